"""The report with `distill.keep_best`: each student's kept step in the variants' table (by seed) and the header's
words on how it was chosen, as its distill artifact recorded it; without keep_best the table is as before."""

from __future__ import annotations

import json
import math

from stage_helpers import run_stage
from test_report import small

from proxykd_jax.report import tables

OLD_HEAD = (
    "| variant | seeds | held-out nats/byte ↓ | KL(teacher ‖ student)/token ↓ | teacher log-lik/byte of generations ↑ "
    "| Δ nats/byte vs SFT | Δ nats/byte vs Proxy-KD |"
)


def rows(kept=None) -> list[dict]:
    out = []
    for seed in (2, 0, 1):  # out of order: the column lists them by seed
        for i, variant in enumerate(("sft", "proxykd")):
            r = {"setting": "perturbed", "seed": seed, "variant": variant, "nats_per_byte": 1.0 + 0.1 * seed - i}
            r |= {"kl_to_teacher": 2.0 + seed, "teacher_loglik_per_byte": -2.0 - seed}
            if kept is not None and (variant, seed) in kept:
                r["best_step"] = kept[variant, seed]
            out.append(r)
    return out


def test_without_kept_steps_the_table_is_as_before():
    table = tables.variant_table(rows()).splitlines()
    assert table[0] == OLD_HEAD and table[1] == "|---" * 7 + "|"
    assert all(line.count("|") == 8 for line in table)


def test_kept_steps_are_listed_by_seed_and_a_student_without_one_shows_a_dash():
    kept = {("sft", 0): 125, ("sft", 1): 150, ("sft", 2): 100, ("proxykd", 0): 250, ("proxykd", 2): 275}
    table = tables.variant_table(rows(kept)).splitlines()
    assert table[0] == OLD_HEAD.replace("| seeds |", "| seeds | kept step (by seed) |")
    assert table[1] == "|---" * 8 + "|" and all(line.count("|") == 9 for line in table)
    cells = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in table[2:]}
    assert cells == {"SFT student (alpha = 0)": "125, 150, 100", "Proxy-KD (full)": "250, -, 275"}


def test_a_report_with_keep_best_lists_the_steps_its_students_kept(tmp_path):
    cfg = small(tmp_path / "run")
    with cfg.unlocked():
        cfg.train.steps, cfg.train.eval_every, cfg.distill.keep_best, cfg.distill.eval_split = 4, 1, True, "align"
    run_stage("report", cfg)
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert (
        "each student kept at the step of its lowest NLL on the align split's teacher responses (scored every 1)" in md
    )
    want = {}
    for variant in ("sft", "proxykd", "prior_only"):
        (folder,) = (tmp_path / "run" / "perturbed" / "seed0").glob(f"*/{variant}")
        evals = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        losses = {r["step"]: r["eval_loss"] for r in evals if "eval_loss" in r}
        assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
        best = min(losses, key=lambda s: (losses[s], s))
        assert json.loads((folder / "artifact.json").read_text())["summary"]["best_step"] == best
        want[variant] = str(best)
    labels = {
        "sft": "SFT student (alpha = 0)",
        "proxykd": "Proxy-KD (full)",
        "prior_only": "prior-only soft labels (N_max = 0)",
    }
    table = [line.split("|") for line in md.splitlines() if line.startswith("| ")]
    got = {cells[1].strip(): cells[3].strip() for cells in table if cells[1].strip() in labels.values()}
    assert got == {labels[v]: s for v, s in want.items()}
