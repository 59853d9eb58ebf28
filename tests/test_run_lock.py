"""The run-directory lock, with real processes: a `collect` holding the run directory makes a second
`collect` on it exit 2 naming the holder's pid and host; after the holder is killed with -9 its
stale lock is taken over with a warning and the corpus ends with every sample exactly once."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import socket
import subprocess
import sys
import threading

import pytest

from proxykd_jax import config as config_lib
from proxykd_jax.context.lock import RunLock, RunLocked
from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.server import make_app

REPO = pathlib.Path(__file__).resolve().parent.parent


class GatedBackend(ToyBackend):
    """A toy teacher whose first call waits for the test: the caller is then certainly mid-stage."""

    def __init__(self):
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def complete(self, prompts, **kw):
        self.started.set()
        self.release.wait(120)
        return super().complete(prompts, **kw)


def _cli(stage: str, cfg, tmp_path: pathlib.Path):
    pkl = tmp_path / "cfg.pkl"
    pkl.write_bytes(pickle.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", "proxykd_jax", stage, f"--config={REPO}/tests/pickled_config.py:{pkl}"]
    return argv, env


def test_second_collect_exits_2_and_a_stale_lock_is_taken_over(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"hi {i}"}) + "\n" for i in range(4)))
    backend = GatedBackend()
    app = make_app(backend)
    with ServerThread(app) as server:
        cfg = config_lib.base_config()
        cfg.run.dir = str(tmp_path / "run")
        cfg.collect.update(
            prompts=str(prompts), base_url=server.base_url, model="toy", max_tokens=8, concurrency=1, progress=False
        )
        argv, env = _cli("collect", cfg, tmp_path)
        holder = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert backend.started.wait(120), "the first collect never reached the teacher"
            second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
            assert second.returncode == 2, second.stderr[-3000:]
            assert f"pid {holder.pid} on this host" in second.stderr and "`collect` runs there" in second.stderr
            assert len(app.state.requests) == 1  # the refused process sent nothing
            lock = json.loads((tmp_path / "run" / "proxykd.lock").read_text())
            assert (lock["pid"], lock["host"], lock["stage"]) == (holder.pid, socket.gethostname(), "collect")
            holder.kill()  # kill -9: the lock stays behind
            holder.wait(30)
        finally:
            if holder.poll() is None:
                holder.kill()
            backend.release.set()
        third = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over a stale lock of `collect`" in third.stderr and f"pid {holder.pid}" in third.stderr
    assert not (tmp_path / "run" / "proxykd.lock").exists()  # released at the end
    corpus = [json.loads(line) for line in (tmp_path / "run" / "corpus" / "teacher.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in corpus) == [f"q{i}" for i in range(4)]
    assert len(app.state.requests) == 4 + 1  # each sample paid once, plus the one the killed run never received


def test_lock_held_on_another_host_names_it(tmp_path):
    path = tmp_path / "proxykd.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "stage": "distill", "since": "then"}))
    with pytest.raises(RunLocked, match=r"`distill` runs there as pid 1 on host elsewhere.*delete .*proxykd.lock"):
        RunLock(path, "prior").acquire()


def test_a_reused_pid_is_not_a_live_holder(tmp_path, caplog):
    path = tmp_path / "proxykd.lock"
    me = os.getpid()  # alive, but started at another time than the lock says: the pid was reused
    path.write_text(json.dumps({"pid": me, "host": socket.gethostname(), "stage": "align", "start_time": "1"}))
    lock = RunLock(path, "prior")
    with caplog.at_level("WARNING"):
        lock.acquire()
    assert "stale lock of `align`" in caplog.text and json.loads(path.read_text())["stage"] == "prior"
    with pytest.raises(RunLocked, match="pid"):  # and now it is held by this live process
        RunLock(path, "eval").acquire()
    lock.release()
    assert not path.exists()
