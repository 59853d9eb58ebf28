"""The forward passes outside the train step (the posterior's proxy scores and its store step, the
align reference pass) run with the mesh set, so activation rows stay split over the batch axes on an
FSDP mesh: the same numbers as on one device, and the [rows, L, V] logits are never whole on one
device."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_bayes_posterior import random_case

from proxykd_jax import parallel
from proxykd_jax.align import objectives
from proxykd_jax.bayes import estimate
from proxykd_jax.bayes.posterior import posterior_topk
from proxykd_jax.bayes.prior import SparsePrior
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.parallel.sharding import replicated, under_mesh

B, L, V = 16, 32, 2048


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig(
        vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=L
    )
    mesh = parallel.make_mesh(ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": 8, "tensor": 1}}))
    rules = parallel.LOGICAL_RULES
    model = parallel.create_sharded_model(Llama, mesh, rules, cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    host = {
        "tokens": rng.integers(0, V, (B, L), dtype=np.int32),
        "targets": rng.integers(0, V, (B, L), dtype=np.int32),
        "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
        "segment_ids": np.ones((B, L), np.int32),
    }
    return mesh, rules, model, parallel.global_batch(host, mesh, rules)


def test_posterior_forward_keeps_rows_split_and_values(setup):
    mesh, _, model, batch = setup
    graphdef, state = nnx.split(model)
    raw = jax.jit(estimate.target_logprobs, static_argnums=0, out_shardings=replicated(mesh))
    pinned = under_mesh(raw, mesh)
    np.testing.assert_allclose(
        np.asarray(pinned(graphdef, state, batch)), np.asarray(raw(graphdef, state, batch)), rtol=1e-5, atol=1e-5
    )
    temp = pinned.lower(graphdef, state, batch).compile().memory_analysis().temp_size_in_bytes
    logits_bytes = B * L * V * 4
    assert temp < logits_bytes / 2, (temp, logits_bytes)  # an eighth of the logits per device, not all of them


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_posterior_store_step_keeps_logits_split_and_matches_one_device(setup, kernel):
    mesh, rules, model, batch = setup
    graphdef, state = nnx.split(model)
    n, k = B * L, 8
    _, host_prior, base, n_pseudo = random_case(3, n=n, v=V)
    pcfg = ml_collections.ConfigDict(
        {"mode": "expected", "num_samples": 4, "beta": 1.0, "chunk_tokens": 32, "kernel": kernel}
    )
    step = estimate.make_posterior_step(graphdef, pcfg, k=k, mesh=mesh, rules=rules)
    tok = parallel.batch_sharding(mesh, rules)
    prior = SparsePrior(*(jax.device_put(x, tok) for x in host_prior))
    args = (state, batch, prior, base, jax.device_put(n_pseudo, tok), np.float32(1.5), None, None, None)
    ids, lps, tail = (np.asarray(x) for x in step(*args))

    one = nnx.merge(*jax.device_get(nnx.split(model)))
    tokens, positions, segments = (np.asarray(batch[f]) for f in ("tokens", "positions", "segment_ids"))
    logits = one(tokens, positions, segments).reshape(n, V)
    want = [np.asarray(x) for x in posterior_topk(logits, host_prior, base, n_pseudo, 1.5, k=k)]
    np.testing.assert_allclose(lps, want[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tail, want[2], rtol=1e-4, atol=1e-5)
    assert np.mean(ids == want[0]) > 0.99  # (a near tie may swap two ids between the two forwards)

    temp = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < n * V * 4 / 2, (temp, n * V * 4)  # each device scores its own rows: no gathered logits


def test_reference_pass_under_the_batch_mesh_matches_host_rows(setup):
    mesh, rules, model, _ = setup
    rng = np.random.default_rng(2)
    rows = {}
    for side in ("chosen_", "rejected_"):
        rows[side + "tokens"] = rng.integers(0, V, (B, L), dtype=np.int32)
        rows[side + "targets"] = rng.integers(0, V, (B, L), dtype=np.int32)
        rows[side + "segment_ids"] = np.ones((B, L), np.int32)
        rows[side + "loss_mask"] = (rng.random((B, L)) < 0.5).astype(np.float32)
    put = lambda b: parallel.global_batch(b, mesh, rules)  # noqa: E731
    sharded = objectives.reference_logprobs(model, (), rows, batch_size=8, chunk=16, put_batch=put)
    host_model = nnx.merge(*jax.device_get(nnx.split(model)))
    local = objectives.reference_logprobs(host_model, (), rows, batch_size=8, chunk=16)
    for a, b in zip(sharded, local):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
