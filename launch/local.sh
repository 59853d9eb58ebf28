#!/usr/bin/env bash
# One process on this machine (CPU, or all local GPUs/TPU chips).
#   launch/local.sh distill --config=configs/demo.py
# SIMULATE_DEVICES=8 gives 8 CPU devices for trying a mesh on a laptop.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${SIMULATE_DEVICES:-}" ]]; then
  export XLA_FLAGS="--xla_force_host_platform_device_count=${SIMULATE_DEVICES} ${XLA_FLAGS:-}"
  export JAX_PLATFORMS=cpu
fi
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"
exec "${PYTHON:-.venv/bin/python}" -m proxykd_jax "$@"
