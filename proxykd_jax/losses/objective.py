"""The student objective's settings and normalisation: the `loss` config group's defaults
(`default_config`), its validated keyword arguments for the losses (`loss_kwargs`), and the default
per-token mean objective (`kd_objective`).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from proxykd_jax.losses.chunked import _check_static
from proxykd_jax.losses.divergences import check_divergence_args


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the student loss settings (group `loss`, read by the distill stage)."""
    cfg = ml_collections.ConfigDict()
    cfg.divergence = "forward_kl"  # forward_kl (paper) | reverse_kl | jsd | skew_kl | tvd
    cfg.tail_mode = "tail"  # sparse targets: tail (K + one tail bucket) | renorm | sampled
    cfg.temperature = 1.0  # divides the student's logits in the KD term (not in CE); no T^2 factor
    cfg.alpha = 100.0  # weight of the KD term relative to CE (paper: 100), per-token mean of both
    cfg.jsd_beta = 0.5  # jsd mixture weight of the target, in (0, 1)
    cfg.skew_alpha = 0.1  # skew_kl: target weight in the skewed student a p + (1 - a) q, in [0, 1)
    cfg.num_samples = 16  # draws per token for tail_mode 'sampled'
    cfg.chunk_size = 256  # tokens per logits tile; one float32 [chunk_size, V] tile lives at a time
    return cfg


def loss_kwargs(cfg: ml_collections.ConfigDict) -> dict:
    """Keyword arguments of `sparse_kd_loss` from the `loss` config group, validated."""
    check_divergence_args(cfg.divergence, cfg.jsd_beta, cfg.skew_alpha, cfg.tail_mode)
    _check_static(cfg.chunk_size, cfg.temperature, cfg.num_samples)
    return dict(
        divergence=cfg.divergence,
        tail_mode=cfg.tail_mode,
        temperature=cfg.temperature,
        jsd_beta=cfg.jsd_beta,
        skew_alpha=cfg.skew_alpha,
        num_samples=cfg.num_samples,
        chunk_size=cfg.chunk_size,
    )


def kd_objective(ce_sum, kd_sum, n_tokens, alpha: float):
    """Per-token mean objective: (CE_sum + alpha * KD_weighted_sum) / max(n_tokens, 1)."""
    return (ce_sum + alpha * kd_sum) / jnp.maximum(n_tokens, 1.0)
