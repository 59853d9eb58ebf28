"""The `distill` stage: train the student on teacher tokens plus a weighted divergence to q̂.

Objective (DESIGN.md §2), per batch, over the response tokens t (loss_mask = 1):

    L = (Σ_t CE_t + α · Σ_t w_t · D(q̂_t ‖ π_S(·|c_t))) / Σ_t 1

Normalisation: both terms are per-token means over the batch's response tokens (the paper's
α = 100 is read against this), w_t is the sample weight of the sample token t belongs to, and D is
`loss.divergence` on the sparse target (top-K + tail, `loss.tail_mode`) streamed from the
posterior store. With `loss.alpha = 0` the KD term is not computed at all: the step is plain SFT on
the teacher tokens, written to `<run>/student_sft/` so the two students compare on equal terms
(same data, order, optimiser, steps).

White-box mode (`distill.white_box` = a Hugging Face folder): the target is a live open teacher's
full distribution, computed in the same step from its frozen, non-donated parameters, tile by tile
(`losses.dense_kd_objective`); no store is read and w_t = 1.

Departure from the v1 abstract: the store holds the posterior only (no separate prior target), so
there is no prior term; train on a prior-only store (`posterior` with N_max = 0) to compare.
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
import ml_collections
from flax import nnx
from jax.experimental import multihost_utils

from proxykd_jax import config as config_lib
from proxykd_jax import data, losses, models, parallel, train
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.tokenizer import load_tokenizer
from proxykd_jax.stages.paths import RunPaths

log = logging.getLogger(__name__)

STUDENT, STUDENT_SFT = "student", "student_sft"


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `distill` config group (steps, batch and optimiser: `train`, `data`, `optim`)."""
    cd = ml_collections.ConfigDict()
    cd.loss = losses.default_config()  # CE + KD settings: alpha (0 = SFT baseline), divergence, tail_mode, ...
    cd.split = "distill"  # prepared split the student trains on
    cd.white_box = ""  # Hugging Face folder of an open teacher: distil from its live logits; "" = use the store
    cd.output = ""  # run-dir subfolder for checkpoints; "" = student, or student_sft when loss.alpha == 0
    cd.seed = 1  # offset added to run.seed for the student's init and the sampled-tail draws
    return cd


def output_name(distill_cfg) -> str:
    """The run-dir subfolder: `distill.output`, else student_sft for α = 0 and student otherwise."""
    if distill_cfg.output:
        return distill_cfg.output
    return STUDENT_SFT if float(distill_cfg.loss.alpha) == 0.0 else STUDENT


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
                hidden_NxD, W_DxV, targets_N, mask_N, chunk_size=kw["chunk_size"]
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
            **kw,
        )
        return _metrics(loss_sum, ce_sum, kd_sum, n_tokens)

    return loss_fn


# ----------------------------------------------------------------------------- the stage


class _DropStore(grain.transforms.Map):
    """Removes the store fields from a packed batch (the α = 0 step never reads them)."""

    def map(self, batch):
        return {k: v for k, v in batch.items() if k not in _STORE_FIELDS}


_STORE_FIELDS = ("kd_ids", "kd_logprobs", "kd_tail", "weight")


def _replicated(mesh, tree):
    """`tree` fully replicated on `mesh` (every process can then read every value)."""
    return jax.jit(lambda x: x, out_shardings=parallel.replicated(mesh))(tree)


def _check_same_shape(loaded: ModelConfig, configured: ModelConfig, folder) -> None:
    fields = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff")
    diff = [
        f"{f}={getattr(loaded, f)} (config: {getattr(configured, f)})"
        for f in fields
        if getattr(loaded, f) != getattr(configured, f)
    ]
    if diff:
        raise ProxyKDError(
            f"{folder}/config.json disagrees with config.model on {', '.join(diff)}; "
            "make the model group match the folder (or pick the matching preset)."
        )


def _require(path: pathlib.Path, what: str, stage: str) -> None:
    if not path.exists():
        raise ProxyKDError(f"{path} does not exist: {what} is missing; run `proxykd {stage}` first.")


@dataclasses.dataclass
class Distillation:
    """Everything one distill run needs, built by `setup(cfg)`; `train()` runs it to the end."""

    loop: train.Loop
    state: train.TrainState
    graphdef: Any
    data_iter: Any
    frozen: tuple
    model_cfg: ModelConfig
    out_dir: pathlib.Path
    tokenizer: Any

    def train(self) -> train.TrainState:
        """Trains (resuming from the newest checkpoint), then writes <out_dir>/final/ as an HF folder."""
        state = self.loop.run(self.state, self.data_iter, frozen=self.frozen)
        host_params = _replicated(self.loop.mesh, (state.params, state.rest))
        if jax.process_index() == 0:
            model = nnx.merge(self.graphdef, *host_params)
            final = self.out_dir / "final"
            tmp = self.out_dir / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            hf.save_hf(model, self.model_cfg, tmp, tokenizer=self.tokenizer)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            log.info("distill: student written to %s", final)
        return state


