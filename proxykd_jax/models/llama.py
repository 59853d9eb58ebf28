"""Llama-family decoder in Flax NNX (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, SmolLM3, Phi-3).

RoPE (optionally scaled as transformers does: linear, Llama-3, YaRN or Phi-3's longrope; on part of each head
with Phi-3's `partial_rotary_factor`), grouped-query attention, RMSNorm,
SwiGLU, optional q/k/v bias (Qwen2), optional per-head RMSNorm of queries and keys before RoPE (Qwen3), tied or
untied embeddings. Gemma's numerics are fields of `ModelConfig`: norms times 1 + weight, scaled embeddings,
GeGLU, norms on the attention and MLP outputs, the query_pre_attn_scalar score scale, Gemma 3's per-layer RoPE
(`layer_types`: a scanned per-layer flag picks the sliding layers' `rope_local_theta` frequencies) and q/k norms,
Gemma 2's soft-capped attention scores and output logits (`attn_softcap`, `logit_softcap`: cap * tanh(z / cap)).
Sliding-window attention (Mistral, Qwen2 / Qwen3, Gemma 2 / 3: `sliding_window`) on the `layer_types`' sliding layers
(every layer without them): the same per-layer flag makes a traced window, the model's or one wider than any row
(a static one where the layers are unrolled or all of one kind, `run_layers`). SmolLM3's NoPE layers (`rope_layers`):
a second scanned per-layer flag keeps q and k unrotated on them.
Parameters are stored in `param_dtype` and cast to the compute `dtype`; logits are always float32. Every
`nnx.Param` carries `out_sharding=` logical axis names (see docs/CONTRACTS.md); the mesh
rules in `proxykd_jax.parallel` map them to devices.

Packed sequences: `segment_ids_BxL` (0 = padding); a query attends to keys of the same non-zero
segment whose position is not after its own. When `positions_BxL` is omitted it restarts at 0 at
every segment boundary.

Layers: the blocks' parameters are stacked on a leading `layers` axis (`Llama.layers` is one `Block`
holding [layers, ...] arrays); `run_layers` runs them with `jax.lax.scan` (`model.scan_layers`, one
traced block: compile time flat in depth) or an unrolled loop over the same arrays (faster steps on
CPU, compile time growing with depth; `"auto"`, the default, unrolls up to
`AUTO_UNROLL_MAX_LAYERS` layers without remat and scans the rest), each layer under
`jax.checkpoint` with the `model.remat` policy. Attention goes through `models.attention`
(`model.attention`: blocked on CPU, cuDNN on GPU, Pallas splash on TPU; with a window, see there).

Decoding: `init_cache(batch, length)` makes an empty `KVCache`; `decode(tokens_BxT, positions_BxT,
segment_ids_BxT, cache)` writes the T new keys/values at slots `[cache.index, cache.index + T)`,
attends over the whole cache (empty slots have segment 0 and are masked) and returns
`(logits_BxTxV, cache)`. A prompt prefill is one `decode` call with T = prompt length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxykd_jax.models.attention import (  # noqa: F401  (attend/self_attend/causal_blocks re-exported)
    GPU_PLATFORMS,
    IMPLEMENTATIONS,
    PACKED_MAX_SEGMENTS,
    attend,
    causal_blocks,
    row_axes,
    self_attend,
    self_attention,
    soft_cap,
)
from proxykd_jax.models.config import (  # noqa: F401  (the config half: callers import it from here too)
    AUTO_UNROLL_MAX_LAYERS,
    REMAT_POLICIES,
    ROPE_SCALING_FORMS,
    ModelConfig,
    default_config,
    default_platform,
    resolve_scan_layers,
)
from proxykd_jax.models.rope import (  # noqa: F401  (rope_inv_freq, rope_attention_factor re-exported)
    apply_rope,
    rope_attention_factor,
    rope_frequencies,
    rope_inv_freq,
)


def flops_per_token(cfg: ModelConfig, seq_len: int, *, backward: bool = True) -> float:
    """Training FLOPs per token of a length-`seq_len` sequence.

    Convention: 2 FLOPs per multiply-accumulate; backward = 2x forward (so training = 3x forward);
    matmul parameters only (the embedding lookup is free, the output layer counts); attention
    scores and the weighted sum of values counted for the causal half of the L x L matrix:
    forward attention = 2 (QK and AV) * 2 (FLOPs/MAC) * H * E * L / 2 per token per layer.
    """
    d, h, g, e, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
    matmul_params = cfg.num_layers * (d * h * e + 2 * d * g * e + h * e * d + 3 * d * f) + d * cfg.vocab_size
    forward = 2.0 * matmul_params + 2.0 * cfg.num_layers * h * e * seq_len
    return forward * (3.0 if backward else 1.0)


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


def positions_from_segments(segment_ids_BxL: jax.Array) -> jax.Array:
    """Positions that restart at 0 wherever the segment id changes along the row."""
    length = segment_ids_BxL.shape[1]
    index_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids_BxL.shape)
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxL[:, :1], bool), segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1
    )
    start_BxL = jax.lax.cummax(jnp.where(is_start, index_BxL, 0), axis=1)
    return index_BxL - start_BxL


def _stacked(shape, axes, stack):
    return (shape, axes) if stack is None else ((stack, *shape), ("layers", *axes))


# Parameters no weight decay applies to (`train.optim`): norms' scales and attention biases, by name (the
# decoder's layers stack their parameters on a leading `layers` axis, so a rank cannot tell them from weights).
NO_WEIGHT_DECAY = frozenset({"scale", "bq", "bk", "bv"})


def _param(rngs: nnx.Rngs, shape, std, axes, dtype, stack: int | None = None) -> nnx.Param:
    """Normal(0, std) parameter; with `stack` a leading `layers` axis of that many layers."""
    shape, axes = _stacked(shape, axes, stack)
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


def _zeros(shape, axes, dtype, stack: int | None = None) -> nnx.Param:
    shape, axes = _stacked(shape, axes, stack)
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last axis (logical `axis`: `embed`, or `head_dim` for a per-head norm),
    normalised in float32; with `plus_one` (Gemma) times 1 + scale, the scale initialised at 0."""

    def __init__(
        self, dim: int, eps: float, param_dtype, dtype, stack=None, axis: str = "embed", plus_one: bool = False
    ):
        shape, axes = _stacked((dim,), (axis,), stack)
        init = jnp.zeros if plus_one else jnp.ones
        self.scale = nnx.Param(init(shape, param_dtype), out_sharding=axes, eager_sharding=False)
        self.eps, self.dtype, self.plus_one = eps, dtype, plus_one

    def __call__(self, x_BxLxD):
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return (x * (1.0 + scale if self.plus_one else scale)).astype(self.dtype)


