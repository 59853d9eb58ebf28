"""Shared pieces of the parallel/train tests, and the worker of the 2-process test.

As a script: `python tests/parallel_helpers.py <coordinator> <num_processes> <process_id> <out.npz>`
starts jax.distributed, runs `sharded_forward_and_step` on its half of the global batch and (on
process 0) writes the results.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.parallel import LOGICAL_RULES, batch_sharding, global_batch, make_mesh
from proxykd_jax.train import create_train_state, make_optimizer, make_train_step
from proxykd_jax.train.optim import default_config as optim_default_config

TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64)
BATCH, LENGTH = 8, 16


def mesh_cfg(data=1, fsdp=1, tensor=1) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"shape": {"data": data, "fsdp": fsdp, "tensor": tensor}})


def optim_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = optim_default_config()
    cfg.update(dict(lr=1e-2, warmup_steps=0, weight_decay=0.1, clip_norm=1.0), **overrides)
    return cfg


def make_batch(seed: int, rows: int = BATCH, length: int = LENGTH, vocab: int = TINY.vocab_size) -> dict:
    """A host batch of random tokens with next-token targets and a random loss mask."""
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, vocab, size=(rows, length + 1), dtype=np.int32)
    return {
        "tokens": seq[:, :-1],
        "targets": seq[:, 1:],
        "loss_mask": (rng.random((rows, length)) < 0.8).astype(np.float32),
    }


def ce_loss(model, batch):
    """Masked mean next-token cross entropy (dense, float32)."""
    logits = model(batch["tokens"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"]
    loss = jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, {"tokens": jnp.sum(mask)}


def sharded_forward_and_step(mesh, host_batch: dict, steps: int = 1, seed: int = 0):
    """Logits of a fresh TINY model on `host_batch` and its params after `steps` optimizer steps."""
    optimizer = make_optimizer(optim_cfg(), total_steps=10)
    graphdef, state, shardings = create_train_state(optimizer, mesh, LOGICAL_RULES, Llama, TINY, rngs=nnx.Rngs(seed))
    batch = global_batch(host_batch, mesh, LOGICAL_RULES)
    logits = jax.jit(lambda s, b: s.model(graphdef)(b["tokens"]))(state, batch)
    step = make_train_step(
        ce_loss, graphdef, optimizer, state_shardings=shardings, batch_shardings=batch_sharding(mesh, LOGICAL_RULES)
    )
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    return logits, state, losses


def _gather(x) -> np.ndarray:
    """A global array as one numpy array on every process."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def main(argv: list[str]) -> None:
    coordinator, num_processes, process_id, out_path = argv[1], int(argv[2]), int(argv[3]), argv[4]
    jax.distributed.initialize(coordinator, num_processes, process_id)
    assert jax.process_count() == num_processes and jax.local_device_count() == 4, jax.devices()
    mesh = make_mesh(mesh_cfg(fsdp=-1, tensor=2))
    full = make_batch(seed=1)
    rows = BATCH // num_processes
    local = {k: v[process_id * rows : (process_id + 1) * rows] for k, v in full.items()}
    logits, state, losses = sharded_forward_and_step(mesh, local)
    flat = {jax.tree_util.keystr(p): _gather(v) for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    logits = _gather(logits)
    if process_id == 0:
        np.savez(out_path, logits=logits, loss=np.asarray(_gather(losses[0])), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
