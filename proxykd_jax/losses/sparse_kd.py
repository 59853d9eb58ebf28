"""Student CE plus KD to sparse targets (the posterior's top-K entries and a tail bucket), tiled over
tokens (see `chunked`): `sparse_kd_loss` (rematerialised, both sums differentiable), its dense
reference `sparse_kd_loss_dense`, and `sparse_kd_objective` (fused, what distillation trains on), whose
paper setting (forward KL, tail bucket, temperature 1) has its logits gradient written out.
"""

from __future__ import annotations

import functools

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
    _student,
    _uniforms,
    _weighted_sums,
)
from proxykd_jax.losses.divergences import check_divergence_args, sparse_divergence


def _sparse_tile(
    logits_CxV,
    targets_C,
    ids_CxK,
    logprobs_CxK,
    tail_C,
    uniforms_CxS,
    *,
    divergence,
    tail_mode,
    temperature,
    jsd_beta,
    skew_alpha,
):
    logq_CxV, logq_kd_CxV = _student(logits_CxV, temperature)
    kd_C = sparse_divergence(
        divergence,
        ids_CxK,
        logprobs_CxK,
        tail_C,
        logq_kd_CxV,
        tail_mode=tail_mode,
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
        sample_uniforms_MxS=uniforms_CxS if tail_mode == "sampled" else None,
    )
    return _nll(logq_CxV, targets_C), kd_C


def _sparse_setup(
    hidden_NxD,
    targets_N,
    kd_ids_NxK,
    kd_logprobs_NxK,
    kd_tail_N,
    mask_N,
    weight_N,
    divergence,
    tail_mode,
    temperature,
    jsd_beta,
    skew_alpha,
    num_samples,
    chunk_size,
    softcap,
):
    check_divergence_args(divergence, jsd_beta, skew_alpha, tail_mode)
    _check_static(chunk_size, temperature, num_samples)
    _check_softcap(softcap)
    _check_rows(
        dict(
            targets_N=targets_N,
            kd_ids_NxK=kd_ids_NxK,
            kd_logprobs_NxK=kd_logprobs_NxK,
            kd_tail_N=kd_tail_N,
            mask_N=mask_N,
            weight_N=weight_N,
        ),
        hidden_NxD.shape[0],
    )
    if kd_ids_NxK.shape != kd_logprobs_NxK.shape:
        raise ValueError(
            f"losses: kd_ids_NxK {kd_ids_NxK.shape} and kd_logprobs_NxK "
            f"{kd_logprobs_NxK.shape} must have the same shape."
        )


def sparse_kd_loss(
    hidden_NxD,
    W_DxV,
    targets_N,
    kd_ids_NxK,
    kd_logprobs_NxK,
    kd_tail_N,
    mask_N,
    weight_N,
    *,
    divergence: str = "forward_kl",
    tail_mode: str = "tail",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    num_samples: int = 16,
    chunk_size: int = 256,
    rng=None,
    softcap: float | None = None,
):
    """Student CE plus sparse-target KD, tiled over tokens.

    Returns (ce_sum, kd_sum, n_tokens): ce_sum = sum_t mask_t * NLL_t,
    kd_sum = sum_t mask_t * weight_t * D(target_t || q_t), n_tokens = sum_t mask_t.
    `rng` (a key) is needed only for tail_mode 'sampled' (num_samples draws per token). `softcap`
    soft-caps the student's logits (see `chunked`; None: no cap).
    """
    _sparse_setup(
        hidden_NxD,
        targets_N,
        kd_ids_NxK,
        kd_logprobs_NxK,
        kd_tail_N,
        mask_N,
        weight_N,
        divergence,
        tail_mode,
        temperature,
        jsd_beta,
        skew_alpha,
        num_samples,
        chunk_size,
        softcap,
    )
    uniforms_NxS = _uniforms(rng, hidden_NxD.shape[0], tail_mode == "sampled", num_samples)
    kw = dict(
        divergence=divergence, tail_mode=tail_mode, temperature=temperature, jsd_beta=jsd_beta, skew_alpha=skew_alpha
    )

    def tile_fn(args):
        hidden_CxD, *rest = args
        return _sparse_tile(_logits(hidden_CxD, W_DxV, softcap), *rest, **kw)

    ce_N, kd_N = _map_tiles(
        tile_fn, (hidden_NxD, targets_N, kd_ids_NxK, kd_logprobs_NxK, kd_tail_N, uniforms_NxS), chunk_size
    )
    return _masked_sums(ce_N, kd_N, mask_N, weight_N)


