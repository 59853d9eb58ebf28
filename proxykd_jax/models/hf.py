"""Hugging Face safetensors import/export for Llama, Mistral, Qwen2, Qwen3 and Gemma 3 causal LMs (no torch needed).

`load_hf(folder, mesh=..., rules=...)` reads config.json and model.safetensors (or a sharded
model.safetensors.index.json), checks every tensor's shape against the config from the file headers
alone, then builds each parameter straight into its sharded global array, every device reading
only its own block (`safetensors_io`); nothing is randomly initialised or built whole on one host.
`save_hf(model, cfg, folder)` writes a folder `transformers` loads (with `source`, the folder the model was
imported from, its config.json: the same family; else Gemma3ForCausalLM when the model has Gemma's norms,
Qwen3ForCausalLM when it has q/k norms, Qwen2ForCausalLM when it has q/k/v bias, MistralForCausalLM when it has a
sliding window, LlamaForCausalLM otherwise), one tensor at a time, in files of at most 5 GB.
`tensor_map` is the one place that maps our parameter paths to HF tensor names and layouts.

Mistral / Qwen2 / Qwen3 / Gemma 3 sliding windows are imported as transformers reads them (`sliding_window`): the
config's `sliding_window` and, where only some layers slide, `layer_types` (Qwen's `max_window_layers` or
`layer_types`, Gemma 3's `layer_types` or `sliding_window_pattern`; Gemma 3's sliding layers keep their own RoPE
base); `max_seq_len` is the model's context (`max_position_embeddings`). A window at least that long is no window.
An export writes the window back (Mistral: MistralForCausalLM; Qwen: `use_sliding_window` and `layer_types`; Gemma
3: its `sliding_window`); one with `source` keeps the source's config.json. Gemma 3's logit soft-capping and
bidirectional attention are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.safetensors_io import SafetensorsFolder, TensorMap, host_value, load_leaf, write_sharded

log = logging.getLogger(__name__)

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM")
_QWEN3_HEAD_DIM = 128  # transformers' Qwen3Config default, what it runs a config.json without head_dim with
GEMMA3 = "Gemma3ForCausalLM"
# transformers' Gemma3TextConfig defaults for keys a config.json may leave out
_GEMMA3_DEFAULTS = dict(
    head_dim=256,
    query_pre_attn_scalar=256,
    max_position_embeddings=131_072,
    sliding_window=4096,
    tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh",
)
_GEMMA3_PATTERN = 6  # sliding_window_pattern's default: every 6th layer full, the others sliding
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """transformers' YaRN `get_mscale`: 1 + 0.1 * mscale * ln(factor) (1 for a factor up to 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_scaling(rope: dict, hf: dict) -> tuple | None:
    """`ModelConfig.rope_scaling` of a config.json's RoPE dict, with transformers 5's defaults filled in as its
    `modeling_rope_utils` does (YaRN: original_max_position_embeddings the context, factor the context over it,
    attention_factor from mscale / mscale_all_dim or factor, beta_fast 32, beta_slow 1, truncate)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type == "linear":
        return ("linear", float(rope["factor"]))
    if rope_type == "llama3":
        return (
            "llama3",
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
            int(rope["original_max_position_embeddings"]),
        )
    if rope_type == "yarn":
        original = int(rope.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 2048))
        factor = rope["factor"]
        factor = float(int(hf.get("max_position_embeddings", 2048)) / original if factor is None else factor)
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
            attention_factor = (
                _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                if mscale and mscale_all_dim
                else _yarn_mscale(factor)
            )
        beta_fast, beta_slow = float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1)
        return (
            "yarn",
            factor,
            original,
            beta_fast,
            beta_slow,
            bool(rope.get("truncate", True)),
            float(attention_factor),
        )
    why = " (its scaling depends on the sequence length at run time)" if rope_type == "dynamic" else ""
    raise ValueError(
        f"config.json rope type {rope_type!r}{why} is not supported; supported: default, linear, llama3, yarn."
    )


def _rope_to_hf(scaling: tuple) -> dict:
    """config.json's RoPE dict of a `ModelConfig.rope_scaling` tuple (not None): what transformers reads back as
    the same numbers."""
    kind, *values = scaling
    names = {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "yarn": (
            "factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "truncate",
            "attention_factor",
        ),
    }[kind]
    return {"rope_type": kind, **dict(zip(names, values, strict=True))}


def config_from_hf(hf: dict, *, dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (old top-level or v5 `rope_parameters` RoPE keys, read
    with transformers' priorities: `rope_scaling` before `rope_parameters`, the RoPE dict's rope_theta before the
    top-level one)."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise ValueError(
            f"Unsupported architecture {archs or hf.get('model_type')!r}; supported: {', '.join(SUPPORTED)}."
        )
    gemma = {}
    if arch == GEMMA3:
        hf = {**_GEMMA3_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    try:
        if arch == GEMMA3:
            gemma = _gemma3_fields(hf)
        d_model, num_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        rope = (gemma.pop("full_rope") if gemma else None) or hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_theta = float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0)
        rope_scaling = _rope_scaling(rope, hf)
        partial = float(rope.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0)
        if partial != 1.0:
            raise ValueError(
                f"config.json sets partial_rotary_factor={partial} (RoPE on part of each head), which is not supported."
            )
        if arch != "Qwen2ForCausalLM" and hf.get("attention_bias"):  # Qwen3's attention_bias: o_proj's too
            raise ValueError("config.json sets attention_bias=true (bias on o_proj too), which is not supported.")
        if hf.get("mlp_bias"):
            raise ValueError("config.json sets mlp_bias=true (biases on the MLP projections), which is not supported.")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish") and not gemma:
            raise ValueError(f"config.json sets hidden_act={act!r}; only silu (SwiGLU) is supported.")
        default_head_dim = _QWEN3_HEAD_DIM if arch == "Qwen3ForCausalLM" else d_model // num_heads
        max_seq_len = int(hf.get("max_position_embeddings", 2048))
        window = sliding_window(hf, arch)
        window = window if window and window < max_seq_len else None  # one as long as the context: full attention
        if not gemma:  # Qwen's sliding layers (Gemma's layer_types, which also pick the RoPE base: `_gemma3_fields`)
            gemma = dict(layer_types=_qwen_layer_types(hf) if window and arch.startswith("Qwen") else None)
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or default_head_dim),
            d_ff=int(hf["intermediate_size"]),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=arch == "Qwen2ForCausalLM",
            qk_norm=arch in ("Qwen3ForCausalLM", GEMMA3),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=max_seq_len,
            param_dtype=param_dtype,
            dtype=dtype,
            sliding_window=window,
            **gemma,
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks the field {e.args[0]!r} that a {arch} config must have.") from None


def _gemma3_layer_types(hf: dict) -> list:
    """A Gemma 3 config.json's `layer_types`, or transformers' from `sliding_window_pattern` without them."""
    pattern = int(hf.get("sliding_window_pattern") or _GEMMA3_PATTERN)
    layers = int(hf["num_hidden_layers"])
    return list(hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
    ])  # fmt: skip


def _gemma3_fields(hf: dict) -> dict:
    """The `ModelConfig` fields of a Gemma 3 config.json (its defaults filled in) beyond the Llama ones, and
    "full_rope", the full-attention layers' RoPE dict, read as transformers 5's `convert_rope_params_to_dict`
    does: `rope_parameters` keyed by layer type, updated by a top-level `rope_scaling` (full layers), each type's
    rope_theta else top-level `rope_theta` (full) / `rope_local_base_freq` (sliding)."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key) is not None:
            raise ValueError(f"config.json sets {key}={hf[key]!r} (logit soft-capping), which is not supported.")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config.json sets use_bidirectional_attention=true (an encoder), which is not supported.")
    act = hf.get("hidden_activation")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"config.json sets hidden_activation={act!r}; a Gemma 3 must use gelu_pytorch_tanh.")
    params = hf.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or {"rope_type": "default"}, **(hf.get("rope_scaling") or {}))
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    full.setdefault("rope_theta", hf.get("rope_theta", 1e6))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 1e4))
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(
            f"config.json's rope_parameters scale the sliding_attention layers' RoPE ({local}), which is not "
            "supported; only their rope_theta may differ."
        )
    types = _gemma3_layer_types(hf)
    sliding = "sliding_attention" in types
    scalar = int(hf["query_pre_attn_scalar"])
    return dict(
        full_rope=full,
        norm_plus_one=True,
        embed_scale=True,
        activation="gelu_tanh",
        sandwich_norms=True,
        query_pre_attn_scalar=None if scalar == int(hf["head_dim"]) else scalar,
        layer_types=tuple(types) if sliding else None,  # none sliding: every layer the full RoPE, as ours
        rope_local_theta=float(local["rope_theta"]) if sliding else None,
    )


