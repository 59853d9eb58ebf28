"""`proxykd align`: SFT warm-up of the proxy, then DPO rounds against its own samples
(`align/rounds.py`); writes `<run>/proxy/` and the aligned proxy as a Hugging Face folder in
`<run>/proxy/final/`. Resumes a killed run phase by phase."""

from __future__ import annotations

import logging
import pathlib

from proxykd_jax.align import lora, phases, rounds
from proxykd_jax.data.pipeline import require_vocab
from proxykd_jax.data.records import PreparedData
from proxykd_jax.models import hf
from proxykd_jax.models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def _summaries(out_dir) -> dict:
    """Every phase's latest summary from `<out>/metrics.jsonl`."""
    path = out_dir / "metrics.jsonl"
    return {r["phase"]: r for r in phases.read_summaries(path)}


def preflight(prepared: PreparedData, acfg) -> None:
    """Refuses, before any model is loaded or anything written, splits too small for the phases:
    the warm-up needs one batch of rows, each DPO round one batch of pairs; and settings of the align
    group no other check reads: LoRA targets that name no weight of the proxy."""
    if int(acfg.lora.rank) > 0:
        lora.check_targets(acfg.lora.targets, empty_ok=False)
    batch = int(acfg.batch_size)
    short = f", fewer than align.batch_size={batch}"
    lower = "lower --config.align.batch_size (a multiple of the mesh's batch shards), or "
    if int(acfg.sft_steps) > 0:
        prepared.require_samples("warmup", short=" for the SFT warm-up", fix="set --config.align.sft_steps=0, or ")
        prepared.require_samples("warmup", batch, short=short, fix=lower)
    if int(acfg.rounds) > 0:
        prepared.require_samples("align", short=" for the DPO rounds", fix="set --config.align.rounds=0, or ")
        per_prompt = int(acfg.samples_per_prompt)
        need = -(-batch // per_prompt)  # each example makes align.samples_per_prompt pairs
        prepared.require_samples(
            "align",
            need,
            short=f", fewer than the {need} that make one batch of align.batch_size={batch} DPO pairs",
            fix=f"raise --config.align.samples_per_prompt, {lower}",
        )


def run(ctx, *, teacher_probs_fn=None) -> dict:
    """Aligns the proxy; returns the summary of each phase (init, sft, round_000, ...).

    `teacher_probs_fn` (known-teacher runs) adds the held-out KL to the teacher to each summary."""
    art = ctx.artifact("align")
    if art.done:
        log.info("align: %s is finished with these settings; reusing it", art.path)
        return art.summary or {}
    cfg = ctx.cfg
    prepared = PreparedData(ctx.paths.prepared)
    require_vocab(prepared, cfg.proxy.vocab_size, "proxy.vocab_size")  # (init_from's must equal the group's)
    preflight(prepared, cfg.align)
    rounds.check_steps(cfg.align, cfg.optim)  # before the artifact is begun: a refused run leaves nothing behind
    data = rounds.AlignData.load(ctx.paths.prepared)
    seq_len = int(cfg.align.seq_len or cfg.data.seq_len)
    rows = (seq_len, "align.seq_len" if cfg.align.seq_len else "data.seq_len")  # no longer than the proxy's context
    model_cfg, proxy = ctx.init_model("proxy", ctx.seed, rows=rows)  # a folder that cannot load stops before any write
    art.begin()
    phases.drop_checkpoints([art.work / name for name in phases.phase_names(cfg.align.rounds)])
    sink = ctx.sink(art.work)
    try:
        trainable, frozen, _ = rounds.align_proxy(
            proxy,
            data,
            cfg.align,
            cfg.optim,
            cfg.train,
            out_dir=art.work,
            mesh=ctx.mesh,
            rules=ctx.rules,
            seed=ctx.seed,
            seq_len=seq_len,
            sink=phases.OncePerPhase(sink, art.work),
            teacher_probs_fn=teacher_probs_fn,
        )
    finally:
        sink.close()
    tokenizer = load_tokenizer(ctx.paths.tokenizer) if ctx.paths.tokenizer.exists() else None
    start = pathlib.Path(str(cfg.proxy.init_from)).expanduser() if cfg.proxy.init_from else None
    rounds.export_final(
        trainable,
        frozen,
        model_cfg,
        art.work / "final",
        cfg.align.lora.targets,
        ctx.mesh,
        tokenizer=tokenizer,
        stop_ids=hf.generation_stop_ids(start) if start is not None and start.is_dir() else (),  # (Llama 3.1's eom)
        source=start,
    )
    summaries = _summaries(art.work)
    art.finish(summaries)
    return summaries
