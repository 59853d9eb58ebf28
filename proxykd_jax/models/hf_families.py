"""What each supported Hugging Face family's config.json means beyond its numbers: transformers' class defaults for the
keys it leaves out (`DEFAULTS`, `with_defaults`), the keys a family's modelling code never reads (`IGNORED`), and
which layers slide or skip RoPE (`sliding_window`, `gemma3_fields`, `qwen_layer_types`, the SmolLM3 readers).

`with_defaults` reads a config.json as transformers 5's config classes do: a key left out is the class default
(Mistral's window 4096, Qwen's and Gemma 3's key/value heads, each family's context...); a null is what the class makes
of it where its field is optional (key/value heads: the query heads; a head: hidden_size / heads; sliding_window: no
window) and is refused, naming the key, where transformers' strict typed fields refuse it, or where its model cannot
run it (a null sliding_window where layers are named sliding, or any on a Gemma 3: `window_of`). The RoPE dicts are
read by `hf_config`, which re-exports `SUPPORTED`, `GEMMA3`, `PHI3`, `SMOLLM3` and `sliding_window`.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

LLAMA, MISTRAL, QWEN2, QWEN3 = "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"
GEMMA2, GEMMA3, SMOLLM3, PHI3 = "Gemma2ForCausalLM", "Gemma3ForCausalLM", "SmolLM3ForCausalLM", "Phi3ForCausalLM"
SUPPORTED = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, SMOLLM3, PHI3)
GEMMAS = (GEMMA2, GEMMA3)

# transformers 5's class defaults (models/<family>/configuration_<family>.py) of the keys each family's modelling code
# reads; None: derived (num_key_value_heads: num_attention_heads; head_dim: hidden_size / num_attention_heads).
# hidden_size, intermediate_size, num_hidden_layers, num_attention_heads and vocab_size have none here: a config.json
# must give its shapes.
_COMMON = dict(
    num_key_value_heads=None,
    head_dim=None,
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)
_QWEN = dict(num_key_value_heads=32, max_position_embeddings=32_768, use_sliding_window=False, sliding_window=4096)
DEFAULTS = {
    LLAMA: dict(_COMMON, attention_bias=False, mlp_bias=False),
    MISTRAL: dict(_COMMON, num_key_value_heads=8, max_position_embeddings=131_072, sliding_window=4096),
    QWEN2: dict(_COMMON, **_QWEN, max_window_layers=28),
    QWEN3: dict(_COMMON, **_QWEN, max_window_layers=28, head_dim=128, attention_bias=False),
    PHI3: dict(_COMMON, max_position_embeddings=4096, original_max_position_embeddings=4096, rms_norm_eps=1e-5),
    SMOLLM3: dict(
        _COMMON,
        num_key_value_heads=4,
        max_position_embeddings=32_768,
        rope_theta=2_000_000.0,  # its default_theta
        tie_word_embeddings=True,
        use_sliding_window=False,
        no_rope_layer_interval=4,
        attention_bias=False,
        mlp_bias=False,
    ),
    GEMMA3: dict(
        {k: v for k, v in _COMMON.items() if k != "hidden_act"},  # (it reads hidden_activation)
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=131_072,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,  # default_theta: global, local
        rope_local_base_freq=10_000.0,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256,
        sliding_window=4096,
        attention_bias=False,
    ),
    GEMMA2: dict(
        {k: v for k, v in _COMMON.items() if k != "hidden_act"},  # (it reads hidden_activation)
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        attention_bias=False,
    ),
}
# Keys whose class field is optional: a null is read as the derived value or no window, as transformers reads it
_OPTIONAL = dict(num_key_value_heads=(LLAMA, QWEN2, QWEN3, PHI3, SMOLLM3), head_dim=(LLAMA, MISTRAL))
_OPTIONAL["sliding_window"] = SUPPORTED
_LENIENT = ("rope_theta", "rope_local_base_freq")  # (a null base transformers cannot run: read as left out, as before)
# Keys a family's modelling code never reads (its projections' biases fixed: Qwen2's q/k/v biased, the others none)
IGNORED = {MISTRAL: ("attention_bias", "mlp_bias"), QWEN2: ("attention_bias", "mlp_bias")}
IGNORED.update({PHI3: IGNORED[MISTRAL], QWEN3: ("mlp_bias",), GEMMA3: ("mlp_bias",), GEMMA2: ("mlp_bias",)})
_GEMMA3_PATTERN = 6  # sliding_window_pattern's default: every 6th layer full, the others sliding
_OPTIONAL.update(final_logit_softcapping=(GEMMA2, GEMMA3), attn_logit_softcapping=(GEMMA2, GEMMA3))  # null: no cap


def _default_words(key: str, default) -> str:
    """A `DEFAULTS` value in words, for a refusal (None: what transformers derives it from)."""
    if default is not None:
        return repr(default)
    return "num_attention_heads" if key == "num_key_value_heads" else "hidden_size / num_attention_heads"


def with_defaults(hf: dict, arch: str) -> dict:
    """A config.json dict of `arch` as transformers' config class reads it: `DEFAULTS` for the keys it leaves out; a
    null where the class field is optional the derived value (None) or no window, a RoPE base's null the default,
    another null refused; keys the family ignores (`IGNORED`) logged and dropped."""
    defaults = DEFAULTS[arch]
    for key, value in hf.items():
        if value is None and key in defaults and key not in _LENIENT and arch not in _OPTIONAL.get(key, ()):
            raise ValueError(
                f"config.json sets {key} to null, which transformers' {arch} refuses or cannot run; give it a "
                f"value, or leave the key out for its default ({_default_words(key, defaults[key])})."
            )
    ignored = [k for k in IGNORED.get(arch, ()) if hf.get(k)]
    if ignored:
        log.info("config.json sets %s, which a %s ignores (fixed biases), as transformers does", ignored, arch)
    kept = {k: v for k, v in hf.items() if k not in IGNORED.get(arch, ()) and (v is not None or k in _OPTIONAL)}
    return {**defaults, **kept}


def gemma3_layer_types(hf: dict) -> list:
    """A Gemma 3 config.json's `layer_types`, or transformers' from `sliding_window_pattern` without them."""
    pattern = int(hf.get("sliding_window_pattern") or _GEMMA3_PATTERN)
    layers = int(hf["num_hidden_layers"])
    return list(hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
    ])  # fmt: skip


def gemma2_layer_types(hf: dict) -> list:
    """A Gemma 2 config.json's `layer_types`, or transformers' without them: every other layer sliding, from the
    first."""
    layers = int(hf["num_hidden_layers"])
    return list(
        hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    )


def gemma_layer_types(hf: dict, arch: str) -> list:
    """A Gemma 2's or Gemma 3's layer types (`gemma2_layer_types`, `gemma3_layer_types`)."""
    return gemma2_layer_types(hf) if arch == GEMMA2 else gemma3_layer_types(hf)


def _gemma_common(hf: dict, arch: str) -> dict:
    """The `ModelConfig` fields a Gemma 2 and a Gemma 3 config.json (`with_defaults`' dict) both have: Gemma's norms,
    scaled embeddings, GeGLU, the score scalar, the layer types (None where none slides) and the soft-caps (a null:
    none; a Gemma 3's attention cap ignored, as transformers 5's Gemma 3 attention never applies it)."""
    name = "Gemma 2" if arch == GEMMA2 else "Gemma 3"
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config.json sets use_bidirectional_attention=true (an encoder), which is not supported.")
    act = hf.get("hidden_activation")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"config.json sets hidden_activation={act!r}; a {name} must use gelu_pytorch_tanh.")
    caps = {}
    for key, field in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "logit_softcap")):
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"config.json sets {key}={value!r}; it must be a positive number, or null for no cap.")
        caps[field] = None if value is None else float(value)
    if arch == GEMMA3 and caps["attn_softcap"] is not None:  # (its attention keeps the value and never applies it)
        log.info("config.json sets attn_logit_softcapping, which a %s ignores, as transformers 5 does", arch)
        caps["attn_softcap"] = None
    types = gemma_layer_types(hf, arch)
    scalar = int(hf["query_pre_attn_scalar"])
    return dict(
        norm_plus_one=True,
        embed_scale=True,
        activation="gelu_tanh",
        sandwich_norms=True,
        query_pre_attn_scalar=None if scalar == int(hf["head_dim"]) else scalar,
        layer_types=tuple(types) if "sliding_attention" in types else None,  # none sliding: every layer full
        **caps,
    )


def gemma2_fields(hf: dict) -> dict:
    """The `ModelConfig` fields of a Gemma 2 config.json (`with_defaults`' dict) beyond the Llama ones
    (`_gemma_common`): its RoPE is one dict for every layer, read as a Llama's."""
    return _gemma_common(hf, GEMMA2)


def gemma3_fields(hf: dict) -> dict:
    """The `ModelConfig` fields of a Gemma 3 config.json (`with_defaults`' dict) beyond the Llama ones, and
    "full_rope", the full-attention layers' RoPE dict, read as transformers 5's `convert_rope_params_to_dict`
    does: `rope_parameters` keyed by layer type, updated by a top-level `rope_scaling` (full layers), each type's
    rope_theta else top-level `rope_theta` (full) / `rope_local_base_freq` (sliding), YaRN's truncate left out (its
    `_compute_yarn_parameters` looks for it beside the layer types' dicts, so a Gemma 3's YaRN is always truncated)."""
    common = _gemma_common(hf, GEMMA3)
    params = hf.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or {"rope_type": "default"}, **(hf.get("rope_scaling") or {}))
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    full.setdefault("rope_theta", hf["rope_theta"])
    full.pop("truncate", None)  # (transformers 5 runs it as true)
    local.setdefault("rope_theta", hf["rope_local_base_freq"])
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(
            f"config.json's rope_parameters scale the sliding_attention layers' RoPE ({local}), which is not "
            "supported; only their rope_theta may differ."
        )
    sliding = common["layer_types"] is not None  # (none sliding: every layer the full RoPE, as ours)
    return dict(common, full_rope=full, rope_local_theta=float(local["rope_theta"]) if sliding else None)


def qwen_layer_types(hf: dict) -> tuple:
    """A Qwen2 / Qwen3 config.json's layer types, as transformers reads them: its `layer_types`, else sliding from
    layer `max_window_layers` on."""
    layers = int(hf["num_hidden_layers"])
    return tuple(hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf["max_window_layers"]) else "full_attention" for i in range(layers)
    ])  # fmt: skip


