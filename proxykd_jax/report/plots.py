"""The report's PNGs (matplotlib, Agg): ablation bars with error bars, the students' training
curves (SFT vs Proxy-KD), and the proxies' KL through the alignment phases."""

from __future__ import annotations

import pathlib

import numpy as np

from proxykd_jax.report.tables import by_setting, mean_std, phase_order
from proxykd_jax.report.variants import VARIANTS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def ablation(out: pathlib.Path, results: list[dict]) -> pathlib.Path:
    plt = _plt()
    groups = by_setting(results)
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 4.6 * len(groups)), squeeze=False)
    fig.subplots_adjust(hspace=0.6)
    for row, (setting, rows) in enumerate(groups.items()):
        has_kl = any(r.get("kl_to_teacher") is not None for r in rows)  # not with a teacher over other tokens
        panels = (
            ("nats_per_byte", "held-out nats/byte (lower is better"),
            ("kl_to_teacher", "KL to teacher (lower is better")
            if has_kl
            else ("teacher_loglik_per_byte", "teacher log-lik/byte of generations (higher is better"),
        )
        for col, (key, title) in enumerate(panels):
            names = [n for n in VARIANTS if any(r["variant"] == n and r.get(key) is not None for r in rows)]
            stats = [mean_std([r[key] for r in rows if r["variant"] == n]) for n in names]
            ax = axes[row, col]
            if not names:
                continue
            colors = ["tab:gray" if n == "sft" else "tab:green" if n == "white_box" else "tab:blue" for n in names]
            ax.bar(range(len(names)), [m for m, _, _ in stats], yerr=[s for _, s, _ in stats], color=colors, capsize=3)
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
            lo = min(m - s for m, s, _ in stats)
            hi = max(m + s for m, s, _ in stats)
            ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
            ax.set_title(f"{setting}: {title}, mean ± std over seeds)", fontsize=9)
    return _save(fig, out / "ablation.png")


def curves(out: pathlib.Path, results: list[dict]) -> pathlib.Path:
    plt = _plt()
    groups = by_setting(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 3.6), squeeze=False)
    for col, (setting, rows) in enumerate(groups.items()):
        ax = axes[0, col]
        for name, color in (("sft", "tab:gray"), ("proxykd", "tab:blue"), ("white_box", "tab:green")):
            runs = [dict(r["curve"]) for r in rows if r["variant"] == name and r.get("curve")]
            if not runs:
                continue
            steps = sorted(set.intersection(*(set(c) for c in runs)))
            ys = np.asarray([[c[s] for s in steps] for c in runs])
            ax.plot(steps, ys.mean(0), color=color, label=VARIANTS[name].label)
            ax.fill_between(steps, ys.min(0), ys.max(0), color=color, alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_ylabel("NLL/token of the teacher tokens trained on")
        ax.set_title(f"{setting}: student training curves (mean, min-max over seeds)", fontsize=9)
        ax.legend(fontsize=8)
    return _save(fig, out / "curves.png")


def alignment(out: pathlib.Path, estimates: list[dict]) -> pathlib.Path:
    plt = _plt()
    groups = {s: rows for s, rows in by_setting(estimates).items() if any(r["phases"] for r in rows)}
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 3.6), squeeze=False)
    for col, (setting, rows) in enumerate(groups.items()):
        ax = axes[0, col]
        for align, color in (("full", "tab:blue"), ("nll", "tab:orange"), ("sft", "tab:gray")):
            runs = [r["phases"][align] for r in rows if r["phases"].get(align)]  # seeds may have run other alignments
            phases = phase_order(p for run in runs for p in run)
            if not phases:
                continue
            ys = np.asarray([[run.get(p, np.nan) for p in phases] for run in runs], np.float64)
            mean, n = np.nanmean(ys, 0), np.sum(np.isfinite(ys), 0)
            spread = np.sqrt(np.nansum((ys - mean) ** 2, 0) / np.maximum(n - 1, 1))  # sample std, as the tables
            ax.errorbar(
                range(len(phases)),
                mean,
                yerr=spread,
                marker="o",
                color=color,
                label=align,
                capsize=3,
            )
            ax.set_xticks(range(len(phases)), phases)
        ax.set_ylabel("KL(teacher ‖ proxy)/token, held-out")
        ax.set_title(f"{setting}: proxy through the alignment phases", fontsize=9)
        ax.legend(fontsize=8)
    return _save(fig, out / "alignment.png")


PLOTS = ("ablation.png", "curves.png", "alignment.png")


def write_plots(out: pathlib.Path, results: list[dict], estimates: list[dict]) -> list[pathlib.Path]:
    """Draws the plots `results` and `estimates` have data for into `out`; removes the others (an earlier
    report's, which report.md would no longer show). Returns the paths drawn."""
    pngs = []
    if results:
        pngs += [ablation(out, results), curves(out, results)]
    if estimates and any(e["phases"] for e in estimates):
        pngs.append(alignment(out, estimates))
    import matplotlib.pyplot as plt

    plt.close("all")
    for name in set(PLOTS) - {p.name for p in pngs}:
        (out / name).unlink(missing_ok=True)
    return pngs
