"""The decoder's execution variants against one float64 numpy reference forward, on random configs and random packed
rows: scanned and unrolled layers, every CPU remat policy, the blocked, XLA and Pallas (interpreted) attention paths,
float32 and bfloat16 compute (float32 master weights), uniform and per-layer sliding windows, GQA ratios, every RoPE
scaling, partial rotary and NoPE layers, qk-norm, biases, Gemma 3's numerics, Gemma 2's soft-caps, tied embeddings;
rows of several segments, segments of one token, rows of padding only, ids that come back, explicit positions with
offsets.

`reference_logits` is written from the families' definitions (transformers' modeling files), not from the model's
code: per row, per layer, dense masked softmax attention with repeated key/value heads, in float64. Logits of the
float32 variants match it to 1e-4 of their largest magnitude; the gradients of a random linear function of the logits
agree between every float32 variant of a config to 1e-5 of each parameter's largest gradient, and match the
reference's own central differences along random directions. Fuzzing with these helpers (`fuzz_case` on
`random_config` / `random_rows` / `variants`, many seeds, from a /tmp script) ran 81 random cases (522 float32 and 162
bf16 variants): float32 logits within 2.7e-6 of the reference with positions from 0, 4e-5 with explicit positions
in the thousands (RoPE's angles in float32, as transformers computes them), gradients within 3.6e-6 of each other and
1.7e-4 of the central differences. The tests keep a seeded subset with few distinct shapes (each variant is one compile).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from proxykd_jax.models.llama import Llama, ModelConfig

SLIDING = "sliding_attention"
# bf16 compute rounds the float32 master weights to bf16 (8 significant bits) and the activations between the float32
# norms, softmax and logits at the same relative precision: its logits' error is bounded in units of the error that
# rounding the weights alone makes in the float64 reference (`fuzz_case`), which scales itself to the model. Measured
# over 72 fuzzed bf16 variants: 1.15 to 1.90 times its rms, 0.96 to 2.74 times its largest; bounds about 2x those.
BF16_RMS = 4.0
BF16_MAX = 6.0
F32_LOGITS = 1e-4  # float32 logits against the float64 reference, relative to the largest |logit|
F32_GRADS = 1e-5  # float32 variants' gradients against each other, relative to each parameter's largest |gradient|


# ----------------------------------------------------------------------------------------------
# The float64 reference
# ----------------------------------------------------------------------------------------------


def reference_inv_freq(cfg: ModelConfig, theta: float, scaling, long: bool = False) -> np.ndarray:
    """Inverse frequencies [R/2] of the R = int(head_dim * partial_rotary_factor) rotated dims, as transformers'
    `ROPE_INIT_FUNCTIONS` compute them for `scaling` (default, linear, llama3, yarn, longrope)."""
    r = int(cfg.head_dim * cfg.partial_rotary_factor)
    base = theta ** (np.arange(0, r, 2, dtype=np.float64) / r)
    inv = 1.0 / base
    kind = None if scaling is None else scaling[0]
    if kind is None:
        return inv
    if kind == "linear":
        return inv / scaling[1]
    if kind == "llama3":
        _, factor, low, high, original = scaling
        wavelen = 2 * math.pi / inv
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        out = np.where(wavelen > original / low, inv / factor, inv)
        return np.where((wavelen >= original / high) & (wavelen <= original / low), blended, out)
    if kind == "yarn":
        _, factor, original, beta_fast, beta_slow, truncate, _ = scaling

        def dim_of(rotations):
            return r * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(beta_fast), dim_of(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, r - 1)
        high = high + 0.001 if low == high else high
        extrapolation = 1 - np.clip((np.arange(r // 2) - low) / (high - low), 0, 1)
        return inv / factor * (1 - extrapolation) + inv * extrapolation
    _, original, _, short, long_factors = scaling  # longrope
    return 1.0 / (np.asarray(long_factors if long else short, np.float64) * base)


def _runs(seg_L: np.ndarray) -> np.ndarray:
    """Each token's contiguous run of one non-zero id, numbered from 1 (0 on padding): one sequence per run."""
    starts = (seg_L != np.concatenate([[0], seg_L[:-1]])) & (seg_L != 0)
    return np.where(seg_L != 0, np.cumsum(starts), 0)


