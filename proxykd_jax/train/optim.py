"""AdamW with linear warm-up + cosine decay, global-norm clipping and gradient accumulation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from proxykd_jax.errors import ConfigError
from proxykd_jax.models.llama import NO_WEIGHT_DECAY
from proxykd_jax.train.config import optim_config as default_config  # noqa: F401  (re-exported)


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
    """Weight decay on weight matrices and embeddings only: no norm's scale or bias is decayed (named in
    `llama.NO_WEIGHT_DECAY`: stacked over the layers, a layer norm's scale has rank 2 like a matrix)."""

    def decays(path, p) -> bool:
        names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
        return p.ndim >= 2 and not names & NO_WEIGHT_DECAY

    return jax.tree_util.tree_map_with_path(decays, params)


def check_whole_updates(steps: int, accum: int, *, setting: str, field: str, model: str) -> None:
    """Refuses `steps` micro-batches (`setting` says where they come from, `field` sets them) that are not
    whole optimizer updates of `accum` (optim.grad_accum): fewer than one update never changes the `model`;
    the micro-batches after the last whole update would be computed and never applied to it."""
    if steps < accum:
        raise ConfigError(
            f"{setting} is shorter than the optim.grad_accum={accum} micro-batches of one optimizer update, so "
            f"the {model} would never be updated; raise {field} to at least {accum} or lower optim.grad_accum."
        )
    if steps % accum:
        low = steps - steps % accum
        raise ConfigError(
            f"{setting} is not a multiple of optim.grad_accum={accum}: its last {steps % accum} micro-batches would "
            f"be computed and never applied to the {model}; set {field} to {low} or {low + accum}, or change "
            "optim.grad_accum."
        )


class AccumulationState(NamedTuple):
    """State of `accumulate`: micro-batches since the last update, their weighted gradient sum and weights."""

    mini_step: jax.Array  # int32
    acc_grads: Any  # Σ_i w_i g_i (float32, like the parameters)
    acc_weight: jax.Array  # Σ_i w_i (float32)
    inner_opt_state: Any


def accumulate(inner: optax.GradientTransformation, every: int) -> optax.GradientTransformationExtraArgs:
    """`inner` applied once every `every` micro-batches, to their gradients' weighted mean Σ w_i g_i / Σ w_i
    (zero updates in between). `update(grads, state, params, weight=w_i)`: w_i is what the micro-batch's loss
    is a mean over (its tokens), so the update equals one step on all the micro-batches' tokens at once;
    optax.MultiSteps' plain mean of the micro-batch means over-weights the tokens of short micro-batches."""
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return AccumulationState(
            mini_step=jnp.zeros((), jnp.int32),
            acc_grads=optax.tree.zeros_like(params, dtype=jnp.float32),
            acc_weight=jnp.zeros((), jnp.float32),
            inner_opt_state=inner.init(params),
        )

    def update(grads, state: AccumulationState, params=None, *, weight=1.0, **extra_args):
        weight = jnp.asarray(weight, jnp.float32)
        acc_grads = jax.tree.map(lambda acc, g: acc + weight * g.astype(jnp.float32), state.acc_grads, grads)
        acc_weight = state.acc_weight + weight
        mean = jax.tree.map(
            lambda acc, g: (acc / jnp.where(acc_weight > 0, acc_weight, 1.0)).astype(g.dtype), acc_grads, grads
        )
        updates, inner_state = inner.update(mean, state.inner_opt_state, params, **extra_args)
        emit = state.mini_step == every - 1
        new_state = AccumulationState(
            mini_step=jnp.where(emit, 0, state.mini_step + 1).astype(jnp.int32),
            acc_grads=jax.tree.map(lambda acc: jnp.where(emit, jnp.zeros_like(acc), acc), acc_grads),
            acc_weight=jnp.where(emit, 0.0, acc_weight),
            inner_opt_state=jax.tree.map(
                lambda old, new: jnp.where(emit, new, old).astype(old.dtype), state.inner_opt_state, inner_state
            ),
        )
        return jax.tree.map(lambda u: jnp.where(emit, u, jnp.zeros_like(u)), updates), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW(schedule) after global-norm clipping, wrapped in `accumulate` when grad_accum > 1."""
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
        optimizer = accumulate(optimizer, int(optim_cfg.grad_accum))
    return optimizer
