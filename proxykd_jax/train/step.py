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
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from proxykd_jax.parallel.sharding import under_mesh
from proxykd_jax.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _metrics_sharding(state_shardings: TrainState) -> NamedSharding:
    return NamedSharding(state_shardings.step.mesh, jax.sharding.PartitionSpec())


# XLA:CPU runs independent ops of a program concurrently; its default schedule puts the two matmuls
# of each linear layer's backward pass (input and weight gradients) side by side, and each then runs
# at about half speed on the shared cores. The memory-optimised schedule orders them apart:
# measured 3-9% faster train steps on the 2-core benchmark machine (BUILD_NOTES.md, train-step figures).
_PLATFORM_COMPILER_OPTIONS = {"cpu": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}}


def _platform(state_shardings: TrainState) -> str:
    return state_shardings.step.mesh.devices.flat[0].platform


def default_compiler_options(state_shardings: TrainState) -> dict[str, str]:
    """XLA options the steps compile with on the state's platform (none off CPU)."""
    return dict(_PLATFORM_COMPILER_OPTIONS.get(_platform(state_shardings), {}))


def make_train_step(
    loss_fn: LossFn,
    graphdef,
    optimizer: optax.GradientTransformation,
    *,
    state_shardings: TrainState,
    batch_shardings,
    frozen_shardings: Sequence[Any] = (),
    schedule: optax.Schedule | None = None,
    grad_accum: int = 1,
    accum_weight: str | None = "tokens",
    compiler_options: dict[str, str] | None = None,
):
    """`step(state, batch, *frozen) -> (state, metrics)`, jitted once, state donated.

    metrics: `loss`, `grad_norm` (before clipping), `lr` (when `schedule` is given; the schedule is
    indexed by optimizer updates = step // grad_accum) and whatever `loss_fn` returns, all
    replicated scalars. `batch_shardings` / `frozen_shardings` may be pytree prefixes (one
    NamedSharding for a whole batch dict). `accum_weight`: the loss_fn metric its loss is a mean
    over (tokens); an accumulating optimizer (`optim.accumulate`) weights each micro-batch's gradient
    by it (equal weights when the loss_fn does not return it). `compiler_options` (XLA debug options)
    default to `default_compiler_options`.
    """

    def step(state: TrainState, batch, *frozen):
        def compute(params):
            model = nnx.merge(graphdef, params, state.rest)
            loss, aux = loss_fn(model, batch, *frozen)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss, (aux, rest)

        (loss, (aux, rest)), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
        extra = {}
        if accum_weight in aux and isinstance(optimizer, optax.GradientTransformationExtraArgs):
            extra["weight"] = aux[accum_weight]
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step // grad_accum), jnp.float32)
        new_state = TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
        return new_state, metrics

    metrics_sh = _metrics_sharding(state_shardings)
    if compiler_options is None:
        compiler_options = default_compiler_options(state_shardings)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, *frozen_shardings),
        out_shardings=(state_shardings, metrics_sh),
        donate_argnums=(0,),
        compiler_options=compiler_options,
    )
    train_step = under_mesh(
        jitted, state_shardings.step.mesh, placed=(batch_shardings, state_shardings.params, *frozen_shardings)
    )
    train_step.step_fn = step  # the pure step, for `make_multi_step`
    return train_step


# `train.steps_per_call` = 0 (auto). On XLA:CPU every execution maps its temporaries afresh (one mmap
# of the benchmark step's ~380 MB, ~94,000 first-touch page faults, ~150-200 ms per call with the
# dispatch): several steps per call amortise that. `benchmarks/train_step.py`, three runs each: 4 steps
# per call 1.13-1.15x one step's tokens/s, 16 steps 1.20-1.27x. The several-step program is one more
# trace and compile (about 2.5 s per training phase of `make demo`, whose phases are 15-300 steps of
# 40 ms: slower there), so auto takes it on CPU for runs of at least `_AUTO_MIN_STEPS` steps, and holds
# the stacked host batches of one call under `_AUTO_STACK_BYTES` (`auto_steps_for_batch`).
# Accelerators keep one step per call. (BUILD_NOTES.md, "Several train steps per call".)
_AUTO_STEPS_PER_CALL = {"cpu": 16}
_AUTO_MIN_STEPS = 1000
_AUTO_STACK_BYTES = 256 * 2**20


def resolve_steps_per_call(value: int, state_shardings: TrainState, steps: int) -> int:
    """`train.steps_per_call`, with 0 (auto) resolved for the state's platform and a run of `steps`
    (before the batch size is known: `auto_steps_for_batch` may lower it)."""
    if value:
        return int(value)
    if steps < _AUTO_MIN_STEPS:
        return 1
    return _AUTO_STEPS_PER_CALL.get(_platform(state_shardings), 1)


def auto_steps_for_batch(per_call: int, batch: dict) -> int:
    """Auto's steps per call lowered so that one call's stacked host batches stay under
    `_AUTO_STACK_BYTES` (a distill batch carries K teacher ids and log-probs per token)."""
    nbytes = sum(np.asarray(x).nbytes for x in batch.values())
    return max(1, min(per_call, _AUTO_STACK_BYTES // max(nbytes, 1)))


def make_multi_step(train_step, state_shardings: TrainState):
    """`multi(state, batches, *frozen) -> (state, metrics)`: one compiled call that runs `train_step`
    (from `make_train_step`) once per batch of `batches` (n batches stacked on a leading axis, see
    `parallel.global_batches`) in a `lax.scan`; metrics come back stacked, [n] each. The result equals n
    calls of `train_step`; the state is donated. Built once per `train_step` (a phase that reuses its
    step, as align's rounds do, reuses this too)."""
    if getattr(train_step, "multi", None) is not None:
        return train_step.multi
    step = train_step.step_fn

    def multi(state, batches, *frozen):
        return jax.lax.scan(lambda carry, batch: step(carry, batch, *frozen), state, batches)

    jitted = jax.jit(
        multi,
        out_shardings=(state_shardings, _metrics_sharding(state_shardings)),
        donate_argnums=(0,),
        compiler_options=default_compiler_options(state_shardings),
    )
    train_step.multi = under_mesh(jitted, state_shardings.step.mesh, getattr(train_step, "rules", None))
    return train_step.multi


def make_eval_step(
    loss_fn: LossFn, graphdef, *, state_shardings: TrainState, batch_shardings, frozen_shardings: Sequence[Any] = ()
):
    """`eval_step(state, batch, *frozen) -> metrics` (`loss` + the loss_fn's metrics); nothing donated."""

    def eval_step(state: TrainState, batch, *frozen):
        loss, aux = loss_fn(state.model(graphdef), batch, *frozen)
        return {"loss": loss, **aux}

    jitted = jax.jit(
        eval_step,
        in_shardings=(state_shardings, batch_shardings, *frozen_shardings),
        out_shardings=_metrics_sharding(state_shardings),
        compiler_options=default_compiler_options(state_shardings),
    )
    return under_mesh(
        jitted, state_shardings.step.mesh, placed=(batch_shardings, state_shardings.params, *frozen_shardings)
    )
