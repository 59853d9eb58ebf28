"""`proxykd collect`: prompts + an OpenAI-compatible endpoint -> the teacher corpus."""

from __future__ import annotations

from proxykd_jax.stages.paths import RunPaths
from proxykd_jax.teacher import client


def run(cfg) -> dict:
    ccfg = cfg.collect
    if not ccfg.out:
        with ccfg.unlocked():
            ccfg.out = str(RunPaths.from_config(cfg).corpus)
    return client.collect(ccfg)
