"""Streaming safetensors I/O: parameters read straight into their sharded global arrays, tensors
written one at a time.

Reading. A `TensorMap` says how one leaf of our parameter state is made from Hugging Face tensors:
which tensor(s) (one, or N stacked along a new leading axis, element i of that axis being
`names[i]`), how each HF dimension splits into ours (`split`, e.g. q_proj [H * E, D] -> (H, E), (D,))
and in which order the split axes appear in our layout (`perm`). `load_leaf` builds the leaf with
one block per addressable device (as `jax.make_array_from_callback` would, but placing each block
as soon as it is read, so the host holds one block at a time): each reads only the rows and columns
of that block (the layer range of a stacked leaf, then the HF slice) through
safetensors' lazy `get_slice`, reshapes and transposes it to our layout and converts its dtype.
Only this process's addressable devices ask, so in a multi-process run each host reads what its
devices hold. Files are opened per read and closed after it: safetensors maps files into memory, and
a mapping kept open for the whole load would make every page read count as resident.

Writing. `write_sharded` plans files of at most `max_shard_bytes` from the tensors' shapes and dtypes
alone, writes each file's header first and then each tensor's bytes as `fetch(name)` produces them,
so at most one tensor is held on the host at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import struct
from collections.abc import Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # the weight files `write_sharded` names


# ---------------------------------------------------------------------------------------------- reading


class SafetensorsFolder:
    """The tensors of a folder with model.safetensors or a sharded model.safetensors.index.json.

    Holds only the name -> file map and the headers (shape, dtype); tensor data is read on demand."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)
        index, single = self.folder / INDEX, self.folder / SINGLE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                weight_map = None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{index} is not a safetensors index (no 'weight_map' object of file names).")
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).exists()})
            if missing:
                raise FileNotFoundError(f"{index} names shard(s) {missing} that are not in {self.folder}.")
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        elif single.exists():
            self.files = None
        else:
            raise FileNotFoundError(f"{self.folder} has neither {SINGLE} nor {INDEX}.")
        self.headers: dict[str, tuple[tuple[int, ...], str]] = {}
        paths = {single} if self.files is None else set(self.files.values())
        for path in sorted(paths):
            try:
                with safe_open(str(path), framework="np") as f:
                    for name in f.keys():
                        s = f.get_slice(name)
                        self.headers[name] = (tuple(s.get_shape()), s.get_dtype())
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise ValueError(f"{path} is not a readable safetensors file ({e}).") from None
        if self.files is None:
            self.files = {name: single for name in self.headers}
        absent = sorted(set(self.files) - set(self.headers))
        if absent:
            raise ValueError(f"{index} maps tensor(s) {absent[:4]} to files that do not hold them.")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.headers[name][0]

    def read(self, name: str, ranges: tuple[slice, ...]) -> np.ndarray:
        """Rows/columns `ranges` (step-1 slices, one per dimension) of tensor `name`, as numpy."""
        with safe_open(str(self.files[name]), framework="np") as f:
            return f.get_slice(name)[ranges] if ranges else f.get_tensor(name)


def _bounds(s: slice, size: int) -> tuple[int, int]:
    start, stop, step = s.indices(size)
    if step != 1:
        raise ValueError(f"strided shard index {s} is not supported.")
    return start, max(start, stop)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How one leaf of our state is read from (and written to) Hugging Face tensors.

    names: the HF tensors; with `stacked`, the leaf has a leading axis of len(names) whose element i
      is names[i] (a scanned stack of layers); otherwise exactly one name.
    split: per HF dimension, the sizes it splits into (q_proj [H * E, D]: ((H, E), (D,))).
    perm: our axes as positions among the flattened split axes (q_proj -> [D, H, E]: (2, 0, 1)).
    """

    names: tuple[str, ...]
    split: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]
    stacked: bool = False

    def __post_init__(self):
        flat = sum(len(s) for s in self.split)
        if sorted(self.perm) != list(range(flat)):
            raise ValueError(f"TensorMap perm {self.perm} is not a permutation of the {flat} split axes.")
        if not self.stacked and len(self.names) != 1:
            raise ValueError(f"an unstacked TensorMap reads one tensor, not {len(self.names)}.")

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.split)

    @property
    def shape(self) -> tuple[int, ...]:
        """Our leaf's shape (the leading stack axis included)."""
        flat = [d for s in self.split for d in s]
        return ((len(self.names),) if self.stacked else ()) + tuple(flat[p] for p in self.perm)

    def read(self, source: SafetensorsFolder, index: tuple[slice, ...], dtype) -> np.ndarray:
        """The block `index` of our leaf (what one device holds), reading only what it needs."""
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        if not self.stacked:
            return self._read_one(source, self.names[0], index, dtype)
        lo, hi = _bounds(index[0], len(self.names))
        return np.stack([self._read_one(source, self.names[i], index[1:], dtype) for i in range(lo, hi)])

    def _read_one(self, source, name: str, index: tuple[slice, ...], dtype) -> np.ndarray:
        flat = [d for s in self.split for d in s]
        split_index = [slice(None)] * len(flat)
        for ours, slot in zip(index, self.perm):
            split_index[slot] = ours
        bounds = [_bounds(s, n) for s, n in zip(split_index, flat)]
        ranges, block_shape, rest, k = [], [], [], 0
        for sizes in self.split:  # each HF dim: read the range its leading split axis needs, whole inner axes
            inner = math.prod(sizes[1:])
            lo, hi = bounds[k]
            ranges.append(slice(lo * inner, hi * inner))
            block_shape += [hi - lo, *sizes[1:]]
            rest += [slice(None)] + [slice(*bounds[k + j]) for j in range(1, len(sizes))]
            k += len(sizes)
        block = source.read(name, tuple(ranges)).reshape(block_shape)[tuple(rest)]
        return np.asarray(block.transpose(self.perm), dtype=dtype, order="C")

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """One element of the leaf (one layer of a stacked leaf) in the HF tensor's layout."""
        return np.ascontiguousarray(np.asarray(x).transpose(np.argsort(self.perm)).reshape(self.hf_shape))