def smollm3_rope_layers(hf: dict) -> tuple:
    """A SmolLM3 config.json's `no_rope_layers` (1: RoPE, 0: none) as bools, or transformers' without them: every
    `no_rope_layer_interval`-th layer without RoPE."""
    layers = int(hf["num_hidden_layers"])
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = int(hf["no_rope_layer_interval"])
        flags = [(i + 1) % interval != 0 for i in range(layers)]
    if len(flags) < layers or any(f not in (0, 1) for f in flags):
        raise ValueError(
            f"config.json's no_rope_layers must list 1 (RoPE) or 0 (no RoPE) for each of the {layers} layers, "
            f"got {flags!r}."
        )
    return tuple(bool(f) for f in flags[:layers])


def smollm3_layer_types(hf: dict, rope_layers: tuple) -> tuple:
    """A SmolLM3 config.json's layer types, as transformers reads them: its `layer_types`, else sliding on the layers
    without RoPE where `use_sliding_window` and `sliding_window` are set."""
    layers = int(hf["num_hidden_layers"])
    slide = bool(hf.get("use_sliding_window")) and hf.get("sliding_window") is not None
    return tuple(hf.get("layer_types") or [
        "sliding_attention" if slide and not rope else "full_attention" for rope in rope_layers[:layers]
    ])  # fmt: skip


