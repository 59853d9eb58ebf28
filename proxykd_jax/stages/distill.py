"""`proxykd distill`: the student on teacher tokens plus a weighted divergence to the posterior
(`train/distill.py`); writes `<run>/student/` (`<run>/student_sft/` for the alpha = 0 baseline,
or `distill.output`) with checkpoints, metrics and the student as a Hugging Face folder in `final/`.
A killed run resumes from its newest checkpoint. With `train.eval_every` > 0 the student is scored on
`distill.eval_split` as it trains (`eval_*` rows); with `distill.keep_best`, `final/` is the evaluated step of
the lowest eval loss (kept in `best/<step>/`), which the summary names (`best_step`, `best_eval_nll`)."""

from __future__ import annotations

import logging
import pathlib

from proxykd_jax.context import load_folder
from proxykd_jax.data.pipeline import require_vocab
from proxykd_jax.data.records import PreparedData
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models import hf
from proxykd_jax.models.tokenizer import load_tokenizer
from proxykd_jax.parallel.hosts import to_host
from proxykd_jax.train import distill

log = logging.getLogger(__name__)


def _require(path, what: str, stage: str) -> None:
    if not path.exists():
        raise ProxyKDError(f"{path} does not exist: {what} is missing; run `proxykd {stage}` first.")


def setup(ctx, art) -> distill.Distillation:
    """The distillation of this context's config into artifact `art` (begun here), ready to `train()`."""
    cfg, paths = ctx.cfg, ctx.paths
    distill.check_steps(cfg.train, cfg.optim)  # before any model is read
    distill.check_eval(cfg.distill, cfg.train)
    _require(paths.prepared / "manifest.json", "the prepared data", "prepare")
    # an empty training split (or a manifest of another format) stops here, before the model is built
    prepared = PreparedData(paths.prepared)
    samples = prepared.require_samples(str(cfg.distill.split), short=" to train the student on")
    if int(cfg.train.eval_every) > 0:
        prepared.require_samples(
            str(cfg.distill.eval_split),
            short=" to score the student on every train.eval_every steps",
            fix="choose another --config.distill.eval_split, set train.eval_every=0, or ",
        )
    require_vocab(prepared, cfg.model.vocab_size, "model.vocab_size")  # (init_from's must equal the group's)
    epochs, steps, rows = int(cfg.data.num_epochs), int(cfg.train.steps), int(cfg.train.batch_size)
    if epochs and samples * epochs < steps * rows:  # a packed row holds one sample or more
        raise ProxyKDError(
            f"split {cfg.distill.split!r} has {samples} samples; {epochs} epoch(s) of them pack into at most "
            f"{samples * epochs // rows} batches of train.batch_size={rows} rows, fewer than train.steps={steps}; "
            "set data.num_epochs=0 (repeat the data) or raise it, or lower train.steps."
        )
    store = None
    if not cfg.distill.white_box and (float(cfg.distill.loss.alpha) > 0 or paths.posterior.exists()):
        _require(paths.posterior, "the posterior store", "posterior")
        store = paths.posterior
    model_cfg = ctx.model_config(cfg.model)
    # the batches before any model: a damaged store or split stops here
    dataset = distill.train_data(cfg.distill, model_cfg, cfg.train, cfg.data, prepared_dir=paths.prepared, store=store)
    if cfg.distill.white_box:
        # its full distribution is compared with the student's id by id: one vocabulary size, checked
        # before any weight is read (`distill.setup` checks it again for library calls)
        teacher_rows = load_folder(pathlib.Path(cfg.distill.white_box).expanduser(), config_only=True).vocab_size
        distill.check_teacher_rows(cfg.distill.white_box, teacher_rows, model_cfg.vocab_size)
    init = ctx.init_model("model", 0)[1] if cfg.model.init_from else None
    teacher = None
    if cfg.distill.white_box:
        teacher = ctx.load_model(
            cfg.distill.white_box,
            dtype=model_cfg.dtype,
            param_dtype=model_cfg.param_dtype,
            rows=(cfg.train.seq_len, "train.seq_len"),
        )
    run = distill.setup(
        cfg.distill,
        model_cfg,
        cfg.optim,
        cfg.train,
        cfg.data,
        mesh=ctx.mesh,
        rules=ctx.rules,
        out_dir=art.work,
        prepared_dir=paths.prepared,
        store=store,
        seed=ctx.seed + cfg.distill.seed,
        init_model=init,
        teacher=teacher,
        tokenizer=load_tokenizer(paths.tokenizer) if paths.tokenizer.exists() else None,
        stop_ids=hf.trained_stop_ids((cfg.model.init_from, cfg.data.tokenizer), paths.prepared),
        source=cfg.model.init_from,
        dataset=dataset,
    )
    art.begin()
    return run


def run(ctx) -> dict:
    """Trains (or resumes, or reuses) the student; returns the artifact's summary."""
    distill.check_eval(ctx.cfg.distill, ctx.cfg.train)  # before the artifact is opened
    art = ctx.artifact("distill")
    if art.done:
        log.info("distill: %s is finished with these settings; reusing it", art.path)
        return art.summary
    distillation = setup(ctx, art)
    state = distillation.train()
    summary = {"steps": int(to_host(state.step)), "final": str(art.path / "final")} | distillation.best
    art.finish(summary)
    log.info("distill: student written to %s", summary["final"])
    return summary
