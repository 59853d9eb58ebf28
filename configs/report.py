"""The ablation report on the demo's sizes: 2 settings x 3 seeds x 9 variants, about 75 s a variant
on a 2-core CPU (about an hour in all; one setting or one seed with --config.report.settings/seeds):

    proxykd report --config=configs/report.py [--config.report.settings=specialised]

The tiny models leave cores idle: one process per setting, each with its own --config.run.dir,
ran all three settings (chartok included) in 19 minutes on 2 cores (BUILD_NOTES.md, "The demo's
table, and the report re-run at `f3af64b`").

Every field can be overridden (`proxykd report --help`); `report.*` is documented in
proxykd_jax/report/config.py.
"""

import pathlib
import runpy


def get_config():
    cfg = runpy.run_path(str(pathlib.Path(__file__).with_name("demo.py")))["get_config"]()
    with cfg.unlocked():
        cfg.run.dir = "runs/report"
        cfg.demo.num_prompts = 300
        cfg.train.steps = 200
        cfg.train.checkpoint_every = 50
        cfg.train.log_every = 10
        cfg.train.progress = False
        cfg.align.prompts_per_round = 128
        cfg.eval.max_samples = 128
    return cfg.lock()
