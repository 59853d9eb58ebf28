"""Memory-bounded student losses, the shared machinery: logits computed tile by tile over tokens,
never [N, V] at once.

Each chunked loss splits the N tokens into tiles of `chunk_size` (the last tile padded by
repeating the final row, then masked out) and holds one float32 [chunk_size, V] logits tile at a
time. Two kinds:

- fused (`cross_entropy_chunked`, `sparse_kd_objective`, `dense_kd_objective`; what the training
  steps use): the gradient wrt hidden and W is computed in the forward pass, tile by tile, and the
  backward pass only scales it (`_fused`, see "fused linear + loss" below). One differentiable output.
- rematerialised (`sparse_kd_loss`, `dense_kd_loss`, `sequence_logprobs`): `_map_tiles`, a
  `jax.lax.map` of a `jax.checkpoint`-ed tile; every output is differentiable; the backward pass
  recomputes each tile's logits (four unembedding matmuls instead of three).

This module holds what they share: the static and row checks, the token tiling, the fused linear +
loss `jax.custom_vjp`, and the helpers of the tiles that write out their logits gradient
(`_logits_vjp`). The losses live by target: `likelihood` (CE of the observed tokens, sequence
log-probs), `sparse_kd` (top-K + tail targets), `dense_kd` (a white-box teacher's full distribution);
`objective` holds the `loss` config group and the default normalisation.

The student's log-softmax is computed once per tile and shared by the CE and KD terms (a second one
only when temperature != 1). Every chunked function has a `*_dense` twin (or, for the fused
objectives, the `*_loss_dense` one) computing the same from full logits, for tests.

Soft-capping (Gemma 2's `final_logit_softcapping`): with `softcap` set, every loss reads the logits
softcap * tanh(z / softcap) of z = hidden . W (float32), and `teacher_softcap` does the same for a
white-box teacher's logits. The cap is applied where a tile's logits are formed: inside the
checkpointed tile when rematerialised, and inside the function the fused pass differentiates, so the
tile's logits gradient is chained through tanh by autodiff. None (the default) leaves the logits, and
the computation, as they are.

Normalisation is the caller's: the losses return sums and the token count; the default objective
(`kd_objective`) is the per-token mean L = CE_sum / n_tokens + alpha * KD_weighted_sum / n_tokens.
All keyword arguments are static: bind them with functools.partial before jax.jit.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _check_static(chunk_size, temperature, num_samples=1):
    if chunk_size <= 0:
        raise ValueError(f"loss.chunk_size is {chunk_size}; it must be a positive number of tokens.")
    if temperature <= 0:
        raise ValueError(f"loss.temperature is {temperature}; it must be positive.")
    if num_samples <= 0:
        raise ValueError(f"loss.num_samples is {num_samples}; it must be a positive number of draws.")


def _check_softcap(softcap, name: str = "softcap"):
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(
            f"losses: {name} is {softcap}; it must be a positive finite logit cap, or None for no capping."
        )


def _check_rows(name_to_array: dict, n: int):
    for name, array in name_to_array.items():
        if array.shape[0] != n:
            raise ValueError(
                f"losses: {name} has {array.shape[0]} rows but hidden_NxD has {n}; "
                "flatten all per-token inputs to the same N."
            )


def _tiling(n: int, chunk_size: int) -> tuple[int, int]:
    """(number of tiles, tile length) for N tokens."""
    if n == 0:
        raise ValueError("losses: the batch has no tokens (N = 0); pass at least one token row.")
    chunk = min(chunk_size, n)
    return -(-n // chunk), chunk


def _pad_tiles(x, num_tiles: int, chunk: int, mode: str = "edge"):
    """[N, ...] -> [num_tiles, chunk, ...], padded at the end (by repeating the last row for 'edge').

    Tile t holds rows t, T + t, 2T + t, ... (strided, T = num_tiles), not rows tC .. tC + C - 1: with the
    token axis split over devices (a sharded batch) every tile then has C / devices rows on each device, so
    each device computes its own part of every tile. Contiguous tiles each lay on one device's rows, and
    XLA ran every tile whole on every device (8x the loss's matmuls at fsdp=8)."""
    pad = num_tiles * chunk - x.shape[0]
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode=mode) if pad else x
    return x.reshape((chunk, num_tiles) + x.shape[1:]).swapaxes(0, 1)