def _norm(cfg: ModelConfig, dim: int, stack=None, axis: str = "embed") -> RMSNorm:
    """The config's RMSNorm of width `dim`."""
    pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    return RMSNorm(dim, cfg.rms_eps, pd, dt, stack, axis, plus_one=cfg.norm_plus_one)


class KVCache(NamedTuple):
    """Keys/values of all layers [layers, B, C, G, E] with each slot's position and segment (0 = empty)."""

    k: jax.Array
    v: jax.Array
    positions_BxC: jax.Array
    segment_ids_BxC: jax.Array
    index: jax.Array  # int32 scalar: next slot to write


def dense(x, w, n_contract: int = 1, preferred_element_type=None):
    """Contracts the last `n_contract` axes of x with the first of w, as one 2-D matmul.

    Same result as the einsum; XLA:CPU runs [B, L, D] x [D, ...] contractions (and above all their
    weight gradients, which contract over B and L) up to 1.6x faster when both sides are 2-D.
    """
    lead, inner = x.shape[: x.ndim - n_contract], x.shape[x.ndim - n_contract :]
    k = math.prod(inner)
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *w.shape[n_contract:])


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        d, h, g, e = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.wq = _param(rngs, (d, h, e), d**-0.5, ("embed", "heads", "head_dim"), pd, stack)
        self.wk = _param(rngs, (d, g, e), d**-0.5, ("embed", "kv_heads", "head_dim"), pd, stack)
        self.wv = _param(rngs, (d, g, e), d**-0.5, ("embed", "kv_heads", "head_dim"), pd, stack)
        self.wo = _param(rngs, (h, e, d), (h * e) ** -0.5, ("heads", "head_dim", "embed"), pd, stack)
        if cfg.qkv_bias:
            self.bq = _zeros((h, e), ("heads", "head_dim"), pd, stack)
            self.bk = _zeros((g, e), ("kv_heads", "head_dim"), pd, stack)
            self.bv = _zeros((g, e), ("kv_heads", "head_dim"), pd, stack)
        if cfg.qk_norm:  # one scale [E] shared by the heads, as Qwen3's (and Gemma 3's) q_norm / k_norm
            self.q_norm = _norm(cfg, e, stack, axis="head_dim")
            self.k_norm = _norm(cfg, e, stack, axis="head_dim")
        self.qkv_bias, self.qk_norm = cfg.qkv_bias, cfg.qk_norm
        self.dtype = jnp.dtype(cfg.dtype)
        self.cfg = cfg

    def __call__(
        self,
        x_BxLxD,
        positions_BxL,
        segment_ids_BxL,
        cache_kv=None,
        index=None,
        k_pos=None,
        k_seg=None,
        local=None,
        rope=None,
    ):
        """Returns (out_BxLxD, (k, v)); with `cache_kv` the new keys/values are written at `index`. `local` (a
        traced bool, or a Python one where known when tracing, with `cfg.layer_types`): this layer is a sliding one,
        whose RoPE is `rope_local_theta`'s (where set) and which attends within `sliding_window` (where set). `rope`
        (a traced bool, with `cfg.rope_layers`): this layer applies RoPE (else q and k go unrotated, SmolLM3's NoPE
        layers)."""
        dt = self.dtype
        q = dense(x_BxLxD, self.wq[...].astype(dt))
        k = dense(x_BxLxD, self.wk[...].astype(dt))
        v = dense(x_BxLxD, self.wv[...].astype(dt))
        if self.qkv_bias:
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_frequencies(self.cfg, positions_BxL, segment_ids_BxL, k_pos, k_seg)
        attention_factor = rope_attention_factor(self.cfg)
        if local is not None and self.cfg.rope_local_theta is not None:  # a scanned flag picks the frequencies
            local_cfg = dataclasses.replace(self.cfg, rope_theta=self.cfg.rope_local_theta, rope_scaling=None)
            inv_freq = jnp.where(local, jnp.asarray(rope_inv_freq(local_cfg), jnp.float32), inv_freq)
            attention_factor = jnp.where(local, 1.0, attention_factor) if attention_factor != 1.0 else 1.0
        q_rot = apply_rope(q, positions_BxL, inv_freq, attention_factor)
        k_rot = apply_rope(k, positions_BxL, inv_freq, attention_factor)
        q, k = (q_rot, k_rot) if rope is None else (jnp.where(rope, q_rot, q), jnp.where(rope, k_rot, k))
        if self.cfg.query_pre_attn_scalar is not None:  # the kernels scale by E ** -0.5: make it the scalar's
            q = q * jnp.asarray(math.sqrt(self.cfg.head_dim / self.cfg.query_pre_attn_scalar), dt)
        window = bound = None
        if self.cfg.windowed:  # every layer slides, or the flag picks the window or one wider than any row
            window = bound = self.cfg.sliding_window
            full = int(np.iinfo(np.int32).max)
            if isinstance(local, bool):  # known when tracing (`run_layers`): a static window, no lax.cond
                window = window if local else full
            elif local is not None:
                window = jnp.where(local, jnp.int32(window), jnp.int32(full))
        if cache_kv is None:
            out = self_attention(
                q,
                k,
                v,
                positions_BxL,
                segment_ids_BxL,
                implementation=self.cfg.attention,
                max_segments=self.cfg.attention_segments,
                window=window,
                window_bound=bound,  # with a traced window, the blocked kernel's static one (skips the keys behind it)
                softcap=self.cfg.attn_softcap,
            )
        else:
            k_cache, v_cache = cache_kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            out = attend(
                q,
                k.astype(dt),
                v.astype(dt),
                positions_BxL,
                k_pos,
                segment_ids_BxL,
                k_seg,
                window,
                self.cfg.attn_softcap,
            )
        return dense(out, self.wo[...].astype(dt), 2), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        d, f = cfg.d_model, cfg.d_ff
        pd = jnp.dtype(cfg.param_dtype)
        self.w_gate = _param(rngs, (d, f), d**-0.5, ("embed", "mlp"), pd, stack)
        self.w_up = _param(rngs, (d, f), d**-0.5, ("embed", "mlp"), pd, stack)
        self.w_down = _param(rngs, (f, d), f**-0.5, ("mlp", "embed"), pd, stack)
        self.dtype, self.activation = jnp.dtype(cfg.dtype), cfg.activation

    def __call__(self, x_BxLxD):
        dt = self.dtype
        gate = dense(x_BxLxD, self.w_gate[...].astype(dt))
        up = dense(x_BxLxD, self.w_up[...].astype(dt))
        act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return dense(act * up, self.w_down[...].astype(dt))


