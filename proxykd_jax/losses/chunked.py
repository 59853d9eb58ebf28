"""Memory-bounded student losses: logits computed tile by tile over tokens, never [N, V] at once.

Each chunked function splits the N tokens into tiles of `chunk_size` (the last tile padded by
repeating the final row, then masked out) and holds one float32 [chunk_size, V] logits tile at a
time. Two kinds:

- fused (`cross_entropy_chunked`, `sparse_kd_objective`, `dense_kd_objective`; what the training
  steps use): the gradient wrt hidden and W is computed in the forward pass, tile by tile, and the
  backward pass only scales it (see "fused linear + loss" below). One differentiable output.
- rematerialised (`sparse_kd_loss`, `dense_kd_loss`, `sequence_logprobs`): `jax.lax.map` of a
  `jax.checkpoint`-ed tile; every output is differentiable; the backward pass recomputes each
  tile's logits (four unembedding matmuls instead of three).

The student's log-softmax is computed once per tile and shared by the CE and KD terms (a second one
only when temperature != 1). Every chunked function has a `*_dense` twin (or, for the fused
objectives, the `*_loss_dense` one) computing the same from full logits, for tests.

Normalisation is the caller's: the losses return sums and the token count; the default objective
(`kd_objective`) is the per-token mean L = CE_sum / n_tokens + alpha * KD_weighted_sum / n_tokens.
All keyword arguments are static: bind them with functools.partial before jax.jit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from proxykd_jax.losses.divergences import check_divergence_args, sampled_divergence, sparse_divergence
from proxykd_jax.losses.divergences import divergence as dense_divergence


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the student loss settings (group `loss`, read by the distill stage)."""
    cfg = ml_collections.ConfigDict()
    cfg.divergence = "forward_kl"  # forward_kl (paper) | reverse_kl | jsd | skew_kl | tvd
    cfg.tail_mode = "tail"  # sparse targets: tail (K + one tail bucket) | renorm | sampled
    cfg.temperature = 1.0  # divides the student's logits in the KD term (not in CE); no T^2 factor
    cfg.alpha = 100.0  # weight of the KD term relative to CE (paper: 100), per-token mean of both
    cfg.jsd_beta = 0.5  # jsd mixture weight of the target, in (0, 1)
    cfg.skew_alpha = 0.1  # skew_kl: target weight in the skewed student a p + (1 - a) q, in [0, 1)
    cfg.num_samples = 16  # draws per token for tail_mode 'sampled'
    cfg.chunk_size = 256  # tokens per logits tile; one float32 [chunk_size, V] tile lives at a time
    return cfg


def loss_kwargs(cfg: ml_collections.ConfigDict) -> dict:
    """Keyword arguments of `sparse_kd_loss` from the `loss` config group, validated."""
    check_divergence_args(cfg.divergence, cfg.jsd_beta, cfg.skew_alpha, cfg.tail_mode)
    _check_static(cfg.chunk_size, cfg.temperature, cfg.num_samples)
    return dict(
        divergence=cfg.divergence,
        tail_mode=cfg.tail_mode,
        temperature=cfg.temperature,
        jsd_beta=cfg.jsd_beta,
        skew_alpha=cfg.skew_alpha,
        num_samples=cfg.num_samples,
        chunk_size=cfg.chunk_size,
    )


def kd_objective(ce_sum, kd_sum, n_tokens, alpha: float):
    """Per-token mean objective: (CE_sum + alpha * KD_weighted_sum) / max(n_tokens, 1)."""
    return (ce_sum + alpha * kd_sum) / jnp.maximum(n_tokens, 1.0)


def _check_static(chunk_size, temperature, num_samples=1):
    if chunk_size <= 0:
        raise ValueError(f"loss.chunk_size is {chunk_size}; it must be a positive number of tokens.")
    if temperature <= 0:
        raise ValueError(f"loss.temperature is {temperature}; it must be positive.")
    if num_samples <= 0:
        raise ValueError(f"loss.num_samples is {num_samples}; it must be a positive number of draws.")


def _check_rows(name_to_array: dict, n: int):
    for name, array in name_to_array.items():
        if array.shape[0] != n:
            raise ValueError(
                f"losses: {name} has {array.shape[0]} rows but hidden_NxD has {n}; "
                "flatten all per-token inputs to the same N."
            )


def _tiling(n: int, chunk_size: int) -> tuple[int, int]:
    """(number of tiles, tile length) for N tokens."""
    if n == 0:
        raise ValueError("losses: the batch has no tokens (N = 0); pass at least one token row.")
    chunk = min(chunk_size, n)
    return -(-n // chunk), chunk


def _pad_tiles(x, num_tiles: int, chunk: int, mode: str = "edge"):
    """[N, ...] -> [num_tiles, chunk, ...], padded at the end (by repeating the last row for 'edge').

    Tile t holds rows t, T + t, 2T + t, ... (strided, T = num_tiles), not rows tC .. tC + C - 1: with the
    token axis split over devices (a sharded batch) every tile then has C / devices rows on each device, so
    each device computes its own part of every tile. Contiguous tiles each lay on one device's rows, and
    XLA ran every tile whole on every device (8x the loss's matmuls at fsdp=8)."""
    pad = num_tiles * chunk - x.shape[0]
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode=mode) if pad else x
    return x.reshape((chunk, num_tiles) + x.shape[1:]).swapaxes(0, 1)


def _untile(y, n: int):
    """[num_tiles, chunk, ...] per-row tiles (`_pad_tiles`' layout) -> the first n rows [n, ...]."""
    return y.swapaxes(0, 1).reshape((-1,) + y.shape[2:])[:n]


