"""Sharded model construction and host-local <-> global batches.

Models are never built whole on one host: `abstract_model` traces the constructor with
`jax.eval_shape`, `state_shardings` turns each parameter's logical axis names (`out_sharding=`
metadata) into a NamedSharding through the rules table, and `create_sharded_model` runs the
constructor under `jax.jit` with those `out_shardings`, so each device only ever holds its shard.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from proxykd_jax.errors import ConfigError
from proxykd_jax.parallel.rules import LOGICAL_RULES, logical_to_pspec, normalize_rules, step_rules


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def spec_axes(spec_entry) -> tuple:
    """The mesh axes of one PartitionSpec entry (None, an axis, or a tuple of axes) as a tuple."""
    return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def spec_ways(spec_entry, mesh: Mesh) -> int:
    """How many shards one PartitionSpec entry makes."""
    return math.prod(mesh.shape[a] for a in spec_axes(spec_entry))


def replicated(mesh: Mesh) -> NamedSharding:
    """A NamedSharding that keeps a whole copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def under_mesh(jitted, mesh: Mesh, rules=None, *, placed=None):
    """`jitted` traced and run with `mesh` set (`jax.set_mesh`) and the rules table its inputs are laid out by
    (`rules.step_rules`), so the model can pin activation rows to the rules' `batch` axes (`models.llama.shard_batch`)
    and look embeddings up where the rows are (`Llama.embed`); without it, XLA may resolve a matmul's FSDP conflict
    by gathering the rows (whole logits on every device). The table: `rules` (the `mesh.rules` value), or read back
    by `rules_of` from `placed` (a tuple: the batch's sharding, then state shardings; or a function of the call's
    arguments that returns one); with neither, the default (or an enclosing `step_rules`). `.lower` is kept for
    ahead-of-time compilation; `.rules` is the table (None where it is read at call time)."""
    fixed = normalize_rules(rules) if rules is not None else rules_of(*placed) if isinstance(placed, tuple) else None

    def context(args, kwargs):
        table = fixed if fixed is not None or placed is None else rules_of(*placed(*args, **kwargs))
        return step_rules(table) if table is not None else contextlib.nullcontext()

    def call(*args, **kwargs):
        with jax.set_mesh(mesh), context(args, kwargs):
            return jitted(*args, **kwargs)

    def lower(*args, **kwargs):
        with jax.set_mesh(mesh), context(args, kwargs):
            return jitted.lower(*args, **kwargs)

    call.lower, call.rules = lower, fixed
    return call


def _named(x):
    """The NamedSharding of `x` (itself, or a placed array's), else None."""
    sharding = x if isinstance(x, NamedSharding) else getattr(x, "sharding", None)
    return sharding if isinstance(sharding, NamedSharding) else None


def rules_of(batch=None, *states):
    """The rules table a step's inputs were laid out by, read back from their shardings: the `batch` entry from
    `batch` (a NamedSharding or placed array, or a tree of them: the first one's dim 0), every other logical axis from
    a Variable of `states` (trees of nnx Variables holding NamedShardings or placed arrays: a TrainState's `params`
    shardings, a model's state) that names it as its dim 0 (a first dim keeps every mesh axis of its rule). Entries
    found nowhere keep the default table's (LOGICAL_RULES)."""
    table = dict(normalize_rules(LOGICAL_RULES))
    rows = (x for x in jax.tree.leaves(batch) if getattr(x, "ndim", 1) >= 1)  # (a placed scalar has no rows)
    first = next((s for s in map(_named, rows) if s is not None), None)
    if first is not None:
        table["batch"] = spec_axes(first.spec[0]) if len(first.spec) else ()
    found = set()
    for variable in jax.tree.leaves(states, is_leaf=_is_variable):
        names = variable.get_metadata().get("out_sharding") if _is_variable(variable) else None
        sharding = _named(variable.get_value()) if names else None
        if sharding is not None and isinstance(names[0], str) and names[0] not in found:
            table[names[0]] = spec_axes(sharding.spec[0]) if len(sharding.spec) else ()
            found.add(names[0])
    return tuple(table.items())