def sparse_kd_loss_dense(
    hidden_NxD,
    W_DxV,
    targets_N,
    kd_ids_NxK,
    kd_logprobs_NxK,
    kd_tail_N,
    mask_N,
    weight_N,
    *,
    divergence: str = "forward_kl",
    tail_mode: str = "tail",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    num_samples: int = 16,
    chunk_size: int = 256,
    rng=None,
    softcap: float | None = None,
):
    """Reference for `sparse_kd_loss` from the full [N, V] logits (chunk_size is ignored)."""
    _sparse_setup(
        hidden_NxD,
        targets_N,
        kd_ids_NxK,
        kd_logprobs_NxK,
        kd_tail_N,
        mask_N,
        weight_N,
        divergence,
        tail_mode,
        temperature,
        jsd_beta,
        skew_alpha,
        num_samples,
        chunk_size,
        softcap,
    )
    uniforms_NxS = _uniforms(rng, hidden_NxD.shape[0], tail_mode == "sampled", num_samples)
    ce_N, kd_N = _sparse_tile(
        _logits(hidden_NxD, W_DxV, softcap),
        targets_N,
        kd_ids_NxK,
        kd_logprobs_NxK,
        kd_tail_N,
        uniforms_NxS,
        divergence=divergence,
        tail_mode=tail_mode,
        temperature=temperature,
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
    )
    return _masked_sums(ce_N, kd_N, mask_N, weight_N)


# The paper's setting (forward KL, the tail bucket, temperature 1) with its logits gradient written
# out. Per token, with q = softmax(z), the K valid target entries p_k, P = sum_k p_k, the tail p_t
# and the student's tail q_t = sum of q outside the K ids (exact, as in `sparse_divergence`):
#   KD = sum_k p_k (log p_k - log q_k) + p_t (log p_t - log q_t)
#   dKD/dz_j = q_j (P + p_t) - p_j                                  for j in K
#            = q_j (P + p_t) - p_t q_j / q_t = (q_j / q_t) (q_t (P + p_t) - p_t)   outside K,
# and dNLL/dz_j = q_j - [j = target]. The tile's gradient is one dense pass, the exponentials over
# the student's tail sum (q_j / q_t <= 1 outside K, however small q_t) times a per-token factor
# minus the target's one-hot, and then the K entries set to their own values (the dense expression
# is wrong there, even inf). One factor for all ids, q_j (P + p_t - p_t / q_t) plus a correction
# on K, cancels catastrophically once the student is confident (q_t ~ 1e-9: p_t / q_t ~ 1e8
# against q_j ~ 1). Autodiff through `sparse_divergence` instead ran the log-softmax's cotangent,
# the scatter of the gathers' cotangents and the masked tail logsumexp's VJP as separate [C, V]
# passes (`benchmarks/kd_loss.py`; figures in BUILD_NOTES.md, "Analytic loss tiles").


