"""Train state, optimizer, pure jitted steps and the shared training loop.

Config groups: `train` (`train.loop.default_config`) and `optim` (`train.optim.default_config`); their defaults
and the `distill` and `export` groups' live in `train/config.py`, which imports no flax, optax, orbax or grain.
The names below load with their modules on their first use (`proxykd_jax.deferred`).
"""

from proxykd_jax.deferred import names_of

__all__ = [
    "Checkpointer",
    "Loop",
    "MetricsWriter",
    "TrainState",
    "TrainingDiverged",
    "abstract_like",
    "create_train_state",
    "make_eval_step",
    "make_multi_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "measure_matmul_peak",
    "read_metrics",
    "step_flops",
    "train_state_shardings",
]
__getattr__ = names_of(
    __name__,
    {
        "checkpoint": ("Checkpointer",),
        "loop": ("Loop", "TrainingDiverged"),
        "metrics": ("MetricsWriter", "measure_matmul_peak", "read_metrics", "step_flops"),
        "optim": ("make_optimizer", "make_schedule"),
        "state": ("TrainState", "abstract_like", "create_train_state", "train_state_shardings"),
        "step": ("make_eval_step", "make_multi_step", "make_train_step"),
    },
)
