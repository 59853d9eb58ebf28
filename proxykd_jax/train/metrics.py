"""Metric sinks (JSONL + TensorBoard), FLOP accounting and a measured matmul peak for MFU.

MFU convention: model FLOPs only (2 per multiply-accumulate; backward = 2x forward; causal
attention counted for half the L x L matrix, as `models.llama.flops_per_token`); frozen forward
passes count 1x forward; rematerialisation is not counted.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


class MetricsWriter:
    """Appends metric dicts to `run_dir/metrics.jsonl` and, optionally, TensorBoard (process 0 only)."""

    def __init__(self, run_dir: str | pathlib.Path, tensorboard: bool, resume_step: int | None = None):
        """With `resume_step` (the step a loop restarts after), rows of later steps, written by the run
        that was killed after that checkpoint, are dropped first, so each step keeps one row; TensorBoard,
        whose event files are only appended to, is told to hide them (`TensorBoardEvents`)."""
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_after(self.path, resume_step)
            self._file = self.path.open("a")
            if tensorboard:
                self._tb = TensorBoardEvents(pathlib.Path(run_dir) / "tensorboard", resume_step)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.write(int(step), metrics)

    def append(self, record: Mapping) -> None:
        """Appends one JSON record as it is (e.g. a phase summary without a step)."""
        if self.enabled:
            self._file.write(json.dumps(dict(record), sort_keys=True) + "\n")
            self._file.flush()

    def flush(self) -> None:
        """Puts every row written so far on disk (the JSONL rows are at each write; TensorBoard's here)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class TensorBoardEvents:
    """Scalars in a new TensorBoard event file in `folder`, written in the calling thread: on disk after
    `flush`. (tensorboardX's `SummaryWriter` hands events to a thread that writes them within two minutes,
    which a `kill -9` loses and its `flush` does not wait for.)

    With `resume_step`, the file opens with a purge from step `resume_step + 1` (a `SessionLog` START): TensorBoard
    hides the earlier files' events of those steps, which the run that was killed wrote and this one writes again."""

    def __init__(self, folder: pathlib.Path, resume_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2

        self._event, self._summary = event_pb2, summary_pb2
        folder.mkdir(parents=True, exist_ok=True)
        # the file's name holds the second it opens in, and opening a name that exists empties it: a suffix in
        # nanoseconds keeps a killed run's file that opened in the same second (and sorts after it, as it must)
        self._writer = EventsWriter(str(folder / "events"), filename_suffix=f".{time.time_ns()}")
        if resume_step is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=resume_step + 1, session_log=start))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        summary = self._summary.Summary(
            value=[self._summary.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
        )
        self._writer.write_event(self._event.Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def truncate_after(path: pathlib.Path, step: int) -> int:
    """Drops the rows of `path` whose step is past `step` (rows without a step stay); returns how many.

    A torn last line (the writer killed mid-write) is dropped too. The file is replaced atomically."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


def read_metrics(run_dir: str | pathlib.Path) -> list[dict]:
    """All records of `run_dir/metrics.jsonl` in file order."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_flops(
    tokens_per_step: int, train_flops_per_token: float, frozen_forward_flops_per_token: Sequence[float] = ()
) -> float:
    """Model FLOPs of one train step: trainable fwd+bwd plus each frozen model's forward."""
    return float(tokens_per_step) * (float(train_flops_per_token) + float(sum(frozen_forward_flops_per_token)))


def measure_matmul_peak(
    n: int = 2048, dtype=jnp.float32, repeats: int = 5, devices: Sequence[jax.Device] | None = None
) -> float:
    """Measured FLOP/s of an n x n x n matmul run on every device at once: the fastest of `repeats`
    timed runs after one warm-up.

    Each device multiplies its own pair of matrices; the result is the aggregate over `devices`
    (default: this process's local devices), so simulated devices sharing cores are not
    over-counted. The fastest run, not a median: other processes' load and clocks ramping up from
    idle only ever slow a run down, so the best time is the closest to what the device can do, and
    a FLOP/s fraction of it cannot read high because the peak was taken in a slow moment (a median
    of 5 on a busy 2-core host once gave `benchmarks/distill_step.py` an MFU of 119.7%).
    """
    devices = list(jax.local_devices() if devices is None else devices)
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    sharding = NamedSharding(mesh, PartitionSpec("d"))
    key_a, key_b = jax.random.split(jax.random.key(0))
    shape = (len(devices), n, n)
    a = jax.jit(lambda k: jax.random.normal(k, shape, dtype), out_shardings=sharding)(key_a)
    b = jax.jit(lambda k: jax.random.normal(k, shape, dtype), out_shardings=sharding)(key_b)
    matmul = jax.jit(lambda x, y: jnp.einsum("dij,djk->dik", x, y), out_shardings=sharding)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * math.prod(shape) * n / min(times)
