"""The device mesh: config defaults for the `mesh` group and `make_mesh`.

Axes are always ("data", "fsdp", "tensor"): `data` replicates parameters and splits the batch,
`fsdp` splits both the batch and the parameters (gathered per layer by XLA), `tensor` splits the
heads / feed-forward / vocabulary dimensions of single matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh

from proxykd_jax.errors import ConfigError
from proxykd_jax.parallel.rules import LOGICAL_RULES

MESH_AXES = ("data", "fsdp", "tensor")


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `mesh` config group."""
    cd = ml_collections.ConfigDict()
    cd.shape = ml_collections.ConfigDict()
    cd.shape.data = 1  # data-parallel replicas (-1 = all devices left over by the other axes)
    cd.shape.fsdp = -1  # parameter + batch sharding (-1 = all devices left over by the other axes)
    cd.shape.tensor = 1  # tensor (head / mlp / vocab) sharding (-1 = all devices left over)
    cd.rules = LOGICAL_RULES  # (logical axis, mesh axis | tuple of mesh axes | None) pairs; see parallel/rules.py
    cd.distributed = ml_collections.ConfigDict()
    cd.distributed.coordinator_address = ""  # "host:port" of process 0; "" = env JAX_COORDINATOR_ADDRESS or autodetect
    cd.distributed.num_processes = 0  # total processes; 0 = env JAX_NUM_PROCESSES or autodetect
    cd.distributed.process_id = -1  # this process's index; -1 = env JAX_PROCESS_ID or autodetect
    cd.distributed.auto = True  # autodetect TPU pod slices and SLURM jobs (jax.distributed.initialize())
    cd.distributed.heartbeat_timeout_s = 100  # a process silent this long counts as dead: the others stop (exit 1)
    return cd


def _whole(size) -> bool:
    """Whether a mesh.shape size is a whole number (an int, or a float such as 2.0; not a bool or a string)."""
    number = isinstance(size, (int, float, np.integer, np.floating)) and not isinstance(size, (bool, np.bool_))
    return number and float(size).is_integer()


def resolve_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Concrete (data, fsdp, tensor) sizes for `num_devices`, filling at most one -1 axis. A shape that does not fit
    is a `ConfigError` naming mesh.shape (one line from the CLI; a `ValueError`, which callers catch)."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh.shape has unknown axes {unknown}; the axes are {list(MESH_AXES)}.")
    given = [shape.get(axis, 1) for axis in MESH_AXES]
    if not all(_whole(s) for s in given):
        raise ConfigError(
            f"mesh.shape {dict(zip(MESH_AXES, given))} has a size that is no whole number; change mesh.shape."
        )
    sizes = [int(s) for s in given]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(
            f"mesh.shape {dict(zip(MESH_AXES, sizes))} is invalid: use positive sizes and at most one -1; "
            "change mesh.shape."
        )
    known = math.prod(s for s in sizes if s != -1)
    described = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if fill:
        if num_devices % known:
            raise ConfigError(
                f"mesh {described} needs a multiple of {known} devices, {num_devices} available; change mesh.shape."
            )
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ConfigError(f"mesh {described} needs {known} devices, {num_devices} available; change mesh.shape.")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all global devices).

    `mesh_cfg` is the `mesh` config group (only `shape` is read). Devices are laid out by
    `jax.make_mesh`, which follows the physical topology on TPU/GPU.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_shape(dict(mesh_cfg.shape), len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
