"""AdamW with linear warm-up + cosine decay, global-norm clipping and gradient accumulation."""

from __future__ import annotations

import jax
import ml_collections
import optax


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `optim` config group."""
    cd = ml_collections.ConfigDict()
    cd.lr = 3e-4  # peak learning rate (reached after warm-up)
    cd.warmup_steps = 100  # linear warm-up from 0 over this many optimizer updates
    cd.decay_steps = 0  # cosine decay length in optimizer updates incl. warm-up; 0 = train.steps // grad_accum
    cd.min_lr_ratio = 0.1  # final learning rate as a fraction of `lr`
    cd.weight_decay = 0.1  # decoupled weight decay (AdamW), applied to parameters of rank >= 2 only
    cd.b1 = 0.9  # Adam first-moment decay
    cd.b2 = 0.95  # Adam second-moment decay
    cd.eps = 1e-8  # Adam epsilon
    cd.clip_norm = 1.0  # clip the (accumulated) gradient to this global L2 norm; 0 = no clipping
    cd.grad_accum = 1  # micro-batches per optimizer update (optax.MultiSteps); each is one loop step
    return cd


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer-update count.

    `total_steps` is the number of loop (micro-batch) steps; the decay spans
    `optim.decay_steps` updates, or `total_steps // grad_accum` when that is 0.
    """
    updates = optim_cfg.decay_steps or max(total_steps // optim_cfg.grad_accum, 1)
    warmup = optim_cfg.warmup_steps
    if warmup >= updates:
        raise ValueError(
            f"optim.warmup_steps ({warmup}) must be below the decay length ({updates} optimizer updates); "
            "lower optim.warmup_steps or raise train.steps / optim.decay_steps."
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_cfg.lr,
        warmup_steps=warmup,
        decay_steps=updates,
        end_value=optim_cfg.lr * optim_cfg.min_lr_ratio,
    )


def _decay_mask(params):
    """Weight decay on matrices only: norms' scales and biases (rank < 2) are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW(schedule) after global-norm clipping, wrapped in MultiSteps when grad_accum > 1."""
    if optim_cfg.grad_accum < 1:
        raise ValueError(f"optim.grad_accum must be >= 1, got {optim_cfg.grad_accum}.")
    parts = [optax.clip_by_global_norm(optim_cfg.clip_norm)] if optim_cfg.clip_norm > 0 else []
    parts.append(
        optax.adamw(
            make_schedule(optim_cfg, total_steps),
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=_decay_mask,
        )
    )
    optimizer = optax.chain(*parts)
    if optim_cfg.grad_accum > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=optim_cfg.grad_accum).gradient_transformation()
    return optimizer