def _untile(y, n: int):
    """[num_tiles, chunk, ...] per-row tiles (`_pad_tiles`' layout) -> the first n rows [n, ...]."""
    return y.swapaxes(0, 1).reshape((-1,) + y.shape[2:])[:n]


def _map_tiles(tile_fn, inputs: tuple, chunk_size: int):
    """Applies tile_fn to [chunk, ...] slices of the per-token inputs; returns per-token outputs [N, ...]."""
    n = inputs[0].shape[0]
    num_tiles, chunk = _tiling(n, chunk_size)
    outputs = jax.lax.map(jax.checkpoint(tile_fn), tuple(_pad_tiles(x, num_tiles, chunk) for x in inputs))
    return jax.tree.map(lambda y: _untile(y, n), outputs)


def _softcap(logits_CxV, softcap):
    """softcap * tanh(logits / softcap) (Gemma 2's final-logit soft-capping); None leaves them as they are."""
    if softcap is None:
        return logits_CxV
    return softcap * jnp.tanh(logits_CxV / softcap)


def _logits(hidden_CxD, W_DxV, softcap=None):
    return _softcap(jnp.dot(hidden_CxD, W_DxV, preferred_element_type=jnp.float32), softcap)


def _student(logits_CxV, temperature: float):
    """(log-probs for CE, log-probs for KD) sharing one log-softmax when temperature == 1."""
    logq_CxV = jax.nn.log_softmax(logits_CxV, axis=-1)
    logq_kd_CxV = logq_CxV if temperature == 1.0 else jax.nn.log_softmax(logits_CxV / temperature, -1)
    return logq_CxV, logq_kd_CxV


def _nll(logq_CxV, targets_C):
    return -jnp.take_along_axis(logq_CxV, targets_C[:, None], axis=-1)[:, 0]


def _weighted_sums(mask, ce, kd, weight):
    """(sum mask * ce, sum mask * weight * kd) over the tokens with mask != 0 (others may be inf/nan)."""
    on = mask != 0
    return (jnp.sum(jnp.where(on, mask * ce, 0.0)), jnp.sum(jnp.where(on, mask * weight.astype(jnp.float32) * kd, 0.0)))


def _masked_sums(ce_N, kd_N, mask_N, weight_N):
    mask_N = mask_N.astype(jnp.float32)
    return (*_weighted_sums(mask_N, ce_N, kd_N, weight_N), jnp.sum(mask_N))


def _uniforms(rng, n: int, tail_mode_or_sampled, num_samples: int):
    if not tail_mode_or_sampled:
        return jnp.zeros((n, 0), jnp.float32)
    if rng is None:
        raise ValueError("losses: sampled KD needs an rng key; pass rng=jax.random.key(...).")
    return jax.random.uniform(rng, (n, num_samples), jnp.float32)


# ----------------------------------------------------------------------------- fused linear + loss
#
# The `cross_entropy_chunked` and `*_kd_objective` losses compute their gradient in the forward
# pass, tile by tile (a `jax.custom_vjp`): each tile's logits give its loss and, by a VJP of the
# tile's loss wrt the logits, dLoss/dlogits, which is contracted at once into the tile's
# hidden-state gradient and a running float32 dW. No logits tile is kept or recomputed: three
# unembedding matmuls in all, as for the dense loss (rematerialisation needs four), and no [N, V]
# array. The backward pass only scales the saved gradients by the loss's cotangent, so gradients
# flow to `hidden_NxD` and `W_DxV` only (targets, masks, weights and teacher inputs are data).


