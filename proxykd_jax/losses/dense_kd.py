"""White-box KD: student CE plus D(teacher || student) between full distributions, the teacher's
logits computed per tile from its hidden states and unembedding (see `chunked`): `dense_kd_loss`
(rematerialised), its reference `dense_kd_loss_dense`, and `dense_kd_objective` (fused), whose forward
KL at temperature 1 has its logits gradient written out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from proxykd_jax.losses.chunked import (
    _check_rows,
    _check_softcap,
    _check_static,
    _fused,
    _grad_coefs,
    _logits,
    _logits_vjp,
    _map_tiles,
    _masked_sums,
    _nll,
    _objective_tile,
    _softmax_grad,
    _softmax_terms,
    _student,
    _uniforms,
    _weighted_sums,
)
from proxykd_jax.losses.divergences import check_divergence_args, sampled_divergence
from proxykd_jax.losses.divergences import divergence as dense_divergence


def _dense_tile(
    logits_CxV, teacher_logits_CxV, targets_C, uniforms_CxS, *, divergence, temperature, jsd_beta, skew_alpha, sampled
):
    logq_CxV, logq_kd_CxV = _student(logits_CxV, temperature)
    logp_CxV = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_logits_CxV / temperature, axis=-1))
    kw = dict(jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    if sampled:
        kd_C = sampled_divergence(divergence, logp_CxV, logq_kd_CxV, uniforms_CxS, **kw)
    else:
        kd_C = dense_divergence(divergence, logp_CxV, logq_kd_CxV, **kw)
    return _nll(logq_CxV, targets_C), kd_C


def _dense_setup(
    hidden_NxD,
    W_DxV,
    targets_N,
    teacher_hidden_NxE,
    teacher_W_ExV,
    mask_N,
    weight_N,
    divergence,
    temperature,
    jsd_beta,
    skew_alpha,
    num_samples,
    chunk_size,
    softcap,
    teacher_softcap,
):
    check_divergence_args(divergence, jsd_beta, skew_alpha)
    _check_static(chunk_size, temperature, num_samples)
    _check_softcap(softcap)
    _check_softcap(teacher_softcap, "teacher_softcap")
    _check_rows(
        dict(targets_N=targets_N, teacher_hidden_NxE=teacher_hidden_NxE, mask_N=mask_N, weight_N=weight_N),
        hidden_NxD.shape[0],
    )
    if teacher_W_ExV.shape[-1] != W_DxV.shape[-1]:
        raise ValueError(
            f"losses: teacher_W_ExV has vocabulary {teacher_W_ExV.shape[-1]} but the "
            f"student's W_DxV has {W_DxV.shape[-1]}; teacher and student must share it."
        )


def dense_kd_loss(
    hidden_NxD,
    W_DxV,
    targets_N,
    teacher_hidden_NxE,
    teacher_W_ExV,
    mask_N,
    weight_N,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    sampled: bool = False,
    num_samples: int = 16,
    chunk_size: int = 256,
    rng=None,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
):
    """White-box KD: CE plus D(teacher || student) between full distributions, tiled over tokens.

    The teacher's logits are computed per tile from its final hidden states and unembedding (no
    gradient flows into them); `temperature` divides both sides' logits in the KD term. With
    sampled=True the KD term is the importance-sampled estimate (`sampled_divergence`). `softcap`
    soft-caps the student's logits and `teacher_softcap` the teacher's (see `chunked`; None: no cap).
    Returns (ce_sum, kd_sum, n_tokens) as `sparse_kd_loss`.
    """
    _dense_setup(
        hidden_NxD,
        W_DxV,
        targets_N,
        teacher_hidden_NxE,
        teacher_W_ExV,
        mask_N,
        weight_N,
        divergence,
        temperature,
        jsd_beta,
        skew_alpha,
        num_samples,
        chunk_size,
        softcap,
        teacher_softcap,
    )
    uniforms_NxS = _uniforms(rng, hidden_NxD.shape[0], sampled, num_samples)
    kw = dict(divergence=divergence, temperature=temperature, jsd_beta=jsd_beta, skew_alpha=skew_alpha, sampled=sampled)

    def tile_fn(args):
        hidden_CxD, teacher_hidden_CxE, targets_C, uniforms_CxS = args
        return _dense_tile(
            _logits(hidden_CxD, W_DxV, softcap),
            _logits(teacher_hidden_CxE, teacher_W_ExV, teacher_softcap),
            targets_C,
            uniforms_CxS,
            **kw,
        )

    ce_N, kd_N = _map_tiles(tile_fn, (hidden_NxD, teacher_hidden_NxE, targets_N, uniforms_NxS), chunk_size)
    return _masked_sums(ce_N, kd_N, mask_N, weight_N)


def dense_kd_loss_dense(
    hidden_NxD,
    W_DxV,
    targets_N,
    teacher_hidden_NxE,
    teacher_W_ExV,
    mask_N,
    weight_N,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    sampled: bool = False,
    num_samples: int = 16,
    chunk_size: int = 256,
    rng=None,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
):
    """Reference for `dense_kd_loss` from the full [N, V] logits of both models."""
    _dense_setup(
        hidden_NxD,
        W_DxV,
        targets_N,
        teacher_hidden_NxE,
        teacher_W_ExV,
        mask_N,
        weight_N,
        divergence,
        temperature,
        jsd_beta,
        skew_alpha,
        num_samples,
        chunk_size,
        softcap,
        teacher_softcap,
    )
    uniforms_NxS = _uniforms(rng, hidden_NxD.shape[0], sampled, num_samples)
    ce_N, kd_N = _dense_tile(
        _logits(hidden_NxD, W_DxV, softcap),
        _logits(teacher_hidden_NxE, teacher_W_ExV, teacher_softcap),
        targets_N,
        uniforms_NxS,
        divergence=divergence,
        temperature=temperature,
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
        sampled=sampled,
    )
    return _masked_sums(ce_N, kd_N, mask_N, weight_N)


def _dense_fkl_forward(alpha, logits_CxV, mask_C, weight_C, targets_C, teacher_logits_CxV):
    """(loss, ce, kd) of one white-box tile, forward KL at temperature 1, and its gradient's residuals:
    dLoss/dz = q (g_ce + g_kd) - g_kd p - g_ce onehot(target), one pass over both logits tiles."""
    shifted_CxV, total_C, row_max_C, nll_C = _softmax_terms(logits_CxV, targets_C)
    teacher_CxV = teacher_logits_CxV.astype(jnp.float32)
    t_max_C = jnp.max(teacher_CxV, axis=-1)
    t_log_total_C = jnp.log(jnp.sum(jnp.exp(teacher_CxV - t_max_C[:, None]), axis=-1))
    logp_CxV = teacher_CxV - (t_max_C + t_log_total_C)[:, None]
    log_total_C = jnp.log(total_C)
    logq_CxV = shifted_CxV - log_total_C[:, None]
    p_CxV = jnp.exp(logp_CxV)
    kd_C = jnp.sum(jnp.where(p_CxV > 0, p_CxV * (logp_CxV - logq_CxV), 0.0), axis=-1)
    ce, kd = _weighted_sums(mask_C, nll_C, kd_C, weight_C)
    g_ce_C, g_kd_C = _grad_coefs(alpha, mask_C, weight_C)
    res = (logits_CxV, row_max_C + log_total_C, teacher_CxV, t_max_C, t_log_total_C, targets_C, g_ce_C, g_kd_C)
    return (ce + alpha * kd, ce, kd), res


def _dense_fkl_grad(residuals, cotangents):
    logits_CxV, log_norm_C, teacher_CxV, t_max_C, t_log_total_C, targets_C, g_ce_C, g_kd_C = residuals
    student = _softmax_grad(logits_CxV, log_norm_C[:, None], (g_ce_C + g_kd_C)[:, None], targets_C, g_ce_C)
    # p recomputed, grouped unlike the forward's log p so that XLA does not merge the two (see `_softmax_grad`)
    p_CxV = jnp.exp((teacher_CxV - t_max_C[:, None]) - t_log_total_C[:, None])
    return cotangents[0] * (student - g_kd_C[:, None] * p_CxV)


def _dense_fkl_tile(alpha, teacher_softcap):
    loss_fn = _logits_vjp(functools.partial(_dense_fkl_forward, alpha), _dense_fkl_grad)

    def tile_fn(logits_CxV, mask_C, weight_C, teacher_hidden_CxE, targets_C, uniforms_CxS, teacher_W):
        teacher_logits_CxV = _logits(teacher_hidden_CxE, teacher_W, teacher_softcap)
        loss, ce, kd = loss_fn(logits_CxV, mask_C, weight_C, targets_C, teacher_logits_CxV)
        return loss, (ce, kd)

    return tile_fn


def dense_kd_objective(
    hidden_NxD,
    W_DxV,
    targets_N,
    teacher_hidden_NxE,
    teacher_W_ExV,
    mask_N,
    weight_N,
    *,
    alpha: float,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    sampled: bool = False,
    num_samples: int = 16,
    chunk_size: int = 256,
    rng=None,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
):
    """`dense_kd_loss` fused into one objective: (loss_sum, ce_sum, kd_sum, n_tokens), as
    `sparse_kd_objective` (the teacher's logits are computed per tile; no gradient reaches the teacher)."""
    _dense_setup(
        hidden_NxD,
        W_DxV,
        targets_N,
        teacher_hidden_NxE,
        teacher_W_ExV,
        mask_N,
        weight_N,
        divergence,
        temperature,
        jsd_beta,
        skew_alpha,
        num_samples,
        chunk_size,
        softcap,
        teacher_softcap,
    )
    uniforms_NxS = _uniforms(rng, hidden_NxD.shape[0], sampled, num_samples)
    kw = dict(divergence=divergence, temperature=temperature, jsd_beta=jsd_beta, skew_alpha=skew_alpha, sampled=sampled)

    def terms(logits_CxV, teacher_hidden_CxE, targets_C, uniforms_CxS, teacher_W):
        teacher_logits_CxV = _logits(teacher_hidden_CxE, teacher_W, teacher_softcap)
        return _dense_tile(logits_CxV, teacher_logits_CxV, targets_C, uniforms_CxS, **kw)

    analytic = (divergence, temperature, sampled) == ("forward_kl", 1.0, False)  # the gradient written out
    loss_sum, (ce_sum, kd_sum) = _fused(
        _dense_fkl_tile(float(alpha), teacher_softcap) if analytic else _objective_tile(terms, float(alpha)),
        hidden_NxD,
        W_DxV,
        mask_N,
        (weight_N, teacher_hidden_NxE, targets_N, uniforms_NxS),
        (teacher_W_ExV,),
        chunk_size=chunk_size,
        softcap=softcap,
    )
    return loss_sum, ce_sum, kd_sum, jnp.sum(mask_N.astype(jnp.float32))
