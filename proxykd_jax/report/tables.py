"""The report's Markdown: per setting, the variants' scores as mean ± std over seeds, the gain of
each part, the estimators' KL and the empirical-Bayes fit."""

from __future__ import annotations

import numpy as np

from proxykd_jax.report.variants import VARIANTS

METRICS = (
    ("nats_per_byte", "held-out nats/byte ↓"),
    ("kl_to_teacher", "KL(teacher ‖ student)/token ↓"),
    ("teacher_loglik_per_byte", "teacher log-lik/byte of generations ↑"),
)


def mean_std(values) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not v.size:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def _cell(values, digits=4) -> str:
    m, s, n = mean_std(values)
    return "-" if not n else f"{m:.{digits}f} ± {s:.{digits}f}"


def _metric_cell(rows: list[dict], key: str) -> str:
    """mean ± std of `key` over `rows`, or "n/a (why)" where every row says the metric does not apply."""
    reasons = {(r.get("na") or {}).get(key) for r in rows}
    if rows and None not in reasons:
        return "n/a (" + "; ".join(sorted(reasons)) + ")"
    return _cell([r.get(key) for r in rows])


def by_setting(results: list[dict]) -> dict:
    """{setting: its results}, settings in the registry's order (the default first)."""
    from proxykd_jax.report.settings import SETTINGS

    out = {}
    for r in results:
        out.setdefault(r["setting"], []).append(r)
    order = list(SETTINGS)
    return dict(sorted(out.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


def _paired_delta(rows: list[dict], name: str, base: str, key: str) -> list[float]:
    """Per-seed differences variant - base (paired by seed)."""
    a = {r["seed"]: r[key] for r in rows if r["variant"] == name and r.get(key) is not None}
    b = {r["seed"]: r[key] for r in rows if r["variant"] == base and r.get(key) is not None}
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def _kept_steps(rows: list[dict]) -> str:
    """The students' kept steps (`distill.keep_best`) in seed order, "-" for one that kept its last step."""
    return ", ".join(str(r.get("best_step", "-")) for r in sorted(rows, key=lambda r: r["seed"]))


def variant_table(rows: list[dict]) -> str:
    """One row per variant: its seeds, each metric's mean ± std, the paired gains; with a column of the students'
    kept steps (by seed) where any was chosen by `distill.keep_best`."""
    names = [n for n in VARIANTS if any(r["variant"] == n for r in rows)]
    kept = any("best_step" in r for r in rows)
    head = (
        "| variant | seeds | "
        + ("kept step (by seed) | " if kept else "")
        + " | ".join(t for _, t in METRICS)
        + " | Δ nats/byte vs SFT | Δ nats/byte vs Proxy-KD |"
    )
    lines = [head, "|---" * (len(METRICS) + 4 + kept) + "|"]
    for n in names:
        mine = [r for r in rows if r["variant"] == n]
        cells = ([_kept_steps(mine)] if kept else []) + [_metric_cell(mine, k) for k, _ in METRICS]
        d_sft = _cell(_paired_delta(rows, n, "sft", "nats_per_byte")) if n != "sft" else ""
        d_kd = _cell(_paired_delta(rows, n, "proxykd", "nats_per_byte")) if n != "proxykd" else ""
        lines.append(f"| {VARIANTS[n].label} | {len(mine)} | " + " | ".join(cells) + f" | {d_sft} | {d_kd} |")
    return "\n".join(lines)


def estimate_table(estimates: list[dict]) -> str:
    names = []
    for e in estimates:
        names += [k for k in e["estimator_kl"] if k != "positions" and k not in names]
    lines = ["| estimate of the teacher | KL(teacher ‖ estimate)/token, distillation split |", "|---|---|"]
    lines += [f"| {n} | {_cell([e['estimator_kl'].get(n) for e in estimates])} |" for n in names]
    return "\n".join(lines)


def proxy_bytes_table(estimates: list[dict]) -> str:
    """Each proxy's nats/byte of held-out teacher text (a teacher over other tokens: no KL)."""
    names = []
    for e in estimates:
        names += [k for k in e.get("proxy_nats_per_byte", {}) if k not in names]
    lines = ["| proxy | held-out nats/byte ↓ |", "|---|---|"]
    lines += [f"| {n} | {_cell([e['proxy_nats_per_byte'].get(n) for e in estimates])} |" for n in names]
    return "\n".join(lines)


def eb_lines(estimates: list[dict]) -> str:
    out = []
    for e in sorted(estimates, key=lambda e: e["seed"]):
        eb = e["eb"]
        ll = eb.get("heldout_loglik") or {}
        search = "; ".join(eb.get("eb_search") or []) or "optimum inside the grids"
        out.append(
            f"- seed {e['seed']}: κ = {eb['kappa']:.4g}, N_max = {eb['n_max']:.4g} (held-out log-lik/token: "
            f"posterior {ll.get('posterior', float('nan')):.4f}, prior {ll.get('prior', float('nan')):.4f}, "
            f"proxy {ll.get('proxy', float('nan')):.4f}; search: {search})"
        )
    return "\n".join(out)


def phase_order(names) -> list[str]:
    """Alignment phases in the order they ran: init, sft, round_000, round_001, ..."""
    rank = {"init": 0, "sft": 1}
    return sorted(set(names), key=lambda p: (rank.get(p, 2), p))


def phase_table(estimates: list[dict]) -> str:
    aligns = sorted({a for e in estimates for a in e["phases"]})
    phases = phase_order(p for e in estimates for a in aligns for p in e["phases"].get(a, {}))
    lines = ["| alignment | " + " | ".join(phases) + " |", "|---" * (len(phases) + 1) + "|"]
    for a in aligns:
        cells = [_cell([e["phases"].get(a, {}).get(p) for e in estimates]) for p in phases]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kept_note(cfg) -> str:
    """The header's words on `distill.keep_best` (empty without it)."""
    if not cfg.distill.get("keep_best", False):
        return ""
    return (
        f", each student kept at the step of its lowest NLL on the {cfg.distill.eval_split} split's teacher responses "
        f"(scored every {cfg.train.eval_every})"
    )


def report_markdown(cfg, results: list[dict], estimates: list[dict], left_out: str | None = None) -> str:
    """The report of `results` and `estimates` (this run's plan); `left_out`: a line on the results on disk
    outside it, said under the introduction."""
    from proxykd_jax.report.settings import SETTINGS

    parts = [
        "# Proxy-KD ablation report",
        "",
        f"Mean ± std (sample std) over seeds; Δ columns are paired by seed (variant − reference; "
        f"negative = fewer nats/byte = better). Student: d_model {cfg.model.d_model}, {cfg.model.num_layers} "
        f"layers, {cfg.train.steps} steps{_kept_note(cfg)}; {cfg.demo.num_prompts} prompts × "
        f"{cfg.demo.samples_per_prompt} teacher responses per seed.",
    ]
    if left_out:
        parts += ["", left_out]
    est_by = by_setting(estimates)
    for setting, rows in by_setting(results).items():
        est = est_by.get(setting, [])
        parts += ["", f"## Setting: {setting}", "", SETTINGS[setting].doc if setting in SETTINGS else "", ""]
        parts += [variant_table(rows)]
        na = est[0].get("na", {}) if est else {}
        if est and na:
            parts += [
                "",
                f"KL(teacher ‖ estimate) of the prior, proxies and posterior: n/a ({na['estimator_kl']}); "
                f"KL(teacher ‖ proxy) through the alignment phases: n/a ({na['phases']}). The proxies per byte "
                "of held-out teacher text instead:",
                "",
                proxy_bytes_table(est),
                "",
                "Empirical Bayes (full posterior):",
                "",
                eb_lines(est),
            ]
        elif est:
            parts += [
                "",
                estimate_table(est),
                "",
                "KL(teacher ‖ proxy) on held-out responses after each alignment phase:",
                "",
            ]
            parts += [phase_table(est), "", "Empirical Bayes (full posterior):", "", eb_lines(est)]
    return "\n".join(parts) + "\n"
