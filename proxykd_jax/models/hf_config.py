"""Hugging Face config.json <-> `ModelConfig` for Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, SmolLM3 and Phi-3
causal LMs.

`config_from_hf` / `read_config` read a config.json as transformers does: each family's class defaults for the keys it
leaves out, its nulls, and the keys its modelling code ignores (`models.hf_families`: Mistral's, Qwen2's and Phi-3's
attention_bias / mlp_bias...), RoPE (`_rope_scaling`: linear, llama3, YaRN with transformers 5's defaults; old
top-level or v5 `rope_parameters` keys), Gemma's fields (Gemma 3's per-layer-type RoPE, Gemma 2's and any Gemma's
soft-caps: `attn_softcap`, `logit_softcap`), and the sliding windows
(`hf_families.sliding_window`: Mistral's on every layer; Qwen's with `use_sliding_window` on the layers its
`layer_types` or `max_window_layers` name; Gemma 3's `layer_types` or `sliding_window_pattern`, its sliding layers with
their own RoPE base; Gemma 2's `layer_types`, by default every other layer; SmolLM3's with `use_sliding_window` on
its `layer_types`' sliding layers, by default those without RoPE, all of them or none where every layer has RoPE), and
SmolLM3's `no_rope_layers` (`rope_layers`; by default every 4th layer without).
Phi-3's (Phi-3.5, Phi-4-mini): `partial_rotary_factor`, longrope (`_rope_scaling`: its short and long factors, the
top-level original_max_position_embeddings, attention_factor resolved) and Mistral's window on every layer.
`max_seq_len` is the model's context (`max_position_embeddings`); a window at least that long is no window. Gemma's
bidirectional attention is refused, and so is what transformers cannot run (query heads not a
multiple of the key/value heads, an odd head, a null sliding_window for sliding layers), each naming its config.json
key. `_hf_config` writes an export's config.json back (`_rope_to_hf`; Mistral: its window; Qwen: `use_sliding_window`
and `layer_types`; SmolLM3: `no_rope_layers` too; Gemma `_gemma3_config`, `_gemma2_config`: their `sliding_window`;
Phi-3 `_phi3_config`),
and `source_config` is a source folder's config.json where it describes the model exported. The weights, tokenizer and
generation_config.json are `models.hf`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib

from proxykd_jax.models import hf_families as families
from proxykd_jax.models.hf_families import (  # noqa: F401 (re-exported)
    GEMMA2,
    GEMMA3,
    PHI3,
    SMOLLM3,
    SUPPORTED,
    sliding_window,
)
from proxykd_jax.models.llama import ModelConfig

log = logging.getLogger(__name__)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """transformers' YaRN `get_mscale`: 1 + 0.1 * mscale * ln(factor) (1 for a factor up to 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _longrope_attention(factor: float, original: int) -> float:
    """transformers' longrope attention_factor for a `factor` (the context over `original`) without one given."""
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _original_max(rope: dict, hf: dict) -> int:
    """A Llama-3 or YaRN RoPE dict's original_max_position_embeddings, else the context's, as transformers 5 reads
    it (for these families a top-level original_max_position_embeddings is not read: Phi-3's is)."""
    return int(rope.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 2048))


