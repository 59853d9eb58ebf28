#!/usr/bin/env bash
# Multi-GPU / multi-node through jax.distributed, one process per node.
# Under SLURM (sbatch --nodes=N --ntasks-per-node=1 --gpus-per-node=8 launch/gpu.sh STAGE ...)
# the coordinator, process count and id are read from SLURM_* variables.
# Without SLURM, run this on every node with:
#   COORDINATOR=host0:1234 NUM_PROCESSES=2 PROCESS_ID=<0|1> launch/gpu.sh distill --config=...
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"
extra=()
if [[ -n "${COORDINATOR:-}" ]]; then
  extra+=("--config.mesh.distributed.coordinator_address=${COORDINATOR}"
          "--config.mesh.distributed.num_processes=${NUM_PROCESSES:?set NUM_PROCESSES}"
          "--config.mesh.distributed.process_id=${PROCESS_ID:?set PROCESS_ID}")
fi
if [[ -n "${SLURM_JOB_ID:-}" && -z "${COORDINATOR:-}" ]]; then
  exec srun --ntasks-per-node=1 "${PYTHON:-.venv/bin/python}" -m proxykd_jax "$@" "${extra[@]}"
fi
exec "${PYTHON:-.venv/bin/python}" -m proxykd_jax "$@" "${extra[@]}"
