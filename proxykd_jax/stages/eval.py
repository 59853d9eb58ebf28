"""`proxykd eval`: score the run's models on held-out teacher data (and against a known teacher,
`eval.known_teacher`, refused unless its tokenizer is the prepared data's or character-level), every model on
the mesh (`eval/metrics.py`). Writes `<run>/eval/metrics.json` (a value that is not finite as null) and prints a
table."""

from __future__ import annotations

import json
import logging
import math

import jax

from proxykd_jax.bayes.tables import load_prior
from proxykd_jax.context import load_folder
from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreReader
from proxykd_jax.errors import ConfigError, ProxyKDError
from proxykd_jax.eval import metrics as metrics_lib
from proxykd_jax.models.tokenizer import tokenizer_hash

log = logging.getLogger(__name__)


def nulls_as_nan(metrics: dict) -> dict:
    """`metrics` with each null (a value that was not finite, `finite_or_null`) read back as NaN: what `run`
    prints and returns, the same whether it evaluated or reused metrics.json."""
    if isinstance(metrics, dict):
        return {k: nulls_as_nan(v) for k, v in metrics.items()}
    return math.nan if metrics is None else metrics


def _report(metrics: dict) -> dict:
    metrics = nulls_as_nan(metrics)
    if jax.process_index() == 0:
        print(metrics_lib.format_table(metrics))
    return metrics


def finite_or_null(metrics: dict) -> dict:
    """A copy of `metrics` with each NaN or infinite number as None (JSON null: NaN and Infinity are not
    JSON), said in one warning. A KL can be infinite where an estimate gives no probability to a token
    the teacher can write (a posterior entry without tail mass)."""
    bad = []

    def walk(value, name):
        if isinstance(value, dict):
            return {k: walk(v, f"{name}.{k}" if name else str(k)) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(f"{name} = {value}")
            return None
        return value

    safe = walk(metrics, "")
    if bad:
        log.warning(
            "eval: %s not finite (a KL is infinite where a model or an estimate gives no probability to a token "
            "the teacher writes); metrics.json stores null there",
            ", ".join(bad),
        )
    return safe


def _check_teacher_tokenizer(teacher, prepared: PreparedData, folder: str) -> None:
    """Refuses a known teacher that reads token ids otherwise than the prepared data (a character-level one
    is scored per byte instead): its distributions and log-likelihoods would be read at the wrong ids."""
    theirs = tokenizer_hash(teacher.tokenizer)
    if teacher.is_char or theirs == prepared.tokenizer_hash:
        return
    ours = prepared.manifest["tokenizer"]
    raise ConfigError(
        f"eval.known_teacher={folder}: the teacher's tokenizer ({len(teacher.tokenizer)} tokens, hash {theirs}) "
        f"differs from the prepared data's ({ours['vocab_size']} tokens, hash {ours['hash']} in "
        f"{prepared.root / 'manifest.json'}), so its probabilities cannot be read at the run's token ids; give a "
        "known teacher with the run's tokenizer (data.tokenizer) or a character-level one, or leave "
        "eval.known_teacher unset."
    )


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
        _check_teacher_tokenizer(teacher, prepared, str(cfg.eval.known_teacher or "(the given teacher)"))
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

        metrics = finite_or_null(
            per_byte.eval_metrics(models, prepared, cfg, teacher, batches(ecfg.split), scorer, seed=ctx.seed)
        )
        ctx.write_json(art.work / "metrics.json", metrics)
        art.finish(metrics)
        return _report(metrics)
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
    metrics = finite_or_null(metrics)
    ctx.write_json(art.work / "metrics.json", metrics)
    art.finish(metrics)
    return _report(metrics)