def _rope_scaling(rope: dict, hf: dict, arch: str = "") -> tuple | None:
    """`ModelConfig.rope_scaling` of a config.json's RoPE dict, with transformers 5's defaults filled in as its
    `modeling_rope_utils` does (YaRN: original_max_position_embeddings the context, factor the context over it,
    attention_factor from mscale / mscale_all_dim or factor, beta_fast 32, beta_slow 1, truncate). A Phi-3's
    (`arch`) is default or longrope ("su" and "yarn" its old names), its original_max_position the top-level
    original_max_position_embeddings, attention_factor from factor (else the context over the original)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if arch == PHI3:
        rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type
        if rope_type not in (None, "default", "longrope"):
            raise ValueError(
                f"config.json rope type {rope_type!r} is not one a Phi3ForCausalLM runs; supported: default, longrope."
            )
    if rope_type in (None, "default"):
        return None
    if rope_type == "longrope" and arch == PHI3:
        original = int(hf["original_max_position_embeddings"])
        factor = rope.get("factor") or int(hf["max_position_embeddings"]) / original
        attention_factor = rope.get("attention_factor") or _longrope_attention(float(factor), original)
        factors = [tuple(float(f) for f in rope[k]) for k in ("short_factor", "long_factor")]
        return ("longrope", original, float(attention_factor), *factors)
    if rope_type == "linear":
        return ("linear", float(rope["factor"]))
    if rope_type == "llama3":
        return (
            "llama3",
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
            _original_max(rope, hf),
        )
    if rope_type == "yarn":
        original = _original_max(rope, hf)
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
    phi3 = " (and longrope on a Phi3ForCausalLM)" if rope_type in ("longrope", "su") else ""
    raise ValueError(
        f"config.json rope type {rope_type!r}{why} is not supported; supported: default, linear, llama3, yarn{phi3}."
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
    top-level one; the family's defaults for the keys it leaves out: `hf_families.with_defaults`)."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise ValueError(
            f"Unsupported architecture {archs or hf.get('model_type')!r}; supported: {', '.join(SUPPORTED)}."
        )
    gemma, given = {}, hf
    try:
        hf = families.with_defaults(hf, arch)
        if arch == GEMMA3:
            gemma = families.gemma3_fields(hf)
        elif arch == GEMMA2:
            gemma = families.gemma2_fields(hf)
        d_model, num_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        num_kv_heads, head_dim = _heads(hf, given, arch)
        rope = gemma.pop("full_rope", None) or hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_theta = float(rope.get("rope_theta") or hf["rope_theta"])
        rope_scaling = _rope_scaling(rope, hf, arch)
        partial = float(rope.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0)
        if partial != 1.0 and arch != PHI3:
            raise ValueError(
                f"config.json sets partial_rotary_factor={partial} (RoPE on part of each head), which is supported on "
                "a Phi3ForCausalLM only."
            )
        if int(head_dim * partial) % 2 or int(head_dim * partial) < 2:
            raise ValueError(
                f"config.json's partial_rotary_factor={partial} rotates int(head_dim * factor) = "
                f"{int(head_dim * partial)} dims of its {head_dim}-dim heads, which RoPE cannot rotate in halves "
                "(transformers fails on it); set head_dim or partial_rotary_factor so that it is even."
            )
        half = int(head_dim * partial) // 2  # (rotated frequencies)
        lengths = {len(f) for f in rope_scaling[3:]} if rope_scaling and rope_scaling[0] == "longrope" else set()
        if lengths and lengths != {half}:
            raise ValueError(
                f"config.json's longrope short_factor and long_factor give {sorted(lengths)} factors where each "
                f"rotated frequency needs one (int(head_dim * partial_rotary_factor) / 2 = {half}), which transformers "
                "refuses; fix the factors or partial_rotary_factor."
            )
        if hf.get("attention_bias"):  # (where the family reads it: `hf_families.IGNORED`)
            raise ValueError("config.json sets attention_bias=true (bias on o_proj too), which is not supported.")
        if hf.get("mlp_bias"):
            raise ValueError("config.json sets mlp_bias=true (biases on the MLP projections), which is not supported.")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish") and not gemma:
            raise ValueError(f"config.json sets hidden_act={act!r}; only silu (SwiGLU) is supported.")
        max_seq_len = int(hf["max_position_embeddings"])
        window = families.window_of(hf, arch)
        window = window if window and window < max_seq_len else None  # one as long as the context: full attention
        if arch == GEMMA2 and window is None:  # (its layer types only say where the window applies)
            gemma["layer_types"] = None
        if arch == SMOLLM3:  # its NoPE layers, and the sliding ones (by default the NoPE ones)
            flags = families.smollm3_rope_layers(hf)
            types = families.smollm3_layer_types(hf, flags) if window else None
            if types and all(flags) and "full_attention" in types:  # (RoPE on every layer: a Mistral's window or none)
                raise ValueError(
                    "config.json's layer_types slide only some layers of a SmolLM3 whose no_rope_layers give every "
                    "layer RoPE, which is not supported; slide every layer or none."
                )
            gemma = dict(rope_layers=flags, layer_types=None if all(flags) else types)
        elif not gemma:  # Qwen's sliding layers (Gemma's layer_types, which also pick the RoPE base: `gemma3_fields`)
            gemma = dict(layer_types=families.qwen_layer_types(hf) if window and arch.startswith("Qwen") else None)
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            d_ff=int(hf["intermediate_size"]),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_eps=float(hf["rms_norm_eps"]),
            qkv_bias=arch == "Qwen2ForCausalLM",
            qk_norm=arch in ("Qwen3ForCausalLM", GEMMA3),
            tie_embeddings=bool(hf["tie_word_embeddings"]),
            max_seq_len=max_seq_len,
            param_dtype=param_dtype,
            dtype=dtype,
            sliding_window=window,
            partial_rotary_factor=partial,
            **gemma,
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks the field {e.args[0]!r} that a {arch} config must have.") from None


def _heads(hf: dict, given: dict, arch: str) -> tuple[int, int]:
    """(key/value heads, head_dim) of a config.json `with_defaults` has read (`given`: as written), refused where
    transformers cannot run them: query heads not a multiple of the key/value heads, or an odd head (RoPE rotates
    halves)."""
    d_model, num_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    num_kv_heads = int(hf["num_key_value_heads"] or num_heads)
    left_out = f", the {arch} default without the key" if "num_key_value_heads" not in given else ""
    if num_heads % num_kv_heads:
        raise ValueError(
            f"config.json's num_attention_heads ({num_heads}) is not a multiple of its num_key_value_heads "
            f"({num_kv_heads}{left_out}), which transformers cannot run; set num_key_value_heads."
        )
    head_dim = int(hf["head_dim"] or d_model // num_heads)
    if head_dim % 2:
        given = "" if hf["head_dim"] else " (hidden_size // num_attention_heads without a head_dim)"
        raise ValueError(
            f"config.json's head_dim is {head_dim}{given}, an odd head RoPE cannot rotate in halves (transformers "
            "fails on it); set an even head_dim."
        )
    return num_kv_heads, head_dim


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


def _gemma_config(config_cls, arch: str, cfg: ModelConfig, kwargs: dict, rope_parameters: dict, **extra) -> dict:
    """config.json of a Gemma `cfg` (`kwargs`: `_hf_config`'s common keys) as `config_cls` writes it: Gemma's fields,
    the layer types and sliding window (without one the context, where the window's attention is the full one), the
    logit soft-cap (null: none), `rope_parameters` and `extra`, then the full layers' RoPE as top-level rope_theta /
    rope_scaling for readers before transformers 5."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("rope_theta", "hidden_act", "rms_norm_eps")}
    hf_cfg = config_cls(
        **kwargs,
        rms_norm_eps=cfg.rms_eps,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
        sliding_window=cfg.sliding_window or cfg.max_seq_len,
        layer_types=list(cfg.layer_types or ["full_attention"] * cfg.num_layers),
        rope_parameters=rope_parameters,
        attention_bias=False,
        final_logit_softcapping=cfg.logit_softcap,
        **extra,
    )
    out = hf_cfg.to_dict()
    out["architectures"] = [arch]
    out["dtype"] = out["torch_dtype"] = cfg.param_dtype
    out["rope_theta"] = cfg.rope_theta
    out["rope_scaling"] = None if cfg.rope_scaling is None else _legacy_scaling(cfg)
    return out


def _full_rope(cfg: ModelConfig) -> dict:
    """The full-attention layers' RoPE dict as transformers 5 writes it."""
    if cfg.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {**_rope_to_hf(cfg.rope_scaling), "rope_theta": cfg.rope_theta}


def _legacy_scaling(cfg: ModelConfig) -> dict:
    """A scaled RoPE as the top-level `rope_scaling` of readers before transformers 5 (`type` and the parameters)."""
    scaling = {k: v for k, v in _full_rope(cfg).items() if k != "rope_theta"}
    return {"type": scaling["rope_type"], **scaling}


def _gemma3_config(cfg: ModelConfig, kwargs: dict) -> dict:
    """config.json of a Gemma 3 `cfg` (`_gemma_config`): RoPE keyed by layer type as transformers 5 writes it, and the
    sliding layers' base as top-level rope_local_base_freq too; no attention cap (`ModelConfig._check_gemma`)."""
    from transformers import Gemma3TextConfig

    if cfg.rope_scaling is not None and cfg.rope_scaling[0] == "yarn" and not cfg.rope_scaling[5]:
        raise ValueError(
            "model.rope_scaling sets YaRN's truncate to False, which a Gemma 3 export cannot keep (transformers runs a "
            "Gemma 3's YaRN truncated whatever config.json says); set it to True."
        )
    local_theta = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
    rope = {"full_attention": _full_rope(cfg), "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}
    out = _gemma_config(Gemma3TextConfig, GEMMA3, cfg, kwargs, rope)
    out["rope_local_base_freq"] = local_theta
    return out


def _gemma2_config(cfg: ModelConfig, kwargs: dict) -> dict:
    """config.json of a Gemma 2 `cfg` (`_gemma_config`): one RoPE dict for every layer and the attention cap."""
    from transformers import Gemma2Config

    if cfg.d_model % cfg.num_heads:
        raise ValueError(
            f"model.d_model ({cfg.d_model}) is not a multiple of model.num_heads ({cfg.num_heads}), which "
            "transformers' Gemma2Config refuses, so a Gemma 2 model of this shape could not be exported; pick a "
            "d_model that is."
        )
    return _gemma_config(Gemma2Config, GEMMA2, cfg, kwargs, _full_rope(cfg), attn_logit_softcapping=cfg.attn_softcap)


def is_phi3(cfg: ModelConfig) -> bool:
    """Whether `cfg` has Phi-3's numerics (partial rotary or longrope), which only a Phi3ForCausalLM holds."""
    return cfg.partial_rotary_factor != 1.0 or (cfg.rope_scaling is not None and cfg.rope_scaling[0] == "longrope")


def _phi3_config(cfg: ModelConfig, kwargs: dict) -> dict:
    """config.json of a Phi-3 `cfg` (`kwargs`: `_hf_config`'s common keys): its window on every layer, and RoPE as
    transformers 5 writes it (`rope_parameters`) and as readers before it read it: top-level rope_theta,
    partial_rotary_factor, original_max_position_embeddings (the context without longrope) and a `rope_scaling` of
    the type and factors, with attention_factor only where it is not the one transformers derives from the context
    over the original."""
    from transformers import Phi3Config

    scaling = cfg.rope_scaling
    original = scaling[1] if scaling else cfg.max_seq_len
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.partial_rotary_factor}
    legacy = None
    if scaling is not None:
        factors = {"short_factor": list(scaling[3]), "long_factor": list(scaling[4])}
        if not math.isclose(scaling[2], _longrope_attention(cfg.max_seq_len / original, original), rel_tol=1e-12):
            factors["attention_factor"] = scaling[2]
        rope.update(factors, rope_type="longrope", original_max_position_embeddings=original)
        legacy = {"type": "longrope", **factors}
    window = cfg.sliding_window if cfg.windowed else None
    kwargs = {k: v for k, v in kwargs.items() if k != "rope_theta"}
    hf_cfg = Phi3Config(
        **kwargs, rope_parameters=rope, original_max_position_embeddings=original, sliding_window=window
    )
    out = hf_cfg.to_dict()
    out["architectures"] = [PHI3]
    out["dtype"] = out["torch_dtype"] = cfg.param_dtype
    out.update(rope_theta=cfg.rope_theta, partial_rotary_factor=cfg.partial_rotary_factor, rope_scaling=legacy)
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
    if arch == GEMMA2:
        return _gemma2_config(cfg, kwargs)
    if arch == PHI3:
        return _phi3_config(cfg, kwargs)
    if cfg.rope_scaling is not None:
        kwargs["rope_scaling"] = _rope_to_hf(cfg.rope_scaling)
    window = cfg.sliding_window if cfg.windowed else None
    if arch == SMOLLM3:
        from transformers import SmolLM3Config

        types = list(cfg.layer_types or [("sliding_attention" if window else "full_attention")] * cfg.num_layers)
        hf_cfg = SmolLM3Config(
            no_rope_layers=[int(f) for f in cfg.rope_layers or [True] * cfg.num_layers],
            use_sliding_window=window is not None,
            sliding_window=window,
            layer_types=types,
            attention_bias=False,
            mlp_bias=False,
            **kwargs,
        )
    elif arch in ("Qwen3ForCausalLM", "Qwen2ForCausalLM"):
        types = list(cfg.layer_types or ["sliding_attention"] * cfg.num_layers) if window else None
        qwen = dict(use_sliding_window=window is not None, sliding_window=window, layer_types=types)
        if types:  # for readers before `layer_types` (transformers < 4.53): layers from this one on slide
            qwen["max_window_layers"] = types.index("sliding_attention")
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
