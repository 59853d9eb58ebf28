"""`proxykd export`: the student's newest checkpoint as a Hugging Face folder.

Reads `<run>/<student>/checkpoints/` (`export.source`; by default the folder `distill` writes with
the same config: student, or student_sft when distill.loss.alpha = 0) onto the configured mesh and
writes `export.out` (default `<run>/export/`): config.json and generation_config.json (with the
tokenizer's bos/eos/pad ids, eos_token_id listing the end-of-turn ids besides the eos: `hf.trained_stop_ids`),
safetensors files of at most `export.max_shard_bytes` (with model.safetensors.index.json when there
are several) and the run's tokenizer files (their tokenizer_config.json without the arguments the
tokenizer was loaded with: `_LOAD_TIME_KEYS`), a folder `transformers.AutoModelForCausalLM` and
`AutoTokenizer` load. The sharded student is written tensor
by tensor, never gathered whole: every process takes part in gathering each tensor, process 0
writes the files.
"""

from __future__ import annotations

import json
import logging
import pathlib

from proxykd_jax.context import student_name
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models import hf
from proxykd_jax.models.tokenizer import load_tokenizer
from proxykd_jax.train.export import load_student

log = logging.getLogger(__name__)

# What transformers 5 keeps from `from_pretrained` and writes back on save: how this process loaded the
# tokenizer (and where from), not what the tokenizer is.
_LOAD_TIME_KEYS = ("local_files_only", "is_local", "name_or_path")


def _drop_load_time_keys(folder: pathlib.Path) -> None:
    """Rewrites folder/tokenizer_config.json without `_LOAD_TIME_KEYS` (when it has any)."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config, dict) and any(key in config for key in _LOAD_TIME_KEYS):
        kept = {key: value for key, value in config.items() if key not in _LOAD_TIME_KEYS}
        path.write_text(json.dumps(kept, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def load(ctx, step: int = 0, source: pathlib.Path | None = None):
    """(ModelConfig, student on the mesh, step) of the configured source folder."""
    cfg = ctx.cfg
    source = source or ctx.paths.student(cfg.export.source or student_name(cfg.distill))
    return load_student(
        ctx.model_config(cfg.model),
        cfg.optim,
        cfg.train,
        source,
        mesh=ctx.mesh,
        rules=ctx.rules,
        step=step,
        load_folder=lambda folder: ctx.load_model(folder, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype),
    )


def run(ctx) -> pathlib.Path:
    """Writes (or reuses) the export folder; returns it."""
    if ctx.cfg.export.max_shard_bytes < 1:
        raise ProxyKDError(f"export.max_shard_bytes must be positive, got {ctx.cfg.export.max_shard_bytes}.")
    art = ctx.artifact("export")
    if art.done:
        log.info("export: %s is finished with these settings; reusing it", art.path)
        return art.path
    if not ctx.paths.tokenizer.exists():
        raise ProxyKDError(
            f"{ctx.paths.tokenizer} does not exist: the run's tokenizer is missing; run `proxykd prepare` first."
        )
    tokenizer = load_tokenizer(ctx.paths.tokenizer)
    model_cfg, model, step = load(ctx, ctx.cfg.export.step)
    art.begin()
    hf.save_hf(
        model,
        model_cfg,
        art.work,
        tokenizer=tokenizer,
        max_shard_bytes=int(ctx.cfg.export.max_shard_bytes),
        stop_ids=hf.trained_stop_ids((ctx.cfg.model.init_from, ctx.cfg.data.tokenizer), ctx.paths.prepared),
        source=ctx.cfg.model.init_from,
    )
    if ctx.is_writer:  # the process that wrote the tokenizer files
        _drop_load_time_keys(art.work)
    log.info("export: step %d written to %s", step, art.path)
    art.finish({"step": int(step)})
    return art.path
