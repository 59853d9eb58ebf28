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
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
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
    dist_cfg, env: Mapping[str, str] | None = None, plan: DistributedPlan | None = None
) -> DistributedPlan:
    """Starts `jax.distributed` as `plan` says (default: as `resolve_distributed` decides; once), then logs
    the devices."""
    plan = resolve_distributed(dist_cfg, env) if plan is None else plan
    if plan.mode != "single" and not jax.distributed.is_initialized():
        heartbeat = {"heartbeat_timeout_seconds": int(dist_cfg.get("heartbeat_timeout_s", 100))}
        if plan.mode == "explicit":
            jax.distributed.initialize(plan.coordinator_address, plan.num_processes, plan.process_id, **heartbeat)
        else:
            jax.distributed.initialize(**heartbeat)
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
