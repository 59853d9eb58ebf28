"""Rotary position embeddings as transformers 5 computes them, for every family `ModelConfig` holds.

`rope_inv_freq`: the inverse frequencies of a head's rotated dims (all of them, or Phi-3's `partial_rotary_factor`
share), scaled by `rope_scaling` (linear, Llama-3, YaRN, longrope); `rope_attention_factor`: YaRN's and longrope's
scale on cos and sin; `rope_frequencies`: the frequencies one call rotates with (longrope's short or long factors per
sequence); `apply_rope`: the rotation (HF `rotate_half` convention) in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from proxykd_jax.models.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, long: bool = False) -> np.ndarray:
    """Inverse RoPE frequencies [R/2] (float64) of the R = `cfg.rotary_dim` rotated dims of a head (E, but Phi-3's
    partial rotary), scaled by `cfg.rope_scaling`'s type as transformers 5's `modeling_rope_utils` does: linear
    divides them all by the factor; Llama-3 divides the low frequencies, keeps the high ones and blends between;
    YaRN blends interpolated (divided) and extrapolated (kept) frequencies along a ramp over the dimensions set by
    beta_fast / beta_slow (see `rope_attention_factor`); longrope divides each by its short factor (`long`: its
    long one, which `rope_frequencies` picks for positions past original_max_position)."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if cfg.rope_scaling is None:
        return inv_freq
    if cfg.rope_scaling[0] == "linear":
        return inv_freq / cfg.rope_scaling[1]
    if cfg.rope_scaling[0] == "yarn":
        return _yarn_inv_freq(inv_freq, dim, cfg.rope_theta, *cfg.rope_scaling[1:6])
    if cfg.rope_scaling[0] == "longrope":
        return inv_freq / np.asarray(cfg.rope_scaling[4 if long else 3], np.float64)
    _, factor, low_freq_factor, high_freq_factor, original_max = cfg.rope_scaling
    low_freq_wavelen = original_max / low_freq_factor
    high_freq_wavelen = original_max / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq, dim, base, factor, original_max, beta_fast, beta_slow, truncate) -> np.ndarray:
    """transformers' `_compute_yarn_parameters` frequencies (float64): dimensions below the one that turns
    beta_fast times over `original_max` positions keep their frequency, those above beta_slow's are divided by
    `factor`, linearly blended between (the bounds floored / ceiled when `truncate`)."""

    def correction_dim(rotations):
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    extrapolation = 1 - np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation


def rope_attention_factor(cfg: ModelConfig) -> float:
    """What cos and sin are multiplied by (so q.k by its square): YaRN's or longrope's attention_factor, else 1."""
    scaling = cfg.rope_scaling
    if scaling is not None and scaling[0] in ("yarn", "longrope"):
        return float(scaling[6 if scaling[0] == "yarn" else 2])
    return 1.0


def _segment_reach(positions_BxL: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    """Per token, 1 + the largest position of its sequence (its run of one segment id along the row; 0 on padding):
    a segmented running max (`associative_scan`) read at each run's last token."""
    length = segment_ids_BxL.shape[1]
    index_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids_BxL.shape)
    starts_BxL = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxL[:, :1], bool), segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1
    )
    ends_BxL = jnp.concatenate([starts_BxL[:, 1:], jnp.ones_like(starts_BxL[:, :1])], axis=1)

    def combine(left, right):  # (a run starts in the right part, its running max)
        return left[0] | right[0], jnp.where(right[0], right[1], jnp.maximum(left[1], right[1]))

    _, running_BxL = jax.lax.associative_scan(combine, (starts_BxL, positions_BxL.astype(jnp.int32)), axis=1)
    last_BxL = jax.lax.cummin(jnp.where(ends_BxL, index_BxL, length - 1), axis=1, reverse=True)
    return jnp.where(segment_ids_BxL > 0, jnp.take_along_axis(running_BxL, last_BxL, axis=1) + 1, 0)


def _row_reach(positions_BxC: jax.Array, segment_ids_BxC: jax.Array) -> jax.Array:
    """Per row [B], 1 + the largest position of its cache slots in use (segment > 0; 0 for none)."""
    return jnp.max(jnp.where(segment_ids_BxC > 0, positions_BxC, -1), axis=1) + 1


def rope_frequencies(cfg: ModelConfig, positions_BxL, segment_ids_BxL, k_pos_BxC=None, k_seg_BxC=None):
    """The inverse frequencies a call rotates with: `rope_inv_freq`'s [R/2]; longrope's per token [B, L, R/2] (a
    traced choice), as transformers 5 switches them (`dynamic_rope_update`) for one sequence run alone: the long
    factors' where the token's sequence (its segment; padding, segment 0, aside) reaches past original_max_position
    (its largest position + 1 above it), else the short ones', so no sequence depends on the rows or packed
    neighbours beside it. Cached decoding (`k_pos_BxC` / `k_seg_BxC`: the cache's slots, this call's written) takes
    each row's reach over its cache; what was cached before the row crossed keeps its short factors, so
    `sampling.generate` re-prefills a row at its crossing, as transformers' generate() recomputes its cache there."""
    inv_freq = rope_inv_freq(cfg)
    if cfg.rope_scaling is None or cfg.rope_scaling[0] != "longrope":
        return inv_freq
    if k_pos_BxC is None:
        reach_BxL = _segment_reach(positions_BxL, segment_ids_BxL)
    else:
        reach_BxL = _row_reach(k_pos_BxC, k_seg_BxC)[:, None]
    long_freq = jnp.asarray(rope_inv_freq(cfg, long=True), jnp.float32)
    return jnp.where((reach_BxL > cfg.rope_scaling[1])[..., None], long_freq, jnp.asarray(inv_freq, jnp.float32))


def apply_rope(x_BxLxNxE: jax.Array, positions_BxL: jax.Array, inv_freq_R2, attention_factor=1.0) -> jax.Array:
    """Rotates halves (HF `rotate_half` convention) of the first R dims of each head by angle position * inv_freq
    (`inv_freq_R2`: [R/2], or per token [B, L, R/2], longrope's `rope_frequencies`), in float32, the other E - R
    (Phi-3's partial rotary) passed through; cos and sin are
    scaled by `attention_factor` (YaRN's, longrope's; at 1 the computation is the unscaled one, op for op)."""
    angles_BxLxR2 = positions_BxL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_R2, jnp.float32)
    cos = jnp.cos(angles_BxLxR2)[:, :, None, :]
    sin = jnp.sin(angles_BxLxR2)[:, :, None, :]
    if not isinstance(attention_factor, float) or attention_factor != 1.0:  # (a traced factor: a per-layer one)
        cos, sin = cos * jnp.float32(attention_factor), sin * jnp.float32(attention_factor)
    x = x_BxLxNxE.astype(jnp.float32)
    rotary = 2 * angles_BxLxR2.shape[-1]
    x, passed = (x, None) if rotary == x.shape[-1] else (x[..., :rotary], x[..., rotary:])
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin] + ([] if passed is None else [passed]), axis=-1)
    return out.astype(x_BxLxNxE.dtype)
