"""`proxykd eval`: score the run's models on held-out teacher data (and against a known teacher,
`eval.known_teacher`, refused unless its tokenizer is the prepared data's or character-level), one model on the
mesh at a time (`eval/metrics.py`): each is loaded in its group's dtypes, scored for everything it takes part in,
its scores written to `<run>/eval/scored/<model>.json` (an infinite KL as null, read back as infinite:
`metrics.Kept`) and released before the next loads, so a killed eval resumes with the models it finished.
Writes `<run>/eval/metrics.json` (a value that is not finite as null) and prints a table."""

from __future__ import annotations

import functools
import json
import logging

import jax

from proxykd_jax.bayes.tables import load_prior
from proxykd_jax.context import load_folder
from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreReader
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.eval import metrics as metrics_lib
from proxykd_jax.models.hf import RUN_FIELDS

log = logging.getLogger(__name__)


def _report(metrics: dict) -> dict:
    metrics = metrics_lib.nulls_as_nan(metrics)
    if jax.process_index() == 0:
        print(metrics_lib.format_table(metrics))
    return metrics


def _as_written(art) -> dict:
    """A finished eval's metrics.json: its models in the order they were scored (the record's summary, the
    same metrics with its keys sorted, where the file cannot be read)."""
    try:
        return json.loads((art.path / "metrics.json").read_text())
    except (OSError, ValueError):
        return art.summary


def run(ctx, *, teacher=None) -> dict:
    """Evaluates (or reuses the evaluation of) the run's models; returns the metrics."""
    cfg, paths, art = ctx.cfg, ctx.paths, ctx.artifact("eval")
    if art.done:
        log.info("eval: %s is finished with these settings and models; reusing it", art.path)
        return _report(_as_written(art))
    prepared = PreparedData(paths.prepared)
    # nothing is written before the splits it reads are known to hold samples
    prepared.require_samples(str(cfg.eval.split), short=" to score", fix="choose another --config.eval.split, or ")
    if teacher is None and cfg.eval.known_teacher:
        from proxykd_jax.teacher.known import KnownTeacher

        teacher = KnownTeacher.load(cfg.eval.known_teacher)
    if teacher is not None:
        name = str(cfg.eval.known_teacher or "(the given teacher)")
        metrics_lib.check_teacher_tokenizer(teacher, prepared, name)
        ctx.require_fits(teacher.model_config, int(cfg.data.seq_len), "data.seq_len", f"the known teacher {name}")
    generates = int(cfg.eval.generate_prompts) > 0 and int(cfg.eval.max_new_tokens) > 0
    if teacher is not None and not teacher.is_char and generates:
        prepared.require_samples(
            "heldout", short=" to prompt the students with", fix="set --config.eval.generate_prompts=0, or "
        )
    folders = metrics_lib.model_folders(cfg.proxy.init_from, paths)
    if not folders:
        raise ProxyKDError(f"{paths.root}: no model folders to evaluate; run `align` or `distill` first.")
    for folder in folders.values():  # rows past a model's context: refused before anything is written
        model_cfg = load_folder(folder, config_only=True)
        ctx.require_fits(model_cfg, int(cfg.data.seq_len), "data.seq_len", f"the model in {folder}")
    art.begin()
    log.info("eval: %s on the %s split, one model at a time", ", ".join(folders), cfg.eval.split)
    scorer = metrics_lib.Scorer(ctx.mesh, ctx.rules, vocab=int(prepared.manifest["tokenizer"]["vocab_size"]))
    batches = lambda split: metrics_lib.eval_batches(  # noqa: E731
        prepared, split, cfg.data, batch_size=cfg.eval.batch_size, limit=cfg.eval.max_samples
    )
    held, kept = batches(cfg.eval.split), metrics_lib.Kept(art.work / "scored", ctx.write_json, ctx.is_writer)
    common = dict(
        batches=held, scorer=scorer, teacher=teacher, max_new_tokens=int(cfg.eval.max_new_tokens), seed=ctx.seed
    )
    if teacher is not None and teacher.is_char:  # another tokenizer: scored per byte (docs/TOKENIZERS.md)
        from proxykd_jax.eval import per_byte
        from proxykd_jax.models.tokenizer import load_tokenizer

        texts, answers, ended = per_byte.heldout_texts(prepared, cfg, held)
        floor = kept("teacher", {}, lambda: per_byte.teacher_nats_per_byte(teacher, texts, answers, ended))
        prompts = list(dict.fromkeys(texts))[: int(cfg.eval.generate_prompts)]
        tok = load_tokenizer(prepared.root / "tokenizer")
        score = functools.partial(per_byte.model_scores, tokenizer=tok, prompts=prompts, **common)
        join = functools.partial(per_byte.join_metrics, split=cfg.eval.split, teacher_floor=floor)
    else:
        est_path, prompts, reference, estimated = paths.posterior / "estimate.json", [], None, None
        if teacher is not None and est_path.exists():  # the posterior estimator against the known teacher
            estimated, est = batches("distill"), json.loads(est_path.read_text())
            store = StoreReader(paths.posterior, tokenizer_hash=prepared.tokenizer_hash)
            reference_kl = metrics_lib.reference_estimator_kl  # the part no model takes part in: scored once
            reference = kept(
                "estimates", {}, lambda: reference_kl(prepared, load_prior(paths.prior), store, teacher, est, estimated)
            )
        if teacher is not None:
            prompts = metrics_lib.heldout_prompts(prepared, cfg.data, "heldout", cfg.eval.generate_prompts)
        score = functools.partial(metrics_lib.score_model, estimator_batches=estimated, prompts=prompts, **common)
        join = functools.partial(metrics_lib.join_metrics, split=cfg.eval.split, reference=reference)
    scores = {}
    for name, folder in folders.items():  # in the dtypes align, posterior and distill run them in
        group = cfg.proxy if name.startswith("proxy") else cfg.model
        load = dict(dtype=str(group.dtype), param_dtype=str(group.param_dtype))
        key = {"folder": str(folder), "run": {f: repr(group[f]) for f in RUN_FIELDS}, **load}
        key["teacher"] = None if teacher is None else ("char" if teacher.is_char else "same tokenizer")
        scored = functools.partial(metrics_lib.scored_alone, ctx.load_model, folder, functools.partial(score, name))
        scores[name] = kept(name, key, functools.partial(scored, **load, group=group))
    return _finish(ctx, art, join(scores))


def _finish(ctx, art, metrics: dict) -> dict:
    """Writes metrics.json (a value that is not finite as null), finishes the artifact, prints the table."""
    metrics = metrics_lib.finite_or_null(metrics)
    ctx.write_json(art.work / "metrics.json", metrics)
    art.finish(metrics)
    return _report(metrics)
