"""Loss functions of the align stage, for `train.make_train_step`, and the reference forward.

`loss_fn(model, batch, *frozen) -> (loss, metrics)`: `model` is the trainable module (the proxy,
or its LoRA adapters); `frozen` is empty, or `(base,)` with LoRA, the frozen base weights.

Neither loss materialises [B, L, V] in float32: the model returns hidden states and the losses
project them onto the vocabulary a chunk of tokens at a time (`losses.cross_entropy_chunked` for
SFT, `losses.sequence_logprobs` for DPO's per-row log-probs).

DPO reference: the reference (the proxy at the start of a round, or the post-SFT proxy with
`align.reference = "initial"`) is frozen for the whole round, so its sequence log-probs are constants of each pair. `reference_logprobs` computes them once per
round in its own jitted forward (no gradient, nothing donated) and they travel with the pairs as
`ref_chosen_logp` / `ref_rejected_logp`; the gradient step reads them from the batch.

Gradient accumulation: with `optim.grad_accum` = k > 1 an optimizer update averages the gradients of k
micro-batches (`train.optim.accumulate`). SFT weights them by their response tokens (its loss is a token mean);
DPO rounds weight them equally, right for the preference term (a mean over pairs, as many in every micro-batch),
and `UpdateTokenBatches` gives the NLL term the whole update's token count instead of the micro-batch's own
(`dpo_loss_fn`), so that the update equals one step on the k micro-batches at once.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxykd_jax import losses
from proxykd_jax.align import lora
from proxykd_jax.align.pairs import ROW_FIELDS, row_lengths
from proxykd_jax.parallel.hosts import to_host
from proxykd_jax.parallel.sharding import mesh_of


def policy_of(model: nnx.Module, frozen: tuple) -> nnx.Module:
    """The model that runs: `model` itself, or the frozen base with `model`'s adapters merged in."""
    if not frozen:
        return model
    (base,) = frozen
    return lora.merged(base, model)


def sequence_logprobs(model: nnx.Module, rows: dict, prefix: str = "", *, chunk: int) -> jax.Array:
    """Sum over masked target positions of log p(target), per row: logp_B (float32)."""
    hidden_BxLxD = model.hidden(rows[prefix + "tokens"], None, rows[prefix + "segment_ids"])
    return losses.sequence_logprobs(
        hidden_BxLxD,
        model.unembedding(),
        rows[prefix + "targets"],
        rows[prefix + "loss_mask"],
        chunk_size=chunk,
        softcap=model.cfg.logit_softcap,
    )


def sft_loss_fn(model, batch, *frozen, chunk: int):
    """Token-mean NLL of the response tokens (teacher responses), by the fused chunked CE."""
    policy = policy_of(model, frozen)
    hidden_BxLxD = policy.hidden(batch["tokens"], None, batch["segment_ids"])
    ce_sum, n_tokens = losses.cross_entropy_chunked(
        hidden_BxLxD.reshape(-1, hidden_BxLxD.shape[-1]),
        policy.unembedding(),
        batch["targets"].reshape(-1),
        batch["loss_mask"].reshape(-1),
        chunk_size=chunk,
        softcap=policy.cfg.logit_softcap,
    )
    nll = ce_sum / jnp.maximum(n_tokens, 1.0)
    return nll, {"loss": nll, "nll": nll, "response_tokens": n_tokens}


LOSS_TYPES = ("dpo", "ipo")


