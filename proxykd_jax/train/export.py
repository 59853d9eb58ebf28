"""A distilled student's checkpoint as a model: restore the newest (or a chosen) train-state
checkpoint onto a mesh (it may differ from the one that trained) and keep the model part.

The `model`, `optim` and `train.steps` settings must be those of the distill run: they fix the
shapes of the checkpointed train state.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from proxykd_jax import train
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.parallel.sharding import ModelBuilder
from proxykd_jax.train.config import export_config as default_config  # noqa: F401  (re-exported)


def _abstract_state(model_cfg: ModelConfig, optim_cfg, steps: int, mesh, rules):
    """(graphdef, abstract TrainState with shardings) of the distill run, allocating nothing."""
    optimizer = train.make_optimizer(optim_cfg, steps)
    graphdef, abstract = ModelBuilder(Llama, model_cfg, rngs=nnx.Rngs(0)).abstract()
    params, rest = nnx.split_state(abstract, nnx.Param, ...)
    shardings = train.train_state_shardings(params, rest, optimizer, mesh, rules)
    state = train.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        rest=rest,
        opt_state=jax.eval_shape(optimizer.init, params),
    )
    return graphdef, train.abstract_like(state, shardings)


def load_student(
    model_cfg: ModelConfig,
    optim_cfg,
    train_cfg,
    source_dir: pathlib.Path,
    *,
    mesh,
    rules,
    step: int = 0,
    load_folder=None,
) -> tuple[ModelConfig, Llama, int]:
    """(model config, student sharded on `mesh`, checkpoint step) from `source_dir/checkpoints`.

    Falls back to `source_dir/final/` (an HF folder, read with `load_folder(folder)`) when the run
    kept no checkpoints (`step` must then be 0 or train.steps)."""
    ckpt_dir = source_dir / "checkpoints"
    checkpointer = train.Checkpointer(ckpt_dir, keep=train_cfg.keep_checkpoints) if ckpt_dir.exists() else None
    try:
        latest = checkpointer.latest_step() if checkpointer is not None else None
        if latest is None:
            if (source_dir / "final" / "config.json").exists() and load_folder is not None:
                if step and step != train_cfg.steps:  # final/ is the student after train.steps, not step `step`
                    raise ProxyKDError(
                        f"export.step={step} names a checkpoint, but {source_dir} keeps none, only the final "
                        f"student of step {train_cfg.steps}; set export.step=0 to export that one."
                    )
                loaded_cfg, model = load_folder(source_dir / "final")
                return loaded_cfg, model, train_cfg.steps
            raise ProxyKDError(
                f"{source_dir} holds no checkpoint and no final/ folder; run `proxykd distill` "
                "with this config first (or set export.source to the student's folder)."
            )
        step = step or latest
        if step not in checkpointer.all_steps():
            raise ProxyKDError(
                f"export.step={step} is not among the checkpoints in {ckpt_dir} "
                f"({checkpointer.all_steps()}); pick one of them or 0 for the newest."
            )
        graphdef, target = _abstract_state(model_cfg, optim_cfg, train_cfg.steps, mesh, rules)
        # a checkpoint of another model/optim config, or a damaged one: CheckpointError names the step
        state = checkpointer.restore(target, step=step)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return model_cfg, nnx.merge(graphdef, state.params, state.rest), step