def _qwen_layer_types(hf: dict) -> tuple:
    """A Qwen2 / Qwen3 config.json's layer types, as transformers reads them: its `layer_types`, else sliding from
    layer `max_window_layers` on."""
    layers = int(hf["num_hidden_layers"])
    return tuple(hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf.get("max_window_layers", 28)) else "full_attention" for i in range(layers)
    ])  # fmt: skip


def sliding_window(hf: dict, arch: str) -> int | None:
    """The attention window a config.json's model runs some layers with, as transformers reads it (None: none):
    Mistral's `sliding_window` on every layer; Qwen2's and Qwen3's only with `use_sliding_window`, on the layers
    their `layer_types` name "sliding_attention" (without them: layers from `max_window_layers` on); Gemma 3's on
    its "sliding_attention" layers (`sliding_window_pattern` without `layer_types`), 4096 by default."""
    if arch == GEMMA3:
        hf = {**_GEMMA3_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
        return int(hf["sliding_window"]) if "sliding_attention" in _gemma3_layer_types(hf) else None
    window = hf.get("sliding_window")
    if not window or arch == "LlamaForCausalLM":
        return None
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if not hf.get("use_sliding_window") or "sliding_attention" not in _qwen_layer_types(hf):
            return None
    return int(window)


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Expected HF tensor name -> shape."""
    d, h, g, e, f, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h * e, d),
                p + "self_attn.k_proj.weight": (g * e, d),
                p + "self_attn.v_proj.weight": (g * e, d),
                p + "self_attn.o_proj.weight": (d, h * e),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
                **{p + name: (d,) for name in _layer_keys(cfg) if name.endswith("layernorm.weight")},
            }
        )
        if cfg.qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (h * e,),
                    p + "self_attn.k_proj.bias": (g * e,),
                    p + "self_attn.v_proj.bias": (g * e,),
                }
            )
        if cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (e,), p + "self_attn.k_norm.weight": (e,)})
    return shapes


_LAYER_KEYS = {
    "self_attn.q_proj.weight": ("attn", "wq"),
    "self_attn.k_proj.weight": ("attn", "wk"),
    "self_attn.v_proj.weight": ("attn", "wv"),
    "self_attn.o_proj.weight": ("attn", "wo"),
    "self_attn.q_proj.bias": ("attn", "bq"),
    "self_attn.k_proj.bias": ("attn", "bk"),
    "self_attn.v_proj.bias": ("attn", "bv"),
    "self_attn.q_norm.weight": ("attn", "q_norm", "scale"),
    "self_attn.k_norm.weight": ("attn", "k_norm", "scale"),
    "mlp.gate_proj.weight": ("mlp", "w_gate"),
    "mlp.up_proj.weight": ("mlp", "w_up"),
    "mlp.down_proj.weight": ("mlp", "w_down"),
    "input_layernorm.weight": ("attn_norm", "scale"),
    "post_attention_layernorm.weight": ("mlp_norm", "scale"),
}
# Gemma 3's four norms per layer: post_attention_layernorm is on the attention's output, not before the MLP
_GEMMA3_NORMS = {
    "input_layernorm.weight": ("attn_norm", "scale"),
    "post_attention_layernorm.weight": ("attn_out_norm", "scale"),
    "pre_feedforward_layernorm.weight": ("mlp_norm", "scale"),
    "post_feedforward_layernorm.weight": ("mlp_out_norm", "scale"),
}
_GEMMA3_LAYER_KEYS = {k: v for k, v in _LAYER_KEYS.items() if not k.endswith("layernorm.weight")} | _GEMMA3_NORMS


def _layer_keys(cfg: ModelConfig) -> dict:
    """HF tensor name (after `model.layers.{i}.`) -> our path in a block, for this config's family."""
    return _GEMMA3_LAYER_KEYS if cfg.sandwich_norms else _LAYER_KEYS


_TOP_KEYS = {
    ("embedding",): "model.embed_tokens.weight",
    ("final_norm", "scale"): "model.norm.weight",
    ("lm_head",): "lm_head.weight",
}


def tensor_map(path: tuple, cfg: ModelConfig) -> TensorMap:
    """The one map between our parameter paths and Hugging Face tensors (and their layouts).

    A path `("layers", i, *rest)` is layer i's tensor; a path `("layers", *rest)` (no index) is a
    scanned stack of all layers, read as `num_layers` tensors stacked along a new leading axis.
    Linear weights are [out, in] in HF; ours are [in, ...heads, out].
    """
    d, h, g, e, f, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    path = tuple(path)
    if path in _TOP_KEYS:
        split, perm = {
            ("embedding",): (((v,), (d,)), (0, 1)),
            ("final_norm", "scale"): (((d,),), (0,)),
            ("lm_head",): (((v,), (d,)), (1, 0)),
        }[path]
        return TensorMap((_TOP_KEYS[path],), split, perm)
    indexed = len(path) > 1 and path[0] == "layers" and isinstance(path[1], int)
    rest = path[2:] if indexed else path[1:]
    per_layer = {ours: hf_name for hf_name, ours in _layer_keys(cfg).items()}
    if path[:1] != ("layers",) or rest not in per_layer:
        raise KeyError(f"parameter {'/'.join(map(str, path))} has no Hugging Face counterpart.")
    heads = {"wq": h, "bq": h}.get(rest[-1], g)
    leaf = rest[-2] if rest[-1] == "scale" else rest[-1]  # a norm's scale: which norm (its width)
    split, perm = {
        "wq": (((h, e), (d,)), (2, 0, 1)),
        "wk": (((g, e), (d,)), (2, 0, 1)),
        "wv": (((g, e), (d,)), (2, 0, 1)),
        "wo": (((d,), (h, e)), (1, 2, 0)),
        "bq": (((heads, e),), (0, 1)),
        "bk": (((heads, e),), (0, 1)),
        "bv": (((heads, e),), (0, 1)),
        "w_gate": (((f,), (d,)), (1, 0)),
        "w_up": (((f,), (d,)), (1, 0)),
        "w_down": (((d,), (f,)), (1, 0)),
        "attn_norm": (((d,),), (0,)),
        "mlp_norm": (((d,),), (0,)),
        "attn_out_norm": (((d,),), (0,)),
        "mlp_out_norm": (((d,),), (0,)),
        "q_norm": (((e,),), (0,)),
        "k_norm": (((e,),), (0,)),
    }[leaf]
    layers = (path[1],) if indexed else range(cfg.num_layers)
    names = tuple(f"model.layers.{i}.{per_layer[rest]}" for i in layers)
    return TensorMap(names, split, perm, stacked=not indexed)


def _checked_folder(folder: pathlib.Path, cfg: ModelConfig) -> SafetensorsFolder:
    """The folder's tensors, checked against the config from the file headers alone."""
    source = SafetensorsFolder(folder)
    expected = _hf_shapes(cfg)
    present = {n for n in source.files if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:
        present.discard("lm_head.weight")
    missing = sorted(set(expected) - present)
    if missing:
        raise ValueError(
            f"{folder} lacks tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''} the config requires."
        )
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise ValueError(f"{folder} has tensor(s) {unexpected[:4]} this {cfg.num_layers}-layer config does not use.")
    for name in sorted(expected):
        shape = source.shape(name)
        if shape != expected[name]:
            raise ValueError(
                f"Tensor {name} in {source.files[name].name} has shape {shape}, but config.json implies "
                f"{expected[name]}."
            )
    return source


# ModelConfig fields that say how a model runs, not what it computes: a folder's config.json leaves them out.
RUN_FIELDS = ("scan_layers", "remat", "attention", "attention_segments")


def read_config(folder, *, dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of a local HF folder's config.json."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Model folder {folder} does not exist; pass a local Hugging Face model folder.")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; it must be a Hugging Face model folder.")
    try:
        hf_cfg = json.loads((folder / "config.json").read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{folder}/config.json is not valid JSON ({e}).") from None
    return config_from_hf(hf_cfg, dtype=dtype, param_dtype=param_dtype)


def load_params(folder, cfg: ModelConfig, targets: Mapping[tuple, tuple], param_dtype) -> dict[tuple, jax.Array]:
    """Our parameters `targets` (path -> (shape, sharding)) read from a folder's safetensors, each
    straight into its sharded array; the folder's tensors are checked against `cfg` first."""
    source = _checked_folder(pathlib.Path(folder), cfg)
    dtype = np.dtype(jnp.dtype(param_dtype))
    out = {}
    for key, (shape, sharding) in targets.items():
        tmap = tensor_map(key, cfg)
        if tmap.shape != tuple(shape):
            raise ValueError(f"parameter {key} has shape {tuple(shape)} but its HF tensors give {tmap.shape}.")
        out[key] = load_leaf(source, tmap, sharding, dtype)
    return out


def load_hf(
    folder, *, dtype: str = "float32", param_dtype: str = "float32", mesh=None, rules=None, run: dict | None = None
) -> tuple[ModelConfig, Llama]:
    """Imports a local HF folder; returns (config, model) with parameters in `param_dtype`; `run` sets how
    the model runs (`RUN_FIELDS`: remat, layer scan, attention path), which config.json does not say.

    With `mesh` (and `rules`, default the standard table) every parameter is built straight into its
    sharded global array, each device's block read from the files on its own (`safetensors_io`);
    without, onto this process's first device. No tensor is ever built whole on the host first."""
    from proxykd_jax.parallel import LOGICAL_RULES, state_shardings

    cfg = read_config(folder, dtype=dtype, param_dtype=param_dtype)
    if run:
        cfg = dataclasses.replace(cfg, **{k: run[k] for k in RUN_FIELDS if k in run})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(state))
    if mesh is not None:
        shardings = {
            k: v.get_value() for k, v in nnx.to_flat_state(state_shardings(state, mesh, rules or LOGICAL_RULES))
        }
    else:
        shardings = dict.fromkeys(flat, SingleDeviceSharding(jax.local_devices()[0]))
    values = load_params(folder, cfg, {k: (v.shape, shardings[k]) for k, v in flat.items()}, param_dtype)
    for key, var in flat.items():
        var.set_value(values[key])
    return cfg, nnx.merge(graphdef, state)


def _gemma3_config(cfg: ModelConfig, kwargs: dict) -> dict:
    """config.json of a Gemma 3 `cfg` (`kwargs`: `_hf_config`'s common keys): RoPE keyed by layer type as
    transformers 5 writes it, and as top-level rope_theta / rope_local_base_freq / rope_scaling for readers before
    it; the sliding window (without one the context, where the window's attention is the full one)."""
    from transformers import Gemma3TextConfig

    full = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        full = {**_rope_to_hf(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
    local_theta = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
    kwargs = {k: v for k, v in kwargs.items() if k not in ("rope_theta", "hidden_act", "rms_norm_eps")}
    hf_cfg = Gemma3TextConfig(
        **kwargs,
        rms_norm_eps=cfg.rms_eps,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
        sliding_window=cfg.sliding_window or cfg.max_seq_len,
        layer_types=list(cfg.layer_types or ["full_attention"] * cfg.num_layers),
        rope_parameters={
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        },
        attention_bias=False,
    )
    out = hf_cfg.to_dict()
    out["architectures"] = [GEMMA3]
    out["dtype"] = out["torch_dtype"] = cfg.param_dtype
    out["rope_theta"], out["rope_local_base_freq"] = cfg.rope_theta, local_theta
    scaling = {k: v for k, v in full.items() if k != "rope_theta"}
    out["rope_scaling"] = None if cfg.rope_scaling is None else {"type": scaling["rope_type"], **scaling}
    return out


def _hf_config(cfg: ModelConfig, arch: str, token_ids: dict) -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        **token_ids,
    )
    if arch == GEMMA3:
        return _gemma3_config(cfg, kwargs)
    if cfg.rope_scaling is not None:
        kwargs["rope_scaling"] = _rope_to_hf(cfg.rope_scaling)
    window = cfg.sliding_window if cfg.windowed else None
    if arch in ("Qwen3ForCausalLM", "Qwen2ForCausalLM"):
        types = list(cfg.layer_types or ["sliding_attention"] * cfg.num_layers) if window else None
        qwen = dict(use_sliding_window=window is not None, sliding_window=window, layer_types=types)
        hf_cfg = (Qwen3Config if arch == "Qwen3ForCausalLM" else Qwen2Config)(attention_bias=False, **qwen, **kwargs)
    elif arch == "MistralForCausalLM":
        hf_cfg = MistralConfig(sliding_window=window, **kwargs)
    else:
        hf_cfg = LlamaConfig(attention_bias=False, **kwargs)
    out = hf_cfg.to_dict()
    out["architectures"] = [arch]
    out["dtype"] = out["torch_dtype"] = cfg.param_dtype  # torch_dtype: the name before transformers 5
    # transformers 5 writes RoPE only as `rope_parameters`; readers before it (transformers 4, vLLM on it) read
    # only top-level rope_theta / rope_scaling and would run theta 10000 without scaling. transformers 5 reads
    # rope_scaling first, so both forms carry the same numbers.
    rope = out["rope_parameters"]
    out["rope_theta"] = rope["rope_theta"]
    out["rope_scaling"] = None
    if rope["rope_type"] != "default":
        out["rope_scaling"] = {"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_theta"}}
    return out


_COMPUTES = tuple(
    f.name for f in dataclasses.fields(ModelConfig) if f.name not in (*RUN_FIELDS, "dtype", "param_dtype")
)


def source_config(folder, cfg: ModelConfig) -> dict | None:
    """The config.json of `folder` (a model's source folder; None or "": none) where it describes a model that
    computes what `cfg` does (every field but how it runs and its dtypes); else None."""
    path = pathlib.Path(str(folder)).expanduser() / "config.json" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
        theirs = config_from_hf(spec, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    except ValueError:
        return None
    differ = [f for f in _COMPUTES if getattr(theirs, f) != getattr(cfg, f)]
    if differ:
        log.info("%s describes another model (%s): config.json is written from the model's own", path, differ[0])
        return None
    return spec


def generation_stop_ids(folder: pathlib.Path) -> tuple:
    """The ids a folder's generation_config.json names as `eos_token_id` (one or a list: an instruct model
    ends a turn with its own token, Llama 3's <|eot_id|>, besides the tokenizer's eos); () without one."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        ids = json.loads(path.read_text()).get("eos_token_id")
    except (ValueError, AttributeError):
        raise ProxyKDError(f"{path} is not a JSON object; fix it or remove it") from None
    ids = [ids] if isinstance(ids, int) else ids or []
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ProxyKDError(f"{path}: eos_token_id must be a token id or a list of them, not {ids!r}")
    return tuple(ids)


def trained_stop_ids(folders, prepared_dir: pathlib.Path) -> tuple:
    """The ids besides the eos that end the answers of a model trained on prepared data (`save_hf`'s `stop_ids` for
    distill's student and its export): those of the first of `folders` (e.g. model.init_from, data.tokenizer)
    whose generation_config.json lists any, and the end of turn `prepare` ended templated answers with
    (`<prepared_dir>/manifest.json`'s tokenizer.end_of_turn_id: Llama 3's <|eot_id|>, which a base model's folder
    does not list)."""
    ids: tuple = ()
    for folder in folders:
        if folder and pathlib.Path(folder).expanduser().is_dir():
            ids = generation_stop_ids(pathlib.Path(folder).expanduser())
            if ids:
                break
    try:
        manifest = json.loads((pathlib.Path(prepared_dir) / "manifest.json").read_text())
        turn_end = manifest["tokenizer"].get("end_of_turn_id")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no manifest: nothing says how answers end
        turn_end = None
    return answer_stop_ids(ids, turn_end)


def answer_stop_ids(folder_ids, end_of_turn) -> tuple:
    """The ids besides the eos that end a model's answers (`save_hf`'s `stop_ids`, `proxykd serve`'s), each once:
    `folder_ids` (a folder's generation_config.json's, `generation_stop_ids`) and `end_of_turn`, the token its
    chat template ends a turn with (`models.tokenizer.end_of_turn_id`, which `prepare` records in its manifest;
    None: none), which a base model's folder does not list although a model trained on templated answers ends
    them there."""
    return tuple(dict.fromkeys([*map(int, folder_ids), *([int(end_of_turn)] if end_of_turn is not None else [])]))


def token_ids_of(tokenizer, stop_ids=()) -> dict:
    """bos/eos/pad ids of a tokenizer (None where it has none; pad falls back to eos). With `stop_ids`
    (an instruct model's end-of-turn tokens besides the eos), eos_token_id is the list of the eos and
    those, as such a model's own config.json and generation_config.json give it."""
    if tokenizer is None:
        return dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ends = [t for t in dict.fromkeys([eos, *map(int, stop_ids)]) if t is not None]
    end = ends if len(ends) > 1 else (ends[0] if ends else None)
    return dict(bos_token_id=bos, eos_token_id=end, pad_token_id=eos if pad is None else pad)


@functools.cache
def _take(out_sharding):
    """Jitted `x[i]` along axis 0 (i traced: one compilation per leaf layout, not per layer)."""
    return jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), out_shardings=out_sharding)


def _stack_element(x: jax.Array, i: int) -> jax.Array:
    """Element i of a stacked leaf, laid out as the leaf's other axes are, without gathering the others."""
    if not x.is_fully_addressable and x.is_fully_replicated:
        return x.addressable_data(0)[i]  # every process holds it whole: a local slice
    out = None
    if isinstance(x.sharding, NamedSharding):
        spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        out = NamedSharding(x.sharding.mesh, PartitionSpec(*spec[1:]))
    return _take(out)(x, np.int32(i))


DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def save_hf(
    model: Llama,
    cfg: ModelConfig,
    folder,
    tokenizer=None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    stop_ids=(),
    source=None,
) -> None:
    """Writes `model` as a Hugging Face folder; see `save_params`."""
    params = {tuple(k): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    save_params(params, cfg, folder, tokenizer, max_shard_bytes=max_shard_bytes, stop_ids=stop_ids, source=source)


def save_params(
    params: Mapping[tuple, jax.Array],
    cfg: ModelConfig,
    folder,
    tokenizer=None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    stop_ids=(),
    source=None,
) -> None:
    """Writes config.json, generation_config.json, safetensors files of at most `max_shard_bytes`
    (more than one: with model.safetensors.index.json) and the tokenizer, one tensor at a time.
    config.json is `source`'s (the folder the model was imported from, when it describes this model: its
    family, a Mistral's sliding window and full context, fields transformers keeps) with this folder's
    token ids and dtype; else one written from `cfg` (Gemma3ForCausalLM with Gemma's norms, Qwen3ForCausalLM with q/k
    norms, Qwen2ForCausalLM with q/k/v bias, else MistralForCausalLM with a sliding window, else LlamaForCausalLM).

    `params` maps our parameter paths to (possibly sharded) arrays. Nothing is gathered whole: each
    tensor (one layer of a stacked leaf) is brought to the host only when it is written. When the
    model spans several processes every process must call this (gathering a tensor is then
    collective) and process 0 writes all files; a model every process holds whole may be saved by
    process 0 alone. config.json and generation_config.json carry the tokenizer's bos/eos/pad ids
    (eos with the end-of-turn `stop_ids`, `token_ids_of`), so `generate()` in transformers and
    `proxykd serve` stop at them by themselves."""
    plain = "MistralForCausalLM" if cfg.windowed else "LlamaForCausalLM"  # (a Mistral slides on every layer)
    arch = "Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.qkv_bias else plain
    arch = GEMMA3 if cfg.sandwich_norms else arch
    folder = pathlib.Path(folder)
    writer = jax.process_index() == 0
    where: dict[str, tuple[tuple, int | None, TensorMap]] = {}
    for key in params:
        tmap = tensor_map(key, cfg)
        if tmap.shape != tuple(params[key].shape):
            raise ValueError(f"parameter {key} has shape {tuple(params[key].shape)}, the config implies {tmap.shape}.")
        for i, name in enumerate(tmap.names):
            where[name] = (key, i if tmap.stacked else None, tmap)
    expected = _hf_shapes(cfg)
    if set(where) != set(expected):
        raise ValueError(f"model parameters do not match the config: {sorted(set(where) ^ set(expected))[:4]}.")
    tensors = {name: (expected[name], np.dtype(params[where[name][0]].dtype)) for name in expected}

    def fetch(name: str):
        key, i, tmap = where[name]
        value = host_value(params[key] if i is None else _stack_element(params[key], i))
        return tmap.to_hf(value) if writer else None

    token_ids = token_ids_of(tokenizer, stop_ids)
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
        config = _hf_config(cfg, arch, token_ids)
        like = source_config(source, cfg)
        if like is not None:
            # (and top-level RoPE, which readers before transformers 5 need: a v5 source has rope_parameters only)
            ours = [k for k in token_ids if config[k] is not None] + [
                "dtype",
                "torch_dtype",
                "rope_theta",
                "rope_scaling",
            ]
            ours += ["rope_local_base_freq"] if arch == GEMMA3 else []
            config = {**like, **{k: config[k] for k in ours}}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        generation = {k: v for k, v in token_ids.items() if v is not None}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_sharded(folder, tensors, fetch, max_shard_bytes=max_shard_bytes, write=writer)
    if writer and tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
