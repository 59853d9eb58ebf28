#!/usr/bin/env bash
# One machine. One process (CPU, or all local GPUs/TPU chips), or NUM_PROCESSES jax.distributed
# processes on 127.0.0.1: a cluster's multi-process path, tried on one box.
#   launch/local.sh distill --config=configs/demo.py
#   SIMULATE_DEVICES=8 launch/local.sh distill --config=configs/demo.py     (8 CPU devices)
#   NUM_PROCESSES=2 SIMULATE_DEVICES=4 launch/local.sh distill --config=configs/demo.py
#   launch/local.sh --dry-run distill ...   prints the commands and environment, runs nothing
# COORDINATOR_PORT fixes the port of process 0 (default: a free one).
# With several processes the first one to fail stops the others; the exit status is its status.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
python="${PYTHON:-.venv/bin/python}"
num="${NUM_PROCESSES:-1}"
if [[ -n "${SIMULATE_DEVICES:-}" ]]; then
  # drop an inherited device count: XLA keeps the last one it reads
  flags=$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")
  export XLA_FLAGS="--xla_force_host_platform_device_count=${SIMULATE_DEVICES} ${flags}"
  export JAX_PLATFORMS=cpu
fi
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"

commands=()
if [[ "$num" == 1 ]]; then
  commands+=("$(printf '%q ' "$python" -m proxykd_jax "$@")")
else
  port="${COORDINATOR_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
  for ((i = 0; i < num; i++)); do
    commands+=("$(printf '%q ' "$python" -m proxykd_jax "$@" \
      "--config.mesh.distributed.coordinator_address=127.0.0.1:${port}" \
      "--config.mesh.distributed.num_processes=${num}" "--config.mesh.distributed.process_id=${i}")")
  done
fi

if [[ "$dry_run" == 1 ]]; then
  echo "workers: ${num} process(es) on this machine"
  echo "environment: XLA_FLAGS=${XLA_FLAGS:-} JAX_PLATFORMS=${JAX_PLATFORMS:-} JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR}"
  for command in "${commands[@]}"; do
    echo "command: ${command}"
  done
  exit 0
fi
if [[ "$num" == 1 ]]; then
  exec "$python" -m proxykd_jax "$@"
fi

pids=()
for command in "${commands[@]}"; do
  # exec: the job is the process itself, so its exit status is the one waited for (a shell left
  # between them under `set -e` reports 1) and `kill` below reaches it (not only its shell)
  eval "exec ${command}" &
  pids+=("$!")
done
status=0
for _ in "${pids[@]}"; do
  code=0
  wait -n || code=$?
  if [[ "$code" != 0 ]]; then
    status=$code
    break
  fi
done
if [[ "$status" != 0 ]]; then
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  wait || true
fi
exit "$status"
