"""A store whose top-K holds the whole vocabulary (K = V): the tail has no ids, so its stored mass (float32
rounding residue) must count as zero; before, it met the student's empty tail (-inf) and the KD loss was inf."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd_jax.losses import sparse_kd
from proxykd_jax.losses.objective import kd_objective


def _case(seed: int, n: int = 12, d: int = 16, v: int = 24):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    teacher = rng.normal(size=(n, v)) * 2.0
    lp64 = teacher - np.logaddexp.reduce(teacher, axis=-1, keepdims=True)
    ids = np.stack([rng.permutation(v) for _ in range(n)]).astype(np.int32)  # every id, in any order
    lp = np.take_along_axis(lp64, ids, axis=-1).astype(np.float32)
    # the residue a writer stores as 1 - sum(top-K) in float32, forced positive on some rows
    tail = np.maximum(1.0 - np.exp(lp.astype(np.float32)).sum(-1), 0.0).astype(np.float32)
    tail[::3] = 3e-7
    targets = rng.integers(0, v, n).astype(np.int32)
    mask = np.ones(n, np.float32)
    weight = rng.uniform(0.5, 1.5, n).astype(np.float32)
    return hidden, w, targets, ids, lp, tail, mask, weight, lp64


def _reference_kd(hidden, w, lp64, weight, divergence):
    logits = hidden.astype(np.float64) @ w.astype(np.float64)
    logq = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    p, q = np.exp(lp64), np.exp(logq)
    if divergence == "forward_kl":
        per_row = (p * (lp64 - logq)).sum(-1)
    else:
        per_row = (q * (logq - lp64)).sum(-1)
    return float((weight * per_row).sum())


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("seed", [0])
def test_kd_loss_is_finite_and_exact_when_k_equals_vocab(divergence, seed):
    hidden, w, targets, ids, lp, tail, mask, weight, lp64 = _case(seed)
    assert (tail > 0).any()  # the residue that made the loss infinite
    args = tuple(map(jnp.asarray, (hidden, w, targets, ids, lp, tail, mask, weight)))
    _, kd_sum, _ = sparse_kd.sparse_kd_loss(*args, divergence=divergence, chunk_size=5)
    want = _reference_kd(hidden, w, lp64, weight, divergence)
    assert np.isfinite(float(kd_sum))
    np.testing.assert_allclose(float(kd_sum), want, rtol=2e-5, atol=2e-5)
    dense = sparse_kd.sparse_kd_loss_dense(*args, divergence=divergence)
    np.testing.assert_allclose(float(dense[1]), want, rtol=2e-5, atol=2e-5)

    # the fused objective's gradient is finite too (this is what distillation differentiates)
    def objective(h, wt):
        ce, kd, n = sparse_kd.sparse_kd_loss(h, wt, *args[2:], divergence=divergence, chunk_size=5)
        return kd_objective(ce, kd, n, 1.0)

    grads = jax.grad(objective, argnums=(0, 1))(args[0], args[1])
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


def test_a_real_tail_still_counts_when_k_is_below_vocab():
    hidden, w, targets, ids, lp, tail, mask, weight, lp64 = _case(3)
    k = ids.shape[1] - 4  # drop four ids per row into the tail
    top_ids, top_lp = ids[:, :k], lp[:, :k]
    top_tail = (1.0 - np.exp(lp64).sum(-1) + np.exp(np.take_along_axis(lp64, ids[:, k:], -1)).sum(-1)).astype(
        np.float32
    )
    args = tuple(map(jnp.asarray, (hidden, w, targets, top_ids, top_lp, top_tail, mask, weight)))
    _, kd_sum, _ = sparse_kd.sparse_kd_loss(*args, chunk_size=5)
    logits = hidden.astype(np.float64) @ w.astype(np.float64)
    logq = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    rows = np.arange(len(ids))[:, None]
    p_top, logq_top = np.exp(lp64[rows, top_ids]), logq[rows, top_ids]
    q_tail = np.exp(logq).sum(-1) - np.exp(logq_top).sum(-1)
    p_tail = 1.0 - p_top.sum(-1)
    per_row = (p_top * (lp64[rows, top_ids] - logq_top)).sum(-1) + p_tail * (np.log(p_tail) - np.log(q_tail))
    np.testing.assert_allclose(float(kd_sum), float((weight * per_row).sum()), rtol=2e-5, atol=2e-5)
