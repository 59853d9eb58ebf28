"""The train state: step, trainable parameters, other model variables and optimizer state.

The model is kept split (`nnx.split`) so every jitted function is a pure function of pytrees; the
graphdef is static and `TrainState.model(graphdef)` merges a live module back. Frozen models (a
DPO reference, a proxy, a teacher) are not part of the train state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from proxykd_jax.parallel.sharding import ModelBuilder, replicated, state_shardings


@flax.struct.dataclass
class TrainState:
    """One training run's device state (a pytree)."""

    step: jax.Array  # int32 scalar: loop steps done (micro-batches when accumulating gradients)
    params: nnx.State  # the trainable nnx.Param variables
    rest: nnx.State  # the model's other variables (RNG state, counters), carried but not optimised
    opt_state: optax.OptState  # optimizer state; its parameter-shaped leaves are sharded like params

    def model(self, graphdef) -> nnx.Module:
        """The live module for these parameters."""
        return nnx.merge(graphdef, self.params, self.rest)


def _split(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    return nnx.split_state(state, nnx.Param, ...)


def train_state_shardings(
    abstract_params, abstract_rest, optimizer: optax.GradientTransformation, mesh: Mesh, rules
) -> TrainState:
    """A TrainState of NamedShardings: params by their logical axes, optimizer moments like their params."""
    rep = replicated(mesh)
    params_sh = state_shardings(abstract_params, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_sh = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt,
        params_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return TrainState(step=rep, params=params_sh, rest=state_shardings(abstract_rest, mesh, rules), opt_state=opt_sh)


def create_train_state(
    optimizer: optax.GradientTransformation, mesh: Mesh, rules, cls_or_fn: Callable[..., nnx.Module], *args, **kw
) -> tuple[Any, TrainState, TrainState]:
    """Builds model `cls_or_fn(*args, **kw)` and its optimizer state directly sharded on `mesh`.

    Returns (graphdef, state, shardings) where `shardings` is a TrainState of NamedShardings (for
    jit in/out shardings and checkpoint restore).
    """
    builder = ModelBuilder(cls_or_fn, *args, **kw)
    graphdef, abstract = builder.abstract()
    abstract_params, abstract_rest = _split(abstract)
    shardings = train_state_shardings(abstract_params, abstract_rest, optimizer, mesh, rules)

    def init(rng_states):
        model_state, new_rng_states = builder.build(rng_states)
        params, rest = _split(model_state)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=optimizer.init(params))
        return state, new_rng_states

    rng_shardings = jax.tree.map(lambda _: replicated(mesh), builder.rng_states)
    state, new_rng_states = jax.jit(init, out_shardings=(shardings, rng_shardings))(builder.rng_states)
    builder.advance(new_rng_states)
    return graphdef, state, shardings


def abstract_like(state: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying `shardings` (a restore target, possibly on another mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
