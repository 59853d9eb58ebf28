"""Compiled memory of the chunked losses: temporaries stay far below one float32 [N, V] logits array
and do not grow with the number of tokens, while the dense references need at least that array.

Nothing is allocated: arguments are jax.ShapeDtypeStruct and only compilation runs.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from proxykd_jax import losses as L

V, D, K, CHUNK = 131072, 64, 64, 256


def _temp_bytes(loss_fn, n, fused=False):
    """temp_size_in_bytes of jit(value_and_grad(CE + KD objective wrt hidden and W)) at N = n tokens."""

    def objective(hidden, w, targets, ids, lps, tail, mask, weight):
        if fused:
            loss_sum, _, _, n_tokens = loss_fn(hidden, w, targets, ids, lps, tail, mask, weight, alpha=100.0)
            return loss_sum / n_tokens
        return L.kd_objective(*loss_fn(hidden, w, targets, ids, lps, tail, mask, weight), alpha=100.0)

    spec = jax.ShapeDtypeStruct
    args = (
        spec((n, D), jnp.float32),
        spec((D, V), jnp.float32),
        spec((n,), jnp.int32),
        spec((n, K), jnp.int32),
        spec((n, K), jnp.float32),
        spec((n,), jnp.float32),
        spec((n,), jnp.float32),
        spec((n,), jnp.float32),
    )
    compiled = jax.jit(jax.value_and_grad(objective, argnums=(0, 1))).lower(*args).compile()
    stats = compiled.memory_analysis()
    assert stats is not None, "this backend reports no compiled memory statistics"
    return stats.temp_size_in_bytes


@pytest.fixture(scope="module")
def temps():
    chunked = functools.partial(L.sparse_kd_loss, chunk_size=CHUNK)
    fused = functools.partial(L.sparse_kd_objective, chunk_size=CHUNK)
    return dict(
        chunked_4k=_temp_bytes(chunked, 4096),
        chunked_8k=_temp_bytes(chunked, 8192),
        dense_4k=_temp_bytes(L.sparse_kd_loss_dense, 4096),
        fused_4k=_temp_bytes(fused, 4096, True),
        fused_8k=_temp_bytes(fused, 8192, True),
    )


def test_dense_reference_materialises_full_logits(temps):
    assert temps["dense_4k"] >= 4096 * V * 4


def test_chunked_temp_far_below_full_logits(temps):
    full_logits = 4096 * V * 4  # 2 GiB
    tile = CHUNK * V * 4  # one float32 logits tile, 128 MiB
    assert temps["chunked_4k"] < full_logits / 4, temps
    assert temps["chunked_4k"] < temps["dense_4k"] / 10, temps
    assert temps["chunked_4k"] < 5 * tile, temps  # a few tile-sized buffers (logits, log-probs, tail mask)


def test_chunked_temp_constant_in_tokens(temps):
    # doubling N adds only per-token vectors and the [N, D] hidden gradient (2 MiB here), not N x V
    assert temps["chunked_8k"] < 1.25 * temps["chunked_4k"], temps
    assert temps["chunked_8k"] - temps["chunked_4k"] < 4096 * V * 4 / 64, temps


def test_fused_objective_temp_bounded_and_constant_in_tokens(temps):
    tile = CHUNK * V * 4
    assert temps["fused_4k"] < 5 * tile, temps  # logits tile, its gradient, log-probs; dW [D, V] = tile / 4
    assert temps["fused_8k"] - temps["fused_4k"] < 4096 * V * 4 / 64, temps


def _ce_temp_bytes(n):
    """temp_size_in_bytes of jit(grad(fused CE mean wrt hidden and W)) at N = n tokens."""

    def objective(hidden, w, targets, mask):
        ce_sum, n_tokens = L.cross_entropy_chunked(hidden, w, targets, mask, chunk_size=CHUNK)
        return ce_sum / n_tokens

    spec = jax.ShapeDtypeStruct
    args = (spec((n, D), jnp.float32), spec((D, V), jnp.float32), spec((n,), jnp.int32), spec((n,), jnp.float32))
    return jax.jit(jax.grad(objective, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_fused_cross_entropy_temp_bounded_and_constant_in_tokens():
    small, large = _ce_temp_bytes(4096), _ce_temp_bytes(8192)
    tile, full_logits = CHUNK * V * 4, 4096 * V * 4
    assert small < 2 * tile <= full_logits / 8, (small, tile)  # one logits tile (+ its gradient) and dW: no [N, V]
    assert large - small < 4096 * V * 4 / 64, (small, large)  # doubling N adds per-token rows only
