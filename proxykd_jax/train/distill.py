"""Distillation: the student trains on teacher tokens plus a weighted divergence to the posterior.

Objective, per batch, over the response tokens t (loss_mask = 1):

    L = (Σ_t CE_t + α · Σ_t w_t · D(q̂_t ‖ π_S(·|c_t))) / Σ_t 1

Normalisation: both terms are per-token means over the batch's response tokens (the paper's
α = 100 is read against this), w_t is the sample weight of the sample token t belongs to, and D is
`loss.divergence` on the sparse target (top-K + tail, `loss.tail_mode`) streamed from the
posterior store. With `loss.alpha = 0` the KD term is not computed at all: the step is plain SFT on
the teacher tokens (the `distill` stage writes it to `<run>/student_sft/`, so the two students
compare on equal terms: same data, order, optimiser, steps).

White-box mode (`distill.white_box` = a Hugging Face folder): the target is a live open teacher's
full distribution, computed in the same step from its frozen, non-donated parameters, tile by tile
(`losses.dense_kd_objective`); no store is read and w_t = 1.

The store holds the posterior only (no separate prior term in the loss); train on a prior-only
store (`posterior` with N_max = 0) to compare with the prior as target.

Validation: with `train.eval_every` > 0 the student's plain next-token NLL on the teacher responses of
`distill.eval_split` (one sample per row, every sample of the split) is computed every eval_every steps
(`make_eval_loss_fn`, `eval_data`): `eval_loss` (per response token), `eval_nats_per_byte`, `eval_tokens` in
metrics.jsonl. With `distill.keep_best`, final/ is the student of the evaluated step of the lowest eval_loss
(`BestKeeper`).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxykd_jax import data, losses, models, parallel, train
from proxykd_jax.errors import ConfigError, ProxyKDError
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.parallel import hosts
from proxykd_jax.train.config import distill_config as default_config  # noqa: F401  (re-exported)
from proxykd_jax.train.loop import BEST_RECORD, BestKeeper

log = logging.getLogger(__name__)


def _flatten(batch, *names):
    """The named [B, L, ...] batch fields as [N, ...] (N = B·L)."""
    return [batch[n].reshape((-1,) + batch[n].shape[2:]) for n in names]


def _metrics(loss_sum, ce_sum, kd_sum, n_tokens):
    """(loss, metrics): the per-token mean of `loss_sum` (= ce_sum + alpha * kd_sum, the sum that
    carries the gradient) and of its two parts."""
    denom = jnp.maximum(n_tokens, 1.0)
    loss = loss_sum / denom
    return loss, {"loss": loss, "ce": ce_sum / denom, "kd": kd_sum / denom, "tokens": n_tokens}


def _sample_key(seed: int, batch):
    """A per-batch key for the sampled tail, derived from the batch itself (resume-stable)."""
    ids = batch["sample_ids"].astype(jnp.uint32)
    return jax.random.fold_in(jax.random.key(seed), jnp.sum(ids * jnp.uint32(2654435761)))


def make_loss_fn(loss_cfg, *, seed: int = 0):
    """loss_fn(model, batch) -> (loss, metrics) on a packed batch joined to the sparse store.

    Batch fields (all [B, L], kd_* with a trailing K): tokens, targets, positions, segment_ids,
    loss_mask, sample_ids, kd_ids, kd_logprobs, kd_tail, weight. With loss.alpha == 0 only the
    first six are read and the step is plain chunked cross-entropy.
    """
    kw = losses.loss_kwargs(loss_cfg)
    alpha = float(loss_cfg.alpha)
    if alpha < 0:
        raise ValueError(f"distill.loss.alpha is {alpha}; it must be >= 0 (0 = the SFT baseline).")

    def loss_fn(model, batch):
        hidden_BxLxD = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])
        hidden_NxD = hidden_BxLxD.reshape(-1, hidden_BxLxD.shape[-1])
        W_DxV = model.unembedding()
        targets_N, mask_N = _flatten(batch, "targets", "loss_mask")
        if alpha == 0.0:
            ce_sum, n_tokens = losses.cross_entropy_chunked(
                hidden_NxD, W_DxV, targets_N, mask_N, chunk_size=kw["chunk_size"], softcap=model.cfg.logit_softcap
            )
            return _metrics(ce_sum, ce_sum, jnp.zeros((), jnp.float32), n_tokens)
        kd_ids_NxK, kd_logprobs_NxK, kd_tail_N, weight_N = _flatten(batch, "kd_ids", "kd_logprobs", "kd_tail", "weight")
        rng = _sample_key(seed, batch) if kw["tail_mode"] == "sampled" else None
        loss_sum, ce_sum, kd_sum, n_tokens = losses.sparse_kd_objective(
            hidden_NxD,
            W_DxV,
            targets_N,
            kd_ids_NxK,
            kd_logprobs_NxK,
            kd_tail_N,
            mask_N,
            weight_N,
            alpha=alpha,
            rng=rng,
            softcap=model.cfg.logit_softcap,
            **kw,
        )
        return _metrics(loss_sum, ce_sum, kd_sum, n_tokens)

    return loss_fn


def make_white_box_loss_fn(loss_cfg, teacher_graphdef, *, seed: int = 0):
    """loss_fn(model, batch, teacher_state) -> (loss, metrics) against a live teacher's full distribution.

    The teacher is a frozen Llama sharing the student's vocabulary, passed as its nnx state (a frozen,
    non-donated step input) and merged with `teacher_graphdef` here; its hidden states are computed
    in the step under stop_gradient and its logits tile by tile inside `losses.dense_kd_objective`.
    Per-token weights are 1 (no proxy, no alignment weight). `loss.tail_mode == 'sampled'` selects
    the importance-sampled estimate; the other tail modes do not apply to dense targets.
    """
    kw = losses.loss_kwargs(loss_cfg)
    alpha = float(loss_cfg.alpha)
    if alpha <= 0:
        raise ValueError(
            f"distill.loss.alpha is {alpha} with distill.white_box set; white-box distillation "
            "needs alpha > 0 (train the SFT baseline without distill.white_box)."
        )
    sampled = kw.pop("tail_mode") == "sampled"

    def loss_fn(model, batch, teacher_state):
        teacher = nnx.merge(teacher_graphdef, teacher_state)
        tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
        hidden_BxLxD = model.hidden(tokens, positions, segments)
        hidden_NxD = hidden_BxLxD.reshape(-1, hidden_BxLxD.shape[-1])
        teacher_hidden_BxLxE = jax.lax.stop_gradient(teacher.hidden(tokens, positions, segments))
        teacher_hidden_NxE = teacher_hidden_BxLxE.reshape(-1, teacher_hidden_BxLxE.shape[-1])
        teacher_W_ExV = jax.lax.stop_gradient(teacher.unembedding())
        targets_N, mask_N = _flatten(batch, "targets", "loss_mask")
        rng = _sample_key(seed, batch) if sampled else None
        loss_sum, ce_sum, kd_sum, n_tokens = losses.dense_kd_objective(
            hidden_NxD,
            model.unembedding(),
            targets_N,
            teacher_hidden_NxE,
            teacher_W_ExV,
            mask_N,
            jnp.ones_like(mask_N, jnp.float32),
            alpha=alpha,
            sampled=sampled,
            rng=rng,
            softcap=model.cfg.logit_softcap,
            teacher_softcap=teacher.cfg.logit_softcap,
            **kw,
        )
        return _metrics(loss_sum, ce_sum, kd_sum, n_tokens)

    return loss_fn


def make_eval_loss_fn(*, vocab: int = 0, chunk_size: int = 256, tokens_per_byte: float = 0.0):
    """loss_fn(model, batch, *frozen) -> (NLL per response token, metrics): the eval step's, the student's plain
    next-token NLL of the targets (`eval_data`'s batches; a white-box teacher, frozen, is not read). Over the
    first `vocab` ids where the embedding is padded past the tokenizer's (0: every row), as the eval stage scores.
    Metrics: `tokens` and, with `tokens_per_byte` > 0, `nats_per_byte` = the NLL per token times the split's
    tokens per byte (their token-weighted mean over batches, `Loop.evaluate`'s, is the split's NLL per byte)."""

    def loss_fn(model, batch, *frozen):
        hidden_BxLxD = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])
        hidden_NxD = hidden_BxLxD.reshape(-1, hidden_BxLxD.shape[-1])
        W_DxV = model.unembedding()
        if 0 < vocab < W_DxV.shape[-1]:
            W_DxV = W_DxV[:, :vocab]
        targets_N, mask_N, segments_N = _flatten(batch, "targets", "loss_mask", "segment_ids")
        mask_N = mask_N.astype(jnp.float32) * (segments_N > 0)
        nll_sum, n_tokens = losses.cross_entropy_chunked(
            hidden_NxD, W_DxV, targets_N, mask_N, chunk_size=chunk_size, softcap=model.cfg.logit_softcap
        )
        nll = nll_sum / jnp.maximum(n_tokens, 1.0)
        metrics = {"tokens": n_tokens}
        if tokens_per_byte > 0:
            metrics["nats_per_byte"] = nll * tokens_per_byte
        return nll, metrics

    return loss_fn


_EVAL_FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def eval_data(prepared_dir, split: str, data_cfg, *, batch_size: int, seq_len: int, tokenizer=None):
    """(batches, tokens per byte) of `split` for the eval step. `batches()` gives, each time it is called, this
    process's rows of every sample of the split, one per row of at most `seq_len` tokens, in global batches of
    `batch_size` rows (the last padded with empty rows, as many on every process; rows in order of length within
    windows of batches, each batch cut to its longest row: `eval.metrics.iter_eval_batches`); tokens per byte: the
    split's scored tokens over their text's UTF-8 bytes (`eval.per_byte.text_bytes`, as the eval stage counts
    them; 0 without a tokenizer)."""
    from proxykd_jax.eval.metrics import iter_eval_batches

    prepared = data.PreparedData(prepared_dir)

    def batches():
        for batch in iter_eval_batches(prepared, split, data_cfg, batch_size=batch_size, seq_len=seq_len):
            yield {k: batch[k] for k in _EVAL_FIELDS}

    if tokenizer is None:
        return batches, 0.0
    from proxykd_jax.eval.per_byte import text_bytes

    tokens = nbytes = 0
    for rec in prepared.iter_split(split):
        targets = np.asarray(rec["tokens"])[1:][np.asarray(rec["loss_mask"])[1:] > 0]
        tokens, nbytes = tokens + len(targets), nbytes + text_bytes(targets, tokenizer)
    return batches, (tokens / nbytes if nbytes else 0.0)


def check_eval(dcfg, train_cfg) -> None:
    """Refuses `distill.keep_best` without an evaluated step to keep, before anything is read or written."""
    every, steps = int(train_cfg.eval_every), int(train_cfg.steps)
    if not dcfg.get("keep_best", False):
        return
    if every <= 0:
        raise ConfigError(
            f"config.distill.keep_best=True keeps the evaluated step of the lowest eval loss, but train.eval_every="
            f"{every} evaluates none; set train.eval_every to N > 0 (every N steps) or distill.keep_best=False."
        )
    if every > steps:
        raise ConfigError(
            f"config.distill.keep_best=True with train.eval_every={every} above train.steps={steps} evaluates no "
            f"step; set train.eval_every to at most {steps}."
        )


class _DropStore(grain.transforms.Map):
    """Removes the store fields from a packed batch (the α = 0 step never reads them)."""

    def map(self, batch):
        return {k: v for k, v in batch.items() if k not in _STORE_FIELDS}


_STORE_FIELDS = ("kd_ids", "kd_logprobs", "kd_tail", "weight")


class _ProcessRows(grain.transforms.Map):
    """This process's rows [p * B/P, (p + 1) * B/P) of a global batch every process packed alike."""

    def __init__(self, index: int, count: int):
        self.index, self.count = index, count

    def map(self, batch):
        rows = next(iter(batch.values())).shape[0] // self.count
        return {k: v[self.index * rows : (self.index + 1) * rows] for k, v in batch.items()}


def check_steps(train_cfg, optim_cfg) -> None:
    """Refuses `train.steps` that are not whole optimizer updates of `optim.grad_accum` micro-batches."""
    steps = int(train_cfg.steps)
    train.optim.check_whole_updates(
        steps, int(optim_cfg.grad_accum), setting=f"config.train.steps={steps}", field="train.steps", model="student"
    )


@dataclasses.dataclass
class Distillation:
    """Everything one distill run needs, built by `setup`; `train()` runs it to the end."""

    loop: train.Loop
    state: train.TrainState
    graphdef: Any
    data_iter: Any
    frozen: tuple
    model_cfg: ModelConfig
    out_dir: pathlib.Path
    tokenizer: Any
    stop_ids: tuple = ()  # besides the eos, the ids final/ lists as ending an answer (`hf.trained_stop_ids`)
    source: str = ""  # the folder the student started from, whose config.json final/ keeps (`hf.source_config`)
    eval_batches: Any = None  # () -> the eval split's batches (`eval_data`), with train.eval_every > 0
    keeper: BestKeeper | None = None  # with distill.keep_best

    def save(self, state: train.TrainState, folder: pathlib.Path) -> None:
        """The student of `state` as an HF folder. The sharded state as it is: save_hf brings one tensor at a time
        to the host (collectively, when the model spans processes) and process 0 writes; nothing is replicated whole."""
        student = nnx.merge(self.graphdef, state.params, state.rest)
        hf.save_hf(
            student, self.model_cfg, folder, tokenizer=self.tokenizer, stop_ids=self.stop_ids, source=self.source
        )

    @property
    def best(self) -> dict:
        """{"best_step", "best_eval_nll"} of the student final/ holds with distill.keep_best ({} without)."""
        return {} if self.keeper is None else {"best_step": self.keeper.step, "best_eval_nll": self.keeper.value}

    def train(self) -> train.TrainState:
        """Trains (resuming from the newest checkpoint), then writes <out_dir>/final/ as an HF folder (written
        beside and renamed into place): the trained student, or with keep_best a copy of the kept one."""
        state = self.loop.run(
            self.state, self.data_iter, frozen=self.frozen, eval_batches=self.eval_batches, watcher=self.keeper
        )
        final, tmp = self.out_dir / "final", self.out_dir / "final.tmp"
        if jax.process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        hosts.sync("distill: final.tmp cleared")
        if self.keeper is None:
            self.save(state, tmp)
        else:
            best = self.keeper.finish()
            if jax.process_index() == 0:
                shutil.copytree(best, tmp, ignore=shutil.ignore_patterns(BEST_RECORD))
            log.info("distill: final/ is the student of step %d (eval loss %.6g)", self.keeper.step, self.keeper.value)
        if jax.process_index() == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        hosts.sync("distill: student written")
        return state


def check_teacher_rows(teacher, teacher_rows: int, student_rows: int) -> None:
    """White-box KD compares the teacher's full distribution with the student's id by id: their embeddings
    must have one number of rows (a posterior store needs no such thing)."""
    if teacher_rows != student_rows:
        raise ProxyKDError(
            f"{teacher}: teacher vocab_size {teacher_rows} differs from config.model.vocab_size {student_rows}; "
            "white-box KD compares full distributions id by id, so use a teacher whose embedding has the "
            "student's rows (or distil from a posterior store instead)."
        )


def train_data(dcfg, model_cfg: ModelConfig, train_cfg, data_cfg, *, prepared_dir: pathlib.Path, store):
    """The student's training batches (a grain dataset): `dcfg.split` packed into `train_cfg` rows, joined with the
    posterior `store` (None: none). It opens the store and checks its shards' checksums, so a damaged store or split
    stops here: call it before any model is read or built, and hand it to `setup`.

    Every process packs the same global batches and keeps its rows, so a run on P processes trains on exactly the
    batches of a run on one (each host decodes the whole global batch)."""
    dataset = data.make_dataset(
        prepared_dir,
        dcfg.split,
        data_cfg,
        store=None if store is None else str(store),
        vocab_size=model_cfg.vocab_size,
        seq_len=train_cfg.seq_len,
        batch_size=train_cfg.batch_size,
        process_index=0,
        process_count=1,
    )
    if jax.process_count() > 1:
        dataset = dataset.map(_ProcessRows(jax.process_index(), jax.process_count()))
    if store is not None and float(dcfg.loss.alpha) == 0.0:
        dataset = dataset.map(_DropStore())
    return dataset


def setup(
    dcfg,
    model_cfg: ModelConfig,
    optim_cfg,
    train_cfg,
    data_cfg,
    *,
    mesh,
    rules,
    out_dir: pathlib.Path,
    prepared_dir: pathlib.Path,
    store: pathlib.Path | None,
    seed: int,
    init_model=None,
    teacher=None,
    tokenizer=None,
    stop_ids=(),
    source="",
    dataset=None,
) -> Distillation:
    """Builds the student state, data iterator, (white-box) teacher, train step and Loop.

    `dcfg`, `optim_cfg`, `train_cfg`, `data_cfg` are the distill, optim, train and data config
    groups; `store` the posterior store folder (None: no store; joined for α = 0 too when given,
    so both students see the same samples); `init_model` a placed Llama whose parameters start the
    student (None: random init from `seed`); `teacher` a placed (ModelConfig, Llama) in white-box mode;
    `stop_ids` what final/ lists besides the eos as ending an answer (`hf.trained_stop_ids`); `source` the folder
    the student started from, whose config.json final/ keeps (its family: a Mistral stays a Mistral); `dataset`
    the batches of `train_data` for these arguments (None: made here, first).
    """
    check_steps(train_cfg, optim_cfg)
    check_eval(dcfg, train_cfg)
    alpha = float(dcfg.loss.alpha)
    steps = train_cfg.steps
    if dataset is None:
        dataset = train_data(dcfg, model_cfg, train_cfg, data_cfg, prepared_dir=prepared_dir, store=store)
    optimizer = train.make_optimizer(optim_cfg, steps)
    graphdef, state, shardings = train.create_train_state(optimizer, mesh, rules, Llama, model_cfg, rngs=nnx.Rngs(seed))
    if init_model is not None:
        params = nnx.state(init_model, nnx.Param)
        state = state.replace(params=jax.device_put(params, shardings.params))  # Adam moments start at 0 anyway

    batch_sh = parallel.batch_sharding(mesh, rules)
    seq_len = train_cfg.seq_len
    train_flops = models.flops_per_token(model_cfg, seq_len, backward=True)
    frozen, frozen_sh, frozen_flops = (), (), ()
    if teacher is not None:
        teacher_cfg, teacher_model = teacher
        check_teacher_rows(dcfg.white_box, teacher_cfg.vocab_size, model_cfg.vocab_size)
        teacher_graphdef, teacher_state = nnx.split(teacher_model)
        loss_fn = make_white_box_loss_fn(dcfg.loss, teacher_graphdef, seed=seed)
        frozen, frozen_sh = (teacher_state,), (parallel.shardings_of(teacher_state),)
        frozen_flops = (models.flops_per_token(teacher_cfg, seq_len, backward=False),)
    else:
        loss_fn = make_loss_fn(dcfg.loss, seed=seed)
    step = train.make_train_step(
        loss_fn,
        graphdef,
        optimizer,
        state_shardings=shardings,
        batch_shardings=batch_sh,
        frozen_shardings=frozen_sh,
        schedule=train.make_schedule(optim_cfg, steps),
        grad_accum=optim_cfg.grad_accum,
    )
    flops = train.step_flops(train_cfg.batch_size * seq_len, train_flops, frozen_flops)
    eval_step = eval_batches = None
    if int(train_cfg.eval_every) > 0:
        split = str(dcfg.get("eval_split", "heldout"))
        eval_batches, tokens_per_byte = eval_data(
            prepared_dir, split, data_cfg, batch_size=train_cfg.batch_size, seq_len=seq_len, tokenizer=tokenizer
        )
        vocab = int(data.PreparedData(prepared_dir).manifest["tokenizer"]["vocab_size"])
        eval_loss = make_eval_loss_fn(vocab=vocab, chunk_size=dcfg.loss.chunk_size, tokens_per_byte=tokens_per_byte)
        eval_step = train.make_eval_step(
            eval_loss, graphdef, state_shardings=shardings, batch_shardings=batch_sh, frozen_shardings=frozen_sh
        )
    loop = train.Loop(
        train_cfg,
        run_dir=out_dir,
        mesh=mesh,
        rules=rules,
        train_step=step,
        state_shardings=shardings,
        eval_step=eval_step,
        flops_per_step=flops,
        compute_dtype=model_cfg.dtype,
    )
    log.info(
        "distill: %s, alpha=%g, %s -> %s",
        "white-box teacher " + dcfg.white_box
        if teacher is not None
        else "sparse store"
        if alpha > 0
        else "SFT baseline",
        alpha,
        dcfg.split,
        out_dir,
    )
    run = Distillation(
        loop=loop,
        state=state,
        graphdef=graphdef,
        data_iter=iter(dataset),
        frozen=frozen,
        model_cfg=model_cfg,
        out_dir=out_dir,
        tokenizer=tokenizer,
        stop_ids=tuple(stop_ids),
        source=str(source or ""),
        eval_batches=eval_batches,
    )
    if dcfg.get("keep_best", False):
        run.keeper = BestKeeper(out_dir / "best", run.save)
    return run
