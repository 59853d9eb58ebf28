"""Attention kernels behind one function, `self_attention(..., implementation=...)`.

Every path computes the same masked grouped-query attention over packed rows: a query sees the keys
of its own non-zero segment whose position is not after its own and whose index in the row is not
after its own (index causality, which packed rows with per-segment positions already imply). Rows of
padding queries (segment 0) come back as zeros on every path. A segment is one contiguous run of
equal non-zero ids: an id that comes back later in the row starts a new segment (`self_attention`
renumbers the runs first), as cuDNN's packed layout and `positions_from_segments` read a row.

Sliding window (`window`, a model's `sliding_window` on its sliding layers): a query also sees only the keys less
than `window` positions before its own (query position - key position < window, transformers 5's
`sliding_window_overlay` on positions, as it reads packed rows), on every path below but `cudnn` and `pallas`. The
window may be a traced int32 scalar, so that one scanned layer body serves sliding and full layers (a full layer's
window: a value larger than any position). `cudnn` (packed lengths and static mask types) and `pallas` (static
masks) cannot take a traced window: with one, `auto` resolves to `cudnn_masked` on GPU (`xla` in float32) and
to `xla` on TPU, and an explicit `cudnn` or `pallas` is refused. The blocked kernel also skips the key blocks behind
the window (a static one, or a traced one with `window_bound`, its static value on the sliding layers; see
`self_attend`): its attention costs O(L W) instead of O(L^2), exactly while positions grow by at least 1 per index
within a segment, as the packer's and `positions_from_segments`' do.

Soft-capping (`softcap`, Gemma 2's `attn_logit_softcapping`, a model's `attn_softcap`; a static Python float): the
scaled float32 scores s become softcap * tanh(s / softcap) before the mask and softmax (transformers' eager Gemma 2
order), on every path below but `cudnn` and `cudnn_masked` (cuDNN's fused attention has no soft-cap): with a cap,
`auto` resolves to `xla` on GPU, in any dtype (which then runs our own dense float32 attention in `attend`'s layout,
since jax 0.10.2's `jax.nn.dot_product_attention` has no soft-cap either), to `pallas` on TPU (`xla` with a window
too) and to `blocked` on CPU, and an explicit `cudnn` or `cudnn_masked` is refused. The blocked kernel caps the
scores of its visible blocks and recomputes the raw ones in its backward pass for the cap's derivative; splash
attention takes the cap itself (`attn_logits_soft_cap`). Without a cap every path is unchanged.

Implementations (`model.attention`):

- `blocked`: the block-causal custom-VJP kernels of `blocked_attention.py` (`self_attend`), tuned for XLA:CPU; it saves
  the float32 probabilities of the visible blocks for the backward pass (with a window, of the window's band).
- `xla`: `jax.nn.dot_product_attention(implementation="xla")` with a boolean mask built from the
  segment ids and positions (float32 softmax inside jax). Upstream limit (jax 0.10.2): XLA:CPU cannot compile
  its bf16 x bf16 -> f32 scores dot where that dot has one element (one row of one token, one query head, one
  key/value head): "Algorithm not supported by the ElementalIrEmitter" (`blocked` compiles it).
- `cudnn`: cuDNN fused flash attention (bf16/fp16, NVIDIA Hopper or newer) in its packed-sequence
  layout: each row's contiguous segments (a padding tail joined to the segment before it) are passed
  as lengths and offsets with the padding-causal mask type, so no [B, L, L] mask is built, read, or
  differentiated. A batch with a row of more than `model.attention_segments` segments (default
  `PACKED_MAX_SEGMENTS`) takes the `cudnn_masked` call instead (a `lax.cond` per batch).
- `cudnn_masked`: `jax.nn.dot_product_attention(implementation="cudnn")` with the causal mask type
  plus the segment mask as an additive bias (any GPU cuDNN supports; cuDNN also computes the bias
  gradient, which nothing uses).
- `pallas`: jax's Pallas splash-attention kernel for TPU (segment ids + causal mask; imported only
  when that path is traced). Lowered for a TPU it is the Mosaic kernel; run on any other backend the
  same kernel goes through Pallas' interpreter (slow, but it lets the tests check this path's values
  and gradients on CPU, and export it for a TPU from a CPU host).
- `auto`: on GPU cudnn (Hopper or newer) or cudnn_masked when the compute dtype is bf16/fp16, else
  xla; pallas on TPU; blocked on CPU (with a window or a soft-cap: see above).

The cache path used by decoding (`attend`) stays dense: its keys are the cache slots, not the row; it applies the
window too (it could not skip by slot: a prompt's padding slots sit between its tokens and the generated ones), and
the soft-cap.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from proxykd_jax.models.blocked_attention import (  # noqa: F401  (band_plan, causal_blocks re-exported)
    _band_attend,
    _in_window,
    _mask_bias,
    band_plan,
    causal_blocks,
    self_attend,
    soft_cap,
)

IMPLEMENTATIONS = ("auto", "blocked", "xla", "cudnn", "cudnn_masked", "pallas")
GPU_PLATFORMS = ("gpu", "cuda", "rocm")  # the names jax gives a GPU platform
# Segment slots per row of cuDNN's packed layout (`model.attention_segments`; a batch with a row of
# more segments takes the masked path). cuDNN's backward pre-pass runs over every slot at full length:
# on an H200 at 64 slots it took 20 ms of a 236 ms step, at 2 used segments per row.
PACKED_MAX_SEGMENTS = 8
_SPLASH_TILE = 128  # splash attention's default query/key tile (`BlockSizes.get_default()`)


def attend(q_BxLxHxE, k_BxCxGxE, v_BxCxGxE, q_pos_BxL, k_pos_BxC, q_seg_BxL, k_seg_BxC, window=None, softcap=None):
    """Masked grouped-query attention; scores and softmax in float32; `window`: the sliding window (None: none);
    `softcap`: the scores' soft-cap, applied before the mask (None: none).

    Laid out for XLA:CPU, measured on the benchmark shapes (B 8, L 256, H 8, E 32): heads move ahead
    of the sequence axes so both batched matmuls have leading batch axes, q is scaled before the
    matmul (an [L, E] multiply, not [L, C]), the mask is an additive bias, and the softmax is
    written out with a stop-gradient max; together 2.4x faster forward and 1.7x faster
    forward + backward than contracting in [B, L, H, E] with `jnp.where` and `jax.nn.softmax`.
    """
    bias_BxLxC = _mask_bias(q_seg_BxL, k_seg_BxC, q_pos_BxL, k_pos_BxC, window=window)
    return _dense_attend(q_BxLxHxE, k_BxCxGxE, v_BxCxGxE, bias_BxLxC, softcap)


def _dense_attend(q_BxLxHxE, k_BxCxGxE, v_BxCxGxE, bias_BxLxC, softcap=None):
    """`attend` with its additive mask `bias_BxLxC` given (the capped `xla` path adds index causality to it)."""
    b, l, h, e = q_BxLxHxE.shape
    c, g = k_BxCxGxE.shape[1], k_BxCxGxE.shape[2]
    r = h // g  # query heads per key/value head, folded into the matmul's row axis (M = R * L)
    q = (q_BxLxHxE * jnp.asarray(1 / math.sqrt(e), q_BxLxHxE.dtype)).reshape(b, l, g, r, e)
    q_BxGxMxE = q.transpose(0, 2, 3, 1, 4).reshape(b, g, r * l, e)
    k_BxGxCxE = k_BxCxGxE.transpose(0, 2, 1, 3)
    v_BxGxCxE = v_BxCxGxE.transpose(0, 2, 1, 3)
    scores = soft_cap(jnp.einsum("bgme,bgce->bgmc", q_BxGxMxE, k_BxGxCxE, preferred_element_type=jnp.float32), softcap)
    scores = (scores.reshape(b, g * r, l, c) + bias_BxLxC[:, None]).reshape(b, g, r * l, c)
    unnorm = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    probs = (unnorm / jnp.sum(unnorm, axis=-1, keepdims=True)).astype(v_BxCxGxE.dtype)
    out = jnp.einsum("bgmc,bgce->bgme", probs, v_BxGxCxE)
    return out.reshape(b, g, r, l, e).transpose(0, 3, 1, 2, 4).reshape(b, l, h, e)


def visible_mask(positions_BxL, segment_ids_BxL, window=None) -> jax.Array:
    """Boolean [B, L, L]: query i sees key j (same non-zero segment, position and index not after i's, and
    within `window` when given)."""
    length = segment_ids_BxL.shape[1]
    index = jnp.arange(length)
    visible = (
        (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
        & (segment_ids_BxL[:, None, :] != 0)
        & (positions_BxL[:, None, :] <= positions_BxL[:, :, None])
        & (index[None, :] <= index[:, None])[None]
    )
    return visible if window is None else visible & _in_window(positions_BxL, positions_BxL, window)


UNWINDOWED = ("cudnn", "pallas")  # the paths that cannot take a (traced) sliding window


def refuse_unwindowed(implementation: str) -> None:
    """Refuses, for a model with a sliding window, an `UNWINDOWED` path."""
    if implementation in UNWINDOWED:
        raise ValueError(
            f"model.attention={implementation!r} cannot apply a sliding window (model.sliding_window); use 'auto', "
            "'cudnn_masked' or 'xla' on GPU, 'xla' on TPU, or 'blocked' on CPU."
        )


UNCAPPED = ("cudnn", "cudnn_masked")  # the paths that cannot soft-cap the scores


def refuse_uncapped(implementation: str) -> None:
    """Refuses, for a model that soft-caps its attention scores, an `UNCAPPED` path."""
    if implementation in UNCAPPED:
        raise ValueError(
            f"model.attention={implementation!r} cannot soft-cap the attention scores (model.attn_softcap: cuDNN's "
            "fused attention has no soft-cap); use 'auto' or 'xla' on GPU."
        )


def resolve(
    implementation: str,
    dtype=jnp.float32,
    platform: str | None = None,
    windowed: bool = False,
    capped: bool = False,
) -> str:
    """The concrete implementation `auto` stands for on `platform` (default: jax's default backend), for a model
    with a sliding window when `windowed` (an explicit `UNWINDOWED` path is then refused) and one that soft-caps its
    scores when `capped` (an explicit `UNCAPPED` path is then refused)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}.")
    if windowed:
        refuse_unwindowed(implementation)
    if capped:
        refuse_uncapped(implementation)
    if implementation != "auto":
        return implementation
    platform = platform or jax.default_backend()
    if platform in GPU_PLATFORMS:
        if capped or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            return "xla"
        if windowed:
            return "cudnn_masked"
        device = jax.devices()[0]
        capability = getattr(device, "compute_capability", "9.0") if device.platform == "gpu" else "9.0"
        return "cudnn" if float(capability) >= 9.0 else "cudnn_masked"
    if platform == "tpu":
        return "xla" if windowed else "pallas"
    return "blocked"


