#!/usr/bin/env bash
# Run one stage on every host of a TPU VM pod slice. jax.distributed finds the coordinator itself
# on TPU (mesh.distributed.auto=True, the default).
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a launch/tpu.sh distill --config=configs/llama.py:7b,70b
#   launch/tpu.sh --dry-run distill ...   prints the command, workers and environment, runs nothing
# The repository must already be at $REMOTE_DIR on every host (git clone + make .venv/.base there
# once, e.g. with the same --worker=all command). WORKERS picks hosts (default all).
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
# shellcheck disable=SC2016  # $HOME is expanded on the TPU hosts, not here
remote_dir="${REMOTE_DIR:-\$HOME/proxykd_jax}"
workers="${WORKERS:-all}"
remote_env="JAX_COMPILATION_CACHE_DIR=${REMOTE_CACHE:-.jax_cache}"
remote="cd ${remote_dir} && ${remote_env} .venv/bin/python -m proxykd_jax $(printf '%q ' "$@")"
command=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "--worker=${workers}" --command "$remote")
if [[ "$dry_run" == 1 ]]; then
  echo "workers: ${workers} (hosts of TPU VM ${TPU_NAME} in ${ZONE}; one process per host)"
  echo "environment: ${remote_env} (on every host)"
  echo "command: $(printf '%q ' "${command[@]}")"
  exit 0
fi
exec "${command[@]}"
