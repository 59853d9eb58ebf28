"""KL from a known teacher to a model on teacher contexts: E_t KL(q_t || p_t).

Given a function that returns the teacher's true next-token distributions at every position of a
batch of token rows (the known-teacher benchmark of docs/METHOD.md), and a model, this measures how
far the model's next-token distributions are from the teacher's, averaged over the masked
positions (normally: positions whose target is a teacher response token). Model log-probs come
from a jitted forward in float32; the KL itself is summed in float64 on the host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=0)
def _log_softmax(graphdef, state, tokens_BxL, segment_ids_BxL):
    model = nnx.merge(graphdef, state)
    return jax.nn.log_softmax(model(tokens_BxL, None, segment_ids_BxL), axis=-1)


def kl_terms(teacher_probs_BxLxV: np.ndarray, model_logprobs_BxLxV: np.ndarray) -> np.ndarray:
    """KL(q || p) per position [B, L] in float64 (terms with q = 0 contribute 0).

    The two may have different widths (one tokenizer, embeddings padded to different sizes): the
    narrower is read as giving the ids past its width no probability (inf where q has mass there)."""
    q = np.asarray(teacher_probs_BxLxV, np.float64)
    logp = np.asarray(model_logprobs_BxLxV, np.float64)
    width = max(q.shape[-1], logp.shape[-1])
    if q.shape[-1] < width:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (width - q.shape[-1],))], -1)
    if logp.shape[-1] < width:
        logp = np.concatenate([logp, np.full(logp.shape[:-1] + (width - logp.shape[-1],), -np.inf)], -1)
    on = q > 0
    return np.sum(np.where(on, q * (np.log(np.where(on, q, 1.0)) - np.where(on, logp, 0.0)), 0.0), axis=-1)


def kl_to_teacher(
    teacher_probs_fn, model: nnx.Module, tokens_BxL, mask_BxL, segment_ids_BxL=None, *, batch_size: int = 16
) -> dict[str, float]:
    """Mean over masked positions of KL(q_t || model_t), and the number of positions.

    teacher_probs_fn(tokens_bxL, segment_ids_bxL) -> probs [b, L, V]: the teacher's next-token
    distribution after each prefix tokens[:t+1] (the same alignment as the model's logits).
    Rows are processed `batch_size` at a time (the last batch padded with row 0, then dropped).
    Returns {"kl": mean KL in nats, "positions": count}.
    """
    tokens_BxL = np.asarray(tokens_BxL, np.int32)
    mask_BxL = np.asarray(mask_BxL, np.float64)
    if segment_ids_BxL is None:
        segment_ids_BxL = np.ones_like(tokens_BxL)
    segment_ids_BxL = np.asarray(segment_ids_BxL, np.int32)
    if tokens_BxL.shape != mask_BxL.shape or tokens_BxL.shape != segment_ids_BxL.shape:
        raise ValueError(
            f"tokens {tokens_BxL.shape}, mask {mask_BxL.shape} and segment ids "
            f"{segment_ids_BxL.shape} must have one [B, L] shape."
        )
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0.0
    n = tokens_BxL.shape[0]
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        idx = np.where(idx < n, idx, 0)
        m = min(batch_size, n - start)
        logp = _log_softmax(graphdef, state, jnp.asarray(tokens_BxL[idx]), jnp.asarray(segment_ids_BxL[idx]))
        logp = np.asarray(jax.device_get(logp))[:m]
        q = np.asarray(teacher_probs_fn(tokens_BxL[idx][:m], segment_ids_BxL[idx][:m]))
        if q.shape[:-1] != logp.shape[:-1]:  # (the vocabularies may differ in padding: `kl_terms`)
            raise ValueError(f"teacher distributions have shape {q.shape}; the model gives {logp.shape}.")
        mask = mask_BxL[start : start + m]
        total += float(np.sum(kl_terms(q, logp) * mask))
        count += float(np.sum(mask))
    if count == 0:
        raise ValueError("kl_to_teacher: the mask selects no position; pass rows with response tokens.")
    return {"kl": total / count, "positions": count}


def proxy_kl_to_teacher(teacher_probs_fn, model: nnx.Module, rows: dict, *, batch_size: int = 16) -> float:
    """E_t KL(q_t || proxy_t) over the response-target positions of padded rows
    (`tokens`, `segment_ids`, `loss_mask` as built by `proxykd_jax.align.pairs.pad_rows`)."""
    return kl_to_teacher(
        teacher_probs_fn, model, rows["tokens"], rows["loss_mask"], rows["segment_ids"], batch_size=batch_size
    )["kl"]