def default_positions(seg_BxL: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 wherever the id changes (padding runs too: they are never seen)."""
    index = np.broadcast_to(np.arange(seg_BxL.shape[1]), seg_BxL.shape)
    starts = np.concatenate([np.ones_like(seg_BxL[:, :1], bool), seg_BxL[:, 1:] != seg_BxL[:, :-1]], 1)
    return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


def _rms(x, scale, cfg):
    w = 1.0 + scale if cfg.norm_plus_one else scale
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_eps) * w


def _rope(x_LxNxE, pos_L, inv_LxR2, factor):
    """HF `rotate_half` RoPE of the first R dims of each head, cos and sin times `factor`; the rest passed through."""
    r = 2 * inv_LxR2.shape[-1]
    ang = pos_L[:, None] * inv_LxR2
    cos, sin = (np.concatenate([f(ang), f(ang)], -1)[:, None] * factor for f in (np.cos, np.sin))
    rot, rest = x_LxNxE[..., :r], x_LxNxE[..., r:]
    half = np.concatenate([-rot[..., r // 2 :], rot[..., : r // 2]], -1)
    return np.concatenate([rot * cos + half * sin, rest], -1)


def _layer_rope(cfg: ModelConfig, layer: int, pos_L, runs_L):
    """(inverse frequencies per token [L, R/2], cos/sin factor) of one layer: a Gemma 3 sliding layer's local base
    unscaled; longrope's long factors for the sequences (runs) whose largest position + 1 passes the original."""
    local = cfg.layer_types is not None and cfg.layer_types[layer] == SLIDING and cfg.rope_local_theta is not None
    scaling = None if local else cfg.rope_scaling
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = np.broadcast_to(reference_inv_freq(cfg, theta, scaling), (len(pos_L), int(cfg.rotary_dim // 2))).copy()
    factor = 1.0
    if scaling is not None and scaling[0] == "yarn":
        factor = scaling[6]
    if scaling is not None and scaling[0] == "longrope":
        factor = scaling[2]
        for run in set(runs_L[runs_L > 0].tolist()):
            if pos_L[runs_L == run].max() + 1 > scaling[1]:
                inv[runs_L == run] = reference_inv_freq(cfg, theta, scaling, long=True)
    return inv, factor


def _reference_row(p, cfg: ModelConfig, tokens_L, seg_L, pos_L):
    d, h, g = cfg.d_model, cfg.num_heads, cfg.num_kv_heads
    runs = _runs(seg_L)
    idx = np.arange(len(tokens_L))
    visible_LxL = (
        (runs[:, None] == runs[None, :])
        & (runs[None, :] != 0)
        & (pos_L[None, :] <= pos_L[:, None])
        & (idx[None] <= idx[:, None])
    )
    x = p["embedding"][tokens_L] * (math.sqrt(d) if cfg.embed_scale else 1.0)
    scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
    for i in range(cfg.num_layers):
        lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
        a = lp["attn"]
        y = _rms(x, lp["attn_norm"]["scale"], cfg)
        q, k, v = (np.einsum("ld,dne->lne", y, a[w]) for w in ("wq", "wk", "wv"))
        if cfg.qkv_bias:
            q, k, v = q + a["bq"], k + a["bk"], v + a["bv"]
        if cfg.qk_norm:
            q, k = _rms(q, a["q_norm"]["scale"], cfg), _rms(k, a["k_norm"]["scale"], cfg)
        if cfg.rope_layers is None or cfg.rope_layers[i]:
            inv, factor = _layer_rope(cfg, i, pos_L, runs)
            q, k = _rope(q, pos_L, inv, factor), _rope(k, pos_L, inv, factor)
        k, v = np.repeat(k, h // g, axis=1), np.repeat(v, h // g, axis=1)  # query head j reads key head j // (h / g)
        visible = visible_LxL
        sliding = cfg.layer_types is None or cfg.layer_types[i] == SLIDING
        if cfg.sliding_window is not None and sliding:
            visible = visible & (pos_L[:, None] - pos_L[None, :] < cfg.sliding_window)
        s = np.einsum("lhe,mhe->hlm", q, k) * scale
        if cfg.attn_softcap is not None:  # Gemma 2: capped before the mask
            s = cfg.attn_softcap * np.tanh(s / cfg.attn_softcap)
        s = np.where(visible[None], s, -np.inf)
        s = np.where(visible.any(-1)[None, :, None], s, 0.0)  # (a padding query sees nothing: its output is 0)
        prob = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("hlm,mhe->lhe", prob / prob.sum(-1, keepdims=True), v) * visible.any(-1)[:, None, None]
        out = np.einsum("lhe,hed->ld", o, a["wo"])
        x = x + (_rms(out, lp["attn_out_norm"]["scale"], cfg) if cfg.sandwich_norms else out)
        m = lp["mlp"]
        y = _rms(x, lp["mlp_norm"]["scale"], cfg)
        gate = y @ m["w_gate"]
        if cfg.activation == "silu":
            act = gate / (1 + np.exp(-gate))
        else:
            act = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
        out = (act * (y @ m["w_up"])) @ m["w_down"]
        x = x + (_rms(out, lp["mlp_out_norm"]["scale"], cfg) if cfg.sandwich_norms else out)
    x = _rms(x, p["final_norm"]["scale"], cfg)
    logits = x @ (p["embedding"].T if cfg.tie_embeddings else p["lm_head"])
    return logits if cfg.logit_softcap is None else cfg.logit_softcap * np.tanh(logits / cfg.logit_softcap)


def reference_logits(p, cfg: ModelConfig, tokens_BxL, seg_BxL, pos_BxL=None) -> np.ndarray:
    """float64 logits [B, L, V] from the parameters `p` (a pure dict of float64 arrays, layers stacked); positions
    restart per id change when `pos_BxL` is None."""
    pos_BxL = default_positions(seg_BxL) if pos_BxL is None else pos_BxL
    rows = [_reference_row(p, cfg, t, s, np.asarray(q, np.float64)) for t, s, q in zip(tokens_BxL, seg_BxL, pos_BxL)]
    return np.stack(rows)


# ----------------------------------------------------------------------------------------------
# Random configs, parameters and rows
# ----------------------------------------------------------------------------------------------


def random_config(rng: np.random.Generator, length: int, **overrides) -> ModelConfig:
    """A random small decoder of one family's numerics (Llama / Mistral, Qwen2, Qwen3, Gemma 3 or 2, SmolLM3, Phi-3)
    for rows of `length`: GQA ratio 1, 2 or 4, head_dim even (some not a multiple of 8), a window of any width; half
    the Gemmas are Gemma 2s, with soft-caps that bind on unit-scale activations."""
    family = overrides.pop("family", None) or rng.choice(["llama", "qwen2", "qwen3", "gemma3", "smollm3", "phi3"])
    if family == "gemma3" and "family" not in overrides and rng.random() < 0.5:  # (the other families' draws kept)
        family = "gemma2"
    g = int(rng.choice([1, 2]))
    h = g * int(rng.choice([1, 2, 4]))
    e = int(rng.choice([2, 4, 6, 8, 10, 12, 16]))
    layers = int(rng.integers(1, 4))
    kw = dict(
        vocab_size=int(rng.integers(20, 80)), d_model=int(rng.choice([16, 24, 32])), num_layers=layers,
        num_heads=h, num_kv_heads=g, head_dim=e, d_ff=int(rng.choice([16, 40, 64])), max_seq_len=max(length, 8),
        rope_theta=float(rng.choice([50.0, 500.0, 1e4])), rms_eps=float(rng.choice([1e-6, 1e-5])),
        tie_embeddings=bool(rng.random() < 0.3), scan_layers=False,
    )  # fmt: skip
    windows = [1, 2, 5, int(rng.integers(1, length + 2)), length, 2 * length + 3]
    window = int(rng.choice(windows)) if rng.random() < 0.5 else None
    mixed = tuple(SLIDING if rng.random() < 0.5 else "full_attention" for _ in range(layers))
    scalings = [
        None,
        ("linear", float(rng.uniform(1, 4))),
        ("llama3", float(rng.uniform(2, 8)), 1.0, 4.0, int(rng.choice([8, 32, 64]))),
        ("yarn", float(rng.uniform(1, 8)), int(rng.choice([8, 32])), 32.0, 1.0, bool(rng.random() < 0.5),
         float(rng.uniform(0.8, 1.5))),
    ]  # fmt: skip
    kw["rope_scaling"] = scalings[int(rng.integers(len(scalings)))]
    if family == "llama":
        kw["sliding_window"] = window  # Mistral: every layer slides
    elif family in ("qwen2", "qwen3"):
        kw.update(qkv_bias=family == "qwen2", qk_norm=family == "qwen3", sliding_window=window)
        kw["layer_types"] = mixed if window is not None and rng.random() < 0.7 else None
    elif family == "gemma3":
        kw.update(
            norm_plus_one=True, embed_scale=True, activation="gelu_tanh", sandwich_norms=True, qk_norm=True,
            query_pre_attn_scalar=int(rng.choice([e, 3 * e + 1])), layer_types=mixed,
            rope_local_theta=float(rng.choice([10.0, 100.0])), sliding_window=window,
        )  # fmt: skip
    elif family == "gemma2":
        kw.update(
            norm_plus_one=True, embed_scale=True, activation="gelu_tanh", sandwich_norms=True,
            query_pre_attn_scalar=int(rng.choice([e, 3 * e + 1])), layer_types=mixed if window else None,
            sliding_window=window, attn_softcap=float(rng.uniform(0.5, 3.0)), logit_softcap=float(rng.uniform(1, 5)),
        )  # fmt: skip
    elif family == "smollm3":
        kw["rope_layers"] = tuple(bool(rng.random() < 0.6) for _ in range(layers))
        kw["sliding_window"] = window
        kw["layer_types"] = mixed if window is not None and rng.random() < 0.5 else None
    else:  # phi3: partial rotary, longrope (head_dim * heads = d_model)
        e = int(rng.choice([4, 8, 12, 16]))
        h = g * -(-16 // (e * g))  # (d_model at least 16)
        factor = float(rng.choice([0.5, 0.75, 1.0]))
        factor = factor if int(e * factor) % 2 == 0 else 1.0  # (the rotated part must be even)
        kw.update(head_dim=e, num_heads=h, d_model=e * h, partial_rotary_factor=factor, rope_scaling=None)
        if rng.random() < 0.7:
            factors = [tuple(float(x) for x in rng.uniform(1, 6, int(e * factor) // 2)) for _ in range(2)]
            kw["rope_scaling"] = ("longrope", int(rng.integers(2, length + 2)), float(rng.uniform(0.8, 1.4)), *factors)
        kw["sliding_window"] = window
    kw.update(overrides)
    return ModelConfig(**kw)


def random_params(cfg: ModelConfig, seed: int) -> nnx.State:
    """Every parameter random at about the scale training keeps (unit activations; norm scales 1 +- 0.3, Gemma's
    0 +- 0.3; biases 0.5), q and k a little larger so attention is neither uniform nor one-hot."""
    state = nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    rng = np.random.default_rng(seed)  # (numpy: no jax program to compile per parameter shape)
    d, he = cfg.d_model, cfg.num_heads * cfg.head_dim
    std = dict(wq=1.5 * d**-0.5, wk=1.5 * d**-0.5, wv=d**-0.5, wo=he**-0.5, w_gate=d**-0.5, w_up=d**-0.5)
    std.update(w_down=cfg.d_ff**-0.5, lm_head=d**-0.5, embedding=1.0, bq=0.5, bk=0.5, bv=0.5, scale=0.3)
    new = []
    for path, x in leaves:
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        value = std[name] * rng.normal(size=x.shape) + (1.0 if name == "scale" and not cfg.norm_plus_one else 0.0)
        new.append(jnp.asarray(value, jnp.float32))
    return jax.tree.unflatten(treedef, new)


def random_rows(rng: np.random.Generator, cfg: ModelConfig, rows: int, length: int, explicit: bool = False):
    """(tokens, segment ids, positions or None) [B, L]: rows of several segments (some of one token) with padding
    runs at the start, between and at the end; a row of padding only; one whole segment; an id that comes back.
    `explicit`: positions given, each sequence starting at a random offset (longrope's reach, the window, RoPE's
    relative angle all see them), growing by 1 or 2 per token."""
    seg = np.zeros((rows, length), np.int32)
    kinds = ["packed", "padding", "whole", "repeat"]
    for b in range(rows):
        kind = kinds[b] if b < len(kinds) else rng.choice(kinds)
        if kind == "whole":
            seg[b] = 1
        elif kind == "repeat":  # 1, 2, 1 (an id that comes back), then padding
            cuts = np.sort(rng.integers(0, length + 1, 3))
            seg[b, : cuts[0]], seg[b, cuts[0] : cuts[1]], seg[b, cuts[1] : cuts[2]] = 1, 2, 1
        elif kind == "packed":
            i, sid = 0, 0
            while i < length:
                n = int(rng.choice([1, 1, 2, int(rng.integers(1, length + 1))]))
                if rng.random() < 0.25:
                    i += n  # a padding run
                    continue
                sid += 1
                seg[b, i : i + n] = sid
                i += n
    tokens = rng.integers(0, cfg.vocab_size, (rows, length))
    return tokens, seg, explicit_positions(rng, seg, int(rng.choice([1, 2]))) if explicit else None


def explicit_positions(rng: np.random.Generator, seg_BxL: np.ndarray, stride: int) -> np.ndarray:
    """Positions growing by `stride` per token within each run of one id, from a random offset in [0, 3 L]."""
    rows, length = seg_BxL.shape
    offsets = rng.integers(0, 3 * length + 1, (rows, length))
    starts = np.concatenate([np.ones((rows, 1), bool), seg_BxL[:, 1:] != seg_BxL[:, :-1]], 1)
    start_offset = np.take_along_axis(offsets, np.maximum.accumulate(np.where(starts, np.arange(length), 0), 1), 1)
    return start_offset + stride * default_positions(seg_BxL)


def edge_rows(rows: int, length: int) -> np.ndarray:
    """Segment ids [rows, L] with the edge cases in this order: a one-token segment, two padding tokens, a segment of
    L / 3, another one-token segment, the rest as one segment and a padding tail of 3; two padding tokens then ids
    1, 2, 1 (an id that comes back); padding only; one segment over the row."""
    a = length // 3
    packed = [1] + [0] * 2 + [2] * a + [3] + [4] * (length - a - 7) + [0] * 3
    quarter = length // 4
    repeat = [0] * 2 + [1] * quarter + [2] * quarter + [1] * (length - 2 - 2 * quarter)
    return np.array([packed, repeat, [0] * length, [1] * length][:rows], np.int32)


# ----------------------------------------------------------------------------------------------
# Running the variants
# ----------------------------------------------------------------------------------------------


def run_variant(cfg: ModelConfig, params, tokens, seg, pos, cot):
    """(float32 logits [B, L, V], parameter gradients of sum(logits * cot) as a list of arrays) in one program."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens, pos, seg)
        return jnp.sum(logits * cot), logits

    pos = None if pos is None else jnp.asarray(pos, jnp.int32)
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), [np.asarray(x) for x in jax.tree.leaves(grads)]


def variant(cfg: ModelConfig, name: str) -> ModelConfig:
    """`cfg` run as `name` says, "layers/remat/attention/dtype": scan or unroll, a `model.remat` policy, a
    `model.attention` path, f32 or bf16 compute (float32 parameters either way)."""
    layers, remat, attention, dtype = name.split("/")
    dtype = {"f32": "float32", "bf16": "bfloat16"}[dtype]
    return dataclasses.replace(cfg, scan_layers=layers == "scan", remat=remat, attention=attention, dtype=dtype)


BASELINE = "unroll/none/blocked/f32"  # the variant the others' gradients are compared with


def variants(cfg: ModelConfig, length: int, rng: np.random.Generator) -> list[str]:
    """Every execution variant of `cfg` for the fuzzing (its numerics unchanged): the baseline, scanned, each CPU remat
    policy (scanned or unrolled at random), XLA attention, Pallas splash attention (no window; rows up to 130), bf16
    compute on the blocked and XLA paths."""
    layers = lambda: "scan" if rng.random() < 0.5 else "unroll"  # noqa: E731
    names = [BASELINE, "scan/none/blocked/f32"]
    names += [f"{layers()}/{remat}/blocked/f32" for remat in ("full", "save_dots", "dots_with_no_batch_dims")]
    names.append(f"{layers()}/none/xla/f32")
    if not cfg.windowed and length <= 130:
        names.append(f"{layers()}/none/pallas/f32")
    return names + [f"{layers()}/none/{attention}/bf16" for attention in ("blocked", "xla")]


def _relative(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def grads_gap(got: list, want: list) -> float:
    """Largest gap between two gradients, per parameter relative to its largest |gradient|, or to 5% of the largest
    of all where that is more: float32 rounding scales with what flows through the model, and a gradient that is
    small by cancellation (window 1's q and k, exactly 0 in exact arithmetic) carries the rounding of its terms."""
    floor = 0.05 * max(np.abs(w).max() for w in want)
    return max(float(np.abs(g - w).max() / max(np.abs(w).max(), floor, 1e-30)) for g, w in zip(got, want))


def directional_check(cfg: ModelConfig, params, grads, tokens, seg, pos, cot, rng, only=None) -> float:
    """Largest relative gap between <gradient, d> and the reference's central difference of sum(logits * cot) along
    d, for d random on one parameter at a time (`only`: the names of those checked, e.g. ("wq", "wk"); default all)."""
    pure = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(params))
    paths, treedef = jax.tree_util.tree_flatten_with_path(pure)
    flat = [x for _, x in paths]
    names = [path[-1].key for path, _ in paths]
    directions = [rng.normal(size=x.shape) for x in flat]
    terms = [float(np.sum(np.abs(g) * np.abs(d))) for g, d in zip(grads, directions)]  # each float32 sum's scale
    worst = 0.0
    for i in [i for i, n in enumerate(names) if only is None or n in only]:
        direction = directions[i]
        step = 1e-4 / max(np.abs(direction).max(), 1e-30)

        def f(sign, i=i, direction=direction, step=step):
            moved = [x + sign * step * direction if j == i else x for j, x in enumerate(flat)]
            return float(np.sum(reference_logits(jax.tree.unflatten(treedef, moved), cfg, tokens, seg, pos) * cot))

        want = (f(1) - f(-1)) / (2 * step)
        got = float(np.sum(grads[i].astype(np.float64) * direction))
        worst = max(worst, abs(got - want) / max(abs(want), 1e-3 * terms[i], 1e-4 * max(terms), 1e-30))
    return worst


@dataclasses.dataclass
class CaseReport:
    logits: dict  # variant: float32's relative error; bf16's rms and largest, of the spread and of bf16 weights'
    grads: dict  # float32 variant: largest per-parameter relative gap to the unrolled baseline
    directional: float  # the baseline's gradients against the reference's central differences
    failures: list
    spread: float  # the reference logits' standard deviation


def fuzz_case(cfg, params, tokens, seg, pos, cot, names: list[str], rng, directional=True):
    """Runs the variants `names` (`variant`'s, `BASELINE` first) of `cfg` on one case; returns a `CaseReport`
    (failures: what broke a tolerance). `directional`: check the baseline's gradients against the reference's central
    differences (True: every parameter; a tuple: those parameter names; False: none)."""
    assert names[0] == BASELINE
    pure = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(params))
    ref = reference_logits(pure, cfg, tokens, seg, pos)
    spread = float(np.std(ref))
    if any(name.endswith("bf16") for name in names):  # bf16's own scale: the reference on bf16-rounded weights
        rounded = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16), np.float64), pure)
        rounding = reference_logits(rounded, cfg, tokens, seg, pos) - ref
        weights_rms, weights_top = float(np.sqrt(np.mean(rounding**2))), float(np.abs(rounding).max())
    report = CaseReport({}, {}, 0.0, [], spread)
    base = None
    for name in names:
        logits, grads = run_variant(variant(cfg, name), params, tokens, seg, pos, cot)
        if not np.all(np.isfinite(logits)) or not all(np.all(np.isfinite(g)) for g in grads):
            report.failures.append(f"{name}: non-finite logits or gradients")
            continue
        if name.endswith("bf16"):
            err = np.asarray(logits, np.float64) - ref
            rms, top = float(np.sqrt(np.mean(err**2))), float(np.abs(err).max())
            report.logits[name] = (rms / spread, top / spread, rms / weights_rms, top / weights_top)
            if rms > BF16_RMS * weights_rms or top > BF16_MAX * weights_top:
                report.failures.append(
                    f"{name}: bf16 logits error {report.logits[name]} (of the spread, of bf16 weights')"
                )
            continue
        report.logits[name] = _relative(logits, ref)
        if report.logits[name] > F32_LOGITS:
            report.failures.append(f"{name}: logits {report.logits[name]:.3g} from the reference")
        if base is None:
            base = grads
            if directional:
                only = None if directional is True else directional
                report.directional = directional_check(cfg, params, grads, tokens, seg, pos, cot, rng, only)
                if report.directional > 1e-3:
                    report.failures.append(f"{name}: gradients {report.directional:.3g} from the reference's")
            continue
        gap = grads_gap(grads, base)
        report.grads[name] = gap
        if gap > F32_GRADS:
            report.failures.append(f"{name}: gradients {gap:.3g} from the unrolled baseline's")
    return report


# ----------------------------------------------------------------------------------------------
# The seeded subset
# ----------------------------------------------------------------------------------------------

FULL = "full_attention"


class Case(NamedTuple):
    fields: dict  # the config's, over `_case`'s base
    rows: int
    length: int
    stride: int | None  # explicit positions' (offset per sequence), or None: restarting at 0 per segment
    variants: list  # `variant` names, the baseline first
    without: dict | None  # fields without which the reference changes: the case's point is exercised
    directional: bool | tuple = True  # `fuzz_case`'s


# Shapes: [4, 24], but for the band kernel's rows of 512 (blocks of 64 divide them) and the causal kernel's two query
# blocks of 65 at L 130. Across the cases: every remat policy, each attention path, both compute dtypes.
CASES = {
    # Qwen2-shaped: q/k/v biases, tied embeddings, Llama-3 RoPE, 4 query heads per key/value head of width 6;
    # Pallas pads the rows of 24 to its 128-row tile
    "bias-llama3-gqa4": Case(
        dict(num_kv_heads=1, head_dim=6, qkv_bias=True, tie_embeddings=True, rope_scaling=("llama3", 8.0, 1.0, 4.0, 16)),
        4, 24, None, [BASELINE, "scan/full/blocked/f32", "scan/none/pallas/f32"], None,
    ),
    # SmolLM3-shaped: a NoPE layer, window 1 on every layer (each token sees itself alone), linear RoPE, head_dim 12
    "nope-window-1": Case(
        dict(num_heads=2, head_dim=12, rope_layers=(False, True), sliding_window=1, rope_scaling=("linear", 2.0)),
        4, 24, None, [BASELINE, "unroll/save_dots/blocked/f32", "unroll/none/xla/f32"], dict(sliding_window=None),
    ),
    # Qwen3-shaped sliding and full layers on rows of 512: the band kernel (blocks of 64, one behind) on the sliding
    # layer, a static window unrolled, the traced window's cond scanned (under remat); YaRN
    "qk-norm-mixed-band": Case(
        dict(qk_norm=True, layer_types=(SLIDING, FULL), sliding_window=50,
             rope_scaling=("yarn", 4.0, 32, 32.0, 1.0, False, 1.2)),
        2, 512, None, [BASELINE, "scan/dots_with_no_batch_dims/blocked/f32", "unroll/none/xla/f32"],
        dict(sliding_window=None, layer_types=None), ("wq", "wk"),
    ),
    # Gemma 3 on rows of 130 (two query blocks of 65): a window of L (none in effect), the local RoPE base, the
    # query_pre_attn_scalar, head_dim 10, a scanned traced window without a band; bf16 compute
    "gemma3-window-L": Case(
        dict(num_heads=2, num_kv_heads=1, head_dim=10, norm_plus_one=True, embed_scale=True, activation="gelu_tanh",
             sandwich_norms=True, qk_norm=True, query_pre_attn_scalar=24, layer_types=(FULL, SLIDING),
             rope_local_theta=10.0, sliding_window=130),
        4, 130, None, [BASELINE, "scan/none/blocked/f32", "unroll/none/blocked/bf16"], dict(rope_local_theta=None),
    ),
    # Gemma 2 on rows of 130: soft-capped scores (0.7) and logits (2.0) that bind, sliding and full layers (window
    # 20: the causal kernel masking it, a traced window scanned under remat), the capped XLA path
    "gemma2-capped-window": Case(
        dict(num_heads=2, num_kv_heads=1, head_dim=10, norm_plus_one=True, embed_scale=True, activation="gelu_tanh",
             sandwich_norms=True, query_pre_attn_scalar=24, layer_types=(SLIDING, FULL), sliding_window=20,
             attn_softcap=0.7, logit_softcap=2.0),
        4, 130, None, [BASELINE, "scan/full/blocked/f32", "unroll/none/xla/f32"],
        dict(attn_softcap=None, logit_softcap=None),
    ),
    # Phi-3: longrope past its original 40 positions on 6 of the 8 sequences (explicit positions offset per sequence),
    # partial rotary (half of each head), window 5
    "phi3-longrope-positions": Case(
        dict(partial_rotary_factor=0.5, sliding_window=5,
             rope_scaling=("longrope", 40, 1.2, (1.0, 2.0), (3.0, 5.0))),
        4, 24, 1, [BASELINE, "scan/none/xla/f32"],
        dict(rope_scaling=("longrope", 40, 1.2, (1.0, 2.0), (1.0, 2.0))),
    ),
}  # fmt: skip


def _case(name: str):
    """(config, parameters, tokens, segment ids, positions, cotangent, rng) of `CASES[name]`, seeded."""
    case = CASES[name]
    base = dict(vocab_size=53, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=40)
    cfg = ModelConfig(**{**base, "rope_theta": 500.0, "max_seq_len": case.length, **case.fields})
    rng = np.random.default_rng(sorted(CASES).index(name))
    seg = edge_rows(case.rows, case.length)
    pos = None if case.stride is None else explicit_positions(rng, seg, case.stride)
    tokens = rng.integers(0, cfg.vocab_size, seg.shape)
    cot = rng.normal(size=(case.rows, case.length, cfg.vocab_size)).astype(np.float32)
    return cfg, random_params(cfg, len(name)), tokens, seg, pos, cot, rng


@pytest.mark.parametrize("name", list(CASES))
def test_variants_match_the_float64_reference(name):
    """Every variant's logits against the reference (float32 to 1e-4 of the largest; bf16 within `BF16_RMS` and
    `BF16_MAX` times bf16-rounded weights' error), the float32 variants' gradients against the baseline's (1e-5), the
    baseline's against the reference's central differences along a random direction per parameter (1e-3: float32's
    own rounding)."""
    case = CASES[name]
    cfg, params, tokens, seg, pos, cot, rng = _case(name)
    report = fuzz_case(cfg, params, tokens, seg, pos, cot, case.variants, rng, case.directional)
    assert not report.failures, report.failures
    assert sorted(report.logits) == sorted(case.variants) and report.spread > 0.5
    if case.without is not None:  # the case's point changes the answer
        p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(params))
        plain = reference_logits(p, dataclasses.replace(cfg, **case.without), tokens, seg, pos)
        assert np.abs(plain - reference_logits(p, cfg, tokens, seg, pos)).max() > 0.05 * report.spread


def test_a_random_case_matches_the_float64_reference():
    """One of the fuzzing's random cases (`random_config`, `random_rows`, `variants` of seed 6): a 3-layer
    Qwen3-shaped model with GQA, linear RoPE, a window of L, explicit positions, scanned in bf16."""
    seed = 6
    rng = np.random.default_rng(seed)
    cfg = random_config(rng, 24)
    tokens, seg, pos = random_rows(rng, cfg, 4, 24, explicit=bool(rng.random() < 0.5))
    cot = rng.normal(size=(4, 24, cfg.vocab_size)).astype(np.float32)
    names = variants(cfg, 24, rng)
    report = fuzz_case(
        cfg, random_params(cfg, seed), tokens, seg, pos, cot, [BASELINE, names[int(rng.integers(1, len(names)))]], rng
    )
    assert not report.failures, report.failures
