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


def test_help_and_unknown_stage_name_the_plan_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "\n  plan " in out and "proxykd plan --help" in out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plna"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown stage 'plna'" in err and err.rstrip().endswith(", report, plan.")


@pytest.mark.parametrize(
    "config, expect",
    [
        ("configs/nope.py", ("config file configs/nope.py does not exist", "--config=configs/demo.py")),
        ("configs", ("config file configs is a folder",)),
        (
            "configs/llama.py:foo,bar",
            ("config file configs/llama.py with the argument 'foo,bar' failed", "unknown preset 'foo'", "choose from"),
        ),
        ("configs/demo.py:x", ("config file configs/demo.py takes no argument after ':' (got 'x')",)),
        ("tests/pickled_config.py", ("config file tests/pickled_config.py needs an argument after ':'",)),
        ("{tmp}/broken.py", ("broken.py line 1: invalid syntax", "fix the Python syntax")),
        ("{tmp}/no_function.py", ("defines no get_config() function",)),
        ("tests/pickled_config.py:{tmp}/nope.pkl", ("cannot be loaded (FileNotFoundError", "nope.pkl")),
    ],
    ids=[
        "missing",
        "folder",
        "bad-preset",
        "no-argument-taken",
        "argument-missing",
        "syntax-error",
        "no-get-config",
        "deferred-oserror",
    ],
)
def test_config_file_errors_are_one_sentence(config, expect, tmp_path, monkeypatch, capsys):
    """A missing or broken --config file, or a ':ARG' it cannot take, is one sentence naming the file:
    no traceback (not even folded into the line), nothing created."""
    (tmp_path / "broken.py").write_text("def get_config(:\n    pass\n")
    (tmp_path / "no_function.py").write_text("X = 1\n")
    monkeypatch.chdir(config_lib.__file__.rsplit("/proxykd_jax/", 1)[0])
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prior", f"--config={config.format(tmp=tmp_path)}", f"--config.run.dir={run}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: proxykd prior: config file "), err
    assert "Traceback" not in err and 'File "' not in err, err
    for want in expect:
        assert want in lines[0], f"{want!r} not in {lines[0]!r}"
    assert not run.exists()
