"""`proxykd report` at a tiny size: one setting x two seeds x every variant, the table and PNGs,
resume after `kill -9` of a real process (same table), the specialised teacher and bad input."""

from __future__ import annotations

import pathlib

from proxykd_jax.report import config as report_config
from tests.pipeline_fixtures import tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent


def report_config_for(run_dir, settings="perturbed", seeds="0,1"):
    cfg = tiny_config(run_dir)
    with cfg.unlocked():
        cfg.report = report_config.default_config()
        cfg.report.settings, cfg.report.seeds = settings, seeds
        cfg.report.general_prompts, cfg.report.pretrain_steps, cfg.report.style_words = 24, 4, 8
        cfg.align.sft_steps, cfg.align.rounds = 2, 1
        cfg.train.steps = 4
        cfg.eval.generate_prompts = 4
    return cfg