def _capped_xla(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, positions_BxL, segment_ids_BxL, window, softcap):
    """The `xla` path with a soft-cap: `attend`'s dense float32 attention with the row as its keys and index causality
    added to its mask (`jax.nn.dot_product_attention` has no soft-cap); plain autodiff."""
    index = jnp.arange(segment_ids_BxL.shape[1])
    causal_1xLxL = (index[None, :] <= index[:, None])[None]
    bias_BxLxL = _mask_bias(segment_ids_BxL, segment_ids_BxL, positions_BxL, positions_BxL, causal_1xLxL, window)
    return _dense_attend(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, bias_BxLxL, softcap)


def _dpa(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, positions_BxL, segment_ids_BxL, implementation, window=None):
    mask_Bx1xLxL = visible_mask(positions_BxL, segment_ids_BxL, window)[:, None]
    return jax.nn.dot_product_attention(
        q_BxLxHxE,
        k_BxLxGxE,
        v_BxLxGxE,
        mask=mask_Bx1xLxL,
        is_causal=implementation == "cudnn",  # cuDNN skips the blocks above the diagonal; the mask still applies
        implementation=implementation,
    )


def packed_layout(segment_ids_BxL, max_segments: int):
    """cuDNN's packed-sequence description of rows made of contiguous segments.

    Every run of equal non-zero segment ids is one sequence. A run of padding (id 0) joins the
    sequence before it: under the causal mask no real query of that sequence sees a padding key (each
    comes after them), and the padding queries are zeroed afterwards, so their cotangent is zero and
    so are their q, k and v gradients. Only padding at the start of a row is a sequence of its own
    (every token must be in one: cuDNN writes no output or gradient outside them).
    Returns (seqlen_BxM, offsets_BxM1, fits_B): sequence lengths and start indices, -1 in unused slots,
    and whether the row's sequences fit in M = `max_segments` slots (when not, the first two are wrong).
    """
    b, length = segment_ids_BxL.shape
    prev = jnp.concatenate([jnp.full((b, 1), -1, segment_ids_BxL.dtype), segment_ids_BxL[:, :-1]], 1)
    is_start_BxL = (segment_ids_BxL != prev) & ((segment_ids_BxL != 0) | (prev == -1))
    starts_BxM = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments, fill_value=length)[0])(is_start_BxL)
    ends_BxM = jnp.concatenate([starts_BxM[:, 1:], jnp.full((b, 1), length, starts_BxM.dtype)], 1)
    used = starts_BxM < length
    seqlen = jnp.where(used, ends_BxM - starts_BxM, -1).astype(jnp.int32)
    offsets = jnp.concatenate([jnp.where(used, starts_BxM, -1), jnp.full((b, 1), -1, starts_BxM.dtype)], 1)
    return seqlen, offsets.astype(jnp.int32), jnp.sum(is_start_BxL, 1) <= max_segments