def _fkl_tail_forward(alpha, logits_CxV, mask_C, weight_C, targets_C, ids_CxK, logprobs_CxK, tail_C):
    """(loss, ce, kd) of one tile and the residuals of its analytic gradient."""
    c, v = logits_CxV.shape
    logprobs_CxK = logprobs_CxK.astype(jnp.float32)
    valid_CxK = logprobs_CxK > -jnp.inf
    slots_CxK = jnp.where(valid_CxK, ids_CxK, v)  # absent entries: out of range, dropped
    member_CxV = jnp.zeros((c, v), bool).at[jnp.arange(c)[:, None], slots_CxK].set(True, mode="drop")
    # The student's tail sum is taken relative to the tail's own max, not the row max: relative to the row max
    # it underflowed to 0 once every logit outside K lay ~87 below the max (a confident student), and the KD
    # term became inf with no tail gradient. The row's normaliser follows from it and the K logits, so the
    # [C, V] pass still takes one exponential per id.
    tail_max_C = jnp.max(jnp.where(member_CxV, -jnp.inf, logits_CxV), axis=-1)  # finite: K < V ids
    tail_max_C = jnp.where(jnp.isfinite(tail_max_C), tail_max_C, 0.0)
    tail_sum_C = jnp.sum(jnp.where(member_CxV, 0.0, jnp.exp(logits_CxV - tail_max_C[:, None])), axis=-1)  # >= 1
    logits_CxK = jnp.take_along_axis(logits_CxV, jnp.clip(ids_CxK, 0, v - 1), axis=-1)
    row_max_C = jnp.maximum(tail_max_C, jnp.max(jnp.where(valid_CxK, logits_CxK, -jnp.inf), axis=-1))
    head_sum_C = jnp.sum(jnp.where(valid_CxK, jnp.exp(logits_CxK - row_max_C[:, None]), 0.0), axis=-1)
    tail_part_C = jnp.where(tail_sum_C > 0, jnp.exp(tail_max_C - row_max_C) * tail_sum_C, 0.0)
    log_norm_C = row_max_C + jnp.log(head_sum_C + tail_part_C)
    nll_C = log_norm_C - jnp.take_along_axis(logits_CxV, targets_C[:, None], axis=-1)[:, 0]
    logq_CxK = logits_CxK - log_norm_C[:, None]
    logp_CxK = jnp.where(valid_CxK, logprobs_CxK, 0.0)
    p_CxK = jnp.where(valid_CxK, jnp.exp(logp_CxK), 0.0)
    head_C = jnp.sum(jnp.where(p_CxK > 0, p_CxK * (logp_CxK - logq_CxK), 0.0), -1)
    p_tail_C = jnp.maximum(tail_C.astype(jnp.float32), 0.0)
    has_tail_C = p_tail_C > 0
    tail_on_C = has_tail_C & (tail_sum_C > 0)
    log_tail_norm_C = tail_max_C + jnp.log(jnp.where(tail_sum_C > 0, tail_sum_C, 1.0))
    logq_tail_C = log_tail_norm_C - log_norm_C
    tail_term_C = jnp.where(tail_on_C, p_tail_C * (jnp.log(jnp.where(has_tail_C, p_tail_C, 1.0)) - logq_tail_C), 0.0)
    kd_C = head_C + jnp.where(has_tail_C & ~tail_on_C, jnp.inf, tail_term_C)  # p_t > 0 against q_t = 0
    ce, kd = _weighted_sums(mask_C, nll_C, kd_C, weight_C)

    g_ce_C, g_kd_C = _grad_coefs(alpha, mask_C, weight_C)
    p_tail_C = jnp.where(tail_on_C, p_tail_C, 0.0)  # q_t = 0: that term is +inf with zero gradient
    coef_C = g_ce_C + g_kd_C * (jnp.sum(p_CxK, -1) + p_tail_C)  # dLoss/dz_j = q_j coef - g_kd p_j on K
    q_tail_C = jnp.where(tail_sum_C > 0, jnp.exp(logq_tail_C), 0.0)
    outside_C = coef_C * q_tail_C - g_kd_C * p_tail_C  # times q_j / q_t outside K
    on_k_CxK = jnp.exp(logq_CxK) * coef_C[:, None] - g_kd_C[:, None] * p_CxK
    on_k_CxK = on_k_CxK - jnp.where(ids_CxK == targets_C[:, None], g_ce_C[:, None], 0.0)
    res = (logits_CxV, log_tail_norm_C, outside_C, targets_C, g_ce_C, slots_CxK, on_k_CxK)
    return (ce + alpha * kd, ce, kd), res