def preference_loss(
    pol_chosen_P,
    pol_rejected_P,
    ref_chosen_P,
    ref_rejected_P,
    *,
    beta: float,
    loss_type: str = "dpo",
    label_smoothing=0.0,
):
    """The preference term of a batch of pairs, from per-sequence log-probs: (loss, metrics).

    h = (log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r)) (the reference carries no gradient).
      dpo, label_smoothing = 0: mean of -log sigmoid(beta h) (`losses.dpo_loss`, Rafailov et al. 2023).
      dpo, label_smoothing = eps > 0 (conservative DPO): mean of -(1 - eps) log sigmoid(beta h)
        - eps log sigmoid(-beta h): the chosen label is taken as wrong with probability eps, so the
        gradient vanishes at beta h = log((1 - eps) / eps) instead of only as h -> infinity.
      ipo: mean of (h - 1 / (2 beta))^2 (Azar et al. 2023): h is pulled to the finite target
        1 / (2 beta) from either side, however far the samples already are apart.
    Metrics as `losses.dpo_loss` (rewards beta * log-ratio, margin beta * h, accuracy h > 0)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"align.loss_type={loss_type!r}; use one of {LOSS_TYPES}.")
    if loss_type == "dpo" and not label_smoothing:
        return losses.dpo_loss(pol_chosen_P, pol_rejected_P, ref_chosen_P, ref_rejected_P, beta)
    if beta <= 0:
        raise ValueError(f"align.beta is {beta}; it must be positive.")
    ratio_c = pol_chosen_P - jax.lax.stop_gradient(ref_chosen_P)
    ratio_r = pol_rejected_P - jax.lax.stop_gradient(ref_rejected_P)
    h_P = ratio_c - ratio_r
    if loss_type == "ipo":
        loss = jnp.mean(jnp.square(h_P - 1.0 / (2.0 * beta)))
    else:
        eps = label_smoothing
        loss = jnp.mean(-(1.0 - eps) * jax.nn.log_sigmoid(beta * h_P) - eps * jax.nn.log_sigmoid(-beta * h_P))
    metrics = dict(
        rewards_chosen=jnp.mean(beta * ratio_c),
        rewards_rejected=jnp.mean(beta * ratio_r),
        margin=jnp.mean(beta * h_P),
        accuracy=jnp.mean((h_P > 0).astype(jnp.float32)),
    )
    return loss, metrics


def dpo_loss_fn(
    model,
    batch,
    *frozen,
    beta: float,
    nll_weight: float,
    chunk: int,
    loss_type: str = "dpo",
    label_smoothing: float = 0.0,
):
    """nll_weight * token-mean NLL(chosen) + the preference term (`preference_loss`: DPO, conservative
    DPO or IPO) against the precomputed reference log-probs.

    `batch` rows are pairs interleaved (chosen i at row 2i, rejected i at row 2i + 1; see
    `phases.interleave_pairs`) with `ref_logp` [2P]; both go through one forward.

    A micro-batch of a k-batch optimizer update carries `update_tokens` [2P] (`UpdateTokenBatches`), whose chosen
    rows sum to N / k, N the update's chosen response tokens: the NLL term differentiated is then the micro-batch's
    chosen log-likelihood sum over N / k (not over its own tokens), and the equal-weight mean of the k micro-batch
    gradients is the gradient of nll_weight * (the update's token-mean NLL) + (its mean preference term). The
    metrics keep their meaning either way: `loss`, `nll`, `dpo_loss` are the micro-batch's own (`nll` its token
    mean), and so is the returned loss without `update_tokens` (one micro-batch per update)."""
    policy = policy_of(model, frozen)
    logp_2P = sequence_logprobs(policy, batch, chunk=chunk)
    pol_chosen_P, pol_rejected_P = logp_2P[0::2], logp_2P[1::2]
    dpo, dpo_metrics = preference_loss(
        pol_chosen_P,
        pol_rejected_P,
        batch["ref_logp"][0::2],
        batch["ref_logp"][1::2],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )
    n_chosen = jnp.sum(batch["loss_mask"][0::2])
    nll = -jnp.sum(pol_chosen_P) / jnp.maximum(n_chosen, 1.0)
    loss = nll_weight * nll + dpo
    metrics = {f"dpo/{k}": v for k, v in dpo_metrics.items()}
    metrics.update({"loss": loss, "nll": nll, "dpo_loss": dpo, "response_tokens": n_chosen})
    if UPDATE_TOKENS not in batch:
        return loss, metrics
    n_update = jnp.sum(batch[UPDATE_TOKENS][0::2])  # N / k: the update's chosen tokens per micro-batch
    update_nll = -jnp.sum(pol_chosen_P) / jnp.where(n_update > 0, n_update, 1.0)
    return nll_weight * update_nll + dpo, metrics


UPDATE_TOKENS = "update_tokens"


class UpdateTokenBatches:
    """Interleaved pair batches (`phases.pair_batches`, `inner`), every `grad_accum` consecutive ones one optimizer
    update, each given `update_tokens` [2P]: per row, the response tokens of its row slot averaged over the update's
    batches. The chosen rows then sum to N / grad_accum (N: the update's chosen response tokens; `dpo_loss_fn`'s
    NLL normaliser) on any split of the rows over processes and devices: each process averages its own slots.

    Reads an update's batches ahead; `get_state` / `set_state` (JSON, the train Loop's checkpoints) hold the inner
    iterator's state at the update's first batch and the position within it, so a run resumed in the middle of an
    update gets the same batches with the same counts (its accumulator is restored with it)."""

    def __init__(self, inner, grad_accum: int):
        self.inner, self.grad_accum = inner, int(grad_accum)
        self.start, self.group, self.pos = None, [], 0

    def __iter__(self):
        return self

    def _read_update(self) -> None:
        self.start = copy.deepcopy(self.inner.get_state())
        group = [next(self.inner) for _ in range(self.grad_accum)]
        tokens_2P = np.mean([np.sum(b["loss_mask"], axis=-1, dtype=np.float64) for b in group], axis=0)
        self.group = [dict(b, **{UPDATE_TOKENS: tokens_2P.astype(np.float32)}) for b in group]
        self.pos = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self.pos == len(self.group):
            self._read_update()
        self.pos += 1
        return self.group[self.pos - 1]

    def get_state(self) -> dict:
        if self.pos == len(self.group):  # between updates: the next batch starts one
            return {"inner": self.inner.get_state(), "pos": 0}
        return {"inner": self.start, "pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state["inner"])
        self.group, self.pos = [], 0
        if state["pos"]:
            self._read_update()
            self.pos = int(state["pos"])


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk", "lora_on"))
def _pair_logprobs(graphdef, state, rows, *, chunk: int, lora_on: bool):
    module = nnx.merge(graphdef, state)
    model = lora.merged(*module) if lora_on else module
    chosen = sequence_logprobs(model, rows, "chosen_", chunk=chunk)
    rejected = sequence_logprobs(model, rows, "rejected_", chunk=chunk)
    return chosen, rejected


def pass_batches(lengths: np.ndarray, batch_size: int, seq_len: int, cut: bool):
    """(row indices, real rows, row length) of each fixed-size batch of a pass over rows of `lengths` positions:
    with `cut` the rows go in order of length (stably), each batch cut to the fewest of `pipeline.lengths_of(seq_len)`
    positions that hold its longest row; else in order at seq_len. A last batch short of `batch_size` rows repeats
    its first row, whose outputs are dropped."""
    from proxykd_jax.data import pipeline

    n = len(lengths)
    order = np.argsort(lengths, kind="stable") if cut else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        real = len(idx)
        idx = np.concatenate([idx, np.full(batch_size - real, idx[0])])
        yield idx, real, pipeline.cut_length(int(lengths[idx].max()), seq_len) if cut else seq_len


def _placed_batches(rows: dict, keys, lengths: np.ndarray, batch_size: int, cut: bool, put_batch):
    """(rows' indices, the batch placed by `put_batch`) of each `pass_batches` batch of the fields `keys` of
    `rows`, the indices those of its real rows (in the batch's first places)."""
    seq_len = rows[keys[0]].shape[1]
    for idx, real, length in pass_batches(lengths, batch_size, seq_len, cut):
        batch = {k: rows[k][idx, :length] for k in keys}
        yield idx[:real], batch if put_batch is None else put_batch(batch)


def reference_logprobs(
    model: nnx.Module,
    frozen: tuple,
    rows: dict[str, np.ndarray],
    *,
    batch_size: int,
    chunk: int,
    put_batch=None,
    cut: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference sequence log-probs of every pair in `rows` ({chosen_*, rejected_*} [S, L]).

    `model`/`frozen` as in the loss functions (the reference is the policy as it is now). Runs in
    fixed-size batches (`pass_batches`; with `cut`, pairs in order of length, each batch cut to its longest row)
    through one jitted forward; `put_batch` places a host batch on the mesh (default: as is). Returns float32 numpy
    arrays [S], in the rows' order.
    """
    module = (frozen[0], model) if frozen else model
    graphdef, state = nnx.split(module)
    n = next(iter(rows.values())).shape[0]
    chosen_out, rejected_out = np.zeros((n,), np.float32), np.zeros((n,), np.float32)
    keys = [k for k in rows if k.startswith(("chosen_", "rejected_"))]
    lengths = np.maximum(row_lengths(rows["chosen_segment_ids"]), row_lengths(rows["rejected_segment_ids"]))
    for idx, batch in _placed_batches(rows, keys, lengths, batch_size, cut, put_batch):
        with mesh_of(batch):  # rows pinned to the batch axes, as in the train step
            c, r = _pair_logprobs(graphdef, state, batch, chunk=chunk, lora_on=bool(frozen))
        chosen_out[idx] = to_host(c)[: len(idx)]
        rejected_out[idx] = to_host(r)[: len(idx)]
    return chosen_out, rejected_out


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk", "lora_on"))
def _row_logprobs(graphdef, state, rows, *, chunk: int, lora_on: bool):
    module = nnx.merge(graphdef, state)
    model = lora.merged(*module) if lora_on else module
    return sequence_logprobs(model, rows, chunk=chunk)


def heldout_nll(
    model: nnx.Module,
    frozen: tuple,
    rows: dict[str, np.ndarray],
    *,
    batch_size: int,
    chunk: int,
    put_batch=None,
    cut: bool = False,
) -> float:
    """Token-mean NLL of the response targets of padded `rows` (tokens/targets/segment_ids/loss_mask), in batches
    of `pass_batches` (with `cut`: rows in order of length, each batch cut to its longest row)."""
    module = (frozen[0], model) if frozen else model
    graphdef, state = nnx.split(module)
    total = 0.0
    for idx, batch in _placed_batches(rows, ROW_FIELDS, row_lengths(rows["segment_ids"]), batch_size, cut, put_batch):
        with mesh_of(batch):
            logp_B = to_host(_row_logprobs(graphdef, state, batch, chunk=chunk, lora_on=bool(frozen)))
        total += float(np.sum(logp_B[: len(idx)].astype(np.float64)))
    return -total / max(float(np.sum(rows["loss_mask"])), 1.0)
