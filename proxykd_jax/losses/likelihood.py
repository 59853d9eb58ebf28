"""Log-likelihood of the observed tokens, tiled over tokens (see `chunked`): the fused masked
cross-entropy (`cross_entropy_chunked`, the SFT and alignment loss) and per-sequence log-probs
(`sequence_logprobs`, for DPO and NLL terms) with its dense reference. Both write out their logits
gradient (`_logits_vjp`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from proxykd_jax.losses.chunked import (
    _check_rows,
    _check_softcap,
    _check_static,
    _fused,
    _logits,
    _logits_vjp,
    _map_tiles,
    _softmax_grad,
    _softmax_terms,
)

# ----------------------------------------------------------------------------- cross-entropy


def _ce_forward(logits_CxV, mask_C, targets_C):
    _, total_C, row_max_C, nll_C = _softmax_terms(logits_CxV, targets_C)
    on_C = mask_C != 0
    coef_C = jnp.where(on_C, mask_C, 0.0)
    loss = jnp.sum(jnp.where(on_C, mask_C * nll_C, 0.0))
    return loss, (logits_CxV, row_max_C + jnp.log(total_C), targets_C, coef_C)


def _ce_grad(residuals, g):
    logits_CxV, log_norm_C, targets_C, coef_C = residuals
    return g * _softmax_grad(logits_CxV, log_norm_C[:, None], coef_C[:, None], targets_C, coef_C)


_ce_loss = _logits_vjp(_ce_forward, _ce_grad)  # masked NLL sum of one tile


def _ce_tile(logits_CxV, mask_C, targets_C):
    return _ce_loss(logits_CxV, mask_C, targets_C), ()


def cross_entropy_chunked(hidden_NxD, W_DxV, targets_N, mask_N, *, chunk_size: int = 256, softcap: float | None = None):
    """Masked CE from hidden states and the unembedding, tiled over tokens: (ce_sum, n_tokens).

    Fused (see above): the gradient wrt hidden_NxD and W_DxV is computed in the forward pass.
    `softcap` soft-caps the logits (see `chunked`; None: no cap).
    """
    _check_static(chunk_size, 1.0)
    _check_softcap(softcap)
    _check_rows(dict(targets_N=targets_N, mask_N=mask_N), hidden_NxD.shape[0])
    ce_sum, _ = _fused(_ce_tile, hidden_NxD, W_DxV, mask_N, (targets_N,), chunk_size=chunk_size, softcap=softcap)
    return ce_sum, jnp.sum(mask_N.astype(jnp.float32))


# ----------------------------------------------------------------------------- sequence log-probs


def _target_logprobs_forward(logits_CxV, targets_C):
    _, total_C, row_max_C, nll_C = _softmax_terms(logits_CxV, targets_C)
    return -nll_C, (logits_CxV, row_max_C + jnp.log(total_C), targets_C)


def _target_logprobs_grad(residuals, g_C):
    logits_CxV, log_norm_C, targets_C = residuals
    return -_softmax_grad(logits_CxV, log_norm_C[:, None], g_C[:, None], targets_C, g_C)


# log softmax(logits)[target] per row; its VJP g * (onehot - softmax) is one pass (see `_softmax_grad`)
# where autodiff of log_softmax + gather took several
_target_logprobs = _logits_vjp(_target_logprobs_forward, _target_logprobs_grad)


def _row_sums(logp_BxL, mask_BxL, length_normalize: bool):
    mask_BxL = mask_BxL.astype(jnp.float32)
    total_B = jnp.sum(jnp.where(mask_BxL != 0, mask_BxL * logp_BxL, 0.0), axis=-1)
    if length_normalize:
        return total_B / jnp.maximum(jnp.sum(mask_BxL, axis=-1), 1.0)
    return total_B


def _check_sequence(hidden_BxLxD, targets_BxL, mask_BxL, chunk_size, softcap):
    _check_static(chunk_size, 1.0)
    _check_softcap(softcap)
    if targets_BxL.shape != hidden_BxLxD.shape[:2] or mask_BxL.shape != targets_BxL.shape:
        raise ValueError(
            f"losses: targets_BxL {targets_BxL.shape} and mask_BxL {mask_BxL.shape} must "
            f"match the first two axes of hidden_BxLxD {hidden_BxLxD.shape}."
        )


def sequence_logprobs(
    hidden_BxLxD,
    W_DxV,
    targets_BxL,
    mask_BxL,
    *,
    chunk_size: int = 256,
    length_normalize: bool = False,
    softcap: float | None = None,
):
    """sum_t mask * log q(target_t) per row (divided by the row's mask sum when length_normalize),
    tiled over the B*L tokens, q from the logits soft-capped by `softcap` (None: no cap). Used for DPO
    (policy and reference) and NLL terms."""
    _check_sequence(hidden_BxLxD, targets_BxL, mask_BxL, chunk_size, softcap)
    b, length, d = hidden_BxLxD.shape

    def tile_fn(args):
        hidden_CxD, targets_C = args
        return _target_logprobs(_logits(hidden_CxD, W_DxV, softcap), targets_C)

    logp_N = _map_tiles(tile_fn, (hidden_BxLxD.reshape(b * length, d), targets_BxL.reshape(-1)), chunk_size)
    return _row_sums(logp_N.reshape(b, length), mask_BxL, length_normalize)


def sequence_logprobs_dense(
    hidden_BxLxD,
    W_DxV,
    targets_BxL,
    mask_BxL,
    *,
    chunk_size: int = 256,
    length_normalize: bool = False,
    softcap: float | None = None,
):
    """Reference for `sequence_logprobs` from the full [B, L, V] logits."""
    _check_sequence(hidden_BxLxD, targets_BxL, mask_BxL, chunk_size, softcap)
    logq_BxLxV = jax.nn.log_softmax(_logits(hidden_BxLxD, W_DxV, softcap), axis=-1)
    logp_BxL = jnp.take_along_axis(logq_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return _row_sums(logp_BxL, mask_BxL, length_normalize)