def sliding_window(hf: dict, arch: str) -> int | None:
    """The attention window a config.json's model runs some layers with, as transformers reads it (None: none; a
    null `sliding_window` is none, and refused where transformers cannot run it: `_refuse_null_window`): Mistral's
    (4096 where the key is left out) and Phi-3's `sliding_window` on every layer; Qwen2's and Qwen3's only with
    `use_sliding_window`, on the layers their `layer_types` name "sliding_attention" (without them: layers from
    `max_window_layers` on); Gemma 3's on its "sliding_attention" layers (`sliding_window_pattern` without
    `layer_types`), 4096 by default; SmolLM3's on its sliding layers (`smollm3_layer_types`)."""
    return window_of(with_defaults(hf, arch), arch)


def window_of(hf: dict, arch: str) -> int | None:
    """`sliding_window` of a config.json dict `with_defaults` has read."""
    window = hf.get("sliding_window")
    if window is None:
        _refuse_null_window(hf, arch)
    if not window or arch == LLAMA:
        return None
    if arch in GEMMAS:
        return int(window) if "sliding_attention" in gemma_layer_types(hf, arch) else None
    if arch == SMOLLM3:
        types = smollm3_layer_types(hf, smollm3_rope_layers(hf))
        if "sliding_attention" in types and not hf.get("use_sliding_window"):  # (its masks slide, flash would not)
            raise ValueError(
                "config.json's layer_types name sliding layers while use_sliding_window is false, which transformers "
                "runs with or without the window by attention kernel; set use_sliding_window, or sliding_window to "
                "null."
            )
        return int(window) if "sliding_attention" in types else None
    if arch in (QWEN2, QWEN3):
        if not hf.get("use_sliding_window") or "sliding_attention" not in qwen_layer_types(hf):
            return None
    return int(window)


def _refuse_null_window(hf: dict, arch: str) -> None:
    """Refuses a null `sliding_window` that transformers 5 cannot run (its sliding layers' mask and cache need the
    window, which it never reads as "no window"): where a Qwen2's, Qwen3's or SmolLM3's `layer_types` name sliding
    layers (without them its layer types slide none), and on every Gemma 2 and Gemma 3, whose model builds the sliding
    mask whatever its layer types. Mistral's and Phi-3's null is no window."""
    if arch in GEMMAS:
        types = gemma_layer_types(hf, arch)
    elif arch in (QWEN2, QWEN3, SMOLLM3):
        types = hf.get("layer_types") or ()
    else:
        return
    named = "layer_types"
    if not hf.get("layer_types") and arch in GEMMAS:
        named += " (sliding_window_pattern without them)" if arch == GEMMA3 else " (every other layer without them)"
    if "sliding_attention" in types:
        use = " with use_sliding_window true" if arch not in GEMMAS else ""
        raise ValueError(
            f"config.json's {named} name sliding_attention layers while sliding_window is null, which transformers' "
            f"{arch} cannot run; set sliding_window to their window{use}, or name every layer full_attention in "
            "layer_types."
        )
    if arch in GEMMAS:
        raise ValueError(
            f"config.json sets sliding_window to null, which transformers' {arch} cannot run even where "
            "its layer_types name no sliding_attention layer; set sliding_window to any window (no layer slides), or "
            "leave it out for its default (4096)."
        )
