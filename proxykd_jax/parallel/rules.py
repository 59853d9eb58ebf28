"""One table from logical axis names to mesh axes.

Parameters and activations name their dimensions with logical axes (`embed`, `vocab`, `batch`, ...);
the rules table, written once as data (config `mesh.rules`), maps each to a mesh axis, a tuple of
mesh axes, or None (replicated). A logical axis missing from the table is an error, never a silent
replication. Within one array a mesh axis is used at most once: a later dimension whose rule names
an axis already taken by an earlier dimension keeps only the untaken axes (so an activation
[batch, length, embed] is split over (data, fsdp) on batch and left whole on embed).

The model places its activations by the table of the step being traced (`step_rules`, entered by
`parallel.under_mesh` with `jax.set_mesh`; `current_rules` reads it): rows over the `batch` entry's mesh axes
(`models.attention.row_axes`), the embedding lookup by the `vocab` and `embed` entries (`models.llama.Llama.embed`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from proxykd_jax.errors import ConfigError

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

LOGICAL_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("length", None),
    ("layers", None),
)


def normalize_rules(rules) -> Rules:
    """Rules as a tuple of (logical, tuple of mesh axes) pairs; accepts lists (e.g. from JSON)."""
    normalized, seen = [], set()
    for i, pair in enumerate(rules):
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ConfigError(f"mesh.rules[{i}] = {pair!r} must be a (logical axis, mesh axes) pair.")
        logical, axes = pair
        if logical in seen:
            raise ConfigError(f"mesh.rules names logical axis {logical!r} twice; keep one entry.")
        seen.add(logical)
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        normalized.append((logical, tuple(axes)))
    return tuple(normalized)


def logical_to_pspec(
    logical_axes: Sequence[str | None], rules=LOGICAL_RULES, mesh: Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry `logical_axes` (None = replicated dim).

    Raises ConfigError on a logical axis that the rules do not name, or (with `mesh`) on a rule
    that names a mesh axis the mesh does not have.
    """
    table = dict(normalize_rules(rules))
    used: set[str] = set()
    spec = []
    for logical in logical_axes:
        if logical is None:
            spec.append(None)
            continue
        if logical not in table:
            raise ConfigError(
                f"logical axis {logical!r} has no entry in the sharding rules (mesh.rules); add "
                f"({logical!r}, <mesh axis or None>) to mesh.rules. Known: {sorted(table)}."
            )
        axes = tuple(a for a in table[logical] if a not in used)
        if mesh is not None:
            missing = [a for a in axes if a not in mesh.axis_names]
            if missing:
                raise ConfigError(
                    f"mesh.rules maps {logical!r} to mesh axes {missing} that the mesh {mesh.axis_names} "
                    "does not have; fix mesh.rules."
                )
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_to_sharding(logical_axes: Sequence[str | None], mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
    """NamedSharding on `mesh` for an array with dimensions named by `logical_axes`."""
    return NamedSharding(mesh, logical_to_pspec(logical_axes, rules, mesh))


# The rules table of the step being traced (None: LOGICAL_RULES). A jax user context, so part of jit's cache key: a
# function traced under one table is traced again under another, never reused.
_STEP_RULES = jax.make_user_context(None)


def step_rules(rules):
    """A context (`with step_rules(rules):`) in which traced models place activations by `rules` (`current_rules`)."""
    return _STEP_RULES(normalize_rules(rules))


def current_rules() -> Rules:
    """The rules table of the enclosing `step_rules`; LOGICAL_RULES outside one."""
    rules = _STEP_RULES.value
    return normalize_rules(LOGICAL_RULES) if rules is None else rules
