#!/usr/bin/env bash
# Multi-GPU / multi-node through jax.distributed, one process per node.
# Under SLURM (sbatch --nodes=N --ntasks-per-node=1 --gpus-per-node=8 launch/gpu.sh STAGE ...)
# the coordinator, process count and id are read from SLURM_* variables.
# Without SLURM, run this on every node with:
#   COORDINATOR=host0:1234 NUM_PROCESSES=2 PROCESS_ID=<0|1> launch/gpu.sh distill --config=...
#   launch/gpu.sh --dry-run distill ...   prints the command, workers and environment, runs nothing
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [[ ! -d "${root}/proxykd_jax" && -n "${SLURM_JOB_ID:-}" ]]; then
  # sbatch runs a copy of this script from slurmd's spool folder; the job starts where sbatch was called
  root="${SLURM_SUBMIT_DIR:-$PWD}"
fi
if [[ ! -d "${root}/proxykd_jax" ]]; then
  echo "error: launch/gpu.sh: ${root} is not the proxykd_jax repository; run (or sbatch) it from the repository root." >&2
  exit 2
fi
cd "$root"
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"
python="${PYTHON:-.venv/bin/python}"
extra=()
if [[ -n "${COORDINATOR:-}" ]]; then
  extra+=("--config.mesh.distributed.coordinator_address=${COORDINATOR}"
          "--config.mesh.distributed.num_processes=${NUM_PROCESSES:?set NUM_PROCESSES}"
          "--config.mesh.distributed.process_id=${PROCESS_ID:?set PROCESS_ID}")
  workers="this node, process ${PROCESS_ID} of ${NUM_PROCESSES} (coordinator ${COORDINATOR})"
  command=("$python" -m proxykd_jax "$@" "${extra[@]}")
elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
  workers="${SLURM_JOB_NUM_NODES:-?} node(s) of SLURM job ${SLURM_JOB_ID}, one task per node (ids from SLURM)"
  command=(srun --ntasks-per-node=1 "$python" -m proxykd_jax "$@")
else
  workers="this node only (one process; set COORDINATOR or run under SLURM for several)"
  command=("$python" -m proxykd_jax "$@")
fi
if [[ "$dry_run" == 1 ]]; then
  echo "workers: ${workers}"
  echo "environment: JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR}"
  echo "command: $(printf '%q ' "${command[@]}")"
  exit 0
fi
exec "${command[@]}"
