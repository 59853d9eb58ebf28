"""Resume after `kill -9`: the align stage killed mid-round and re-run with the same command ends
with the same aligned proxy as an uninterrupted run (to 1e-5).

The killed and resumed runs are subprocesses on one CPU device (`python tests/test_align_resume.py
<run dir>` runs the stage on the config of test_align_stage.py); the uninterrupted run is in this
process, on a 1-device mesh.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from stage_helpers import run_stage  # noqa: E402
from test_align_stage import build_prepared, final_params, make_config, new_run  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


def stage_config(run_dir):
    cfg = make_config(run_dir, rounds=2, dpo_steps_per_round=4)
    cfg.mesh.shape.update(data=1, fsdp=1, tensor=1)
    return cfg


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device
    env.update(
        PYTHONPATH=str(REPO),  # the checkout under test (a script's own folder is tests/, not the repository)
        JAX_PLATFORMS="cpu",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def _command(run: pathlib.Path) -> list[str]:
    return [sys.executable, str(pathlib.Path(__file__).resolve()), str(run)]


def _finished_steps(checkpoints: pathlib.Path) -> list[int]:
    """Steps of finished orbax checkpoints (a step folder is renamed into place when complete)."""
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def _tail(path: pathlib.Path) -> str:
    return path.read_text()[-3000:] if path.exists() else ""


def test_kill9_mid_round_then_rerun_matches_uninterrupted(tmp_path):
    import jax

    (tmp_path / "data").mkdir()
    prepared = build_prepared(tmp_path / "data")
    run = new_run(prepared, tmp_path / "killed")
    log_path = tmp_path / "killed.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(_command(run), env=_env(), cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        # kill -9 as soon as round 0 has its first checkpoint (SFT done, reference and pairs saved). (The
        # uninterrupted run once ran here, beside it: with a warm compilation cache the killed run then finished
        # before this process looked for the checkpoint.)
        checkpoints = run / "proxy" / "round_000" / "checkpoints"
        deadline = time.monotonic() + TIMEOUT_S
        while not _finished_steps(checkpoints):
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                assert time.monotonic() < deadline, "no round-0 checkpoint in time:\n" + _tail(log_path)
                continue
            raise AssertionError(
                f"the align run ended (rc {proc.returncode}) before round 0 checkpointed:\n" + _tail(log_path)
            )
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (run / "proxy" / "final").exists()
    assert not (run / "proxy" / "round_001" / "DONE").exists()
    reference = new_run(prepared, tmp_path / "uninterrupted")  # the uninterrupted run, in this process
    summaries = run_stage("align", stage_config(reference), devices=jax.devices()[:1])
    assert set(summaries) == {"init", "sft", "round_000", "round_001"}
    # the same command again resumes (SFT restored from its marker, round 0 from its checkpoint)
    done = subprocess.run(_command(run), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from step" in done.stdout + done.stderr
    resumed, want = final_params(run), final_params(reference)
    assert sorted(resumed) == sorted(want)
    for key in want:
        np.testing.assert_allclose(resumed[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)


if __name__ == "__main__":
    import logging

    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_stage("align", stage_config(pathlib.Path(sys.argv[1])))
