"""Train state, optimizer, pure jitted steps and the shared training loop.

Config groups: `train` (`train.loop.default_config`) and `optim` (`train.optim.default_config`).
"""

from proxykd_jax.train.checkpoint import Checkpointer
from proxykd_jax.train.loop import Loop, TrainingDiverged
from proxykd_jax.train.metrics import MetricsWriter, measure_matmul_peak, read_metrics, step_flops
from proxykd_jax.train.optim import make_optimizer, make_schedule
from proxykd_jax.train.state import TrainState, abstract_like, create_train_state, train_state_shardings
from proxykd_jax.train.step import make_eval_step, make_multi_step, make_train_step

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
