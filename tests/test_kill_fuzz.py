"""kill -9 at chosen points: the kept subset of a fuzz that SIGKILLed every stage at random moments and just before
random ones of its file-system writes, resumed it (killing the resumed run again at times) and compared its artifacts
with an uninterrupted run's. Four points showed a defect: a kill while a stage takes the run lock, while orbax removes
a step past `train.keep_checkpoints`, with a store shard written but not in place, and inside the append of an align
phase summary. The others here are kept as guards: mid-checkpoint, a checkpoint or final/ about to be renamed into
place, a pass-1 chunk written but not in place. The same command finishes each with artifacts equal to an
uninterrupted run's, bit for bit, and leaves no temporary file behind.

A killed run is a subprocess that SIGKILLs itself just before the n-th file-system write of a kind (mkdir, open for
writing, rename, replace, link, unlink, rmtree) to a path matching a pattern: a point in the stage's own sequence
of writes, not a moment, so it lands at the same place on a slow machine as on a fast one. The resumed and the
uninterrupted runs are in this process, on one device (as the subprocess's).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from stage_helpers import run_stage

from proxykd_jax.context.lock import RunLock

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
TIMEOUT_S = 300

# Runs `stage` on a pickled config with one device, SIGKILLed at a point: just before the n-th write of kind `op` (any:
# "*") to a path that matches the regular expression `pattern`, or `after` writes (of any kind and path) later
KILLER = r"""
import builtins, io, os, pickle, re, shutil, signal, sys
op, pattern, nth, after, stage, cfg_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:]
seen, left = [0], [None]

def hit(kind, path):
    if left[0] is None and op in ("*", kind) and re.search(pattern, path):
        seen[0] += 1
        left[0] = after if seen[0] == nth else None
    elif left[0] is not None:
        left[0] -= 1
    if left[0] == 0:
        os.kill(os.getpid(), signal.SIGKILL)

def wrap(owner, attr, kind, writes=lambda *a, **k: True):
    real = getattr(owner, attr)
    def wrapped(*a, **k):
        path = a[0] if a else k.get("file", k.get("path", ""))
        if isinstance(path, (str, os.PathLike)) and writes(*a, **k):
            hit(kind, os.fspath(path))
        return real(*a, **k)
    setattr(owner, attr, wrapped)

for attr in ("rename", "replace", "link", "mkdir", "unlink", "rmdir"):
    wrap(os, attr, attr)
wrap(os, "open", "open", lambda path, flags, *a, **k: bool(flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR)))
wrap(shutil, "rmtree", "rmtree")
for owner in (builtins, io):
    wrap(owner, "open", "open", lambda file, mode="r", *a, **k: any(c in str(mode) for c in "wax+"))
from stage_helpers import run_stage
run_stage(stage, pickle.load(open(cfg_path, "rb")))
"""


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), JAX_PLATFORMS="cpu")
    return env


def killed_at(stage: str, cfg, point: tuple, tmp: pathlib.Path) -> None:
    """Runs `proxykd <stage>` on `cfg` in a subprocess, SIGKILLed at `point`, (op, pattern, n[, after]): just before
    its n-th write of kind `op` (mkdir, open, rename, replace, link, unlink, rmdir, rmtree; "*" any) to a path that
    matches `pattern`, or `after` writes later (those inside an rmtree: removals)."""
    pkl = tmp / f"{stage}.cfg.pkl"
    pkl.write_bytes(pickle.dumps(cfg))
    op, pattern, nth, after = (*point, 0)[:4]
    argv = [sys.executable, "-c", KILLER, op, pattern, str(nth), str(after), stage, str(pkl)]
    proc = subprocess.run(argv, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}:\n{proc.stderr[-3000:]}"


def one_device(stage: str, cfg):
    return run_stage(stage, cfg, devices=jax.devices()[:1])


def rows(folder: pathlib.Path) -> list[dict]:
    """metrics.jsonl less its timings (tokens/s and MFU, which no two runs share)."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "mfu")} for x in lines]


# ---------------------------------------------------------------------------------------------------- the run lock

LOCK_KILLER = r"""
import json, os, signal, sys
from proxykd_jax.context.lock import RunLock
point, path = sys.argv[1], sys.argv[2]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if point == "owner_not_written":  # the lock's file created, its owner not yet in it
    json.dump = die
elif point == "owner_written":  # the owner on disk, not yet the lock
    os.link = die
elif point == "linked":  # the lock in place, its temporary name not yet removed
    link = os.link
    os.link = lambda *a, **k: (link(*a, **k), die())
RunLock(path, "prior").acquire()
"""


@pytest.mark.parametrize("point", ["owner_not_written", "owner_written", "linked"])
def test_a_kill_while_taking_the_lock_never_refuses_the_same_command(tmp_path, point):
    """Killed between creating the lock and writing its owner, a run left an empty `proxykd.lock` that every later
    command took for one being written, then refused ("could not take the run-directory lock")."""
    lock_path = tmp_path / "run" / "proxykd.lock"
    argv = [sys.executable, "-c", LOCK_KILLER, point, str(lock_path)]
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    left = lock_path.read_text() if lock_path.exists() else None
    assert left is None or "pid" in json.loads(left or "{}"), f"a lock without its owner was left behind: {left!r}"
    lock = RunLock(lock_path, "prior")
    lock.acquire()  # (a lock left behind is stale: taken over)
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    lock.release()
    assert list(lock_path.parent.iterdir()) == []  # nor the file its owner was written to first