def _cudnn_packed(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, positions_BxL, segment_ids_BxL, max_segments):
    """cuDNN flash attention over packed rows without a mask tensor (see `packed_layout`).

    Uses jax's cuDNN binding directly (`jax.nn.dot_product_attention` has no packed layout); the
    whole batch falls back to the masked call when some row has more than `max_segments` runs.
    """
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    seqlen_BxM, offsets_BxM1, fits_B = packed_layout(segment_ids_BxL, max_segments)
    scale = 1.0 / math.sqrt(q_BxLxHxE.shape[-1])

    def packed(q, k, v):
        return cudnn_attention(
            q,
            k,
            v,
            q_seqlen=seqlen_BxM,
            kv_seqlen=seqlen_BxM,
            q_offsets=offsets_BxM1,
            kv_offsets=offsets_BxM1,
            scale=scale,
            mask_type=MaskType.PADDING_CAUSAL,
            qkv_layout="BTNH",
        )

    def masked(q, k, v):
        return _dpa(q, k, v, positions_BxL, segment_ids_BxL, "cudnn")

    return jax.lax.cond(jnp.all(fits_B), packed, masked, q_BxLxHxE, k_BxLxGxE, v_BxLxGxE)


def _splash(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, segment_ids_BxL, softcap=None):
    """Pallas splash attention (TPU): one MQA kernel per key/value head, causal mask + segment ids, scores soft-capped
    by the kernel (`attn_logits_soft_cap`, before its mask) with `softcap`.

    Packed rows restart positions at segment boundaries, so segment ids plus index causality are the
    whole mask. Imported here so that non-TPU installs never load the kernel. `lax.platform_dependent`
    lowers the Mosaic kernel for a TPU and the interpreted kernel for every other platform.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    # The kernel's key tiles are multiples of 128 lanes: rows are padded to a multiple of 128 with
    # segment 0, whose keys no real query sees and whose queries are sliced off.
    pad = -q_BxLxHxE.shape[1] % _SPLASH_TILE
    q_BxLxHxE, k_BxLxGxE, v_BxLxGxE = (
        jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BxLxHxE, k_BxLxGxE, v_BxLxGxE)
    )
    segment_ids_BxL = jnp.pad(segment_ids_BxL, ((0, 0), (0, pad)))
    b, l, h, e = q_BxLxHxE.shape
    g = k_BxLxGxE.shape[2]
    r = h // g
    mask = sm.MultiHeadMask([sm.CausalMask((l, l)) for _ in range(r)])
    q = (q_BxLxHxE * jnp.asarray(1 / math.sqrt(e), q_BxLxHxE.dtype)).reshape(b, l, g, r, e).transpose(0, 2, 3, 1, 4)
    k = k_BxLxGxE.transpose(0, 2, 1, 3)
    v = v_BxLxGxE.transpose(0, 2, 1, 3)

    def run(interpret):
        kernel = sk.make_splash_mqa_single_device(  # 128-wide tiles
            mask=mask, interpret=interpret, attn_logits_soft_cap=softcap
        )

        def one_row(q_GxRxLxE, k_GxLxE, v_GxLxE, seg_L):
            ids = sk.SegmentIds(q=seg_L, kv=seg_L)
            return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(q_GxRxLxE, k_GxLxE, v_GxLxE)

        return jax.vmap(one_row)

    def kernel(*args):
        return jax.lax.platform_dependent(*args, tpu=run(False), default=run(True))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        kernel = _per_shard(kernel, mesh, b, g)
    out = kernel(q, k, v, segment_ids_BxL)  # [B, G, R, L, E]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, l, h, e)[:, : l - pad]


def row_axes(mesh, rows: int) -> tuple[str, ...]:
    """The mesh axes activation rows split over (`llama.shard_batch`, the embedding lookup, the splash kernel's
    `shard_map`): those of the `batch` entry of the rules the step runs under (`parallel.rules.current_rules`, set by
    `parallel.under_mesh`; by default data x fsdp, as `parallel.batch_sharding` places the input rows) that the mesh
    has, or () when they do not divide `rows`."""
    from proxykd_jax.parallel.rules import current_rules

    names = (mesh.axis_names or ()) if mesh is not None else ()
    axes = tuple(a for a in dict(current_rules()).get("batch", ()) if a in names)
    return () if axes and rows % math.prod(mesh.shape[a] for a in axes) else axes


def _per_shard(kernel, mesh, batch: int, kv_heads: int):
    """`kernel` (q [B, G, R, L, E], k/v [B, G, L, E], segment ids [B, L]) under `shard_map` on `mesh`.

    XLA has no partitioning rule for a Mosaic custom call, so under plain jit it would run the kernel
    on q, k and v gathered whole onto every device. Rows are split over `row_axes` and key/value heads
    over `tensor` (where it divides them), as the model's activations are (`llama.shard_batch`, the
    `heads` rules); attention needs nothing across rows or heads.
    """
    P = jax.sharding.PartitionSpec
    rows = row_axes(mesh, batch)
    heads = "tensor" if "tensor" in mesh.axis_names and kv_heads % mesh.shape["tensor"] == 0 else None
    spec = P(rows or None, heads)  # q [B, G, R, L, E], k/v [B, G, L, E]
    return jax.shard_map(
        kernel, mesh=mesh, in_specs=(spec, spec, spec, P(rows or None)), out_specs=spec, check_vma=False
    )


def contiguous_segments(segment_ids_BxL) -> jax.Array:
    """Segment ids renumbered 1, 2, ... by contiguous run of each row (padding stays 0), so an id that
    comes back after another one (or after padding) is a segment of its own on every path."""
    prev_BxL = jnp.concatenate([jnp.zeros_like(segment_ids_BxL[:, :1]), segment_ids_BxL[:, :-1]], 1)
    starts_BxL = (segment_ids_BxL != prev_BxL) & (segment_ids_BxL != 0)
    runs_BxL = jnp.cumsum(starts_BxL, axis=1, dtype=jnp.int32)
    return jnp.where(segment_ids_BxL != 0, runs_BxL, 0)


def self_attention(
    q_BxLxHxE,
    k_BxLxGxE,
    v_BxLxGxE,
    positions_BxL,
    segment_ids_BxL,
    *,
    implementation: str = "auto",
    max_segments: int = PACKED_MAX_SEGMENTS,
    window=None,
    window_bound: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Causal grouped-query self-attention over packed rows with the chosen implementation.

    q [B, L, H, E] (unscaled), k/v [B, L, G, E] with H % G == 0; returns [B, L, H, E] in q's dtype,
    zero on padding queries (segment 0). `window`: the sliding window (an int or a traced int32 scalar; None: none);
    `window_bound`: with a traced one, the int it is on the layers that slide (the blocked kernel skips the keys
    behind it there, `self_attend`); `softcap`: the scores' soft-cap (a Python float; None: none; see the module
    docstring for the paths that take it).
    """
    softcap = None if softcap is None else float(softcap)  # static (a kernel parameter), never traced
    impl = resolve(implementation, q_BxLxHxE.dtype, windowed=window is not None, capped=softcap is not None)
    segment_ids_BxL = contiguous_segments(segment_ids_BxL)
    if impl == "blocked":
        out = self_attend(
            q_BxLxHxE,
            k_BxLxGxE,
            v_BxLxGxE,
            positions_BxL,
            segment_ids_BxL,
            window=window,
            window_bound=window_bound,
            softcap=softcap,
        )
    elif impl == "xla" and softcap is not None:
        out = _capped_xla(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, positions_BxL, segment_ids_BxL, window, softcap)
    elif impl == "cudnn":
        out = _cudnn_packed(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, positions_BxL, segment_ids_BxL, max_segments)
    elif impl in ("xla", "cudnn_masked"):
        out = _dpa(
            q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, positions_BxL, segment_ids_BxL, impl.removesuffix("_masked"), window
        )
    else:
        out = _splash(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, segment_ids_BxL, softcap)
    keep_BxLx1x1 = (segment_ids_BxL != 0)[:, :, None, None]
    return jnp.where(keep_BxLx1x1, out, jnp.zeros((), out.dtype)).astype(q_BxLxHxE.dtype)
