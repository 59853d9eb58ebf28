"""Per-token divergences D(p_target || q_student) between distributions given as log-probabilities.

Every function here works on the last axis and broadcasts over any leading axes; it is NaN-free in
value and gradient for zero-probability entries (log-prob -inf) on either side, so rows of padding
(all -inf targets) can be masked out after the fact.

Kinds (p = target, q = student, all sums over the vocabulary or the sparse support):
  forward_kl  KL(p || q) = sum p (log p - log q)                      (the paper's)
  reverse_kl  KL(q || p) = sum q (log q - log p)
  jsd         beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,
              bounded by the binary entropy H(beta) <= log 2
  skew_kl     KL(p || a p + (1 - a) q),  a = skew_alpha in [0, 1)  (a = 0 is forward_kl)
  tvd         0.5 sum |p - q|, in [0, 1]

Sparse targets (top-K ids, their log-probs, and the tail mass 1 - sum topk) are reduced to a small
distribution by `sparse_divergence`, with one of three tail modes:
  tail     the K probabilities plus one bucket holding the tail mass; the student's side of the
           bucket is its total probability outside the K ids, computed exactly as a logsumexp over
           the student's log-probs at the non-K ids (equal to log(1 - sum_K q) without the
           cancellation). This equals the dense divergence against the target completed by
           spreading its tail over the non-K ids in proportion to the student (p/q is then constant
           on the tail, and every kind here is an f-divergence).
  renorm   the target and the student both renormalised over the K ids.
  sampled  an unbiased importance-sampled estimate of the dense divergence (see
           `sampled_divergence`) against the completed target above; its expectation over draws is
           the `tail` value, so it adds variance in exchange for touching only S ids per token.
Absent top-K entries have log-prob -inf (any id); their student mass counts as tail. Valid ids in
one row must be distinct. A stored tail of 0 is the float32 rounding of 1 - sum topk (whose unit near
1 is 2^-24), not a target without mass outside the K ids: reverse_kl, whose tail term divides by it,
reads it as 2^-24 (against 0 any student mass there made the loss inf; the other kinds stay finite).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
TAIL_MODES = ("tail", "renorm", "sampled")
# Kinds whose per-id term vanishes wherever the target does: sampling from the target alone is unbiased.
_TARGET_SUPPORTED = ("forward_kl", "skew_kl")
# The smallest tail a stored 1 - sum topk stands for, for kinds that divide by the target's tail.
_TAIL_FLOOR = {"reverse_kl": 2.0**-24}


def check_divergence_args(kind: str, jsd_beta: float, skew_alpha: float, tail_mode: str = "tail") -> None:
    """Raises ValueError naming the bad loss setting (config group `loss`)."""
    if kind not in KINDS:
        raise ValueError(f"loss.divergence is {kind!r}; expected one of {KINDS}.")
    if tail_mode not in TAIL_MODES:
        raise ValueError(f"loss.tail_mode is {tail_mode!r}; expected one of {TAIL_MODES}.")
    if not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"loss.jsd_beta is {jsd_beta}; it must lie strictly between 0 and 1.")
    if not 0.0 <= skew_alpha < 1.0:
        raise ValueError(f"loss.skew_alpha is {skew_alpha}; it must lie in [0, 1).")


def masked_logsumexp(x, keep, axis=-1):
    """log sum_{keep} exp(x) along `axis`; -inf (with zero, finite gradients) where nothing is kept."""
    x_kept = jnp.where(keep, x, -jnp.inf)
    x_max = jax.lax.stop_gradient(jnp.max(x_kept, axis=axis, keepdims=True))
    x_max = jnp.where(jnp.isfinite(x_max), x_max, 0.0)
    total = jnp.sum(jnp.exp(x_kept - x_max), axis=axis, keepdims=True)
    positive = total > 0
    out = jnp.where(positive, jnp.log(jnp.where(positive, total, 1.0)) + x_max, -jnp.inf)
    return jnp.squeeze(out, axis)


def _log_mix(weight: float, logp, logq):
    """log(weight p + (1 - weight) q), elementwise, NaN-free when both sides are -inf."""
    both = jnp.stack([logp, logq])
    coef = jnp.array([weight, 1.0 - weight], dtype=logp.dtype).reshape((2,) + (1,) * logp.ndim)
    return masked_logsumexp(both + jnp.log(coef), jnp.ones_like(both, dtype=bool), axis=0)


def _plogratio(prob, log_a, log_b):
    """prob * (log_a - log_b), and exactly 0 where prob == 0 (log_a may then be -inf)."""
    positive = prob > 0
    finite = positive & (log_b > -jnp.inf)  # prob > 0 against log_b = -inf is +inf, with zero gradient
    diff = jnp.where(finite, log_a, 0.0) - jnp.where(finite, log_b, 0.0)
    return jnp.where(finite, prob * diff, jnp.where(positive, jnp.inf, 0.0))


def divergence_terms(kind: str, target_logprobs, student_logprobs, *, jsd_beta: float = 0.5, skew_alpha: float = 0.1):
    """Elementwise terms whose sum over the last axis is D(p || q); same shape as the inputs."""
    check_divergence_args(kind, jsd_beta, skew_alpha)
    logp, logq = target_logprobs, student_logprobs
    p, q = jnp.exp(logp), jnp.exp(logq)
    if kind == "forward_kl":
        return _plogratio(p, logp, logq)
    if kind == "reverse_kl":
        return _plogratio(q, logq, logp)
    if kind == "jsd":
        logm = _log_mix(jsd_beta, logp, logq)
        return jsd_beta * _plogratio(p, logp, logm) + (1.0 - jsd_beta) * _plogratio(q, logq, logm)
    if kind == "skew_kl":
        logm = logq if skew_alpha == 0.0 else _log_mix(skew_alpha, logp, logq)
        return _plogratio(p, logp, logm)
    return 0.5 * jnp.abs(p - q)


def divergence(kind: str, target_logprobs, student_logprobs, *, jsd_beta: float = 0.5, skew_alpha: float = 0.1):
    """D(p_target || q_student) over the last axis, for two full (dense) distributions."""
    terms = divergence_terms(kind, target_logprobs, student_logprobs, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    return jnp.sum(terms, axis=-1)


def cross_entropy(logits_NxV, targets_N, mask_N):
    """Masked token cross-entropy from full logits: returns (ce_sum, n_tokens), both float32 scalars."""
    logq_NxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1)
    nll_N = -jnp.take_along_axis(logq_NxV, targets_N[:, None], axis=-1)[:, 0]
    mask_N = mask_N.astype(jnp.float32)
    return jnp.sum(jnp.where(mask_N != 0, mask_N * nll_N, 0.0)), jnp.sum(mask_N)


def _sparse_parts(kd_ids_MxK, kd_logprobs_MxK, kd_tail_M, student_logprobs_MxV, tail_floor: float = 0.0):
    """Shared pieces of a sparse target: valid top-K log-probs on both sides and the tail buckets (the
    stored tail raised to `tail_floor` where the tail holds ids)."""
    num_rows, vocab = student_logprobs_MxV.shape
    valid_MxK = kd_logprobs_MxK > -jnp.inf
    logp_MxK = jnp.where(valid_MxK, kd_logprobs_MxK, -jnp.inf)
    gathered_MxK = jnp.take_along_axis(student_logprobs_MxV, kd_ids_MxK, axis=-1)
    logq_MxK = jnp.where(valid_MxK, gathered_MxK, -jnp.inf)
    rows_Mx1 = jnp.arange(num_rows)[:, None]
    slot_ids_MxK = jnp.where(valid_MxK, kd_ids_MxK, vocab)  # out of range -> dropped
    member_MxV = jnp.zeros((num_rows, vocab), bool).at[rows_Mx1, slot_ids_MxK].set(True, mode="drop")
    logq_tail_M = masked_logsumexp(student_logprobs_MxV, ~member_MxV)
    # When the top-K covers every id (K = V) the tail holds no id and so no mass: the stored tail is
    # then float32 rounding residue, which against the student's empty tail (-inf) gave an infinite KL.
    if kd_ids_MxK.shape[-1] < vocab:  # fewer slots than ids: the tail is never empty (no [M, V] pass)
        empty_tail_M = jnp.zeros((num_rows,), bool)
    else:
        empty_tail_M = jnp.all(member_MxV, axis=-1)
    tail_M = jnp.where(empty_tail_M, 0.0, jnp.maximum(kd_tail_M.astype(jnp.float32), tail_floor))
    logp_tail_M = jnp.where(tail_M > 0, jnp.log(jnp.where(tail_M > 0, tail_M, 1.0)), -jnp.inf)
    return logp_MxK, logq_MxK, logp_tail_M, logq_tail_M, member_MxV, rows_Mx1, slot_ids_MxK


def complete_sparse_target(kd_ids_MxK, kd_logprobs_MxK, kd_tail_M, student_logprobs_MxV, tail_floor: float = 0.0):
    """Dense target log-probs [M, V]: the top-K values, and the tail mass (at least `tail_floor`) spread
    over the other ids in proportion to the student (differentiable through the student's part)."""
    logp_MxK, _, logp_tail_M, logq_tail_M, member_MxV, rows_Mx1, slot_ids_MxK = _sparse_parts(
        kd_ids_MxK, kd_logprobs_MxK, kd_tail_M, student_logprobs_MxV, tail_floor
    )
    top_MxV = jnp.full(member_MxV.shape, -jnp.inf).at[rows_Mx1, slot_ids_MxK].set(logp_MxK, mode="drop")
    tail_norm_M = jnp.where(jnp.isfinite(logq_tail_M), logq_tail_M, 0.0)
    spread_MxV = (logp_tail_M - tail_norm_M)[:, None] + student_logprobs_MxV
    return jnp.where(member_MxV, top_MxV, spread_MxV)


def sampled_divergence(
    kind: str,
    target_logprobs_MxV,
    student_logprobs_MxV,
    sample_uniforms_MxS,
    *,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
):
    """Unbiased importance-sampled estimate of D(p || q) per row, RS-KD style.

    With draws x_1..x_S ~ r / Z (inverse-CDF from the given uniforms in [0, 1), Z = sum_v r_v) the estimate is
        D_hat = (Z/S) sum_s d(p_{x_s}, q_{x_s}) / r_{x_s},
    where d is the per-id term (`divergence_terms`), so E[D_hat] = sum_v d(p_v, q_v) = D(p || q)
    whenever r > 0 wherever d != 0. The proposal r is the target p for forward_kl and skew_kl (their
    terms vanish where p does; forward_kl's estimate is then (Z/S) sum_s log p_x - log q_x) and the
    even mixture (p + q)/2 otherwise. Z is 1 up to rounding for a normalised target, but a stored
    sparse row's top-k and tail sum to 1 only within its encoding (up to ~4e-3 for bfloat16 or uint8
    log-probs): without Z the estimate's expectation was the `tail` value divided by Z (or by (1 + Z)/2).
    r is held constant under differentiation, so the gradient of D_hat is also an unbiased estimate of
    the gradient of D. Sampling uses a float32 CDF.
    """
    check_divergence_args(kind, jsd_beta, skew_alpha)
    logp_MxV = target_logprobs_MxV
    if kind in _TARGET_SUPPORTED:
        logr_MxV = jax.lax.stop_gradient(logp_MxV)
    else:
        logr_MxV = jax.lax.stop_gradient(_log_mix(0.5, logp_MxV, student_logprobs_MxV))
    cdf_MxV = jnp.cumsum(jnp.exp(logr_MxV), axis=-1)
    total_Mx1 = cdf_MxV[:, -1:]  # Z: the draws' probabilities are r / Z
    points_MxS = sample_uniforms_MxS * total_Mx1
    draws_MxS = jax.vmap(lambda c, u: jnp.searchsorted(c, u, side="right"))(cdf_MxV, points_MxS)
    draws_MxS = jnp.minimum(draws_MxS, logp_MxV.shape[-1] - 1)
    terms_MxS = divergence_terms(
        kind,
        jnp.take_along_axis(logp_MxV, draws_MxS, axis=-1),
        jnp.take_along_axis(student_logprobs_MxV, draws_MxS, axis=-1),
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
    )
    logr_MxS = jnp.take_along_axis(logr_MxV, draws_MxS, axis=-1)
    weights_MxS = total_Mx1 * jnp.exp(-jnp.where(jnp.isfinite(logr_MxS), logr_MxS, 0.0))
    return jnp.mean(jnp.where(jnp.isfinite(logr_MxS), terms_MxS * weights_MxS, 0.0), axis=-1)


def sparse_divergence(
    kind: str,
    kd_ids_MxK,
    kd_logprobs_MxK,
    kd_tail_M,
    student_logprobs_MxV,
    *,
    tail_mode: str = "tail",
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    sample_uniforms_MxS=None,
):
    """D(sparse target || q_student) per row; see the module docstring for the tail modes.

    kd_ids_MxK int32, kd_logprobs_MxK float32 (-inf where absent), kd_tail_M float32 (1 - sum topk),
    student_logprobs_MxV the student's full log-probs. `sampled` needs sample_uniforms_MxS.
    """
    check_divergence_args(kind, jsd_beta, skew_alpha, tail_mode)
    kw = dict(jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    floor = _TAIL_FLOOR.get(kind, 0.0)
    if tail_mode == "sampled":
        if sample_uniforms_MxS is None:
            raise ValueError(
                "loss.tail_mode 'sampled' needs sample uniforms; pass an rng key and loss.num_samples > 0."
            )
        logp_MxV = complete_sparse_target(kd_ids_MxK, kd_logprobs_MxK, kd_tail_M, student_logprobs_MxV, floor)
        return sampled_divergence(kind, logp_MxV, student_logprobs_MxV, sample_uniforms_MxS, **kw)
    logp_MxK, logq_MxK, logp_tail_M, logq_tail_M, *_ = _sparse_parts(
        kd_ids_MxK, kd_logprobs_MxK, kd_tail_M, student_logprobs_MxV, floor
    )
    if tail_mode == "renorm":
        keep_MxK = logp_MxK > -jnp.inf
        norm_p = masked_logsumexp(logp_MxK, keep_MxK)[:, None]
        norm_q = masked_logsumexp(logq_MxK, keep_MxK)[:, None]
        logp_MxK = logp_MxK - jnp.where(jnp.isfinite(norm_p), norm_p, 0.0)
        logq_MxK = logq_MxK - jnp.where(jnp.isfinite(norm_q), norm_q, 0.0)
        return divergence(kind, logp_MxK, logq_MxK, **kw)
    logp_MxB = jnp.concatenate([logp_MxK, logp_tail_M[:, None]], axis=-1)
    logq_MxB = jnp.concatenate([logq_MxK, logq_tail_M[:, None]], axis=-1)
    return divergence(kind, logp_MxB, logq_MxB, **kw)


def binary_entropy(beta: float) -> float:
    """H(beta) in nats: the upper bound of jsd with that beta (log 2 at beta = 0.5)."""
    return -beta * math.log(beta) - (1.0 - beta) * math.log1p(-beta)
