"""Pure, jitted-once train and eval steps around a stage's loss function.

A stage (SFT, DPO, distillation) supplies only `loss_fn(model, batch, *frozen) -> (loss, metrics)`;
`make_train_step` wraps it into `step(state, batch, *frozen) -> (state, metrics)` with explicit
in/out shardings and the state donated. Frozen inputs (reference model, proxy, teacher outputs)
follow the batch as extra arguments, are never donated and get no gradient.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from proxykd_jax.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _metrics_sharding(state_shardings: TrainState) -> NamedSharding:
    return NamedSharding(state_shardings.step.mesh, jax.sharding.PartitionSpec())


def make_train_step(loss_fn: LossFn, graphdef, optimizer: optax.GradientTransformation, *,
                    state_shardings: TrainState, batch_shardings, frozen_shardings: Sequence[Any] = (),
                    schedule: optax.Schedule | None = None, grad_accum: int = 1):
    """`step(state, batch, *frozen) -> (state, metrics)`, jitted once, state donated.

    metrics: `loss`, `grad_norm` (before clipping), `lr` (when `schedule` is given; the schedule is
    indexed by optimizer updates = step // grad_accum) and whatever `loss_fn` returns, all
    replicated scalars. `batch_shardings` / `frozen_shardings` may be pytree prefixes (one
    NamedSharding for a whole batch dict).
    """
    def step(state: TrainState, batch, *frozen):
        def compute(params):
            model = nnx.merge(graphdef, params, state.rest)
            loss, aux = loss_fn(model, batch, *frozen)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss, (aux, rest)

        (loss, (aux, rest)), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step // grad_accum), jnp.float32)
        new_state = TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
        return new_state, metrics

    metrics_sh = _metrics_sharding(state_shardings)
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings, *frozen_shardings),
                   out_shardings=(state_shardings, metrics_sh), donate_argnums=(0,))


def make_eval_step(loss_fn: LossFn, graphdef, *, state_shardings: TrainState, batch_shardings,
                   frozen_shardings: Sequence[Any] = ()):
    """`eval_step(state, batch, *frozen) -> metrics` (`loss` + the loss_fn's metrics); nothing donated."""
    def eval_step(state: TrainState, batch, *frozen):
        loss, aux = loss_fn(state.model(graphdef), batch, *frozen)
        return {"loss": loss, **aux}

    return jax.jit(eval_step, in_shardings=(state_shardings, batch_shardings, *frozen_shardings),
                   out_shardings=_metrics_sharding(state_shardings))
