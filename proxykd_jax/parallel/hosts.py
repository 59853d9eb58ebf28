"""Host-side helpers for code that runs the same on one process and on many (jax.distributed).

Every process runs the same program on its own rows; these move values between the hosts and the
mesh: whole host batches onto the mesh (`replicated_batch`), global arrays back to numpy on every
host (`to_host`, `replicate`), host values gathered over processes (`allgather`, `allsum`), a barrier
(`sync`), and iterators padded so that every process runs the same number of collective steps
(`lockstep`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from proxykd_jax.parallel.sharding import batch_sharding, replicated


def sync(name: str) -> None:
    """A barrier over all processes (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast(value: int) -> int:
    """Process 0's integer, on every process."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def broadcast_text(text: str) -> str:
    """Process 0's string, on every process (what process 0 decided, where the others might see otherwise)."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    size = broadcast(len(data))
    padded = np.zeros(size, np.uint8)
    padded[: min(size, len(data))] = data[:size]
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))).decode("utf-8")


def replicated_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """A batch that every process holds whole, as global arrays split over the `batch` mesh axes.

    (`sharding.global_batch` is for batches whose rows differ per process.)"""
    sharding = batch_sharding(mesh, rules)
    out = {}
    for name, value in host_batch.items():
        value = np.asarray(value)
        out[name] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
    return out


def replicate(tree, mesh: Mesh):
    """`tree` fully replicated on `mesh`: every process can then read every value whole."""
    return jax.jit(lambda x: x, out_shardings=replicated(mesh))(tree)


def to_host(x) -> np.ndarray:
    """A (global) array as one numpy array on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_rows(x, rows: int) -> np.ndarray:
    """This process's `rows` rows of a global array whose rows are ordered by process."""
    start = jax.process_index() * rows
    return to_host(x)[start : start + rows]


def allgather(x: np.ndarray) -> np.ndarray:
    """Concatenates a host array over processes along axis 0 (lengths may differ), in process order.

    Values travel as raw bytes, so int64 ids and float64 sums arrive exactly (jax arrays would
    narrow them to 32 bits without x64)."""
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    row_shape, dtype = x.shape[1:], x.dtype
    raw = (
        x.reshape(x.shape[0], -1).view(np.uint8)
        if x.size
        else np.zeros((0, dtype.itemsize * int(np.prod(row_shape))), np.uint8)
    )
    n = np.asarray(multihost_utils.process_allgather(np.asarray([raw.shape[0]], np.int32))).reshape(-1)
    buf = np.zeros((max(int(n.max()), 1), raw.shape[1]), np.uint8)
    buf[: raw.shape[0]] = raw
    parts = np.asarray(multihost_utils.process_allgather(buf))
    out = np.concatenate([p[: int(c)] for p, c in zip(parts, n)])
    return np.ascontiguousarray(out).view(dtype).reshape((-1,) + row_shape)


def allsum(values: Mapping[str, float]) -> dict[str, float]:
    """Sums host floats over processes (float64)."""
    names = sorted(values)
    local = np.asarray([float(values[k]) for k in names], np.float64)
    total = allgather(local[None]).sum(0) if jax.process_count() > 1 else local
    return dict(zip(names, (float(v) for v in total)))


def lockstep(batches: Iterator[dict], num_batches: int, empty: Callable[[dict], dict]) -> Iterator[dict]:
    """Exactly `num_batches` batches: those of `batches`, then `empty(template)` padding batches.

    Processes may hold different numbers of samples; each collective step (a jitted call on the
    global mesh) must still run on every process, so all iterate to the same count."""
    count, template = 0, None
    for batch in batches:
        if count >= num_batches:
            raise ValueError(f"the data gave more than the {num_batches} batches every process agreed on.")
        template, count = batch, count + 1
        yield batch
    if template is None and num_batches:
        raise ValueError("this process has no data to fill a batch; use fewer processes or more data.")
    for _ in range(num_batches - count):
        yield empty(template)


def batches_per_process(num_samples: int, batch_size: int) -> int:
    """Batches of `batch_size` rows the process with the most samples (of a 1/process_count slice) needs."""
    return math.ceil(math.ceil(num_samples / jax.process_count()) / batch_size)
