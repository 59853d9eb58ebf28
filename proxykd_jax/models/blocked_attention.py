"""The block-causal CPU kernels behind `attention.self_attention(..., implementation="blocked")`, and the mask
every path shares (`_mask_bias`).

`self_attend` runs causal self-attention over packed rows in query blocks, each against only the keys it can see:
the key prefix up to its own block (`_causal_core`, which saves the float32 probabilities for a direct softmax
backward), or, with a sliding window, the band of key blocks the window reaches (`band_plan`, `_band_core`); a traced
window (one scanned body for a mixed model's sliding and full layers) picks between the band and the prefix kernel
in its log-sum-exp form (`_causal_lse_core`) with a `lax.cond`. The masks are those `attention.attend` applies: same
non-zero segment, position and index not after the query's, and within the window. With a `softcap` (Gemma 2) every
kernel soft-caps the scores before the mask, and its backward pass applies the cap's derivative (`_block_grads`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_MASK_VALUE = -1e30
_BAND_MAX_SHARE = 0.6  # `band_plan`: the most of the causal kernel's score entries a band may hold


def _in_window(q_pos_BxL, k_pos_BxC, window):
    """Boolean [B, L, C]: the key is less than `window` positions before the query (transformers'
    `sliding_window_overlay`: key > query - window)."""
    return q_pos_BxL[:, :, None] - k_pos_BxC[:, None, :] < window


def _mask_bias(q_seg_BxL, k_seg_BxC, q_pos_BxL, k_pos_BxC, causal_LxC=True, window=None):
    """Additive float32 mask [B, L, C]: 0 where a query sees a key (same non-zero segment, key
    position not after the query's, `causal_LxC`, and within `window` when given), else a large negative value."""
    visible = (
        (q_seg_BxL[:, :, None] == k_seg_BxC[:, None, :])
        & (k_seg_BxC[:, None, :] != 0)
        & (k_pos_BxC[:, None, :] <= q_pos_BxL[:, :, None])
        & causal_LxC
    )
    if window is not None:
        visible = visible & _in_window(q_pos_BxL, k_pos_BxC, window)
    return jnp.where(visible, 0.0, _MASK_VALUE).astype(jnp.float32)


def causal_blocks(length: int) -> int:
    """Query blocks for `self_attend`: the most of 8, 4, 2 that divide `length` into >= 64 rows."""
    for n in (8, 4, 2):
        if length % n == 0 and length // n >= 64:
            return n
    return 1


def soft_cap(scores, softcap: float | None):
    """Gemma 2's soft-capping of float32 scores (attention) or logits (`Llama.logits`): softcap * tanh(scores /
    softcap) (transformers' order); None leaves them as they are."""
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def _raw_scores(q_i, k_c):
    """float32 scores q . k of one query block ([B, G, R * bq, E], q scaled) against its keys [B, G, C, E]."""
    return jnp.einsum("bgme,bgce->bgmc", q_i, k_c, preferred_element_type=jnp.float32)


def _block_scores(q_i, k_c, bias_i, r, softcap=None, raw=None):
    """float32 scores of one query block ([B, G, R * bq, E], rows ordered (r, t)) against its keys, soft-capped with
    `softcap` (None: not), then masked by the additive `bias_i` [B, bq, C]; `raw`: the block's `_raw_scores` when
    already computed."""
    b, g, m, _ = q_i.shape
    s = soft_cap(_raw_scores(q_i, k_c) if raw is None else raw, softcap)
    return (s.reshape(b, g, r, m // r, -1) + bias_i[:, None, None]).reshape(b, g, m, -1)


def _block_probs(q_i, k_c, bias_i, r, softcap=None):
    """Softmax probabilities (float32) of one query block against its keys (its visible prefix, or its band)."""
    s = _block_scores(q_i, k_c, bias_i, r, softcap)
    u = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return u / jnp.sum(u, axis=-1, keepdims=True)


def _block_grads(q_i, k_c, v_c, p, out_i, do, softcap=None, raw=None):
    """(dq, dk, dv) of one query block from its probabilities `p` (dS = P (dP - rowsum(dO O))); dk, dv float32.

    With `softcap`, dS of the capped scores times the cap's derivative 1 - tanh(s / softcap)^2 at the raw scores s:
    `raw` (the block's `_raw_scores`), recomputed from q and k when not given (recovering them from `p` would lose
    the masked and underflowed entries, and the precision of saturated ones)."""
    f32 = jnp.float32
    dv = jnp.einsum("bgmc,bgme->bgce", p.astype(do.dtype), do, preferred_element_type=f32)
    dp = jnp.einsum("bgme,bgce->bgmc", do, v_c, preferred_element_type=f32)
    delta = jnp.sum(do.astype(f32) * out_i.astype(f32), axis=-1, keepdims=True)
    ds = p * (dp - delta)
    if softcap is not None:
        t = jnp.tanh((_raw_scores(q_i, k_c) if raw is None else raw) / softcap)
        ds = ds * (1 - t * t)
    ds = ds.astype(q_i.dtype)
    return (
        jnp.einsum("bgmc,bgce->bgme", ds, k_c),
        jnp.einsum("bgmc,bgme->bgce", ds, q_i, preferred_element_type=f32),
        dv,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _causal_core(q_NxBxGxMxE, k_BxGxLxE, v_BxGxLxE, biases, r, softcap=None):
    """Query blocks q[i] ([B, G, R * bq, E], rows of head group g) against keys [0, (i + 1) bq); scores soft-capped
    with `softcap` (a Python float; None: not)."""
    return _causal_core_fwd(q_NxBxGxMxE, k_BxGxLxE, v_BxGxLxE, biases, r, softcap)[0]


def _causal_core_fwd(q, k, v, biases, r, softcap=None):
    bq = q.shape[3] // r
    outs, probs = [], []
    for i in range(q.shape[0]):
        c = (i + 1) * bq
        p = _block_probs(q[i], k[:, :, :c], biases[i], r, softcap)
        probs.append(p)
        outs.append(jnp.einsum("bgmc,bgce->bgme", p.astype(v.dtype), v[:, :, :c]))
    out = jnp.stack(outs)
    return out, (q, k, v, tuple(probs), out)


def _causal_core_bwd(r, softcap, res, dout):
    q, k, v, probs, out = res
    bq = q.shape[3] // r
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for i, p in enumerate(probs):
        c = (i + 1) * bq
        dq_i, dk_c, dv_c = _block_grads(q[i], k[:, :, :c], v[:, :, :c], p, out[i], dout[i], softcap)
        dq, dk, dv = [*dq, dq_i], dk.at[:, :, :c].add(dk_c), dv.at[:, :, :c].add(dv_c)
    return jnp.stack(dq), dk.astype(k.dtype), dv.astype(v.dtype), None


_causal_core.defvjp(_causal_core_fwd, _causal_core_bwd)


def _causal_biases(positions_BxL, segment_ids_BxL, n: int, window):
    """The masks of the block-causal kernel's n query blocks: block i's [B, L / n, (i + 1) L / n]."""
    bq = positions_BxL.shape[1] // n
    index = jnp.arange(n * bq)
    biases = []
    for i in range(n):
        c = (i + 1) * bq
        biases.append(
            _mask_bias(
                segment_ids_BxL[:, i * bq : c],
                segment_ids_BxL[:, :c],
                positions_BxL[:, i * bq : c],
                positions_BxL[:, :c],
                (index[None, :c] <= index[i * bq : c, None])[None],
                window,
            )
        )
    return tuple(biases)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _causal_lse_core(q_NxBxGxMxE, k_BxGxLxE, v_BxGxLxE, positions_BxL, segment_ids_BxL, window, r, n, softcap=None):
    """`_causal_core` keeping only each row's log-sum-exp: the backward pass rebuilds the masks and recomputes the
    probabilities (the full layers of a mixed model, whose saved probabilities a `lax.cond` would otherwise
    allocate on the sliding layers too: `self_attend`), and with `softcap` the cap's derivative from the same raw
    scores."""
    args = (q_NxBxGxMxE, k_BxGxLxE, v_BxGxLxE, positions_BxL, segment_ids_BxL, window)
    return _causal_lse_fwd(*args, r, n, softcap)[0]


def _causal_lse_fwd(q, k, v, positions, segment_ids, window, r, n, softcap=None):
    bq = q.shape[3] // r
    outs, lses = [], []
    for i, bias in enumerate(_causal_biases(positions, segment_ids, n, window)):
        s = _block_scores(q[i], k[:, :, : (i + 1) * bq], bias, r, softcap)
        lses.append(jax.nn.logsumexp(s, axis=-1, keepdims=True))
        outs.append(jnp.einsum("bgmc,bgce->bgme", jnp.exp(s - lses[-1]).astype(v.dtype), v[:, :, : (i + 1) * bq]))
    out = jnp.stack(outs)
    return out, (q, k, v, positions, segment_ids, window, jnp.stack(lses), out)


def _causal_lse_bwd(r, n, softcap, res, dout):
    q, k, v, positions, segment_ids, window, lse, out = res
    bq = q.shape[3] // r
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for i, bias in enumerate(_causal_biases(positions, segment_ids, n, window)):
        c = (i + 1) * bq
        raw = None if softcap is None else _raw_scores(q[i], k[:, :, :c])
        p = jnp.exp(_block_scores(q[i], k[:, :, :c], bias, r, softcap, raw) - lse[i])
        dq_i, dk_c, dv_c = _block_grads(q[i], k[:, :, :c], v[:, :, :c], p, out[i], dout[i], softcap, raw)
        dq, dk, dv = [*dq, dq_i], dk.at[:, :, :c].add(dk_c), dv.at[:, :, :c].add(dv_c)
    return jnp.stack(dq), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_causal_lse_core.defvjp(_causal_lse_fwd, _causal_lse_bwd)


def band_plan(length: int, window: int, num_blocks: int | None = None) -> tuple[int, int] | None:
    """(bq, behind) of the sliding-window kernel for rows of `length` and a window of at most `window`: query blocks
    of bq rows (the largest of 256, 128, 64 that divides `length` and is at most max(64, window / 4)), each against
    its own key block and the `behind` = ceil((window - 1) / bq) blocks before it. None where no block size fits,
    or where that band holds more than `_BAND_MAX_SHARE` of the score entries of the causal kernel (`num_blocks`
    blocks, default `causal_blocks`), e.g. a window near or above the row's length."""
    sizes = [bq for bq in (256, 128, 64) if length % bq == 0 and bq <= max(64, window // 4)]
    if not sizes:
        return None
    bq = sizes[0]
    behind = -(-(window - 1) // bq)
    n = causal_blocks(length) if num_blocks is None else num_blocks
    return (bq, behind) if (behind + 1) * bq <= _BAND_MAX_SHARE * length * (n + 1) / (2 * n) else None


def _band(x, behind: int, axis: int):
    """Blocks [..., N, bq, ...] (block axis `axis`) -> [..., N, (behind + 1) bq, ...]: block i's band, blocks
    i - behind .. i in order, zeros (segment 0: never seen) before the row."""
    n = x.shape[axis]
    x = jnp.pad(x, [(behind, 0) if a == axis else (0, 0) for a in range(x.ndim)])
    return jnp.concatenate([jax.lax.slice_in_dim(x, j, j + n, axis=axis) for j in range(behind + 1)], axis + 1)


def _band_keys(k_BxGxLxE, bq: int, behind: int):
    """Keys (or values) [B * N, G, (behind + 1) bq, E]: the band of each of the N query blocks of bq rows."""
    b, g, l, e = k_BxGxLxE.shape
    bands = _band(k_BxGxLxE.reshape(b, g, l // bq, bq, e), behind, 2)
    return bands.transpose(0, 2, 1, 3, 4).reshape(b * (l // bq), g, -1, e)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _band_core(q_ZxGxMxE, k_BxGxLxE, v_BxGxLxE, bias_ZxTxC, r, behind, softcap=None):
    """Query blocks (Z = B * N of them, [R * bq, E] rows of head group g) against their bands (`_band_keys`); scores
    soft-capped with `softcap` (None: not)."""
    return _band_core_fwd(q_ZxGxMxE, k_BxGxLxE, v_BxGxLxE, bias_ZxTxC, r, behind, softcap)[0]


def _band_core_fwd(q, k, v, bias, r, behind, softcap=None):
    bq = q.shape[2] // r
    p = _block_probs(q, _band_keys(k, bq, behind), bias, r, softcap)
    out = jnp.einsum("bgmc,bgce->bgme", p.astype(v.dtype), _band_keys(v, bq, behind))
    return out, (q, k, v, p, out)


def _band_core_bwd(r, behind, softcap, res, dout):
    q, k, v, p, out = res
    bands = functools.partial(_band_keys, bq=q.shape[2] // r, behind=behind)
    dq, dk, dv = _block_grads(q, bands(k), bands(v), p, out, dout, softcap)
    unband = jax.linear_transpose(bands, jax.ShapeDtypeStruct(k.shape, jnp.float32))
    return dq, unband(dk)[0].astype(k.dtype), unband(dv)[0].astype(v.dtype), None


_band_core.defvjp(_band_core_fwd, _band_core_bwd)


def _band_attend(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, positions_BxL, segment_ids_BxL, window, plan, softcap=None):
    """The sliding-window kernel (`band_plan`'s `plan`): query block i meets only key blocks i - behind .. i; the
    mask (`window` on positions, which may be traced and smaller than the plan's) applies within them, after the
    `softcap` (None: none)."""
    b, l, h, e = q_BxLxHxE.shape
    g = k_BxLxGxE.shape[2]
    r = h // g
    bq, behind = plan
    n = l // bq
    q = (q_BxLxHxE * jnp.asarray(1 / math.sqrt(e), q_BxLxHxE.dtype)).reshape(b, n, bq, g, r, e)
    q = q.transpose(0, 1, 3, 4, 2, 5).reshape(b * n, g, r * bq, e)
    k_seg, k_pos = (_band(x.reshape(b, n, bq), behind, 1).reshape(b * n, -1) for x in (segment_ids_BxL, positions_BxL))
    causal_TxC = jnp.arange((behind + 1) * bq)[None, :] <= jnp.arange(bq)[:, None] + behind * bq  # key index <= query's
    seg_ZxT, pos_ZxT = segment_ids_BxL.reshape(b * n, bq), positions_BxL.reshape(b * n, bq)
    bias = _mask_bias(seg_ZxT, k_seg, pos_ZxT, k_pos, causal_TxC[None], window)
    out = _band_core(q, k_BxLxGxE.transpose(0, 2, 1, 3), v_BxLxGxE.transpose(0, 2, 1, 3), bias, r, behind, softcap)
    return out.reshape(b, n, g, r, bq, e).transpose(0, 1, 4, 2, 3, 5).reshape(b, l, h, e)


def _causal_attend(
    q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, positions_BxL, segment_ids_BxL, n: int, window, lse=False, softcap=None
):
    """The block-causal kernel: query block i of n against the key prefix [0, (i + 1) L / n), `window` masked, scores
    soft-capped with `softcap` (None: not); with `lse`, `_causal_lse_core`."""
    b, l, h, e = q_BxLxHxE.shape
    g = k_BxLxGxE.shape[2]
    r = h // g
    bq = l // n
    # one transpose to query blocks [N, B, G, R * bq, E]: each block contiguous, rows ordered (r, t)
    q = (q_BxLxHxE * jnp.asarray(1 / math.sqrt(e), q_BxLxHxE.dtype)).reshape(b, n, bq, g, r, e)
    q = q.transpose(1, 0, 3, 4, 2, 5).reshape(n, b, g, r * bq, e)
    if lse:
        k, v = k_BxLxGxE.transpose(0, 2, 1, 3), v_BxLxGxE.transpose(0, 2, 1, 3)
        out = _causal_lse_core(q, k, v, positions_BxL, segment_ids_BxL, window, r, n, softcap)
    else:
        biases = _causal_biases(positions_BxL, segment_ids_BxL, n, window)
        out = _causal_core(q, k_BxLxGxE.transpose(0, 2, 1, 3), v_BxLxGxE.transpose(0, 2, 1, 3), biases, r, softcap)
    return out.reshape(n, b, g, r, bq, e).transpose(1, 0, 4, 2, 3, 5).reshape(b, l, h, e)


def self_attend(
    q_BxLxHxE,
    k_BxLxGxE,
    v_BxLxGxE,
    positions_BxL,
    segment_ids_BxL,
    num_blocks: int | None = None,
    window=None,
    window_bound: int | None = None,
    softcap: float | None = None,
):
    """Causal self-attention over packed rows (training and scoring; no cache).

    Same mask as `attend` plus index causality (a key after the query in the row is never seen, which packed rows
    with per-segment positions already imply), so query block i only meets the keys of blocks 0..i: the all-masked
    blocks above the diagonal are never computed (the L x L work drops to (n + 1) / 2n of it for n blocks). A custom
    VJP saves the float32 probabilities and applies the softmax backward directly (dS = P (dP - rowsum(dO O))).
    Measured on the benchmark shapes (B 8, L 256, H 8, E 32, 4 blocks): forward + backward 2x faster than autodiff
    of `attend`. The probabilities take (n + 1) / 2n of B H L^2 float32 per layer; on an accelerator a fused
    (flash) kernel would keep only the row statistics (not built: BUILD_NOTES).

    Sliding window W (`window` a Python int, or traced with `window_bound` = W) with a `band_plan`: query blocks of
    bq rows (64 to 256, about W / 4: fine enough to skip, and one batched matmul for all blocks, so compile time does
    not grow with L / bq) meet only the key blocks from the one holding index (first query index - W + 1) on: about
    L (W + bq) score entries and saved probabilities instead of L^2 (n + 1) / 2n. Skipping by index is exact while
    positions grow by at least 1 per index within a segment (the packer's and `positions_from_segments`' grow by
    exactly 1): a key W indices back is then at least W positions back, outside the window. A traced window (one
    scanned body for a mixed model's sliding and full layers) takes a `lax.cond`: window <= W runs the band, else
    the causal kernel in its log-sum-exp form, which saves each row's log-sum-exp instead of its probabilities (a
    cond's residuals are both branches', allocated on every layer: saved probabilities would cost each sliding
    layer a full layer's too). A Python int with `window_bound` (a mixed model's layer whose kind is known when
    tracing: unrolled, `llama.run_layers`) picks at trace time: the band (the cond's branch, bit for bit) or, for a
    full layer, the causal kernel that saves its probabilities (as a model without a window; about 1e-7 from the
    log-sum-exp form): no second branch to trace and compile per layer. Forward + backward against the masked kernel
    (benchmarks/attention_window.py, XLA:CPU, B 2, H 8, G 2, E 64, a shared 2-core machine): 0.36-0.43x at L 2048,
    W 256; 0.7-0.8x at L 2048, W 512 (one run of five 1.3x); 0.11-0.18x at L 4096, W 256; 0.24-0.31x at L 4096,
    W 512; a full layer behind the cond 0.8-1.4x (its probabilities recomputed). The cond's one-layer temporaries
    are twice the masked kernel's, but each layer saves only the band's residuals: jit(grad) through 24 scanned
    layers (5 of 6 sliding) at L 4096, W 512 took 7.0 GB of XLA temporaries instead of 15.7 GB. Without a plan (no
    block size fits, or a window near the row's length) the causal kernel masks the window; without a window it is
    unchanged.

    `softcap` (Gemma 2's `attn_logit_softcapping`, a Python float; None: none): every kernel caps the float32 scores
    of its visible blocks, softcap * tanh(s / softcap), before the mask; its backward pass multiplies dS by the cap's
    derivative 1 - tanh(s / softcap)^2 at the raw scores s, recomputed from q and k (one more [L, E] x [E, C]
    matmul per block; the log-sum-exp form reuses the scores it recomputes anyway). Without it every kernel is
    unchanged.
    """
    l = q_BxLxHxE.shape[1]
    softcap = None if softcap is None else float(softcap)  # static: a custom VJP's non-differentiable argument
    n = causal_blocks(l) if num_blocks is None else num_blocks
    if l % n:
        raise ValueError(f"self_attend: {n} query blocks do not divide the sequence length {l}.")
    args = (q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, positions_BxL, segment_ids_BxL)
    static = isinstance(window, (int, np.integer))
    bound = int(window) if static and window_bound is None else window_bound
    plan = None if window is None or bound is None else band_plan(l, bound, n)
    if plan is None:
        return _causal_attend(*args, n, window, softcap=softcap)
    if static:  # picked at trace time (an unrolled layer of a mixed model): a full layer saves its probabilities
        if window <= bound:
            return _band_attend(*args, window, plan, softcap)
        return _causal_attend(*args, n, window, softcap=softcap)
    return jax.lax.cond(
        window <= bound,
        lambda *a: _band_attend(*a, plan, softcap),
        lambda *a: _causal_attend(*a[:-1], n, a[-1], lse=True, softcap=softcap),
        *args,
        jnp.asarray(window, jnp.int32),
    )
