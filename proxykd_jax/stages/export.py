"""`proxykd export`: the student's newest checkpoint as a Hugging Face folder.

Reads `<run>/<student>/checkpoints/` (`export.source`; by default the folder `distill` writes with
the same config: student, or student_sft when distill.loss.alpha = 0) onto the configured mesh and
writes `export.out` (default `<run>/export/`): config.json and generation_config.json (with the
tokenizer's bos/eos/pad ids, eos_token_id listing the end-of-turn ids besides the eos: `hf.trained_stop_ids`),
safetensors files of at most `export.max_shard_bytes` (with model.safetensors.index.json when there
are several) and the run's tokenizer files (their tokenizer_config.json without the arguments the
tokenizer was loaded with: `_LOAD_TIME_KEYS`), a folder `transformers.AutoModelForCausalLM` and
`AutoTokenizer` load, keeping the config.json keys and stop ids of the folder the student started from
(`model.init_from`, else the one the exported folder's record names: `start_folder`). The sharded student is
written tensor by tensor, never gathered whole: every process takes part in gathering each tensor, process 0
writes the files.
"""

from __future__ import annotations

import json
import logging
import pathlib

from proxykd_jax.context.specs import export_source, recorded_start, resolve_path
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


def start_folder(ctx) -> tuple[str, str]:
    """(the folder the exported student started from, which field said so): config.model.init_from, else the
    `model.init_from` in the source folder's record (`proxykd distill $R --config.model.init_from=F` then
    `proxykd export $R`: `recorded_start`); ("", "") where neither names one. The config's wins, with a warning,
    where both name folders and they differ. Read, never set: the export's record holds the same folder (the
    export's `derived` field), so a plain re-run after one naming it is unchanged."""
    ours = str(ctx.cfg.model.init_from or "")
    theirs, record = recorded_start(ctx.cfg, ctx.paths)
    if ours and theirs and resolve_path("model.init_from", ours) != resolve_path("model.init_from", theirs):
        log.warning(
            "export: config.model.init_from=%s differs from model.init_from=%s, which %s records the student was "
            "distilled from; config.json keys and stop ids come from the config's (drop the override for the other)",
            ours,
            theirs,
            record,
        )
    return (theirs, f"the record {record}") if theirs and not ours else (ours, "config.model.init_from" if ours else "")


def load(ctx, step: int = 0, source: pathlib.Path | None = None):
    """(ModelConfig, student on the mesh, step) of the configured source folder."""
    cfg = ctx.cfg
    source = source or export_source(ctx.cfg, ctx.paths)
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
    start, said = start_folder(ctx)
    art.begin()
    hf.save_hf(
        model,
        model_cfg,
        art.work,
        tokenizer=tokenizer,
        max_shard_bytes=int(ctx.cfg.export.max_shard_bytes),
        stop_ids=hf.trained_stop_ids((start, ctx.cfg.data.tokenizer), ctx.paths.prepared),
        source=start,
    )
    if ctx.is_writer:  # the process that wrote the tokenizer files
        _drop_load_time_keys(art.work)
    came = f"model.init_from={start} ({said})" if start else "no model.init_from"
    log.info("export: step %d written to %s; config.json keys and stop ids from %s", step, art.path, came)
    art.finish({"step": int(step)})
    return art.path
