"""`proxykd eval`: score the run's models on held-out teacher data (and against a known teacher,
`eval.known_teacher`, refused unless its tokenizer is the prepared data's or character-level), every model on
the mesh (`eval/metrics.py`). Writes `<run>/eval/metrics.json` (a value that is not finite as null) and prints a
table."""

from __future__ import annotations

import json
import logging

import jax

from proxykd_jax.bayes.tables import load_prior
from proxykd_jax.context import load_folder
from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreReader
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.eval import metrics as metrics_lib

log = logging.getLogger(__name__)


def _report(metrics: dict) -> dict:
    metrics = metrics_lib.nulls_as_nan(metrics)
    if jax.process_index() == 0:
        print(metrics_lib.format_table(metrics))
    return metrics


def run(ctx, *, teacher=None) -> dict:
    """Evaluates (or reuses the evaluation of) the run's models; returns the metrics."""
    cfg, paths, art = ctx.cfg, ctx.paths, ctx.artifact("eval")
    if art.done:
        log.info("eval: %s is finished with these settings and models; reusing it", art.path)
        return _report(art.summary)
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
    log.info("eval: %s on the %s split", ", ".join(folders), cfg.eval.split)
    models = {name: ctx.load_model(folder)[1] for name, folder in folders.items()}
    scorer = metrics_lib.Scorer(ctx.mesh, ctx.rules, vocab=int(prepared.manifest["tokenizer"]["vocab_size"]))
    ecfg = cfg.eval
    batches = lambda split: metrics_lib.eval_batches(  # noqa: E731
        prepared, split, cfg.data, batch_size=ecfg.batch_size, limit=ecfg.max_samples
    )
    if teacher is not None and teacher.is_char:  # another tokenizer: scored per byte (docs/TOKENIZERS.md)
        from proxykd_jax.eval import per_byte

        return _finish(
            ctx, art, per_byte.eval_metrics(models, prepared, cfg, teacher, batches(ecfg.split), scorer, seed=ctx.seed)
        )
    metrics = {"models": metrics_lib.model_metrics(models, batches(ecfg.split), teacher, scorer), "split": ecfg.split}
    if teacher is not None:
        est_path = paths.posterior / "estimate.json"
        if est_path.exists():
            log.info("eval: the posterior estimator against the known teacher")
            proxies = {k: m for k, m in models.items() if k.startswith("proxy")}
            metrics["estimator_kl"] = metrics_lib.estimator_metrics(
                prepared,
                load_prior(paths.prior),
                StoreReader(paths.posterior, tokenizer_hash=prepared.tokenizer_hash),
                teacher,
                proxies,
                json.loads(est_path.read_text()),
                batches("distill"),
                scorer,
            )
        students = {k: m for k, m in models.items() if k.startswith("student")}
        prompts = metrics_lib.heldout_prompts(prepared, cfg.data, "heldout", ecfg.generate_prompts)
        if students and prompts and ecfg.max_new_tokens > 0:
            log.info("eval: the students answer %d held-out prompts; the teacher scores the answers", len(prompts))
        generated = metrics_lib.generation_metrics(
            students, prompts, teacher, max_new_tokens=ecfg.max_new_tokens, seed=ctx.seed
        )
        for name, ll in generated.items():
            metrics["models"][name]["teacher_loglik_of_generations"] = ll
    return _finish(ctx, art, metrics)


def _finish(ctx, art, metrics: dict) -> dict:
    """Writes metrics.json (a value that is not finite as null), finishes the artifact, prints the table."""
    metrics = metrics_lib.finite_or_null(metrics)
    ctx.write_json(art.work / "metrics.json", metrics)
    art.finish(metrics)
    return _report(metrics)