def _fused_tiles(hidden_NxD, mask_N, per_token: tuple, chunk_size: int):
    """[T, C, ...] tiles: padded rows repeat the last row (edge) with mask 0."""
    num_tiles, chunk = _tiling(hidden_NxD.shape[0], chunk_size)
    tiles = tuple(_pad_tiles(x, num_tiles, chunk) for x in (hidden_NxD, *per_token))
    return tiles[0], _pad_tiles(mask_N, num_tiles, chunk, "constant"), tiles[1:]


def _sum_tiles(loss_T, aux_T):
    return jnp.sum(loss_T), jax.tree.map(lambda a: jnp.sum(a, axis=0), aux_T)


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _fused_linear_loss(tile_fn, hidden_NxD, W_DxV, mask_N, per_token, shared, chunk_size):
    """sum over token tiles of `tile_fn(logits_CxV, mask_C, *per_token_C, *shared) -> (loss, aux)`."""
    hidden_T, mask_T, tokens_T = _fused_tiles(hidden_NxD, mask_N, per_token, chunk_size)

    def tile(args):
        hidden_CxD, mask_C, *tokens_C = args
        return tile_fn(_logits(hidden_CxD, W_DxV), mask_C, *tokens_C, *shared)

    return _sum_tiles(*jax.lax.map(tile, (hidden_T, mask_T, *tokens_T)))


