"""Student and alignment losses: cross-entropy, divergences D(p_target || q_student) for dense and
sparse (top-K + tail) targets, token-tiled memory-bounded CE + KD with dense references, sequence
log-probs and DPO. See `divergences` for the kinds and tail modes and `chunked` for the tiling; the
tiled losses live in `likelihood` (CE, sequence log-probs), `sparse_kd` and `dense_kd`, the `loss`
config group in `objective`.
"""

from proxykd_jax.losses.dense_kd import dense_kd_loss, dense_kd_loss_dense, dense_kd_objective
from proxykd_jax.losses.divergences import (
    KINDS,
    TAIL_MODES,
    binary_entropy,
    complete_sparse_target,
    cross_entropy,
    divergence,
    divergence_terms,
    masked_logsumexp,
    sampled_divergence,
    sparse_divergence,
)
from proxykd_jax.losses.dpo import dpo_loss
from proxykd_jax.losses.likelihood import cross_entropy_chunked, sequence_logprobs, sequence_logprobs_dense
from proxykd_jax.losses.objective import default_config, kd_objective, loss_kwargs
from proxykd_jax.losses.sparse_kd import sparse_kd_loss, sparse_kd_loss_dense, sparse_kd_objective

__all__ = [
    "KINDS",
    "TAIL_MODES",
    "binary_entropy",
    "complete_sparse_target",
    "cross_entropy",
    "cross_entropy_chunked",
    "default_config",
    "dense_kd_loss",
    "dense_kd_loss_dense",
    "dense_kd_objective",
    "divergence",
    "divergence_terms",
    "dpo_loss",
    "kd_objective",
    "loss_kwargs",
    "masked_logsumexp",
    "sampled_divergence",
    "sequence_logprobs",
    "sequence_logprobs_dense",
    "sparse_divergence",
    "sparse_kd_loss",
    "sparse_kd_loss_dense",
    "sparse_kd_objective",
]
