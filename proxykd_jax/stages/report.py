"""`proxykd report`: the ablation report over settings, seeds and variants (`report/`): writes
`<run>/report/report.md` and its PNGs; resumes after `kill -9` (each variant's result is written
atomically, every stage below resumes as usual)."""

from __future__ import annotations

from proxykd_jax import stages
from proxykd_jax.report import run_report


def run(ctx) -> list[dict]:
    return run_report(ctx, stages.run_stage)