# --------------------------------------------------------------------------------------------------------- distill


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    from test_distill_stage import build_run, make_config

    run = build_run(tmp_path_factory.mktemp("kill_distill"))
    cfg = make_config(run, **{"distill.output": "straight"})
    one_device("distill", cfg)
    return run


@pytest.mark.parametrize(
    "first, second, keep",
    [
        # step 4's checkpoint half written (step 2's finished); then, keeping one checkpoint, the kill inside orbax's
        # removal of step 4 once step 6 is saved: a half-removed step folder, which no later save removes
        (("open", r"4\.orbax-checkpoint-tmp/", 2), ("rmtree", r"checkpoints/4$", 1, 2), 1),
        # step 4's checkpoint whole but not yet renamed into place; then final.tmp whole, the old final/ gone, and
        # final.tmp not yet renamed into its place
        (("rename", r"4\.orbax-checkpoint-tmp$", 1), ("rename", r"final\.tmp$", 1), 3),
    ],
    ids=["mid_checkpoint_then_mid_removal_of_a_step", "checkpoint_rename_then_final_rename"],
)
def test_distill_killed_twice_ends_with_the_uninterrupted_student(distill_run, tmp_path, first, second, keep):
    from test_distill_stage import make_config

    cfg = make_config(distill_run, **{"distill.output": "student", "train.keep_checkpoints": keep})
    out = distill_run / "student"
    try:
        killed_at("distill", cfg, first, tmp_path)
        assert not (out / "final").exists()
        killed_at("distill", cfg, second, tmp_path)  # the resumed run, killed again
        steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
        assert steps == ([4, 6] if keep == 1 else [2, 4, 6])  # (keep 1: the kill left step 4 half removed)
        assert one_device("distill", cfg)["steps"] == 6  # the same command again finishes it
        straight = distill_run / "straight"
        got = load_file(str(out / "final" / "model.safetensors"))
        want = load_file(str(straight / "final" / "model.safetensors"))
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        assert rows(out) == rows(straight)  # each step logged once, as uninterrupted
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [str(s) for s in steps[-keep:]]
        assert [p.name for p in out.iterdir() if "tmp" in p.name] == []
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- posterior


@pytest.fixture(scope="module")
def posterior_run(tmp_path_factory):
    """(config, the uninterrupted run's store folder): a tiny known-teacher run with its prior, and its posterior
    moved aside to posterior_uninterrupted/ (the killed runs write posterior/ again, from the same inputs)."""
    from pipeline_fixtures import build_run

    cfg, _ = build_run(tmp_path_factory.mktemp("kill_posterior") / "run")
    with cfg.unlocked():
        cfg.posterior.proxy = cfg.proxy.init_from
        cfg.data.store.shard_mb = 0.002  # several shards: a resumed pass 2 has finished ones to keep
        cfg.mesh.shape.update(data=1, fsdp=1, tensor=1)
    one_device("prior", cfg)
    one_device("posterior", cfg)
    run = pathlib.Path(cfg.run.dir)
    (run / "posterior").rename(run / "posterior_uninterrupted")
    return cfg, run / "posterior_uninterrupted"


def test_posterior_killed_in_each_pass_ends_with_the_uninterrupted_store(posterior_run, tmp_path):
    """Killed with pass 1's third chunk written but not in place, then (resumed) with the third store shard's data
    and manifest written but the manifest not in place: the same command finishes a store whose every file (names,
    bytes) is the uninterrupted run's; a half-written shard leaves no file behind."""
    cfg, want = posterior_run
    got = pathlib.Path(cfg.run.dir) / "posterior"
    killed_at("posterior", cfg, ("replace", r"pass1\.p0000\.00002\.", 1), tmp_path)
    assert not (got / "estimate.json").exists()
    killed_at("posterior", cfg, ("replace", r"shard-00000-00002\.json", 1), tmp_path)
    assert (got / "estimate.json").exists() and (got / "shard-00000-00002.json.tmp").exists()
    one_device("posterior", cfg)
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    for path in sorted(want.iterdir()):
        if path.name == "artifact.json":  # but when it was written and the input files' stamps (a cache, not hashed)
            a, b = ({**json.loads((f / path.name).read_text()), "updated": 0, "stamps": 0} for f in (want, got))
            assert a == b
        else:
            assert (got / path.name).read_bytes() == path.read_bytes(), path.name


# ----------------------------------------------------------------------------------------------------------- align


def test_a_phase_summary_a_kill_cut_short_is_written_again_whole(tmp_path):
    """A kill inside the write of an align phase summary leaves `proxy/metrics.jsonl` ending in a row without its
    newline; the resumed run glued its summary of that phase to it, so neither was read back and the finished
    artifact's summary lacked the phase. (The state such a kill leaves, written here: no kill lands inside one
    small write(2) on cue.)"""
    from proxykd_jax.align import phases
    from proxykd_jax.train.metrics import MetricsWriter

    init, sft = {"heldout_nll": 2.5, "phase": "init"}, {"heldout_nll": 2.4, "phase": "sft"}
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(init) + "\n" + json.dumps(sft)[:20])
    sink = MetricsWriter(tmp_path, tensorboard=False)  # opened before the phases' sink, as the align stage does
    once = phases.OncePerPhase(sink, tmp_path)
    once.append(init)  # summarised again on resume: not written twice
    once.append(sft)
    sink.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [init, sft]
    assert phases.read_summaries(path) == [init, sft]