def load_leaf(source: SafetensorsFolder, tmap: TensorMap, sharding, dtype) -> jax.Array:
    """One global array laid out by `sharding`, each addressable device's block read on its own.

    Blocks go to their device as they are read, so the host holds one block at a time; devices
    holding the same block (replicated dimensions) get a device-to-device copy of the first read."""
    placed: dict[tuple, jax.Array] = {}
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(tmap.shape).items():
        key = tuple(_bounds(s, n) for s, n in zip(index, tmap.shape))
        if key in placed:
            arrays.append(jax.device_put(placed[key], device))
        else:
            placed[key] = jax.device_put(tmap.read(source, index, dtype), device)
            arrays.append(placed[key])
    return jax.make_array_from_single_device_arrays(tmap.shape, sharding, arrays, dtype=np.dtype(dtype))


# ---------------------------------------------------------------------------------------------- writing


def plan_files(tensors: Mapping[str, tuple[tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most `max_shard_bytes` each, in order (a tensor larger
    than the limit gets a file of its own)."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    files, current, size = [], [], 0
    for name, (shape, dtype) in tensors.items():
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if current and size + nbytes > max_shard_bytes:
            files.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not files:
        files.append(current)
    return files


def _header(names: Iterable[str], tensors, metadata) -> bytes:
    header, offset = {"__metadata__": dict(metadata)}, 0
    for name in names:
        shape, dtype = tensors[name]
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _CODES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_sharded(
    folder,
    tensors: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    fetch: Callable[[str], np.ndarray | None],
    *,
    max_shard_bytes: int,
    write: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Writes `tensors` (name -> (shape, dtype), in file order) as model.safetensors, or as files of
    at most `max_shard_bytes` plus model.safetensors.index.json; returns the file names.

    `fetch(name)` is called once per tensor, in order, on every process (it may be collective); only
    with `write` (one process) are files written, and its value may be None elsewhere. Weight files of
    an earlier save into `folder` that this one does not overwrite are removed first: a loader would
    read them (this module prefers an index, transformers a single file)."""
    folder = pathlib.Path(folder)
    groups = plan_files(tensors, max_shard_bytes)
    fnames = (
        [SINGLE]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    metadata = {"format": "pt", **(metadata or {})}
    if write:  # weights of an earlier save here would be read instead of these: remove them, the index first
        previous = [INDEX] + [p.name for p in folder.glob("model*.safetensors") if _WEIGHTS.fullmatch(p.name)]
        for name in previous:
            if name not in fnames:
                (folder / name).unlink(missing_ok=True)
    for fname, names in zip(fnames, groups):
        out = open(folder / fname, "wb") if write else None
        try:
            if out is not None:
                out.write(_header(names, tensors, metadata))
            for name in names:
                value = fetch(name)
                if out is None:
                    continue
                shape, dtype = tensors[name]
                if tuple(value.shape) != tuple(shape) or value.dtype != np.dtype(dtype):
                    raise ValueError(
                        f"tensor {name} is {value.dtype}{list(value.shape)}, planned {dtype}{list(shape)}."
                    )
                out.write(np.ascontiguousarray(value).view(np.uint8).data)
        finally:
            if out is not None:
                out.close()
    if write and len(groups) > 1:
        total = sum(math.prod(s) * np.dtype(d).itemsize for s, d in tensors.values())
        weight_map = {name: fname for fname, names in zip(fnames, groups) for name in names}
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return fnames


def host_value(x: jax.Array) -> np.ndarray | None:
    """A (global) array whole on the host: read locally when this process holds all of it, else
    gathered from every process (a collective: every process must call it)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
