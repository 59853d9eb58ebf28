"""The entry point: `proxykd <stage> --help` lists the stage's config fields with their defaults and
one-line comments (every field has one), and bad input exits 2 with one sentence."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest

from proxykd_jax import cli, stages
from proxykd_jax import config as config_lib
from proxykd_jax.context.artifacts import flatten

REPO = pathlib.Path(__file__).resolve().parent.parent


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


def test_help_and_unknown_stage_name_the_plan_and_status_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "\n  plan " in out and "proxykd plan --help" in out and "\n  status " in out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plna"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown stage 'plna'" in err and err.rstrip().endswith(", report, plan, status.")


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


def _main(args: list[str], monkeypatch) -> int:
    """`cli.main(args)` as `python -m proxykd_jax ARGS` runs it (ml_collections also reads sys.argv)."""
    monkeypatch.setattr(sys, "argv", ["proxykd", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    return exit_info.value.code


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--config.run.overwrite", "False"], "got the stray argument 'False'; give every value with '='"),
        (["--", "--config.run.overwrite=True"], "got the stray argument '--config.run.overwrite=True'"),
        (
            ["--config.train.stesp=3"],
            "(--config.train.stesp names no config field (did you mean --config.train.steps?))",
        ),
        (
            ["--noconfig.run.overwrit"],
            "--config.run.overwrit names no config field (did you mean --config.run.overwrite?)",
        ),
        (["--config.run.dir.x=1"], "(--config.run.dir.x names no config field)"),
        (["--config.train.steps=1e3"], "invalid literal for int() with base 10: '1e3');"),
        (["--config.collect.stop=(END,)"], "--config.collect.stop=(END,) is not a tuple: quote each string element"),
        (["--config.align.lora.targets=wq,wv"], "--config.align.lora.targets=wq,wv is not a tuple"),
        (["--config.collect.stop=('END', 'STOP')"], "prepared/manifest.json does not exist"),  # a tuple: accepted
        (["--config.run.dir="], "config.run.dir is empty; set --config.run.dir"),
    ],
    ids=[
        "bool-value-apart",
        "after-double-dash",
        "typo",
        "typo-noflag",
        "under-a-str-field",
        "bad-int",
        "unquoted-tuple",
        "comma-string-for-tuple",
        "quoted-tuple",
        "empty-run-dir",
    ],
)
def test_bad_overrides_are_one_sentence_naming_the_flag(extra, expect, tmp_path, monkeypatch, capsys):
    """An override that would be dropped or misread (a value after a space, a field under a string, an
    unquoted tuple of strings, an empty run.dir meaning the working directory) stops with one sentence
    that names the flag, before anything is written."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run = tmp_path / "run"
    assert _main(["prior", f"--config={REPO}/configs/demo.py", f"--config.run.dir={run}", *extra], monkeypatch) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in err, err
    assert "\\" not in lines[0] and not run.exists() and list(cwd.iterdir()) == []


def test_help_into_a_closed_pipe_is_quiet():
    """`proxykd distill --help | head` : the reader leaves early, and the help ends without a traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "proxykd_jax", "distill", "--help"], stdout=write, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write)
    assert result.returncode == 0 and "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr


_INTERRUPTED_CHILD = """
import sys, time
from proxykd_jax import cli, stages

def run_stage(name, ctx, **kw):  # a stage that runs until it is interrupted
    print("running", flush=True)
    for _ in range(1200):  # Python code between short waits, as a stage runs: a signal the kernel hands to
        time.sleep(0.1)  # another thread (jax's) is handled at the main thread's next bytecode, not in one long sleep

