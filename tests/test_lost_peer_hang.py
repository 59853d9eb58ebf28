"""`parallel.distributed.PeerWatch`: each process of a multi-process run beats in jax's key-value store, and one
whose peer has gone silent stops in one line (exit 1) instead of hanging until jax's heartbeat check aborts it
with a C++ stack trace. These tests drive the watch's rounds by hand on a shared in-memory store; the two-process
runs are in test_multiprocess_stages.py (`..._while_its_collective_hangs_stops_in_one_line`)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading

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


# The CLI's lost-peer path: a process whose collective broke because another process is gone (gloo's error on CPU)
_GLOO = "Gloo AllReduce failed: [pair.cc:598] Connection reset by peer [127.0.0.1]:41234\nmore of jax's message"
_BROKE = "'s collective broke mid-step: Gloo AllReduce failed: [pair.cc:598] Connection reset by peer [127.0.0.1]:41234"


class Exited(Exception):
    """`os._exit` in these tests: the process stops here."""


def _exit(code):
    raise Exited(code)


def _collective_breaks(monkeypatch, watch) -> int:
    """`proxykd distill` on `watch`'s process, whose collective breaks mid-step (`lost_peer` reads it as it would
    once jax.distributed has started); the exit status it stops with."""
    from proxykd_jax import cli

    def run_loaded(stage, cfg):
        raise RuntimeError(_GLOO)

    monkeypatch.setattr(cli, "load_config", lambda stage, argv: None)
    monkeypatch.setattr(cli, "_run_loaded", run_loaded)
    monkeypatch.setattr(distributed, "lost_peer", lambda e: str(e).splitlines()[0])
    monkeypatch.setattr(distributed.jax, "process_index", lambda: watch.process)
    monkeypatch.setattr(distributed.jax, "process_count", lambda: watch.count)
    monkeypatch.setattr(distributed, "_watch", watch)
    monkeypatch.setattr(os, "_exit", _exit)
    monkeypatch.setattr(cli.logging, "shutdown", lambda: None)  # (the path without a watch: pytest's logs)
    watch.stop = _exit
    with pytest.raises(Exited) as exited:
        cli.main(["distill"])
    return exited.value.args[0]


def _cli_line(p, count=3):
    return (
        f"error: proxykd distill: process {p} of {count} lost the others mid-step (Gloo AllReduce failed: [pair.cc:598]"
        " Connection reset by peer [127.0.0.1]:41234): another process of this run stopped, and its own log says why;"
        " once that is fixed, run the same command on every process to resume from the last checkpoint.\n"
    )


def test_a_process_whose_collective_broke_says_lost_and_prints_the_clis_line(monkeypatch, capsys):
    """Process 2 is killed; process 1's collective breaks: it said nothing in the store, so the others waited
    `heartbeat_timeout_s` and then named the wrong process (process 1, silent since). It now says "lost:<why>" (its
    last act, after its one line, as `PeerWatch.end`)."""
    store, (w0, w1, w2), stopped = _watches()
    for w in (w0, w1, w2):
        w.check(0.0)
    assert _collective_breaks(monkeypatch, w1) == 1
    assert capsys.readouterr().err == _cli_line(1)  # the CLI's line, once
    assert store.kv["proxykd/heartbeat/1"] == "lost:process 1" + _BROKE
    assert stopped == []


def test_the_others_stop_at_once_naming_the_broken_collective(monkeypatch, capsys):
    """After process 1 took the lost-peer path, process 0 and process 2 (stuck in a collective that hangs, say)
    stop at their next round, their line naming process 1's broken collective, not a silent process."""
    store, (w0, w1, w2), stopped = _watches()
    for w in (w0, w1, w2):
        w.check(0.0)
    _collective_breaks(monkeypatch, w1)
    capsys.readouterr()
    why = "process 1" + _BROKE
    assert w2.check(0.5) == why and w0.check(0.5) == why  # at once, not timeout_s (4 s) later
    w2.end(why)
    assert stopped == [1] and capsys.readouterr().err == (
        f"error: proxykd distill: process 2 of 3 lost the others ({why}): another process of this run is gone or "
        "unreachable, and its own log says why; once that is fixed, run the same command on every process to resume "
        "from the last checkpoint.\n"
    )


