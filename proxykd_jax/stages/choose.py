"""`proxykd choose`: a posterior or distill setting chosen by the students' validation loss (`choose.py`): one
trial run directory per value under `<run>/choose/<field>/`, its posterior and student made there, and
`choice.json`; resumes after `kill -9` (every trial's stages resume as usual)."""

from __future__ import annotations

from proxykd_jax import stages
from proxykd_jax.choose import run_choose


def run(ctx) -> dict:
    return run_choose(ctx, stages.run_stage)