stages.run_stage = run_stage
sys.argv = ["proxykd", *sys.argv[1:]]
cli.main(sys.argv[1:])
"""


def _interrupted_collect(child_code: str, tmp_path, ready: str, signame: str, check_ready=lambda run: None):
    """(status, stdout, stderr, run dir) of `proxykd collect` run by `child_code` and sent `signame` once it
    prints `ready` (SIGINT not ignored, as in a terminal)."""
    prompts, run = tmp_path / "prompts.jsonl", tmp_path / "run"
    prompts.write_text('{"id": "q0", "prompt": "hi"}\n')
    argv = [sys.executable, "-c", child_code, "collect", f"--config={REPO}/configs/demo.py"]
    argv += [f"--config.run.dir={run}", f"--config.collect.prompts={prompts}", "--config.collect.base_url=http://x/v1"]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    with subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as child:
        try:
            assert child.stdout.readline() == ready + "\n"
            check_ready(run)
            child.send_signal(getattr(signal, signame))
            out, err = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
    return child.returncode, out, err, run


@pytest.mark.parametrize("signame, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_stage_says_so_in_one_line_and_releases_the_lock(signame, status, tmp_path):
    """Ctrl-C, and SIGTERM (kill, scancel, a batch system's time limit), stop a stage with one line and the
    shell's status for the signal; the run-directory lock is released (after SIGTERM a job re-queued on
    another host would otherwise find it held)."""

    def locked(run):
        assert (run / "proxykd.lock").exists()

    code, _, err, run = _interrupted_collect(_INTERRUPTED_CHILD, tmp_path, "running", signame, locked)
    assert code == status, err
    assert err.strip().splitlines()[-1] == (
        f"error: proxykd collect: interrupted ({signame}); run the same command again to resume."
    )
    assert "Traceback" not in err and not (run / "proxykd.lock").exists()


_INTERRUPTED_IN_GC_CHILD = """
import gc, sys, threading, time
from proxykd_jax import cli, stages

handled = threading.Event()
handler = cli._raise_interrupt

def seen(signum, frame):  # the CLI's handler, telling the gc callback below that the signal reached it
    handled.set()
    return handler(signum, frame)

cli._raise_interrupt = seen

def run_stage(name, ctx, **kw):
    def callback(phase, info):  # as jax's _xla_gc_callback: Python code the garbage collector runs
        if phase == "start" and not handled.is_set():
            print("in a gc callback", flush=True)
            handled.wait(60)  # the signal arrives here; an exception raised here is printed and dropped
    gc.callbacks.append(callback)
    gc.collect()
    gc.callbacks.remove(callback)
    for _ in range(50):  # the stage's work after the collection
        time.sleep(0.1)
    print("the stage was not interrupted", flush=True)

stages.run_stage = run_stage
cli.main(sys.argv[1:])
"""


def test_an_interrupt_that_arrives_in_a_gc_callback_still_stops_the_stage(tmp_path):
    """Ctrl-C while the garbage collector runs jax's callback (a stage's start-up is full of them): Python prints
    and drops a KeyboardInterrupt raised there, so the stage ran on (a served model kept serving); the signal is
    delivered again once the callback returns."""
    code, out, err, _ = _interrupted_collect(_INTERRUPTED_IN_GC_CHILD, tmp_path, "in a gc callback", "SIGINT")
    assert code == 130 and "not interrupted" not in out, err
    assert err.strip().splitlines()[-1] == (
        "error: proxykd collect: interrupted (SIGINT); run the same command again to resume."
    )
    assert "Exception ignored" not in err and "Traceback" not in err


@pytest.mark.parametrize("signame, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stopped_server_says_it_stopped(signame, status, monkeypatch, capsys):
    """`serve` ends with its signal's status and a line that says the server stopped (not "resume")."""

    def stopped(stage, rest):
        raise KeyboardInterrupt(signame)  # as `teacher.listen.serve` raises after a graceful shutdown

    monkeypatch.setattr(cli, "_run_stage", stopped)
    assert _main(["serve", f"--config={REPO}/configs/demo.py"], monkeypatch) == status
    assert capsys.readouterr().err.strip() == f"error: proxykd serve: interrupted ({signame}); the server stopped."


def test_rope_scaling_can_be_overridden(tmp_path, monkeypatch, capsys):
    """`model.rope_scaling` takes a tuple from the command line (as a list field, ml_collections refused
    every override of it): a malformed one reaches the model config's check, a well-formed one passes it."""
    cfg = [f"--config={REPO}/configs/demo.py", f"--config.run.dir={tmp_path / 'run'}"]
    bad = "--config.model.rope_scaling=('llama3', 8.0)"
    assert _main(["distill", *cfg, bad], monkeypatch) == 2
    assert "model.rope_scaling must be None or ('llama3', factor" in capsys.readouterr().err
    good = "--config.model.rope_scaling=('llama3', 8.0, 1.0, 4.0, 8192)"
    assert _main(["distill", *cfg, good], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "model.rope_scaling" not in err and "prepared/manifest.json does not exist" in err, err
