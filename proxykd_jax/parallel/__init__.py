"""Device mesh, logical-axis sharding rules, sharded model construction and jax.distributed start-up.

The names of `parallel/sharding.py` (flax) load on their first use (`proxykd_jax.deferred`), so config checks and `proxykd <stage> --help`
(the `mesh` group's defaults, `parallel/mesh.py`) import no flax."""

from proxykd_jax.deferred import names_of
from proxykd_jax.parallel.distributed import DistributedPlan, maybe_initialize_distributed, resolve_distributed
from proxykd_jax.parallel.mesh import MESH_AXES, default_config, make_mesh, resolve_shape
from proxykd_jax.parallel.rules import (
    LOGICAL_RULES,
    current_rules,
    logical_to_pspec,
    logical_to_sharding,
    normalize_rules,
    step_rules,
)

__all__ = [
    "DistributedPlan",
    "LOGICAL_RULES",
    "MESH_AXES",
    "ModelBuilder",
    "batch_sharding",
    "create_sharded_model",
    "current_rules",
    "default_config",
    "global_batch",
    "global_batches",
    "logical_to_pspec",
    "logical_to_sharding",
    "make_mesh",
    "maybe_initialize_distributed",
    "normalize_rules",
    "place_model",
    "replicated",
    "resolve_distributed",
    "resolve_shape",
    "rules_of",
    "shardings_of",
    "mesh_of",
    "state_shardings",
    "step_rules",
    "under_mesh",
    "variable_sharding",
]

__getattr__ = names_of(
    __name__,
    {
        "sharding": (
            "ModelBuilder",
            "batch_sharding",
            "create_sharded_model",
            "global_batch",
            "global_batches",
            "mesh_of",
            "place_model",
            "replicated",
            "rules_of",
            "shardings_of",
            "state_shardings",
            "under_mesh",
            "variable_sharding",
        )
    },
)
