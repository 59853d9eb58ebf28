"""`parallel.distributed.PeerWatch`: each process of a multi-process run beats in jax's key-value store, and one
whose peer has gone silent stops in one line (exit 1) instead of hanging until jax's heartbeat check aborts it
with a C++ stack trace. These tests drive the watch's rounds by hand on a shared in-memory store; the two-process
runs are in test_multiprocess_stages.py (`..._while_its_collective_hangs_stops_in_one_line`)."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.parallel import distributed
from proxykd_jax.parallel.distributed import PeerWatch


class Store:
    """jax's DistributedRuntimeClient key-value calls the watch uses, on one dict; `down` makes them fail as
    they do where the coordination service is gone."""

    def __init__(self):
        self.kv, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
        assert allow_overwrite
        self.kv[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
        return [(k, v) for k, v in sorted(self.kv.items()) if k.startswith(prefix)]


def _watches(count=3, timeout_s=4.0):
    store, stopped = Store(), []
    watches = [PeerWatch(store, p, count, timeout_s, "proxykd distill", stop=stopped.append) for p in range(count)]
    return store, watches, stopped


def test_a_peer_silent_for_the_timeout_is_gone_and_beating_peers_are_not():
    _, (w0, w1, w2), _ = _watches()
    for t in (0.0, 1.0, 2.0, 3.5):  # all three beat: nobody is gone
        assert [w.check(t) for w in (w2, w1, w0)] == [None, None, None]
    for t in (4.0, 6.0, 7.4):  # process 2 stops at 3.5 (its last beat); the others go on
        assert w1.check(t) is None and w0.check(t) is None
    why = "process 2 sent no heartbeat for 4 s: mesh.distributed.heartbeat_timeout_s"
    assert w0.check(7.5) == why  # its beat last changed (as process 0 saw it) at 3.5
    assert w1.check(7.6) == why


def test_a_peer_that_exited_through_python_is_not_watched():
    store, (w0, w1, w2), _ = _watches()
    for w in (w0, w1, w2):
        w.check(0.0)
    w2.leave()  # atexit: "done"
    assert store.kv["proxykd/heartbeat/2"] == "done"
    assert w2.check(1.0) is None and store.kv["proxykd/heartbeat/2"] == "done"  # no counter after "done"
    for t in (1.0, 5.0, 50.0):
        assert w0.check(t) is None and w1.check(t) is None


def test_a_peer_that_stopped_for_a_lost_one_stops_the_others_at_once_with_its_reason():
    store, (w0, w1, w2), stopped = _watches()
    for w in (w0, w1, w2):
        w.check(0.0)
    w1.end("process 2 sent no heartbeat for 4 s: mesh.distributed.heartbeat_timeout_s")
    assert stopped == [1]
    assert store.kv["proxykd/heartbeat/1"].startswith("lost:process 2 sent no heartbeat")
    assert w0.check(0.5) == "process 2 sent no heartbeat for 4 s: mesh.distributed.heartbeat_timeout_s"


def test_rounds_that_miss_the_store_start_the_count_over():
    """Where the coordination service cannot be reached, jax's own check decides: a peer is not called silent
    for beats this process could not see."""
    store, (w0, w1), _ = _watches(count=2)
    w0.check(0.0), w1.check(0.0)
    store.down = True
    assert w0.check(3.0) is None and w0.check(6.0) is None
    store.down = False
    assert w0.check(7.0) is None  # process 1 has not beaten since 0.0, but seen again only from now
    assert w0.check(10.9) is None
    assert w0.check(11.0) == "process 1 sent no heartbeat for 4 s: mesh.distributed.heartbeat_timeout_s"


def test_end_says_lost_prints_one_line_and_stops_with_exit_1(capsys):
    store, (w0, w1), stopped = _watches(count=2)
    w1.check(0.0), w0.check(0.0)  # process 0 sees process 1's beat at 0.0: its last one
    assert w0.check(3.9) is None
    assert w0.check(4.0) == "process 1 sent no heartbeat for 4 s: mesh.distributed.heartbeat_timeout_s"
    w0.end(w0.check(4.1))  # process 1 is silent: process 0 has no one to wait for
    assert stopped == [1]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err == (
        "error: proxykd distill: process 0 of 2 lost the others (process 1 sent no heartbeat for 4 s: "
        "mesh.distributed.heartbeat_timeout_s): another process of this run is gone or unreachable, and its own "
        "log says why; once that is fixed, run the same command on every process to resume from the last "
        "checkpoint.\n"
    )
    assert store.kv["proxykd/heartbeat/0"].startswith("lost:")


def test_jax_gets_three_times_the_timeout_and_the_watch_starts(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **k: calls.append(("jax", a, k)))
    monkeypatch.setattr(PeerWatch, "start", classmethod(lambda cls, t, label: calls.append(("watch", t, label))))
    cfg = ml_collections.ConfigDict(
        dict(coordinator_address="h:1", num_processes=2, process_id=0, auto=False, heartbeat_timeout_s=7)
    )
    distributed.maybe_initialize_distributed(cfg, label="proxykd distill")
    assert calls == [("jax", ("h:1", 2, 0), {"heartbeat_timeout_seconds": 21}), ("watch", 7.0, "proxykd distill")]


@pytest.mark.parametrize("timeout_s, interval_s", [(100, 5.0), (4, 0.4), (1, 0.1)])
def test_beats_come_ten_times_per_timeout_at_most_every_5_s(timeout_s, interval_s):
    assert PeerWatch(Store(), 0, 2, timeout_s).interval_s == pytest.approx(interval_s)


def test_a_peer_that_stopped_with_an_error_stops_the_others_after_the_timeout(monkeypatch):
    """A process that stops with an error exits through Python: it says "failed", not "done", so the others,
    where they do not stop with it (the same error everywhere), stop `timeout_s` later naming it, rather than hang
    in a collective it left."""
    store, (w0, w1, w2), _ = _watches()
    for w in (w0, w1, w2):
        w.check(0.0)
    monkeypatch.setattr(distributed, "_watch", w2)
    distributed.failed()  # the CLI's error paths
    w2.leave()  # atexit
    assert store.kv["proxykd/heartbeat/2"] == "failed"
    assert w0.check(1.0) is None and w1.check(1.0) is None and w0.check(4.9) is None
    assert w0.check(5.0) == "process 2 stopped with an error 4 s ago"


@pytest.mark.parametrize(
    "raised, code",
    [(ProxyKDError("bad input"), 2), (FloatingPointError("diverged"), 1), (RuntimeError("a bug"), None)],
)
def test_the_cli_marks_a_process_that_stops_with_an_error(monkeypatch, capsys, raised, code):
    from proxykd_jax import cli

    marked = []
    monkeypatch.setattr(distributed, "failed", marked.append)

    def run_stage(stage, rest):
        raise raised

    monkeypatch.setattr(cli, "_run_stage", run_stage)
    with pytest.raises(SystemExit if code else RuntimeError) as caught:
        cli.main(["distill"])
    assert marked == [code or 1] and (code is None or caught.value.code == code)  # the status it will exit with
    monkeypatch.setattr(cli, "_run_stage", lambda stage, rest: 0)
    marked.clear()
    with pytest.raises(SystemExit):
        cli.main(["distill"])
    assert marked == []  # a finished stage is "done"


_SIGTERM_AFTER_START = """
import os, signal, socket, sys, time
import ml_collections
from proxykd_jax.parallel import distributed

def handler(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)

signal.signal(signal.SIGTERM, handler)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
cfg = ml_collections.ConfigDict(dict(heartbeat_timeout_s=10))
distributed.maybe_initialize_distributed(cfg, plan=distributed.DistributedPlan("explicit", f"127.0.0.1:{port}", 1, 0))
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("still running")
except KeyboardInterrupt as e:
    print("interrupted", e)
"""


def test_sigterm_still_reaches_the_cli_once_jax_distributed_has_started(tmp_path):
    """jax.distributed.initialize starts jax's preemption notifier, which takes SIGTERM over in C++ while Python
    still lists the CLI's handler: kill, scancel and a batch system's time limit were ignored (only SIGKILL
    stopped a multi-process run). The CLI's handler is put back."""
    script = tmp_path / "sigterm.py"
    script.write_text(_SIGTERM_AFTER_START)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.strip().splitlines()[-1] == "interrupted SIGTERM", out.stdout + out.stderr
