"""Multi-process start-up: `jax.distributed` from config, environment, SLURM or a TPU pod slice.

Order of precedence (the `mesh.distributed` config group):
1. an explicit coordinator: `coordinator_address` / `num_processes` / `process_id` from config,
   each falling back to env JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID;
2. with `auto`, a SLURM job step of several tasks (SLURM_JOB_ID and SLURM_NTASKS > 1) or a
   multi-host TPU slice: `jax.distributed.initialize()` with no arguments, which reads the cluster
   from the environment. A slice is recognised as jax recognises it: on GKE by the worker list in
   TPU_PROCESS_ADDRESSES or TPU_WORKER_HOSTNAMES, on a Cloud TPU VM (where no variable names the
   workers) by the VM metadata's `worker-network-endpoints`, asked only where libtpu is installed
   (and not for a stage that runs as one process: the metadata says what the machine is, not how the
   command was started);
3. otherwise a single process: nothing to start.

A started run is watched (`PeerWatch`): where another process of it goes silent, this one stops in one line
instead of hanging in its collective until jax's heartbeat check aborts it with a C++ stack trace.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping

import jax

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    """What `maybe_initialize_distributed` will do: mode is explicit, slurm, tpu or single."""

    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def several(self) -> bool:
        """Whether this starts more than one process (known before anything starts)."""
        return self.mode in ("slurm", "tpu") or (self.mode == "explicit" and (self.num_processes or 1) > 1)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer.") from None


_METADATA = "http://{ip}/computeMetadata/v1/instance/attributes/worker-network-endpoints"


def tpu_vm_workers(env: Mapping[str, str]) -> list[str]:
    """The hosts of this Cloud TPU VM's slice from its metadata server; [] off a TPU VM.

    Asked only where libtpu is installed (a CPU or GPU machine never waits on the network here) and
    not where TPU_SKIP_MDS_QUERY is set (jax's own switch for "not a GCE TPU")."""
    if env.get("TPU_SKIP_MDS_QUERY") is not None or importlib.util.find_spec("libtpu") is None:
        return []
    url = _METADATA.format(ip=env.get("GCE_METADATA_IP", "metadata.google.internal"))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Metadata-Flavor": "Google"}), timeout=5) as r:
            text = r.read().decode()
    except OSError:  # no metadata server: a TPU machine outside Google Cloud
        return []
    return [w for w in text.split(",") if w.strip()]


def no_tpu_workers(env: Mapping[str, str]) -> list[str]:
    """`tpu_workers` that never asks the metadata server (for stages that run as one process)."""
    del env
    return []


def resolve_distributed(
    dist_cfg,
    env: Mapping[str, str] | None = None,
    tpu_workers: Callable[[Mapping[str, str]], list[str]] = tpu_vm_workers,
) -> DistributedPlan:
    """Decides how to start from `dist_cfg` (the mesh.distributed group) and `env` (default os.environ);
    `tpu_workers` asks a Cloud TPU VM for its slice's hosts (replaced in tests)."""
    env = os.environ if env is None else env
    address = dist_cfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
    num = dist_cfg.num_processes if dist_cfg.num_processes > 0 else _env_int(env, "JAX_NUM_PROCESSES")
    pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else _env_int(env, "JAX_PROCESS_ID")
    if address:
        if num is None or pid is None:
            raise ValueError(
                f"coordinator {address} is set but num_processes/process_id are not; set "
                "mesh.distributed.num_processes and .process_id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)."
            )
        if not 0 <= pid < num:
            raise ValueError(f"mesh.distributed.process_id={pid} must be in [0, num_processes={num}).")
        return DistributedPlan("explicit", address, num, pid)
    if num is not None or pid is not None:
        raise ValueError(
            "num_processes/process_id are set without a coordinator; set mesh.distributed.coordinator_address "
            "(or JAX_COORDINATOR_ADDRESS) to host:port of process 0."
        )
    if dist_cfg.auto:
        if env.get("SLURM_JOB_ID") and (_env_int(env, "SLURM_NTASKS") or 1) > 1:
            return DistributedPlan("slurm")
        listed = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")  # GKE, in jax's order
        hosts = [h for h in listed.split(",") if h.strip()] if listed is not None else tpu_workers(env)
        if len(hosts) > 1:
            return DistributedPlan("tpu")
    return DistributedPlan("single")


def maybe_initialize_distributed(
    dist_cfg, env: Mapping[str, str] | None = None, plan: DistributedPlan | None = None, label: str = "proxykd"
) -> DistributedPlan:
    """Starts `jax.distributed` as `plan` says (default: as `resolve_distributed` decides; once) and a
    `PeerWatch` on it (`label`, e.g. "proxykd distill", begins its line), then logs the devices."""
    plan = resolve_distributed(dist_cfg, env) if plan is None else plan
    if plan.mode != "single" and not jax.distributed.is_initialized():
        timeout_s = float(dist_cfg.get("heartbeat_timeout_s", 100))
        # jax's own check, the fallback, well behind the watch's (which ends a run by 1.1x the timeout)
        heartbeat = {"heartbeat_timeout_seconds": max(3, round(3 * timeout_s))}
        on_term = signal.getsignal(signal.SIGTERM)
        if plan.mode == "explicit":
            jax.distributed.initialize(plan.coordinator_address, plan.num_processes, plan.process_id, **heartbeat)
        else:
            jax.distributed.initialize(**heartbeat)
        if callable(on_term) and threading.current_thread() is threading.main_thread():
            # jax's preemption notifier takes SIGTERM over in C++ (Python still lists the old handler): kill,
            # scancel and a batch system's time limit were ignored; nothing here uses its preemption sync points
            signal.signal(signal.SIGTERM, on_term)
        PeerWatch.start(timeout_s, label)
    log.info(
        "jax %s: process %d of %d, %d local / %d global devices (%s), start-up mode %s",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
        plan.mode,
    )
    return plan


# What a broken collective or jax's coordination service says where another process of the run is gone: gloo's
# socket errors (CPU), NCCL's (GPU), the heartbeat check's.
_PEER_LOST = re.compile(
    r"connection (?:reset|closed) by peer|heartbeat timeout|tasks are unhealthy|remote process exited|"
    r"gloo \S+ failed",
    re.IGNORECASE,
)


def lost_peer(err: BaseException) -> str | None:
    """The first line of `err` where it says that another process of this multi-process run is gone (a
    collective broke mid-step), else None (one process, or another error)."""
    if not jax.distributed.is_initialized() or jax.process_count() < 2 or not _PEER_LOST.search(str(err)):
        return None
    return str(err).strip().splitlines()[0][:300]


# Where jax's key-value store keeps each process's beat: a counter, "done" once it exits through Python, "lost:<why>"
# once it stops because another process went silent (why: which one).
_BEATS = "proxykd/heartbeat/"


class PeerWatch:
    """Stops this process in one line (exit 1) where another process of the run has gone silent.

    Why: where a process is killed and the others' collective hangs instead of breaking (several devices per
    process on CPU, NCCL on GPU), jax's coordination service notices the missing heartbeats after its timeout
    and its missed-heartbeat callback aborts every other process with LOG(FATAL) and a C++ stack trace (exit
    134); the CLI's one-line lost-peer path never runs. jaxlib's `get_distributed_runtime_client` takes a
    `missed_heartbeat_callback`, but (jaxlib 0.10.2) it calls a Python callable with an `absl::Status` that
    nanobind cannot convert: std::bad_cast, std::terminate, the same exit 134, the callable never runs. So the
    processes beat here: a daemon thread writes a counter to jax's key-value store every `interval_s` and reads
    the others'; where one's counter has not moved for `timeout_s` (seen from here), that process is gone, and
    this one prints its line and ends at once (os._exit: its main thread is stuck in the collective). jax's own
    check gets three times the timeout: the fallback where this thread cannot run (the GIL held that long).

    A process that stops through Python leaves (`leave`): "done" at exit, or "failed" as soon as the CLI knows it
    stops with an error (`failed`). The others no longer watch a "done" one; a "failed" one they stop
    `timeout_s` later with a line naming it (stuck in a collective it left), unless they stop too (the same error
    everywhere: every process then meets the others at jax's shutdown barrier and exits with its own status). A
    process that has left beats no more, but its thread goes on while it waits at that barrier: where another
    process says "lost" (it will never come), this one exits at once with its own status and no second line (its
    error is printed already, or it finished), instead of aborting with a C++ stack trace when the barrier fails
    or process 0 goes. Process 0 exits last: jax's coordination service lives in it, and every process still
    connected aborts at once without it; so where it stops, it says "lost" first and waits (two beats at most)
    for the others, which say "lost" just before they go. Where process 0 itself dies, jax aborts the others at
    once, before anything here can run. The run-directory lock is left to the next run, which takes it over as
    stale (its pid is gone). A process whose collective broke mid-step (the CLI's lost-peer path, `lost`) ends
    the same way, with the CLI's line.
    """

    def __init__(self, client, process: int, count: int, timeout_s: float, label: str = "proxykd", stop=os._exit):
        self.client, self.process, self.count, self.label, self.stop = client, process, count, label, stop
        self.timeout_s, self.interval_s = timeout_s, min(timeout_s / 10, 5.0)
        self.beats, self.code = 0, 0  # code: the exit status it leaves with (`leave`)
        self.left = self.ended = False  # it said "done" or "failed" (`leave`); it is stopping (`end`)
        self.seen: dict[int, tuple[str, float]] = {}  # process -> (its value, when it last changed as seen here)
        self._lock = threading.Lock()  # one write at a time: no counter after "done", one `leave` or `end`
        self._closing = threading.Event()  # jax's shutdown barrier is passed: the thread stops (`finish`)
        self._done = threading.Event()  # `end` has stopped the process (seen only where `stop` returns: tests)
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, timeout_s: float, label: str) -> PeerWatch | None:
        """Watches the run jax.distributed has just started (None: one process, or a jax without the store)."""
        from jax._src import distributed as jax_distributed  # the client: no public handle on it

        client = getattr(jax_distributed.global_state, "client", None)
        store = all(hasattr(client, m) for m in ("key_value_set", "key_value_dir_get"))
        if jax.process_count() < 2 or not store:  # a jax without the store: its own check alone, as before
            return None
        global _watch
        watch = _watch = cls(client, jax.process_index(), jax.process_count(), timeout_s, label)
        watch.write(str(watch.beats))
        atexit.register(watch.finish)  # (before jax's own exit hook, registered when jax was imported)
        watch._thread = threading.Thread(target=watch.run, name="proxykd-peer-watch", daemon=True)
        watch._thread.start()
        return watch

    def _set(self, value: str) -> bool:
        try:
            self.client.key_value_set(f"{_BEATS}{self.process}", value, allow_overwrite=True)
        except Exception:  # the coordination service is gone: jax's own check stops this process
            return False
        return True

    def write(self, value: str) -> bool:
        """Sets this process's beat to `value`; False where the store cannot be reached or it has left."""
        with self._lock:
            return not (self.left or self.ended) and self._set(value)

    def read(self) -> dict[int, str] | None:
        """Every process's beat (None where the store cannot be reached)."""
        try:
            return {int(k.rsplit("/", 1)[1]): v for k, v in self.client.key_value_dir_get(_BEATS)}
        except Exception:
            return None

    def gone(self, values: dict[int, str] | None, now: float) -> str | None:
        """Why another process is gone (silent for timeout_s; or what made another one stop), else None. Only
        beats seen without a gap count: a round that missed the store starts the count over. Once this process
        has left, only a process that says "lost" counts (the others meet it at jax's shutdown barrier)."""
        if values is None:
            self.seen.clear()
            return None
        for p in range(self.count):
            value = values.get(p, "")
            if p == self.process or value == "done":
                continue
            if value.startswith("lost:"):
                return value.removeprefix("lost:")
            if self.left:
                continue
            if p not in self.seen or self.seen[p][0] != value:
                self.seen[p] = (value, now)
            elif now - self.seen[p][1] >= self.timeout_s:
                if value == "failed":
                    return f"process {p} stopped with an error {self.timeout_s:g} s ago"
                return f"process {p} sent no heartbeat for {self.timeout_s:g} s: mesh.distributed.heartbeat_timeout_s"
        return None

    def check(self, now: float) -> str | None:
        """One round: writes this process's next counter (until it leaves), then judges the others'."""
        if not self.left:
            self.beats += 1
            if not self.write(str(self.beats)):
                return self.gone(None, now)
        return self.gone(self.read(), now)

    def _stopped(self, p: int, value: str, now: float) -> bool:
        """Whether process p has stopped: it said "lost" (its last act) or its counter has been silent for
        timeout_s; not one that said "done" or "failed", which waits at jax's shutdown barrier."""
        if value.startswith("lost:"):
            return True
        seen = self.seen.get(p)
        return (
            value not in ("done", "failed")
            and seen is not None
            and seen[0] == value
            and now - seen[1] >= self.timeout_s
        )

    def line(self, why: str) -> str:
        return (
            f"error: {self.label}: process {self.process} of {self.count} lost the others ({why}): another process "
            "of this run is gone or unreachable, and its own log says why; once that is fixed, run the same command "
            "on every process to resume from the last checkpoint."
        )

    def end(self, why: str, clock=time.monotonic, sleep=time.sleep, line: str | None = None) -> None:
        """Says "lost" (the others stop at once), prints the line (`line`, else the watch's own) and stops the
        process with exit 1; one that has left (its error printed, or finished) prints nothing and stops with its
        own status. Process 0 says it first and waits (up to two beats) for the others to go; the others say it
        last, just before they go. Where it is stopping already (the thread and the main thread both found a peer
        gone), the second call waits for the first to stop the process: process 0 must not go before the others."""
        with self._lock:
            second, self.ended = self.ended, True
        if second:
            self._done.wait(2 * self.interval_s + 5)
            return
        if self.process == 0:
            self._set(f"lost:{why}")
            deadline = clock() + 2 * self.interval_s
            while True:
                values, now = self.read() or {}, clock()
                if now >= deadline or all(self._stopped(p, values.get(p, ""), now) for p in range(1, self.count)):
                    break
                sleep(self.interval_s / 4)
            if any(values.get(p, "").startswith("lost:") for p in range(1, self.count)):
                sleep(min(self.interval_s / 2, 0.5))  # their own exit, just begun, ends before the service does
        if not self.left:
            print(line or self.line(why), file=sys.stderr)
        for handler in logging.getLogger().handlers:  # flushed, not closed: the main thread may still log
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        if self.process != 0:
            self._set(f"lost:{why}")
        self.stop(self.code if self.left else 1)
        self._done.set()

    def run(self) -> None:
        while not self._closing.wait(self.interval_s) and not self.ended:  # (ended: the main thread stops it)
            why = self.check(time.monotonic())
            if why is not None:
                self.end(why)
                return

    def finish(self) -> None:
        """At exit: says "done" (unless it failed), waits at jax's shutdown barrier while the thread still watches
        (a process that says "lost" there ends this one with its own status), then stops the thread and waits for it.
        Left running, the thread could be inside a call to the coordination client when the interpreter finalizes:
        a daemon thread that comes back from C++ then is unwound, which aborts the process ("FATAL: exception not
        rethrown") after a run that succeeded."""
        self.leave()
        jax.distributed.shutdown()  # what jax's own exit hook does after this one (then a no-op)
        self._closing.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 10)

    def leave(self, ok: bool = True, code: int = 1) -> None:
        """This process stops through Python: "done" (atexit), or "failed" (`failed`, from the CLI's error paths)
        with `code`, the exit status it stops with (also where a process that says "lost" ends it early)."""
        with self._lock:
            if self.left or self.ended:
                return
            self.left, self.code = True, 0 if ok else code
            self._set("done" if ok else "failed")


_watch: PeerWatch | None = None  # this process's, once started


def lost(why: str, line: str) -> None:
    """Stops this process of a multi-process run whose collective broke because another process is gone (the CLI's
    lost-peer path) through its watch: it says "lost:<why>", so the others stop at once naming the cause rather
    than wait `heartbeat_timeout_s` and name a silent process; process 0 first waits for them, since jax aborts
    every process still connected once it goes; `line`, the CLI's, is printed; exit 1. Returns only where no watch
    runs (one process, or a jax without the store): the caller prints its line and exits."""
    if _watch is not None:
        _watch.end(why, line=line)


def failed(code: int = 1) -> None:
    """Marks this process as stopping with an error and exit status `code` (the CLI's error paths): the others, if
    they do not stop too, stop `heartbeat_timeout_s` later with a line naming it, rather than hang in a collective
    it left."""
    if _watch is not None:
        _watch.leave(ok=False, code=code)
