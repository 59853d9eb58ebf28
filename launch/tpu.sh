#!/usr/bin/env bash
# Run one stage on every host of a TPU VM pod slice. jax.distributed finds the
# coordinator itself on TPU (mesh.distributed.auto=True, the default).
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a launch/tpu.sh distill --config=configs/llama.py:7b,70b
# The repository must already be at $REMOTE_DIR on every host (git clone + make
# .venv/.base there once, e.g. with the same --worker=all command).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR="${REMOTE_DIR:-\$HOME/proxykd_jax}"
args=$(printf '%q ' "$@")
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $REMOTE_DIR && .venv/bin/python -m proxykd_jax $args"