def _map_tiles(tile_fn, inputs: tuple, chunk_size: int):
    """Applies tile_fn to [chunk, ...] slices of the per-token inputs; returns per-token outputs [N, ...]."""
    n = inputs[0].shape[0]
    num_tiles, chunk = _tiling(n, chunk_size)
    outputs = jax.lax.map(jax.checkpoint(tile_fn), tuple(_pad_tiles(x, num_tiles, chunk) for x in inputs))
    return jax.tree.map(lambda y: _untile(y, n), outputs)


def _logits(hidden_CxD, W_DxV):
    return jnp.dot(hidden_CxD, W_DxV, preferred_element_type=jnp.float32)


def _student(logits_CxV, temperature: float):
    """(log-probs for CE, log-probs for KD) sharing one log-softmax when temperature == 1."""
    logq_CxV = jax.nn.log_softmax(logits_CxV, axis=-1)
    logq_kd_CxV = logq_CxV if temperature == 1.0 else jax.nn.log_softmax(logits_CxV / temperature, -1)
    return logq_CxV, logq_kd_CxV


def _nll(logq_CxV, targets_C):
    return -jnp.take_along_axis(logq_CxV, targets_C[:, None], axis=-1)[:, 0]


def _weighted_sums(mask, ce, kd, weight):
    """(sum mask * ce, sum mask * weight * kd) over the tokens with mask != 0 (others may be inf/nan)."""
    on = mask != 0
    return (jnp.sum(jnp.where(on, mask * ce, 0.0)), jnp.sum(jnp.where(on, mask * weight.astype(jnp.float32) * kd, 0.0)))


def _masked_sums(ce_N, kd_N, mask_N, weight_N):
    mask_N = mask_N.astype(jnp.float32)
    return (*_weighted_sums(mask_N, ce_N, kd_N, weight_N), jnp.sum(mask_N))


def _uniforms(rng, n: int, tail_mode_or_sampled, num_samples: int):
    if not tail_mode_or_sampled:
        return jnp.zeros((n, 0), jnp.float32)
    if rng is None:
        raise ValueError("losses: sampled KD needs an rng key; pass rng=jax.random.key(...).")
    return jax.random.uniform(rng, (n, num_samples), jnp.float32)


# ----------------------------------------------------------------------------- fused linear + loss
#
# The `cross_entropy_chunked` and `*_kd_objective` losses compute their gradient in the forward
# pass, tile by tile (a `jax.custom_vjp`): each tile's logits give its loss and, by a VJP of the
# tile's loss wrt the logits, dLoss/dlogits, which is contracted at once into the tile's
# hidden-state gradient and a running float32 dW. No logits tile is kept or recomputed: three
# unembedding matmuls in all, as for the dense loss (rematerialisation needs four), and no [N, V]
# array. The backward pass only scales the saved gradients by the loss's cotangent, so gradients
# flow to `hidden_NxD` and `W_DxV` only (targets, masks, weights and teacher inputs are data).


def _fused_tiles(hidden_NxD, mask_N, per_token: tuple, chunk_size: int):
    """[T, C, ...] tiles: padded rows repeat the last row (edge) with mask 0."""
    num_tiles, chunk = _tiling(hidden_NxD.shape[0], chunk_size)
    tiles = tuple(_pad_tiles(x, num_tiles, chunk) for x in (hidden_NxD, *per_token))
    return tiles[0], _pad_tiles(mask_N, num_tiles, chunk, "constant"), tiles[1:]


def _sum_tiles(loss_T, aux_T):
    return jnp.sum(loss_T), jax.tree.map(lambda a: jnp.sum(a, axis=0), aux_T)


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _fused_linear_loss(tile_fn, hidden_NxD, W_DxV, mask_N, per_token, shared, chunk_size):
    """sum over token tiles of `tile_fn(logits_CxV, mask_C, *per_token_C, *shared) -> (loss, aux)`."""
    hidden_T, mask_T, tokens_T = _fused_tiles(hidden_NxD, mask_N, per_token, chunk_size)

    def tile(args):
        hidden_CxD, mask_C, *tokens_C = args
        return tile_fn(_logits(hidden_CxD, W_DxV), mask_C, *tokens_C, *shared)

    return _sum_tiles(*jax.lax.map(tile, (hidden_T, mask_T, *tokens_T)))