def setup(cfg) -> Distillation:
    """Builds mesh, student state, data iterator, (white-box) teacher, train step and Loop from `cfg`."""
    dcfg, paths = cfg.distill, RunPaths.from_config(cfg)
    out_dir = paths.student(output_name(dcfg))
    if (out_dir / "final").exists():
        if not cfg.run.overwrite:
            raise ProxyKDError(
                f"{out_dir}/final already holds a finished student; set --config.run.overwrite=True "
                "to train it again, or --config.distill.output=NAME for another folder."
            )
        if jax.process_index() == 0:
            shutil.rmtree(out_dir)
        multihost_utils.sync_global_devices("distill: old student removed")
    alpha = float(dcfg.loss.alpha)
    white_box = bool(dcfg.white_box)
    _require(paths.prepared / "manifest.json", "the prepared data", "prepare")
    store = None
    if not white_box and (alpha > 0 or paths.posterior.exists()):
        _require(paths.posterior, "the posterior store", "posterior")
        store = str(paths.posterior)  # joined for α = 0 too, so both students see the same samples
    tokenizer = load_tokenizer(paths.tokenizer) if paths.tokenizer.exists() else None

    mesh, rules = parallel.make_mesh(cfg.mesh), parallel.normalize_rules(cfg.mesh.rules)
    model_cfg = config_lib.model_config_from(cfg.model)
    steps, seed = cfg.train.steps, cfg.run.seed + dcfg.seed
    optimizer = train.make_optimizer(cfg.optim, steps)
    graphdef, state, shardings = train.create_train_state(optimizer, mesh, rules, Llama, model_cfg, rngs=nnx.Rngs(seed))
    if cfg.model.init_from:
        loaded_cfg, loaded = hf.load_hf(cfg.model.init_from, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype)
        _check_same_shape(loaded_cfg, model_cfg, cfg.model.init_from)
        params = nnx.state(loaded, nnx.Param)
        state = state.replace(params=jax.device_put(params, shardings.params))  # Adam moments start at 0 anyway

    batch_sh = parallel.batch_sharding(mesh, rules)
    seq_len = cfg.train.seq_len
    train_flops = models.flops_per_token(model_cfg, seq_len, backward=True)
    frozen, frozen_sh, frozen_flops = (), (), ()
    if white_box:
        teacher_cfg, teacher = hf.load_hf(dcfg.white_box, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype)
        if teacher_cfg.vocab_size != model_cfg.vocab_size:
            raise ProxyKDError(
                f"{dcfg.white_box}: teacher vocab_size {teacher_cfg.vocab_size} differs from "
                f"config.model.vocab_size {model_cfg.vocab_size}; white-box KD needs one vocabulary."
            )
        teacher_graphdef, teacher_state = parallel.place_model(teacher, mesh, rules)
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
        schedule=train.make_schedule(cfg.optim, steps),
        grad_accum=cfg.optim.grad_accum,
    )
    flops = train.step_flops(cfg.train.batch_size * seq_len, train_flops, frozen_flops)
    loop = train.Loop(
        cfg.train,
        run_dir=out_dir,
        mesh=mesh,
        rules=rules,
        train_step=step,
        state_shardings=shardings,
        flops_per_step=flops,
    )

    dataset = data.make_dataset(
        paths.prepared,
        dcfg.split,
        cfg.data,
        store=store,
        vocab_size=model_cfg.vocab_size,
        seq_len=seq_len,
        batch_size=cfg.train.batch_size,
    )
    if store is not None and alpha == 0.0:
        dataset = dataset.map(_DropStore())
    log.info(
        "distill: %s, alpha=%g, %s -> %s",
        "white-box teacher " + dcfg.white_box if white_box else "sparse store" if alpha > 0 else "SFT baseline",
        alpha,
        dcfg.split,
        out_dir,
    )
    return Distillation(
        loop=loop,
        state=state,
        graphdef=graphdef,
        data_iter=iter(dataset),
        frozen=frozen,
        model_cfg=model_cfg,
        out_dir=out_dir,
        tokenizer=tokenizer,
    )


def run(cfg) -> None:
    """The `distill` stage: trains the student (resumable) and writes <run>/<output>/final/."""
    setup(cfg).train()