class Block(nnx.Module):
    """One decoder block; with `stack` = N it holds the parameters of N blocks on a leading `layers`
    axis (what `Llama.layers` is) and is run one layer at a time by `run_layers`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        self.attn_norm = _norm(cfg, cfg.d_model, stack)
        self.attn = Attention(cfg, rngs=rngs, stack=stack)
        self.mlp_norm = _norm(cfg, cfg.d_model, stack)
        self.mlp = MLP(cfg, rngs=rngs, stack=stack)
        if cfg.sandwich_norms:  # Gemma: the outputs normed too, before the residual adds
            self.attn_out_norm = _norm(cfg, cfg.d_model, stack)
            self.mlp_out_norm = _norm(cfg, cfg.d_model, stack)
        self.sandwich_norms = cfg.sandwich_norms

    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, **cache_args):
        attn_out, kv = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL, **cache_args)
        mlp = self.mlp
        if self.sandwich_norms:
            attn_out = self.attn_out_norm(attn_out)
            mlp = lambda x: self.mlp_out_norm(self.mlp(x))  # noqa: E731
        x_BxLxD = x_BxLxD + attn_out
        return x_BxLxD + mlp(self.mlp_norm(x_BxLxD)), kv


def shard_batch(x):
    """Pins dim 0 (rows) of an activation to the batch mesh axes (`row_axes`: the `batch` entry of the rules the step
    runs under, by default data x fsdp) when a mesh is set (`jax.set_mesh`); a no-op otherwise. Without it, XLA may
    resolve the FSDP conflict of a matmul (rows and the weight's `embed` dim both on `fsdp`) by gathering the rows:
    measured with `proxykd plan`, the 70B proxy's [rows, L, V] logits then end up whole on every device."""
    axes = row_axes(jax.sharding.get_abstract_mesh(), x.shape[0])
    if not axes:
        return x
    spec = jax.sharding.PartitionSpec(axes, *([jax.sharding.PartitionSpec.UNCONSTRAINED] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)


def lookup_specs(rows: int, d_model: int):
    """(tokens, output) PartitionSpecs of the embedding lookup when a mesh is set, or None where it needs none.

    Where the table's `embed` mesh axes (the rules' `vocab` and `embed` entries) are also row axes (FSDP: `fsdp` on
    both), XLA looked the rows up split over the other row axes, D over `fsdp`, then moved that to the rows' layout
    by gathering the rows whole over those other axes (data 2 x fsdp 4: every device held [B, L, D / 4]) before an
    all-to-all, and summed the whole [vocab, D] table gradient. Pinning that lookup layout (tokens gathered over the
    `embed` axes only) leaves the all-to-all alone, and the table gradient split (tests/test_row_rules.py)."""
    from proxykd_jax.parallel.rules import current_rules, logical_to_pspec
    from proxykd_jax.parallel.sharding import spec_axes

    mesh = jax.sharding.get_abstract_mesh()
    rows_axes = row_axes(mesh, rows)
    embed = tuple(a for a in spec_axes(logical_to_pspec(("vocab", "embed"), current_rules())[1]) if a in rows_axes)
    if not embed or d_model % math.prod(mesh.shape[a] for a in embed):
        return None
    keep = tuple(a for a in rows_axes if a not in embed) or None
    return jax.sharding.PartitionSpec(keep, None), jax.sharding.PartitionSpec(keep, None, embed)


def remat_policy(name: str):
    """`jax.checkpoint` policy for `model.remat` (None for `full`: save nothing but the layer input)."""
    cp = jax.checkpoint_policies
    if name == "full":
        return None
    if name == "save_dots":
        return cp.checkpoint_dots
    if name == "dots_with_no_batch_dims":
        return cp.dots_with_no_batch_dims_saveable
    if name == "offload":
        if jax.default_backend() == "cpu":
            raise ValueError("model.remat='offload' moves saved activations to host memory, which needs a GPU or TPU.")
        return cp.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host")
    raise ValueError(f"model.remat must be one of {', '.join(REMAT_POLICIES)}, got {name!r}.")


def run_layers(cfg: ModelConfig, layers: Block, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None):
    """Runs the stacked blocks in order: `jax.lax.scan` over the `layers` axis (`cfg.scan_layers`)
    or an unrolled loop over the same stacked parameters, each layer under `jax.checkpoint` with
    `cfg.remat`'s policy. With `cache` = (k, v, index, k_pos, k_seg) (k, v [layers, B, C, G, E])
    returns (x, (new_k, new_v)); without, (x, None).

    The `local` flag (`cfg.layer_types`) is scanned with the parameters only where one scanned body serves both
    layer kinds; unrolled layers, or layers all of one kind, get it as a Python bool (`static_flags`), so that each
    layer's window is static and the blocked kernel picks its branch at trace time (`self_attend`), not with a
    `lax.cond` per layer (both branches traced and compiled; under remat XLA kept the conds and their temporaries).
    """
    graphdef, state = nnx.split(layers)

    def body(x, layer_in, static):
        layer_state, kv, per_layer = layer_in  # per_layer: the layer's traced flags, {"local": ..., "rope": ...}
        per_layer = {**per_layer, **dict(static)}  # static: the layer's flags known when tracing, (("local", b),)
        block = nnx.merge(graphdef, layer_state)
        if kv is None:
            x, _ = block(x, positions_BxL, segment_ids_BxL, **per_layer)
            return shard_batch(x), None
        index, k_pos, k_seg = cache[2:]
        return block(x, positions_BxL, segment_ids_BxL, cache_kv=kv, index=index, k_pos=k_pos, k_seg=k_seg, **per_layer)

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers, static_argnums=2)
    flags = {}  # per-layer flags, scanned with the parameters: one traced block whatever the layer
    local = None if cfg.layer_types is None else [t == "sliding_attention" for t in cfg.layer_types]
    if local is not None and cfg.scan_layers and len(set(local)) > 1:
        flags["local"] = jnp.asarray(local)
    if cfg.rope_layers is not None:
        flags["rope"] = jnp.asarray(cfg.rope_layers)
    xs = (state, None if cache is None else (cache[0], cache[1]), flags)

    def static_flags(i):  # layer i's flags known when tracing: `body`'s `static`
        return () if local is None or "local" in flags else (("local", local[i]),)

    if cfg.scan_layers:
        return jax.lax.scan(lambda x, layer_in: body(x, layer_in, static_flags(0)), x_BxLxD, xs)
    outs = []
    for i in range(cfg.num_layers):
        x_BxLxD, out = body(x_BxLxD, jax.tree.map(lambda a, i=i: a[i], xs), static_flags(i))
        outs.append(out)
    return x_BxLxD, None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class Llama(nnx.Module):
    """Decoder-only Llama-family language model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        embed_std = cfg.d_model**-0.5 if cfg.tie_embeddings else 1.0
        self.embedding = _param(rngs, (cfg.vocab_size, cfg.d_model), embed_std, ("vocab", "embed"), pd)
        self.layers = Block(cfg, rngs=rngs, stack=cfg.num_layers)  # parameters [layers, ...]
        self.final_norm = _norm(cfg, cfg.d_model)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model**-0.5, ("embed", "vocab"), pd)

    def unembedding(self) -> jax.Array:
        """Output-layer weight W_DxV in the compute dtype (embedding.T when tied)."""
        w = self.embedding[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return w.astype(self.dtype)

    def logits(self, hidden_BxLxD) -> jax.Array:
        """float32 logits from final-norm hidden states (soft-capped with `cfg.logit_softcap`)."""
        logits = dense(shard_batch(hidden_BxLxD), self.unembedding(), preferred_element_type=jnp.float32)
        return shard_batch(soft_cap(logits, self.cfg.logit_softcap))

    def embed(self, tokens_BxL) -> jax.Array:
        """Input embeddings in the compute dtype (times sqrt(d_model), cast to it, with `cfg.embed_scale`); under a
        mesh looked up where `lookup_specs` says."""
        specs = lookup_specs(tokens_BxL.shape[0], self.cfg.d_model)
        if specs is not None:
            tokens_BxL = jax.lax.with_sharding_constraint(tokens_BxL, specs[0])
        x = jnp.take(self.embedding[...], tokens_BxL, axis=0).astype(self.dtype)
        if specs is not None:
            x = jax.lax.with_sharding_constraint(x, specs[1])
        return x * jnp.asarray(self.cfg.d_model**0.5, self.dtype) if self.cfg.embed_scale else x

    def hidden(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None) -> jax.Array:
        """Final-norm hidden states [B, L, D] in the compute dtype; rows of at most `max_seq_len` tokens."""
        if tokens_BxL.shape[-1] > self.cfg.max_seq_len:
            raise ValueError(
                f"rows of {tokens_BxL.shape[-1]} tokens are longer than the model's max_seq_len "
                f"{self.cfg.max_seq_len} (its context); use shorter rows."
            )
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones(tokens_BxL.shape, jnp.int32)
        if positions_BxL is None:
            positions_BxL = positions_from_segments(segment_ids_BxL)
        x = shard_batch(self.embed(tokens_BxL))
        x, _ = run_layers(self.cfg, self.layers, x, positions_BxL, segment_ids_BxL)
        return shard_batch(self.final_norm(x))

    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None) -> jax.Array:
        """float32 logits [B, L, V]."""
        return self.logits(self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL))

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache of `length` slots per row (all slots segment 0, i.e. masked)."""
        shape = (self.cfg.num_layers, batch, length, self.cfg.num_kv_heads, self.cfg.head_dim)
        zeros = jnp.zeros(shape, self.dtype)
        return KVCache(
            k=zeros,
            v=zeros,
            positions_BxC=jnp.zeros((batch, length), jnp.int32),
            segment_ids_BxC=jnp.zeros((batch, length), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    def decode(self, tokens_BxT, positions_BxT, segment_ids_BxT, cache: KVCache, logits_at_B=None):
        """Appends T tokens to the cache at `cache.index`; returns (logits_BxTxV float32, new cache).

        `segment_ids_BxT` is 0 for tokens that must stay invisible (prompt padding), else the row's
        segment (1 for ordinary generation). Queries see cached keys of their own segment at
        positions not after theirs. `logits_at_B` (int32 [B]): each row's one index along T whose logits
        alone come back ([B, 1, V]), so that a long call that needs one token's (a re-prefill) never holds
        [B, T, V] float32.
        """
        index = cache.index
        k_pos = jax.lax.dynamic_update_slice(cache.positions_BxC, positions_BxT.astype(jnp.int32), (0, index))
        k_seg = jax.lax.dynamic_update_slice(cache.segment_ids_BxC, segment_ids_BxT.astype(jnp.int32), (0, index))
        x = self.embed(tokens_BxT)
        x, (new_k, new_v) = run_layers(
            self.cfg, self.layers, x, positions_BxT, segment_ids_BxT, (cache.k, cache.v, index, k_pos, k_seg)
        )
        if logits_at_B is not None:
            x = jnp.take_along_axis(x, logits_at_B[:, None, None], axis=1)
        logits = self.logits(self.final_norm(x))
        new_cache = KVCache(
            k=new_k,
            v=new_v,
            positions_BxC=k_pos,
            segment_ids_BxC=k_seg,
            index=index + tokens_BxT.shape[1],
        )
        return logits, new_cache