def _fused_linear_loss_fwd(tile_fn, hidden_NxD, W_DxV, mask_N, per_token, shared, chunk_size):
    hidden_T, mask_T, tokens_T = _fused_tiles(hidden_NxD, mask_N, per_token, chunk_size)

    def step(dW_DxV, args):
        hidden_CxD, mask_C, *tokens_C = args
        loss, tile_vjp, aux = jax.vjp(
            lambda logits: tile_fn(logits, mask_C, *tokens_C, *shared), _logits(hidden_CxD, W_DxV), has_aux=True
        )
        dlogits_CxV = tile_vjp(jnp.ones_like(loss))[0].astype(W_DxV.dtype)
        dhidden_CxD = jax.lax.dot_general(
            dlogits_CxV, W_DxV, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        dW_DxV = dW_DxV + jax.lax.dot_general(
            hidden_CxD, dlogits_CxV, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return dW_DxV, (loss, aux, dhidden_CxD.astype(hidden_CxD.dtype))

    dW_DxV, (loss_T, aux_T, dhidden_T) = jax.lax.scan(
        step, jnp.zeros(W_DxV.shape, jnp.float32), (hidden_T, mask_T, *tokens_T)
    )
    dhidden_NxD = _untile(dhidden_T, hidden_NxD.shape[0])
    return _sum_tiles(loss_T, aux_T), (dhidden_NxD, dW_DxV.astype(W_DxV.dtype), mask_N, per_token, shared)


def _fused_linear_loss_bwd(tile_fn, chunk_size, res, cotangents):
    dhidden_NxD, dW_DxV, mask_N, per_token, shared = res
    g = cotangents[0]  # aux outputs are metrics: the public functions return them under stop_gradient
    return (
        g.astype(dhidden_NxD.dtype) * dhidden_NxD,
        g.astype(dW_DxV.dtype) * dW_DxV,
        _zero_cotangent(mask_N),
        jax.tree.map(_zero_cotangent, per_token),
        jax.tree.map(_zero_cotangent, shared),
    )


_fused_linear_loss.defvjp(_fused_linear_loss_fwd, _fused_linear_loss_bwd)


def _capped_tile(tile_fn, softcap):
    """tile_fn of the soft-capped logits: the cap sits inside what the fused pass's VJP differentiates,
    so dLoss/dz = dLoss/dlogits * (1 - tanh^2) comes from autodiff around the tile's own gradient."""
    if softcap is None:
        return tile_fn

    def capped_tile_fn(z_CxV, *rest):
        return tile_fn(_softcap(z_CxV, softcap), *rest)

    return capped_tile_fn


def _fused(tile_fn, hidden_NxD, W_DxV, mask_N, per_token=(), shared=(), *, chunk_size: int, softcap=None):
    _tiling(hidden_NxD.shape[0], chunk_size)  # rejects N = 0 before tracing
    tile_fn = _capped_tile(tile_fn, softcap)
    loss, aux = _fused_linear_loss(
        tile_fn, hidden_NxD, W_DxV, mask_N.astype(jnp.float32), tuple(per_token), tuple(shared), chunk_size
    )
    return loss, jax.lax.stop_gradient(aux)


# ----------------------------------------------------------------------------- analytic tile gradients


# The tile losses of `likelihood`, `sparse_kd` and `dense_kd` write out their logits gradient (a
# `jax.custom_vjp` per tile, used by the fused pass's VJP): dNLL/dz = softmax(z) - onehot(target) is
# one elementwise pass that reads the logits tile again. Left to autodiff, XLA:CPU kept the tile's
# exponentials as a [C, V] buffer and ran the cotangent through separate passes
# (`benchmarks/kd_loss.py`; BUILD_NOTES.md, "Analytic loss tiles").


def _softmax_terms(logits_CxV, targets_C):
    """(shifted logits, sum of their exponentials, row max, NLL of the targets) per row."""
    row_max_C = jnp.max(logits_CxV, axis=-1)
    shifted_CxV = logits_CxV - row_max_C[:, None]
    total_C = jnp.sum(jnp.exp(shifted_CxV), axis=-1)
    target_C = jnp.take_along_axis(logits_CxV, targets_C[:, None], axis=-1)[:, 0]
    nll_C = jnp.log(total_C) - (target_C - row_max_C)
    return shifted_CxV, total_C, row_max_C, nll_C


def _softmax_grad(logits_CxV, log_norm, scale, targets_C, target_coef_C):
    """scale * exp(logits - log_norm) - target_coef * onehot(target): one pass over the tile
    (`log_norm` and `scale` are [C, 1]). The exponent is not the forward's `logits - row max` on
    purpose: XLA would merge the two and keep the exponentials as a [C, V] buffer, which on CPU cost
    more than computing them twice (CE's loss and gradient 18% slower at V 32768)."""
    onehot_CxV = jnp.arange(logits_CxV.shape[-1])[None, :] == targets_C[:, None]
    return jnp.exp(logits_CxV - log_norm) * scale - jnp.where(onehot_CxV, target_coef_C[:, None], 0.0)


def _logits_vjp(forward, grad):
    """f(logits, *data) -> forward's output, differentiated in the logits only and by hand:
    `forward(logits, *data) -> (out, residuals)`, `grad(residuals, out_cotangent) -> dlogits`. The
    data (masks, targets, the targets' log-probs, teacher logits) get zero cotangents."""

    @jax.custom_vjp
    def f(logits, *data):
        return forward(logits, *data)[0]

    def fwd(logits, *data):
        out, residuals = forward(logits, *data)
        return out, (residuals, data)

    def bwd(saved, out_cotangent):
        residuals, data = saved
        return (grad(residuals, out_cotangent), *jax.tree.map(_zero_cotangent, data))

    f.defvjp(fwd, bwd)
    return f


def _grad_coefs(alpha, mask_C, weight_C):
    """dLoss/dNLL and dLoss/dKD per token of loss = sum mask NLL + alpha sum mask weight KD (0 off the mask)."""
    on_C = mask_C != 0
    return jnp.where(on_C, mask_C, 0.0), jnp.where(on_C, alpha * mask_C * weight_C.astype(jnp.float32), 0.0)


def _objective_tile(tile_terms, alpha):
    """(loss, (ce, kd)) of one tile from its per-token (nll_C, kd_C): loss = ce + alpha * kd."""

    def tile_fn(logits_CxV, mask_C, weight_C, *rest):
        ce, kd = _weighted_sums(mask_C, *tile_terms(logits_CxV, *rest), weight_C)
        return ce + alpha * kd, (ce, kd)

    return tile_fn
