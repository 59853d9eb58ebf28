"""Resume after SIGKILL: a distill run killed mid-way and rerun ends with the same parameters as an
uninterrupted run (state and data-iterator position both restored from the checkpoint)."""

import json
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from stage_helpers import run_stage
from test_distill_stage import build_run, final_params, make_config, read_metrics


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("distill_resume"))


KILL_SCRIPT = """
import os, signal, sys, json
sys.path.insert(0, {tests!r})
import test_distill_stage as t
from proxykd_jax import context
from proxykd_jax.stages import distill
cfg = t.make_config({run!r}, **json.loads({overrides!r}))
ctx = context.create(cfg, "distill")
setup = distill.setup(ctx, ctx.artifact("distill"))
step, calls = setup.loop.train_step, [0]
def killing_step(*args):
    calls[0] += 1
    if calls[0] == {kill_at}:  # the save of step 4 waited for step 2's: a finished checkpoint exists
        os.kill(os.getpid(), signal.SIGKILL)
    return step(*args)
setup.loop.train_step = killing_step
setup.train()
"""


def test_resume_after_sigkill_equals_uninterrupted_run(run_dir):
    overrides = {"distill.output": "student_killed", "train.steps": 8}
    script = KILL_SCRIPT.format(
        tests=str(pathlib.Path(__file__).parent), run=str(run_dir), overrides=json.dumps(overrides), kill_at=5
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = run_dir / "student_killed"
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and not (killed / "final").exists()

    assert (run_dir / "proxykd.lock").exists()  # left behind by the killed run: stale, taken over below
    run_stage("distill", make_config(run_dir, **overrides))  # resumes from the newest checkpoint
    run_stage("distill", make_config(run_dir, **{**overrides, "distill.output": "student_straight"}))
    resumed, straight = final_params(killed), final_params(run_dir / "student_straight")
    for name in straight:
        np.testing.assert_allclose(resumed[name], straight[name], atol=1e-5, err_msg=name)
    logged = [m["step"] for m in read_metrics(killed)]
    restarts = [i for i in range(1, len(logged)) if logged[i] <= logged[i - 1]]
    resumed_from = logged[restarts[0]] - 1 if restarts else 4
    assert resumed_from >= 2  # continued from a checkpoint, not from scratch
    assert logged[-(8 - resumed_from) :] == list(range(resumed_from + 1, 9))