def _fkl_tail_grad(residuals, cotangents):
    logits_CxV, log_tail_norm_C, outside_C, targets_C, g_ce_C, slots_CxK, on_k_CxK = residuals
    g = cotangents[0]  # ce and kd are metrics (returned under stop_gradient by `_fused`)
    dlogits_CxV = _softmax_grad(logits_CxV, log_tail_norm_C[:, None], outside_C[:, None], targets_C, g_ce_C)
    rows_Cx1 = jnp.arange(logits_CxV.shape[0])[:, None]
    return g * dlogits_CxV.at[rows_Cx1, slots_CxK].set(on_k_CxK, mode="drop")


def _fkl_tail_tile(alpha):
    loss_fn = _logits_vjp(functools.partial(_fkl_tail_forward, alpha), _fkl_tail_grad)

    def tile_fn(logits_CxV, mask_C, weight_C, targets_C, ids_CxK, logprobs_CxK, tail_C, uniforms_CxS):
        loss, ce, kd = loss_fn(logits_CxV, mask_C, weight_C, targets_C, ids_CxK, logprobs_CxK, tail_C)
        return loss, (ce, kd)

    return tile_fn


def sparse_kd_objective(
    hidden_NxD,
    W_DxV,
    targets_N,
    kd_ids_NxK,
    kd_logprobs_NxK,
    kd_tail_N,
    mask_N,
    weight_N,
    *,
    alpha: float,
    divergence: str = "forward_kl",
    tail_mode: str = "tail",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    num_samples: int = 16,
    chunk_size: int = 256,
    rng=None,
    softcap: float | None = None,
):
    """`sparse_kd_loss` fused into one objective: (loss_sum, ce_sum, kd_sum, n_tokens).

    loss_sum = ce_sum + alpha * kd_sum carries the gradient (wrt hidden_NxD and W_DxV, computed in
    the forward pass; see "fused linear + loss"); ce_sum and kd_sum are the same sums as
    `sparse_kd_loss` returns, as metrics without gradient. The distillation objective is
    loss_sum / max(n_tokens, 1) (= `kd_objective`).
    """
    _sparse_setup(
        hidden_NxD,
        targets_N,
        kd_ids_NxK,
        kd_logprobs_NxK,
        kd_tail_N,
        mask_N,
        weight_N,
        divergence,
        tail_mode,
        temperature,
        jsd_beta,
        skew_alpha,
        num_samples,
        chunk_size,
        softcap,
    )
    uniforms_NxS = _uniforms(rng, hidden_NxD.shape[0], tail_mode == "sampled", num_samples)
    terms = functools.partial(
        _sparse_tile,
        divergence=divergence,
        tail_mode=tail_mode,
        temperature=temperature,
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
    )
    analytic = (divergence, tail_mode, temperature) == ("forward_kl", "tail", 1.0)
    analytic = analytic and kd_ids_NxK.shape[-1] < W_DxV.shape[-1]  # K = V: the tail may be empty
    loss_sum, (ce_sum, kd_sum) = _fused(
        _fkl_tail_tile(float(alpha)) if analytic else _objective_tile(terms, float(alpha)),
        hidden_NxD,
        W_DxV,
        mask_N,
        (weight_N, targets_N, kd_ids_NxK, kd_logprobs_NxK, kd_tail_N, uniforms_NxS),
        chunk_size=chunk_size,
        softcap=softcap,
    )
    return loss_sum, ce_sum, kd_sum, jnp.sum(mask_N.astype(jnp.float32))