def _fused_linear_loss_fwd(tile_fn, hidden_NxD, W_DxV, mask_N, per_token, shared, chunk_size):
    hidden_T, mask_T, tokens_T = _fused_tiles(hidden_NxD, mask_N, per_token, chunk_size)

    def step(dW_DxV, args):
        hidden_CxD, mask_C, *tokens_C = args
        loss, tile_vjp, aux = jax.vjp(
            lambda logits: tile_fn(logits, mask_C, *tokens_C, *shared), _logits(hidden_CxD, W_DxV), has_aux=True
        )
        dlogits_CxV = tile_vjp(jnp.ones_like(loss))[0].astype(W_DxV.dtype)
        dhidden_CxD = jax.lax.dot_general(
            dlogits_CxV, W_DxV, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        dW_DxV = dW_DxV + jax.lax.dot_general(
            hidden_CxD, dlogits_CxV, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return dW_DxV, (loss, aux, dhidden_CxD.astype(hidden_CxD.dtype))

    dW_DxV, (loss_T, aux_T, dhidden_T) = jax.lax.scan(
        step, jnp.zeros(W_DxV.shape, jnp.float32), (hidden_T, mask_T, *tokens_T)
    )
    dhidden_NxD = _untile(dhidden_T, hidden_NxD.shape[0])
    return _sum_tiles(loss_T, aux_T), (dhidden_NxD, dW_DxV.astype(W_DxV.dtype), mask_N, per_token, shared)


def _fused_linear_loss_bwd(tile_fn, chunk_size, res, cotangents):
    dhidden_NxD, dW_DxV, mask_N, per_token, shared = res
    g = cotangents[0]  # aux outputs are metrics: the public functions return them under stop_gradient
    return (
        g.astype(dhidden_NxD.dtype) * dhidden_NxD,
        g.astype(dW_DxV.dtype) * dW_DxV,
        _zero_cotangent(mask_N),
        jax.tree.map(_zero_cotangent, per_token),
        jax.tree.map(_zero_cotangent, shared),
    )


_fused_linear_loss.defvjp(_fused_linear_loss_fwd, _fused_linear_loss_bwd)


def _fused(tile_fn, hidden_NxD, W_DxV, mask_N, per_token=(), shared=(), *, chunk_size: int):
    _tiling(hidden_NxD.shape[0], chunk_size)  # rejects N = 0 before tracing
    loss, aux = _fused_linear_loss(
        tile_fn, hidden_NxD, W_DxV, mask_N.astype(jnp.float32), tuple(per_token), tuple(shared), chunk_size
    )
    return loss, jax.lax.stop_gradient(aux)


# ----------------------------------------------------------------------------- cross-entropy


# The tile losses below write out their logits gradient (a `jax.custom_vjp` per tile, used by the
# fused pass's VJP): dNLL/dz = softmax(z) - onehot(target) is one elementwise pass that reads the
# logits tile again. Left to autodiff, XLA:CPU kept the tile's exponentials as a [C, V] buffer and
# ran the cotangent through separate passes (`benchmarks/kd_loss.py`; BUILD_NOTES.md, "Analytic loss
# tiles").


def _softmax_terms(logits_CxV, targets_C):
    """(shifted logits, sum of their exponentials, row max, NLL of the targets) per row."""
    row_max_C = jnp.max(logits_CxV, axis=-1)
    shifted_CxV = logits_CxV - row_max_C[:, None]
    total_C = jnp.sum(jnp.exp(shifted_CxV), axis=-1)
    target_C = jnp.take_along_axis(logits_CxV, targets_C[:, None], axis=-1)[:, 0]
    nll_C = jnp.log(total_C) - (target_C - row_max_C)
    return shifted_CxV, total_C, row_max_C, nll_C


def _softmax_grad(logits_CxV, log_norm, scale, targets_C, target_coef_C):
    """scale * exp(logits - log_norm) - target_coef * onehot(target): one pass over the tile
    (`log_norm` and `scale` are [C, 1]). The exponent is not the forward's `logits - row max` on
    purpose: XLA would merge the two and keep the exponentials as a [C, V] buffer, which on CPU cost
    more than computing them twice (CE's loss and gradient 18% slower at V 32768)."""
    onehot_CxV = jnp.arange(logits_CxV.shape[-1])[None, :] == targets_C[:, None]
    return jnp.exp(logits_CxV - log_norm) * scale - jnp.where(onehot_CxV, target_coef_C[:, None], 0.0)


def _logits_vjp(forward, grad):
    """f(logits, *data) -> forward's output, differentiated in the logits only and by hand:
    `forward(logits, *data) -> (out, residuals)`, `grad(residuals, out_cotangent) -> dlogits`. The
    data (masks, targets, the targets' log-probs, teacher logits) get zero cotangents."""

    @jax.custom_vjp
    def f(logits, *data):
        return forward(logits, *data)[0]

    def fwd(logits, *data):
        out, residuals = forward(logits, *data)
        return out, (residuals, data)

    def bwd(saved, out_cotangent):
        residuals, data = saved
        return (grad(residuals, out_cotangent), *jax.tree.map(_zero_cotangent, data))

    f.defvjp(fwd, bwd)
    return f


def _ce_forward(logits_CxV, mask_C, targets_C):
    _, total_C, row_max_C, nll_C = _softmax_terms(logits_CxV, targets_C)
    on_C = mask_C != 0
    coef_C = jnp.where(on_C, mask_C, 0.0)
    loss = jnp.sum(jnp.where(on_C, mask_C * nll_C, 0.0))
    return loss, (logits_CxV, row_max_C + jnp.log(total_C), targets_C, coef_C)


def _ce_grad(residuals, g):
    logits_CxV, log_norm_C, targets_C, coef_C = residuals
    return g * _softmax_grad(logits_CxV, log_norm_C[:, None], coef_C[:, None], targets_C, coef_C)


_ce_loss = _logits_vjp(_ce_forward, _ce_grad)  # masked NLL sum of one tile


def _ce_tile(logits_CxV, mask_C, targets_C):
    return _ce_loss(logits_CxV, mask_C, targets_C), ()


def cross_entropy_chunked(hidden_NxD, W_DxV, targets_N, mask_N, *, chunk_size: int = 256):
    """Masked CE from hidden states and the unembedding, tiled over tokens: (ce_sum, n_tokens).

    Fused (see above): the gradient wrt hidden_NxD and W_DxV is computed in the forward pass.
    """
    _check_static(chunk_size, 1.0)
    _check_rows(dict(targets_N=targets_N, mask_N=mask_N), hidden_NxD.shape[0])
    ce_sum, _ = _fused(_ce_tile, hidden_NxD, W_DxV, mask_N, (targets_N,), chunk_size=chunk_size)
    return ce_sum, jnp.sum(mask_N.astype(jnp.float32))


# ----------------------------------------------------------------------------- sparse targets


def _sparse_tile(
    logits_CxV,
    targets_C,
    ids_CxK,
    logprobs_CxK,
    tail_C,
    uniforms_CxS,
    *,
    divergence,
    tail_mode,
    temperature,
    jsd_beta,
    skew_alpha,
):
    logq_CxV, logq_kd_CxV = _student(logits_CxV, temperature)
    kd_C = sparse_divergence(
        divergence,
        ids_CxK,
        logprobs_CxK,
        tail_C,
        logq_kd_CxV,
        tail_mode=tail_mode,
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
        sample_uniforms_MxS=uniforms_CxS if tail_mode == "sampled" else None,
    )
    return _nll(logq_CxV, targets_C), kd_C


def _sparse_setup(
    hidden_NxD,
    targets_N,
    kd_ids_NxK,
    kd_logprobs_NxK,
    kd_tail_N,
    mask_N,
    weight_N,
    divergence,
    tail_mode,
    temperature,
    jsd_beta,
    skew_alpha,
    num_samples,
    chunk_size,
):
    check_divergence_args(divergence, jsd_beta, skew_alpha, tail_mode)
    _check_static(chunk_size, temperature, num_samples)
    _check_rows(
        dict(
            targets_N=targets_N,
            kd_ids_NxK=kd_ids_NxK,
            kd_logprobs_NxK=kd_logprobs_NxK,
            kd_tail_N=kd_tail_N,
            mask_N=mask_N,
            weight_N=weight_N,
        ),
        hidden_NxD.shape[0],
    )
    if kd_ids_NxK.shape != kd_logprobs_NxK.shape:
        raise ValueError(
            f"losses: kd_ids_NxK {kd_ids_NxK.shape} and kd_logprobs_NxK "
            f"{kd_logprobs_NxK.shape} must have the same shape."
        )


def sparse_kd_loss(
    hidden_NxD,
    W_DxV,
    targets_N,
    kd_ids_NxK,
    kd_logprobs_NxK,
    kd_tail_N,
    mask_N,
    weight_N,
    *,
    divergence: str = "forward_kl",
    tail_mode: str = "tail",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    num_samples: int = 16,
    chunk_size: int = 256,
    rng=None,
):
    """Student CE plus sparse-target KD, tiled over tokens.

    Returns (ce_sum, kd_sum, n_tokens): ce_sum = sum_t mask_t * NLL_t,
    kd_sum = sum_t mask_t * weight_t * D(target_t || q_t), n_tokens = sum_t mask_t.
    `rng` (a key) is needed only for tail_mode 'sampled' (num_samples draws per token).
    """
    _sparse_setup(
        hidden_NxD,
        targets_N,
        kd_ids_NxK,
        kd_logprobs_NxK,
        kd_tail_N,
        mask_N,
        weight_N,
        divergence,
        tail_mode,
        temperature,
        jsd_beta,
        skew_alpha,
        num_samples,
        chunk_size,
    )
    uniforms_NxS = _uniforms(rng, hidden_NxD.shape[0], tail_mode == "sampled", num_samples)
    kw = dict(
        divergence=divergence, tail_mode=tail_mode, temperature=temperature, jsd_beta=jsd_beta, skew_alpha=skew_alpha
    )

    def tile_fn(args):
        hidden_CxD, *rest = args
        return _sparse_tile(_logits(hidden_CxD, W_DxV), *rest, **kw)

    ce_N, kd_N = _map_tiles(
        tile_fn, (hidden_NxD, targets_N, kd_ids_NxK, kd_logprobs_NxK, kd_tail_N, uniforms_NxS), chunk_size
    )
    return _masked_sums(ce_N, kd_N, mask_N, weight_N)


def sparse_kd_loss_dense(
    hidden_NxD,
    W_DxV,
    targets_N,
    kd_ids_NxK,
    kd_logprobs_NxK,
    kd_tail_N,
    mask_N,
    weight_N,
    *,
    divergence: str = "forward_kl",
    tail_mode: str = "tail",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    num_samples: int = 16,
    chunk_size: int = 256,
    rng=None,
):
    """Reference for `sparse_kd_loss` from the full [N, V] logits (chunk_size is ignored)."""
    _sparse_setup(
        hidden_NxD,
        targets_N,
        kd_ids_NxK,
        kd_logprobs_NxK,
        kd_tail_N,
        mask_N,
        weight_N,
        divergence,
        tail_mode,
        temperature,
        jsd_beta,
        skew_alpha,
        num_samples,
        chunk_size,
    )
    uniforms_NxS = _uniforms(rng, hidden_NxD.shape[0], tail_mode == "sampled", num_samples)
    ce_N, kd_N = _sparse_tile(
        _logits(hidden_NxD, W_DxV),
        targets_N,
        kd_ids_NxK,
        kd_logprobs_NxK,
        kd_tail_N,
        uniforms_NxS,
        divergence=divergence,
        tail_mode=tail_mode,
        temperature=temperature,
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
    )
    return _masked_sums(ce_N, kd_N, mask_N, weight_N)


# The paper's setting (forward KL, the tail bucket, temperature 1) with its logits gradient written
# out. Per token, with q = softmax(z), the K valid target entries p_k, P = sum_k p_k, the tail p_t
# and the student's tail q_t = sum of q outside the K ids (exact, as in `sparse_divergence`):
#   KD = sum_k p_k (log p_k - log q_k) + p_t (log p_t - log q_t)
#   dKD/dz_j = q_j (P + p_t) - p_j                                  for j in K
#            = q_j (P + p_t) - p_t q_j / q_t = (q_j / q_t) (q_t (P + p_t) - p_t)   outside K,
# and dNLL/dz_j = q_j - [j = target]. The tile's gradient is one dense pass, the exponentials over
# the student's tail sum (q_j / q_t <= 1 outside K, however small q_t) times a per-token factor
# minus the target's one-hot, and then the K entries set to their own values (the dense expression
# is wrong there, even inf). One factor for all ids, q_j (P + p_t - p_t / q_t) plus a correction
# on K, cancels catastrophically once the student is confident (q_t ~ 1e-9: p_t / q_t ~ 1e8
# against q_j ~ 1). Autodiff through `sparse_divergence` instead ran the log-softmax's cotangent,
# the scatter of the gathers' cotangents and the masked tail logsumexp's VJP as separate [C, V]
# passes (`benchmarks/kd_loss.py`; figures in BUILD_NOTES.md, "Analytic loss tiles").


def _grad_coefs(alpha, mask_C, weight_C):
    """dLoss/dNLL and dLoss/dKD per token of loss = sum mask NLL + alpha sum mask weight KD (0 off the mask)."""
    on_C = mask_C != 0
    return jnp.where(on_C, mask_C, 0.0), jnp.where(on_C, alpha * mask_C * weight_C.astype(jnp.float32), 0.0)


def _fkl_tail_forward(alpha, logits_CxV, mask_C, weight_C, targets_C, ids_CxK, logprobs_CxK, tail_C):
    """(loss, ce, kd) of one tile and the residuals of its analytic gradient."""
    c, v = logits_CxV.shape
    logprobs_CxK = logprobs_CxK.astype(jnp.float32)
    valid_CxK = logprobs_CxK > -jnp.inf
    slots_CxK = jnp.where(valid_CxK, ids_CxK, v)  # absent entries: out of range, dropped
    member_CxV = jnp.zeros((c, v), bool).at[jnp.arange(c)[:, None], slots_CxK].set(True, mode="drop")
    # The student's tail sum is taken relative to the tail's own max, not the row max: relative to the row max
    # it underflowed to 0 once every logit outside K lay ~87 below the max (a confident student), and the KD
    # term became inf with no tail gradient. The row's normaliser follows from it and the K logits, so the
    # [C, V] pass still takes one exponential per id.
    tail_max_C = jnp.max(jnp.where(member_CxV, -jnp.inf, logits_CxV), axis=-1)  # finite: K < V ids
    tail_max_C = jnp.where(jnp.isfinite(tail_max_C), tail_max_C, 0.0)
    tail_sum_C = jnp.sum(jnp.where(member_CxV, 0.0, jnp.exp(logits_CxV - tail_max_C[:, None])), axis=-1)  # >= 1
    logits_CxK = jnp.take_along_axis(logits_CxV, jnp.clip(ids_CxK, 0, v - 1), axis=-1)
    row_max_C = jnp.maximum(tail_max_C, jnp.max(jnp.where(valid_CxK, logits_CxK, -jnp.inf), axis=-1))
    head_sum_C = jnp.sum(jnp.where(valid_CxK, jnp.exp(logits_CxK - row_max_C[:, None]), 0.0), axis=-1)
    tail_part_C = jnp.where(tail_sum_C > 0, jnp.exp(tail_max_C - row_max_C) * tail_sum_C, 0.0)
    log_norm_C = row_max_C + jnp.log(head_sum_C + tail_part_C)
    nll_C = log_norm_C - jnp.take_along_axis(logits_CxV, targets_C[:, None], axis=-1)[:, 0]
    logq_CxK = logits_CxK - log_norm_C[:, None]
    logp_CxK = jnp.where(valid_CxK, logprobs_CxK, 0.0)
    p_CxK = jnp.where(valid_CxK, jnp.exp(logp_CxK), 0.0)
    head_C = jnp.sum(jnp.where(p_CxK > 0, p_CxK * (logp_CxK - logq_CxK), 0.0), -1)
    p_tail_C = jnp.maximum(tail_C.astype(jnp.float32), 0.0)
    has_tail_C = p_tail_C > 0
    tail_on_C = has_tail_C & (tail_sum_C > 0)
    log_tail_norm_C = tail_max_C + jnp.log(jnp.where(tail_sum_C > 0, tail_sum_C, 1.0))
    logq_tail_C = log_tail_norm_C - log_norm_C
    tail_term_C = jnp.where(tail_on_C, p_tail_C * (jnp.log(jnp.where(has_tail_C, p_tail_C, 1.0)) - logq_tail_C), 0.0)
    kd_C = head_C + jnp.where(has_tail_C & ~tail_on_C, jnp.inf, tail_term_C)  # p_t > 0 against q_t = 0
    ce, kd = _weighted_sums(mask_C, nll_C, kd_C, weight_C)

    g_ce_C, g_kd_C = _grad_coefs(alpha, mask_C, weight_C)
    p_tail_C = jnp.where(tail_on_C, p_tail_C, 0.0)  # q_t = 0: that term is +inf with zero gradient
    coef_C = g_ce_C + g_kd_C * (jnp.sum(p_CxK, -1) + p_tail_C)  # dLoss/dz_j = q_j coef - g_kd p_j on K
    q_tail_C = jnp.where(tail_sum_C > 0, jnp.exp(logq_tail_C), 0.0)
    outside_C = coef_C * q_tail_C - g_kd_C * p_tail_C  # times q_j / q_t outside K
    on_k_CxK = jnp.exp(logq_CxK) * coef_C[:, None] - g_kd_C[:, None] * p_CxK
    on_k_CxK = on_k_CxK - jnp.where(ids_CxK == targets_C[:, None], g_ce_C[:, None], 0.0)
    res = (logits_CxV, log_tail_norm_C, outside_C, targets_C, g_ce_C, slots_CxK, on_k_CxK)
    return (ce + alpha * kd, ce, kd), res


def _fkl_tail_grad(residuals, cotangents):
    logits_CxV, log_tail_norm_C, outside_C, targets_C, g_ce_C, slots_CxK, on_k_CxK = residuals
    g = cotangents[0]  # ce and kd are metrics (returned under stop_gradient by `_fused`)
    dlogits_CxV = _softmax_grad(logits_CxV, log_tail_norm_C[:, None], outside_C[:, None], targets_C, g_ce_C)
    rows_Cx1 = jnp.arange(logits_CxV.shape[0])[:, None]
    return g * dlogits_CxV.at[rows_Cx1, slots_CxK].set(on_k_CxK, mode="drop")


def _fkl_tail_tile(alpha):
    loss_fn = _logits_vjp(functools.partial(_fkl_tail_forward, alpha), _fkl_tail_grad)

    def tile_fn(logits_CxV, mask_C, weight_C, targets_C, ids_CxK, logprobs_CxK, tail_C, uniforms_CxS):
        loss, ce, kd = loss_fn(logits_CxV, mask_C, weight_C, targets_C, ids_CxK, logprobs_CxK, tail_C)
        return loss, (ce, kd)

    return tile_fn


def _objective_tile(tile_terms, alpha):
    """(loss, (ce, kd)) of one tile from its per-token (nll_C, kd_C): loss = ce + alpha * kd."""

    def tile_fn(logits_CxV, mask_C, weight_C, *rest):
        ce, kd = _weighted_sums(mask_C, *tile_terms(logits_CxV, *rest), weight_C)
        return ce + alpha * kd, (ce, kd)

    return tile_fn


def sparse_kd_objective(
    hidden_NxD,
    W_DxV,
    targets_N,
    kd_ids_NxK,
    kd_logprobs_NxK,
    kd_tail_N,
    mask_N,
    weight_N,
    *,
    alpha: float,
    divergence: str = "forward_kl",
    tail_mode: str = "tail",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    num_samples: int = 16,
    chunk_size: int = 256,
    rng=None,
):
    """`sparse_kd_loss` fused into one objective: (loss_sum, ce_sum, kd_sum, n_tokens).

    loss_sum = ce_sum + alpha * kd_sum carries the gradient (wrt hidden_NxD and W_DxV, computed in
    the forward pass; see "fused linear + loss"); ce_sum and kd_sum are the same sums as
    `sparse_kd_loss` returns, as metrics without gradient. The distillation objective is
    loss_sum / max(n_tokens, 1) (= `kd_objective`).
    """
    _sparse_setup(
        hidden_NxD,
        targets_N,
        kd_ids_NxK,
        kd_logprobs_NxK,
        kd_tail_N,
        mask_N,
        weight_N,
        divergence,
        tail_mode,
        temperature,
        jsd_beta,
        skew_alpha,
        num_samples,
        chunk_size,
    )
    uniforms_NxS = _uniforms(rng, hidden_NxD.shape[0], tail_mode == "sampled", num_samples)
    terms = functools.partial(
        _sparse_tile,
        divergence=divergence,
        tail_mode=tail_mode,
        temperature=temperature,
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
    )
    analytic = (divergence, tail_mode, temperature) == ("forward_kl", "tail", 1.0)
    analytic = analytic and kd_ids_NxK.shape[-1] < W_DxV.shape[-1]  # K = V: the tail may be empty
    loss_sum, (ce_sum, kd_sum) = _fused(
        _fkl_tail_tile(float(alpha)) if analytic else _objective_tile(terms, float(alpha)),
        hidden_NxD,
        W_DxV,
        mask_N,
        (weight_N, targets_N, kd_ids_NxK, kd_logprobs_NxK, kd_tail_N, uniforms_NxS),
        chunk_size=chunk_size,
    )
    return loss_sum, ce_sum, kd_sum, jnp.sum(mask_N.astype(jnp.float32))


# ----------------------------------------------------------------------------- dense (white-box) targets


def _dense_tile(
    logits_CxV, teacher_logits_CxV, targets_C, uniforms_CxS, *, divergence, temperature, jsd_beta, skew_alpha, sampled
):
    logq_CxV, logq_kd_CxV = _student(logits_CxV, temperature)
    logp_CxV = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_logits_CxV / temperature, axis=-1))
    kw = dict(jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    if sampled:
        kd_C = sampled_divergence(divergence, logp_CxV, logq_kd_CxV, uniforms_CxS, **kw)
    else:
        kd_C = dense_divergence(divergence, logp_CxV, logq_kd_CxV, **kw)
    return _nll(logq_CxV, targets_C), kd_C


def _dense_setup(
    hidden_NxD,
    W_DxV,
    targets_N,
    teacher_hidden_NxE,
    teacher_W_ExV,
    mask_N,
    weight_N,
    divergence,
    temperature,
    jsd_beta,
    skew_alpha,
    num_samples,
    chunk_size,
):
    check_divergence_args(divergence, jsd_beta, skew_alpha)
    _check_static(chunk_size, temperature, num_samples)
    _check_rows(
        dict(targets_N=targets_N, teacher_hidden_NxE=teacher_hidden_NxE, mask_N=mask_N, weight_N=weight_N),
        hidden_NxD.shape[0],
    )
    if teacher_W_ExV.shape[-1] != W_DxV.shape[-1]:
        raise ValueError(
            f"losses: teacher_W_ExV has vocabulary {teacher_W_ExV.shape[-1]} but the "
            f"student's W_DxV has {W_DxV.shape[-1]}; teacher and student must share it."
        )


def dense_kd_loss(
    hidden_NxD,
    W_DxV,
    targets_N,
    teacher_hidden_NxE,
    teacher_W_ExV,
    mask_N,
    weight_N,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    sampled: bool = False,
    num_samples: int = 16,
    chunk_size: int = 256,
    rng=None,
):
    """White-box KD: CE plus D(teacher || student) between full distributions, tiled over tokens.

    The teacher's logits are computed per tile from its final hidden states and unembedding (no
    gradient flows into them); `temperature` divides both sides' logits in the KD term. With
    sampled=True the KD term is the importance-sampled estimate (`sampled_divergence`).
    Returns (ce_sum, kd_sum, n_tokens) as `sparse_kd_loss`.
    """
    _dense_setup(
        hidden_NxD,
        W_DxV,
        targets_N,
        teacher_hidden_NxE,
        teacher_W_ExV,
        mask_N,
        weight_N,
        divergence,
        temperature,
        jsd_beta,
        skew_alpha,
        num_samples,
        chunk_size,
    )
    uniforms_NxS = _uniforms(rng, hidden_NxD.shape[0], sampled, num_samples)
    kw = dict(divergence=divergence, temperature=temperature, jsd_beta=jsd_beta, skew_alpha=skew_alpha, sampled=sampled)

    def tile_fn(args):
        hidden_CxD, teacher_hidden_CxE, targets_C, uniforms_CxS = args
        return _dense_tile(
            _logits(hidden_CxD, W_DxV), _logits(teacher_hidden_CxE, teacher_W_ExV), targets_C, uniforms_CxS, **kw
        )

    ce_N, kd_N = _map_tiles(tile_fn, (hidden_NxD, teacher_hidden_NxE, targets_N, uniforms_NxS), chunk_size)
    return _masked_sums(ce_N, kd_N, mask_N, weight_N)


def dense_kd_loss_dense(
    hidden_NxD,
    W_DxV,
    targets_N,
    teacher_hidden_NxE,
    teacher_W_ExV,
    mask_N,
    weight_N,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    sampled: bool = False,
    num_samples: int = 16,
    chunk_size: int = 256,
    rng=None,
):
    """Reference for `dense_kd_loss` from the full [N, V] logits of both models."""
    _dense_setup(
        hidden_NxD,
        W_DxV,
        targets_N,
        teacher_hidden_NxE,
        teacher_W_ExV,
        mask_N,
        weight_N,
        divergence,
        temperature,
        jsd_beta,
        skew_alpha,
        num_samples,
        chunk_size,
    )
    uniforms_NxS = _uniforms(rng, hidden_NxD.shape[0], sampled, num_samples)
    ce_N, kd_N = _dense_tile(
        _logits(hidden_NxD, W_DxV),
        _logits(teacher_hidden_NxE, teacher_W_ExV),
        targets_N,
        uniforms_NxS,
        divergence=divergence,
        temperature=temperature,
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
        sampled=sampled,
    )
    return _masked_sums(ce_N, kd_N, mask_N, weight_N)


def _dense_fkl_forward(alpha, logits_CxV, mask_C, weight_C, targets_C, teacher_logits_CxV):
    """(loss, ce, kd) of one white-box tile, forward KL at temperature 1, and its gradient's residuals:
    dLoss/dz = q (g_ce + g_kd) - g_kd p - g_ce onehot(target), one pass over both logits tiles."""
    shifted_CxV, total_C, row_max_C, nll_C = _softmax_terms(logits_CxV, targets_C)
    teacher_CxV = teacher_logits_CxV.astype(jnp.float32)
    t_max_C = jnp.max(teacher_CxV, axis=-1)
    t_log_total_C = jnp.log(jnp.sum(jnp.exp(teacher_CxV - t_max_C[:, None]), axis=-1))
    logp_CxV = teacher_CxV - (t_max_C + t_log_total_C)[:, None]
    log_total_C = jnp.log(total_C)
    logq_CxV = shifted_CxV - log_total_C[:, None]
    p_CxV = jnp.exp(logp_CxV)
    kd_C = jnp.sum(jnp.where(p_CxV > 0, p_CxV * (logp_CxV - logq_CxV), 0.0), axis=-1)
    ce, kd = _weighted_sums(mask_C, nll_C, kd_C, weight_C)
    g_ce_C, g_kd_C = _grad_coefs(alpha, mask_C, weight_C)
    res = (logits_CxV, row_max_C + log_total_C, teacher_CxV, t_max_C, t_log_total_C, targets_C, g_ce_C, g_kd_C)
    return (ce + alpha * kd, ce, kd), res


def _dense_fkl_grad(residuals, cotangents):
    logits_CxV, log_norm_C, teacher_CxV, t_max_C, t_log_total_C, targets_C, g_ce_C, g_kd_C = residuals
    student = _softmax_grad(logits_CxV, log_norm_C[:, None], (g_ce_C + g_kd_C)[:, None], targets_C, g_ce_C)
    # p recomputed, grouped unlike the forward's log p so that XLA does not merge the two (see `_softmax_grad`)
    p_CxV = jnp.exp((teacher_CxV - t_max_C[:, None]) - t_log_total_C[:, None])
    return cotangents[0] * (student - g_kd_C[:, None] * p_CxV)


def _dense_fkl_tile(alpha):
    loss_fn = _logits_vjp(functools.partial(_dense_fkl_forward, alpha), _dense_fkl_grad)

    def tile_fn(logits_CxV, mask_C, weight_C, teacher_hidden_CxE, targets_C, uniforms_CxS, teacher_W):
        loss, ce, kd = loss_fn(logits_CxV, mask_C, weight_C, targets_C, _logits(teacher_hidden_CxE, teacher_W))
        return loss, (ce, kd)

    return tile_fn


def dense_kd_objective(
    hidden_NxD,
    W_DxV,
    targets_N,
    teacher_hidden_NxE,
    teacher_W_ExV,
    mask_N,
    weight_N,
    *,
    alpha: float,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    sampled: bool = False,
    num_samples: int = 16,
    chunk_size: int = 256,
    rng=None,
):
    """`dense_kd_loss` fused into one objective: (loss_sum, ce_sum, kd_sum, n_tokens), as
    `sparse_kd_objective` (the teacher's logits are computed per tile; no gradient reaches the teacher)."""
    _dense_setup(
        hidden_NxD,
        W_DxV,
        targets_N,
        teacher_hidden_NxE,
        teacher_W_ExV,
        mask_N,
        weight_N,
        divergence,
        temperature,
        jsd_beta,
        skew_alpha,
        num_samples,
        chunk_size,
    )
    uniforms_NxS = _uniforms(rng, hidden_NxD.shape[0], sampled, num_samples)
    kw = dict(divergence=divergence, temperature=temperature, jsd_beta=jsd_beta, skew_alpha=skew_alpha, sampled=sampled)

    def terms(logits_CxV, teacher_hidden_CxE, targets_C, uniforms_CxS, teacher_W):
        return _dense_tile(logits_CxV, _logits(teacher_hidden_CxE, teacher_W), targets_C, uniforms_CxS, **kw)

    analytic = (divergence, temperature, sampled) == ("forward_kl", 1.0, False)  # the gradient written out
    loss_sum, (ce_sum, kd_sum) = _fused(
        _dense_fkl_tile(float(alpha)) if analytic else _objective_tile(terms, float(alpha)),
        hidden_NxD,
        W_DxV,
        mask_N,
        (weight_N, teacher_hidden_NxE, targets_N, uniforms_NxS),
        (teacher_W_ExV,),
        chunk_size=chunk_size,
    )
    return loss_sum, ce_sum, kd_sum, jnp.sum(mask_N.astype(jnp.float32))


# ----------------------------------------------------------------------------- sequence log-probs


def _target_logprobs_forward(logits_CxV, targets_C):
    _, total_C, row_max_C, nll_C = _softmax_terms(logits_CxV, targets_C)
    return -nll_C, (logits_CxV, row_max_C + jnp.log(total_C), targets_C)


def _target_logprobs_grad(residuals, g_C):
    logits_CxV, log_norm_C, targets_C = residuals
    return -_softmax_grad(logits_CxV, log_norm_C[:, None], g_C[:, None], targets_C, g_C)


# log softmax(logits)[target] per row; its VJP g * (onehot - softmax) is one pass (see `_softmax_grad`)
# where autodiff of log_softmax + gather took several
_target_logprobs = _logits_vjp(_target_logprobs_forward, _target_logprobs_grad)


def _row_sums(logp_BxL, mask_BxL, length_normalize: bool):
    mask_BxL = mask_BxL.astype(jnp.float32)
    total_B = jnp.sum(jnp.where(mask_BxL != 0, mask_BxL * logp_BxL, 0.0), axis=-1)
    if length_normalize:
        return total_B / jnp.maximum(jnp.sum(mask_BxL, axis=-1), 1.0)
    return total_B


def _check_sequence(hidden_BxLxD, targets_BxL, mask_BxL, chunk_size):
    _check_static(chunk_size, 1.0)
    if targets_BxL.shape != hidden_BxLxD.shape[:2] or mask_BxL.shape != targets_BxL.shape:
        raise ValueError(
            f"losses: targets_BxL {targets_BxL.shape} and mask_BxL {mask_BxL.shape} must "
            f"match the first two axes of hidden_BxLxD {hidden_BxLxD.shape}."
        )


def sequence_logprobs(
    hidden_BxLxD, W_DxV, targets_BxL, mask_BxL, *, chunk_size: int = 256, length_normalize: bool = False
):
    """sum_t mask * log q(target_t) per row (divided by the row's mask sum when length_normalize),
    tiled over the B*L tokens. Used for DPO (policy and reference) and NLL terms."""
    _check_sequence(hidden_BxLxD, targets_BxL, mask_BxL, chunk_size)
    b, length, d = hidden_BxLxD.shape

    def tile_fn(args):
        hidden_CxD, targets_C = args
        return _target_logprobs(_logits(hidden_CxD, W_DxV), targets_C)

    logp_N = _map_tiles(tile_fn, (hidden_BxLxD.reshape(b * length, d), targets_BxL.reshape(-1)), chunk_size)
    return _row_sums(logp_N.reshape(b, length), mask_BxL, length_normalize)


def sequence_logprobs_dense(
    hidden_BxLxD, W_DxV, targets_BxL, mask_BxL, *, chunk_size: int = 256, length_normalize: bool = False
):
    """Reference for `sequence_logprobs` from the full [B, L, V] logits."""
    _check_sequence(hidden_BxLxD, targets_BxL, mask_BxL, chunk_size)
    logq_BxLxV = jax.nn.log_softmax(_logits(hidden_BxLxD, W_DxV), axis=-1)
    logp_BxL = jnp.take_along_axis(logq_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return _row_sums(logp_BxL, mask_BxL, length_normalize)
