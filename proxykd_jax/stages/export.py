"""The `export` stage: the student's newest checkpoint as a Hugging Face folder.

Reads `<run>/<student>/checkpoints/` (the distill output named by `export.source`, by default the
one `distill` would write with the same config: student, or student_sft when distill.loss.alpha = 0)
and writes `export.out` (default `<run>/export/`): config.json, model.safetensors and the run's
tokenizer files, a folder `transformers.AutoModelForCausalLM` and `AutoTokenizer` load. The
checkpoint is restored onto the configured mesh (it may differ from the one that trained), so the
`model`, `optim` and `train.steps` settings must be those of the distill run. A non-empty output
folder is refused unless `run.overwrite` is set; the folder is written beside and renamed into place.
"""

from __future__ import annotations

import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from proxykd_jax import config as config_lib
from proxykd_jax import parallel, train
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.tokenizer import load_tokenizer
from proxykd_jax.parallel.sharding import ModelBuilder
from proxykd_jax.stages import distill
from proxykd_jax.stages.paths import RunPaths

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `export` config group."""
    cd = ml_collections.ConfigDict()
    cd.source = ""  # run-dir subfolder of the student to export; "" = distill's output for this config
    cd.step = 0  # checkpoint step to export; 0 = the newest
    cd.out = ""  # output folder; "" = <run>/export
    return cd


def _abstract_state(cfg, model_cfg: ModelConfig, mesh, rules):
    """(graphdef, abstract TrainState with shardings) of the distill run, allocating nothing."""
    optimizer = train.make_optimizer(cfg.optim, cfg.train.steps)
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


def load_student(cfg, source_dir: pathlib.Path, step: int = 0) -> tuple[ModelConfig, Llama, int]:
    """(model config, student with replicated parameters, checkpoint step) from `source_dir`.

    Falls back to `source_dir/final/` (an HF folder) when the run kept no checkpoints.
    """
    model_cfg = config_lib.model_config_from(cfg.model)
    ckpt_dir = source_dir / "checkpoints"
    checkpointer = train.Checkpointer(ckpt_dir, keep=cfg.train.keep_checkpoints) if ckpt_dir.exists() else None
    try:
        latest = checkpointer.latest_step() if checkpointer is not None else None
        if latest is None:
            if (source_dir / "final" / "config.json").exists():
                loaded_cfg, model = hf.load_hf(
                    source_dir / "final", dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype
                )
                return loaded_cfg, model, cfg.train.steps
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
        mesh, rules = parallel.make_mesh(cfg.mesh), parallel.normalize_rules(cfg.mesh.rules)
        graphdef, target = _abstract_state(cfg, model_cfg, mesh, rules)
        try:
            state = checkpointer.restore(target, step=step)
        except (ValueError, KeyError) as e:
            raise ProxyKDError(
                f"{ckpt_dir}: checkpoint {step} does not match config.model/optim ({e}); export "
                "with the config the student was trained with."
            ) from None
    finally:
        if checkpointer is not None:
            checkpointer.close()
    params, rest = jax.jit(lambda x: x, out_shardings=parallel.replicated(mesh))((state.params, state.rest))
    return model_cfg, nnx.merge(graphdef, params, rest), step


def run(cfg) -> pathlib.Path:
    """The `export` stage; returns the folder written."""
    paths = RunPaths.from_config(cfg)
    source = paths.student(cfg.export.source or distill.output_name(cfg.distill))
    out = pathlib.Path(cfg.export.out).expanduser() if cfg.export.out else paths.export
    if out.exists() and any(out.iterdir()) and not cfg.run.overwrite:
        raise ProxyKDError(
            f"{out} is not empty; set --config.run.overwrite=True to replace it, or "
            "--config.export.out=FOLDER to write elsewhere."
        )
    if not paths.tokenizer.exists():
        raise ProxyKDError(
            f"{paths.tokenizer} does not exist: the run's tokenizer is missing; run `proxykd prepare` first."
        )
    tokenizer = load_tokenizer(paths.tokenizer)
    model_cfg, model, step = load_student(cfg, source, cfg.export.step)
    if jax.process_index() == 0:
        tmp = out.parent / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_hf(model, model_cfg, tmp, tokenizer=tokenizer)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        log.info("export: %s step %d written to %s", source, step, out)
    return out