def test_process_0_on_the_lost_peer_path_says_lost_first_and_waits_for_the_others(monkeypatch, capsys):
    """Process 2 is killed; process 0's collective breaks while process 1 still runs. Process 0 went at once and
    took jax's coordination service with it: process 1 aborted with jax's C++ stack trace. Now process 0 says
    "lost" first and waits (two beats at most, as `PeerWatch.end`) for process 1 to read it and go."""
    store, (w0, w1, w2), stopped = _watches()
    for w in (w0, w1, w2):
        w.check(0.0)
    clock, order = [1.0], []

    def sleep(seconds):  # process 0 waits a quarter beat at a time; every beat, process 1's watch runs a round
        clock[0] += seconds
        order.append(("process 1 sees", store.kv["proxykd/heartbeat/0"][:5]))
        if len(order) % 4 == 0 and (why := w1.check(clock[0])) is not None:
            w1.end(why)
            order.append(("process 1 stopped", stopped[-1]))

    monkeypatch.setattr(
        distributed.PeerWatch, "end", functools.partialmethod(PeerWatch.end, clock=lambda: clock[0], sleep=sleep)
    )
    assert _collective_breaks(monkeypatch, w0) == 1
    assert order[0] == ("process 1 sees", "lost:") and ("process 1 stopped", 1) in order
    assert clock[0] == pytest.approx(1.0 + 2 * w0.interval_s + w0.interval_s / 2)  # two beats for process 2, dead
    err = capsys.readouterr().err.splitlines(keepends=True)
    assert err[-1] == _cli_line(0) and err[0].startswith(
        "error: proxykd distill: process 1 of 3 lost the others (process 0" + _BROKE
    )
    assert store.kv["proxykd/heartbeat/0"] == "lost:process 0" + _BROKE


def test_a_signal_while_process_0_waits_for_the_others_does_not_cut_the_wait_short(monkeypatch, capsys):
    """SIGTERM (a batch system stopping the job) and Ctrl-C while process 0 waits for the others on the lost-peer
    path: the CLI's handler raised KeyboardInterrupt out of the wait (no line, a traceback, and at exit jax's
    shutdown barrier waiting for the lost process). They are ignored there: the wait (two beats at most) goes on,
    and process 0 stops with its line and exit 1."""
    store, (w0, w1, w2), stopped = _watches()
    for w in (w0, w1, w2):
        w.check(0.0)
    clock, sent = [1.0], []

    def sleep(seconds):  # in the first quarter beat both signals arrive
        clock[0] += seconds
        if not sent:
            sent.append(True)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(
        distributed.PeerWatch, "end", functools.partialmethod(PeerWatch.end, clock=lambda: clock[0], sleep=sleep)
    )
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    try:
        code = _collective_breaks(monkeypatch, w0)
    except KeyboardInterrupt as e:  # (caught: one escaping would stop the whole test session)
        pytest.fail(f"a signal cut process 0's wait short: KeyboardInterrupt({e})")
    assert code == 1 and capsys.readouterr().err == _cli_line(0)
    assert clock[0] >= 1.0 + 2 * w0.interval_s - 1e-9  # the whole wait: processes 1 and 2 never said "lost"
    assert store.kv["proxykd/heartbeat/0"] == "lost:process 0" + _BROKE
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # the CLI's restored


def test_without_a_watch_the_lost_peer_path_is_the_clis_own(monkeypatch, capsys):
    """One process, or a jax without the key-value store: `lost` returns and prints nothing (the CLI prints its
    line and exits 1 as before)."""
    monkeypatch.setattr(distributed, "_watch", None)
    assert distributed.lost("process 1" + _BROKE, _cli_line(1)) is None
    assert capsys.readouterr().err == ""


def test_a_second_end_waits_for_the_first_to_stop_the_process(capsys):
    """Process 0's watch ends the run (another process said "lost") and is waiting for the others when its own
    collective breaks: the CLI's lost-peer path must not stop process 0 before the watch's wait is over (it went
    at once, and jax aborted the others still connected)."""
    store, (w0, w1), _ = _watches(count=2)
    waiting, release, order = threading.Event(), threading.Event(), []
    w0.stop = lambda code: order.append(("the watch stops it", code))

    def sleep(seconds):
        waiting.set()
        release.wait(10)

    first = threading.Thread(target=w0.end, args=("process 1 sent no heartbeat",), kwargs=dict(sleep=sleep))
    first.start()
    assert waiting.wait(10)
    threading.Timer(0.3, release.set).start()
    w0.end("process 0" + _BROKE, line=_cli_line(0, 2))  # the main thread: waits for the first, prints nothing
    order.append("the second end returns")
    first.join(10)
    assert order == [("the watch stops it", 1), "the second end returns"]
    assert capsys.readouterr().err.count("\n") == 1
