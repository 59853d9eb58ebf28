"""The entry point: `proxykd <stage> --help` lists the stage's config fields with their defaults and
one-line comments (every field has one), and bad input exits 2 with one sentence."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proxykd_jax import cli, stages
from proxykd_jax import config as config_lib
from proxykd_jax.context.artifacts import flatten


def test_every_config_field_has_a_comment():
    docs = config_lib.field_docs()
    fields = flatten(config_lib.base_config().to_dict())
    assert [k for k in fields if not docs.get(k)] == []
    assert docs["distill.loss.alpha"].startswith("weight") or "alpha" in docs["distill.loss.alpha"].lower()
    assert docs["run.overwrite"] and docs["align.lora.rank"] and docs["mesh.shape.fsdp"]


@pytest.mark.parametrize("stage", list(stages.STAGES))
def test_stage_help_lists_its_fields(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([stage, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"proxykd {stage}: {stages.STAGES[stage].doc}")
    docs = config_lib.field_docs()
    groups = stages.STAGES[stage].groups or tuple(config_lib.base_config().keys())
    for group in groups:
        assert f"\n  {group}:\n" in out
    if stage == "distill":
        assert "--config.distill.loss.alpha=100.0\n        " + docs["distill.loss.alpha"] in out
        assert "--config.serve" not in out
    if stage == "serve":
        assert "--config.serve.port=8000" in out and "--config.distill" not in out


def test_bad_input_exits_2_with_one_sentence(tmp_path):
    run = [sys.executable, "-m", "proxykd_jax"]
    unknown = subprocess.run(run + ["distil"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown stage 'distil'" in unknown.stderr
    bad = subprocess.run(
        run + ["prior", "--config=configs/demo.py", "--config.prior.no_such_field=1"],
        capture_output=True,
        text=True,
        cwd=config_lib.__file__.rsplit("/proxykd_jax/", 1)[0],
    )
    assert bad.returncode == 2 and "bad config override" in bad.stderr and "Traceback" not in bad.stderr
