"""`proxykd choose`: one setting of prior, align, posterior or distill chosen by the students' validation loss
(`choose.py`): a trial run directory per candidate value under `<run>/choose/<field>/`, the stages the field acts on
run there, and `choice.json`; resumes after `kill -9` (every trial's stages resume as usual)."""

from __future__ import annotations

from proxykd_jax import stages
from proxykd_jax.choose import run_choose


def run(ctx) -> dict:
    return run_choose(ctx, stages.run_stage)