def mesh_of(tree):
    """A context that sets the mesh of the first NamedSharding-placed array in `tree`, with its dim 0's mesh axes as
    the rules' `batch` entry (`rules_of`; a no-op when there is none): for jitted functions called on batches a
    caller has already placed."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return _both(jax.set_mesh(sharding.mesh), step_rules(rules_of(tree)))
    return contextlib.nullcontext()


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


# The model config field (group `model` or `proxy`) each split logical axis of the decoder's parameters measures,
# named beside the axis in a refusal
MODEL_FIELDS = {
    "vocab": "vocab_size",
    "embed": "d_model",
    "mlp": "d_ff",
    "heads": "num_heads",
    "kv_heads": "num_kv_heads",
}


def variable_sharding(path: str, variable: nnx.Variable, mesh: Mesh, rules) -> NamedSharding:
    """NamedSharding of one (abstract) Variable from its logical `out_sharding` names.

    An `nnx.Param` of rank >= 1 without names is an error (it would be silently replicated);
    other variable kinds (RNG state, counters) without names are replicated.
    """
    names = variable.get_metadata().get("out_sharding")
    shape = tuple(variable.shape) if hasattr(variable, "shape") else ()
    if not names:
        if isinstance(variable, nnx.Param) and len(shape) > 0:
            raise ValueError(
                f"parameter {path} (shape {shape}) has no logical axis names; create it with "
                "nnx.Param(value, out_sharding=(<logical axis per dim>...))."
            )
        return replicated(mesh)
    if len(names) != len(shape):
        raise ValueError(f"parameter {path} has shape {shape} but {len(names)} logical axis names {names}.")
    spec = logical_to_pspec(names, rules, mesh)
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        ways = spec_ways(axes, mesh)
        if size % ways:
            field = f" (or the model's {MODEL_FIELDS[names[dim]]})" if names[dim] in MODEL_FIELDS else ""
            raise ConfigError(
                f"parameter {path} dim {dim} ({names[dim]!r}, size {size}) does not split over mesh axes "
                f"{axes} ({ways} ways); change mesh.shape{field}, or keep {names[dim]!r} whole on every device with "
                f'--config.mesh.rules="{_rules_without(rules, names[dim])}".'
            )
    return NamedSharding(mesh, spec)


def _rules_without(rules, logical: str) -> str:
    """`rules` as a command-line value, with `logical` mapped to no mesh axis (kept whole)."""

    def axes(a):
        a = tuple(a) if isinstance(a, (tuple, list)) else (a,) if a else ()
        return None if not a else a[0] if len(a) == 1 else a

    return repr(tuple((name, None if name == logical else axes(a)) for name, a in rules))


def state_shardings(abstract_state, mesh: Mesh, rules):
    """A tree like `abstract_state` (an nnx.State) with a NamedSharding in place of each value."""

    def one(path, variable):
        return variable.replace(variable_sharding(jax.tree_util.keystr(path), variable, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=_is_variable)


def shardings_of(tree):
    """The `.sharding` of every array in `tree` (e.g. a frozen model's state, for jit in_shardings)."""
    return jax.tree.map(lambda x: x.sharding, tree)


class ModelBuilder:
    """Calls `cls_or_fn(*args, **kw)` inside a trace, threading any `nnx.Rngs` argument through.

    An `nnx.Rngs` cannot be mutated from inside `jax.jit`, so its state is passed in as an explicit
    input and the caller's Rngs is advanced afterwards (`advance`), exactly as an eager call would.
    """

    def __init__(self, cls_or_fn: Callable[..., nnx.Module], *args, **kw):
        self.cls_or_fn, self.args, self.kw = cls_or_fn, args, kw
        self.slots = [(i, a) for i, a in enumerate(args) if isinstance(a, nnx.Rngs)]
        self.slots += [(k, v) for k, v in kw.items() if isinstance(v, nnx.Rngs)]
        split = [nnx.split(r) for _, r in self.slots]
        self.rng_graphdefs = [g for g, _ in split]
        self.rng_states = [s for _, s in split]
        self.graphdef = None

    def build(self, rng_states) -> tuple[nnx.State, list]:
        """Traceable: (model state, new Rngs states); records the model's graphdef."""
        args, kw = list(self.args), dict(self.kw)
        rngs = [nnx.merge(g, s) for g, s in zip(self.rng_graphdefs, rng_states)]
        for (slot, _), r in zip(self.slots, rngs):
            if isinstance(slot, int):
                args[slot] = r
            else:
                kw[slot] = r
        with nnx.use_eager_sharding(False):
            model = self.cls_or_fn(*args, **kw)
        self.graphdef, state = nnx.split(model)
        return state, [nnx.split(r)[1] for r in rngs]

    def abstract(self) -> tuple[Any, nnx.State]:
        """(graphdef, abstract nnx.State of ShapeDtypeStructs) without allocating anything."""
        state, _ = jax.eval_shape(self.build, self.rng_states)
        return self.graphdef, state

    def advance(self, new_rng_states) -> None:
        """Updates the caller's Rngs to the state after construction."""
        for (_, r), s in zip(self.slots, new_rng_states):
            nnx.update(r, s)


def create_sharded_model(cls_or_fn: Callable[..., nnx.Module], mesh: Mesh, rules, *args, **kw) -> nnx.Module:
    """Builds `cls_or_fn(*args, **kw)` directly into sharded device memory.

    The constructor is traced abstractly, every variable gets a NamedSharding from its logical
    axis names and `rules`, then the constructor runs under `jax.jit(out_shardings=...)`.
    """
    builder = ModelBuilder(cls_or_fn, *args, **kw)
    graphdef, abstract_state = builder.abstract()
    shardings = state_shardings(abstract_state, mesh, rules)
    rng_shardings = jax.tree.map(lambda _: replicated(mesh), builder.rng_states)
    state, new_rng_states = jax.jit(builder.build, out_shardings=(shardings, rng_shardings))(builder.rng_states)
    builder.advance(new_rng_states)
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of batch arrays: leading dimension over the mesh axes of logical `batch`."""
    return NamedSharding(mesh, logical_to_pspec(("batch",), rules, mesh))


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """Assembles each process's rows [B_local, ...] into global arrays [B_local * processes, ...].

    Rows of process p are rows [p * B_local, (p + 1) * B_local) of the global batch (the layout
    `jax.make_array_from_process_local_data` expects); the batch dimension is split over the mesh
    axes of logical `batch` (default data x fsdp).
    """
    return _assemble(host_batch, mesh, rules, stacked=0)


def global_batches(host_batches: Sequence[Mapping[str, np.ndarray]], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """`global_batch` of n host batches stacked on a new, unsharded leading axis: [n, B, ...] (the
    input of `train.make_multi_step`)."""
    fields = host_batches[0].keys()
    stacked = {name: np.stack([np.asarray(b[name]) for b in host_batches]) for name in fields}
    return _assemble(stacked, mesh, rules, stacked=len(host_batches))


def _assemble(host_batch, mesh: Mesh, rules, *, stacked: int) -> dict[str, jax.Array]:
    sharding = batch_sharding(mesh, rules)
    ways = spec_ways(sharding.spec[0], mesh)
    if stacked:
        sharding = NamedSharding(mesh, PartitionSpec(None, *sharding.spec))
    lead = 1 if stacked else 0
    out = {}
    for name, value in host_batch.items():
        value = np.asarray(value)
        if value.ndim <= lead:
            raise ValueError(f"batch field {name!r} is a scalar; every batch field needs a leading batch dim.")
        rows = value.shape[lead] * jax.process_count()
        if rows % ways:
            raise ConfigError(
                f"global batch of {rows} rows (field {name!r}) does not split over {ways} batch shards "
                f"({sharding.spec[lead]}); make the stage's batch size (train.batch_size, posterior.batch_size, "
                f"eval.batch_size, ...) a multiple of {ways}."
            )
        shape = value.shape[:lead] + (rows,) + value.shape[lead + 1 :]
        out[name] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


def place_model(model: nnx.Module, mesh: Mesh, rules) -> tuple[Any, nnx.State]:
    """(graphdef, state) of a host-built model (e.g. loaded weights) laid out by its logical axes."""
    graphdef, state = nnx.split(model)
    return graphdef, jax.device_put(state, state_shardings(state, mesh, rules))
