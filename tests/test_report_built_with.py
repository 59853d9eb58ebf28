"""A setting's folder keeps its teacher, proxy init, prompts and corpora once written, so a report run
with other settings for them (even with run.overwrite=True) stops with one sentence before any work,
instead of showing the old ones under the new settings."""

from __future__ import annotations

import json

import pytest
from stage_helpers import run_stage

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.report import runner as runner_lib
from tests.pipeline_fixtures import tiny_config


def _cfg(run_dir, **demo):
    cfg = tiny_config(run_dir)
    with cfg.unlocked():
        cfg.report.settings, cfg.report.seeds, cfg.report.variants = "perturbed", "0", "proxykd"
        for key, value in demo.items():
            cfg.demo[key] = value
    return cfg


def test_a_setting_built_with_other_settings_is_refused(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(runner_lib.Runner, "run", lambda self: ran.append(1) or [])  # no stage runs here
    run = tmp_path / "run"
    run_stage("report", _cfg(run))
    run_stage("report", _cfg(run))  # the same settings: reused
    changed = _cfg(run, num_prompts=40, proxy_noise=0.5)
    with changed.unlocked():
        changed.run.overwrite = True
    with pytest.raises(
        ProxyKDError, match=r"demo.num_prompts 48 -> 40; demo.proxy_noise 0.15 -> 0.5.*new --config.run.dir"
    ):
        run_stage("report", changed)
    assert len(ran) == 2
    stamp = json.loads((run / "perturbed" / "built_with.json").read_text())
    assert stamp["demo.num_prompts"] == 48 and stamp["proxy.vocab_size"] == 96 and "report.seeds" not in stamp
    # what only the stages read (each follows its own record) may change
    other = _cfg(run)
    with other.unlocked():
        other.run.overwrite, other.train.steps, other.report.nll_beta = True, 7, 1e-3
    run_stage("report", other)
    assert len(ran) == 3
