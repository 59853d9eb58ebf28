"""The `model` config group: its defaults (`default_config`) and `ModelConfig`, the shape and numerics of one
Llama-family decoder with their checks. It imports no flax: config validation and `proxykd <stage> --help`
read this module alone; `models/llama.py`, the decoder, re-exports its names."""

from __future__ import annotations

import dataclasses
import math
import pkgutil

import jax
import ml_collections
import numpy as np

from proxykd_jax.models.attention import (
    GPU_PLATFORMS,
    IMPLEMENTATIONS,
    PACKED_MAX_SEGMENTS,
    refuse_uncapped,
    refuse_unwindowed,
)

REMAT_POLICIES = ("none", "full", "save_dots", "dots_with_no_batch_dims", "offload")
# The forms of `model.rope_scaling`, each transformers 5's RoPE type of that name (modeling_rope_utils) with every
# parameter that changes the numbers, in this order; YaRN's attention_factor is the resolved one (from mscale and
# mscale_all_dim, or factor, where config.json gives none), its beta_fast / beta_slow the defaults 32 / 1 filled in.
ROPE_SCALING_FORMS = (
    "('llama3', factor, low_freq_factor, high_freq_factor, original_max_position), ('linear', factor) or "
    "('yarn', factor, original_max_position, beta_fast, beta_slow, truncate, attention_factor) or "
    "('longrope', original_max_position, attention_factor, short_factor, long_factor)"
)
ACTIVATIONS = ("silu", "gelu_tanh")  # the gated MLP's: SwiGLU (Llama), GeGLU with tanh-approximated GELU (Gemma 3)
LAYER_TYPES = ("sliding_attention", "full_attention")  # `model.layer_types`' names, transformers'
SLIDING = LAYER_TYPES[0]


def _valid_rope_scaling(value) -> bool:
    """Whether `value` is one of `ROPE_SCALING_FORMS`, every number finite and above 0, truncate a bool."""

    def positive(x) -> bool:
        return (
            isinstance(x, (int, float, np.integer, np.floating))
            and not isinstance(x, (bool, np.bool_))
            and 0 < x < math.inf
        )

    if not isinstance(value, (tuple, list)) or not value:
        return False
    kind, *rest = value
    if kind == "llama3":
        return len(rest) == 4 and all(map(positive, rest))
    if kind == "linear":
        return len(rest) == 1 and positive(rest[0])
    if kind == "yarn":
        if len(rest) != 6:
            return False
        factor, original, beta_fast, beta_slow, truncate, attention_factor = rest
        whole = positive(original) and float(original).is_integer()
        return (
            whole
            and all(map(positive, (factor, beta_fast, beta_slow, attention_factor)))
            and isinstance(truncate, (bool, np.bool_))
        )
    if kind == "longrope":  # Phi-3's: the factors (one per rotated frequency) lists of positive numbers
        if len(rest) != 4:
            return False
        original, attention_factor, short, long = rest
        lists = [f for f in (short, long) if isinstance(f, (tuple, list)) and f and all(map(positive, f))]
        return positive(original) and float(original).is_integer() and positive(attention_factor) and len(lists) == 2
    return False


def _positive_int(x) -> bool:
    """Whether `x` is an integer (not a bool) above 0."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and x > 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one Llama-family decoder."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # None or one of `ROPE_SCALING_FORMS` (see `rope_inv_freq`)
    rms_eps: float = 1e-5
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool | str = "auto"  # resolved to a bool by __post_init__ (see `resolve_scan_layers`)
    remat: str = "none"
    attention: str = "auto"
    attention_segments: int = PACKED_MAX_SEGMENTS
    # Gemma 3 (each default computes what the other families do)
    norm_plus_one: bool = False  # RMSNorms scale by 1 + weight (weights initialised at 0)
    embed_scale: bool = False  # embeddings times sqrt(d_model) (in the compute dtype) before the first layer
    activation: str = "silu"  # one of ACTIVATIONS
    sandwich_norms: bool = False  # RMSNorm on the attention and MLP outputs too, before each residual add
    query_pre_attn_scalar: int | None = None  # attention scores scaled by its ** -0.5 (None: head_dim's)
    layer_types: tuple | None = None  # None, or one of LAYER_TYPES per layer: which layers slide
    rope_local_theta: float | None = None  # RoPE base of the "sliding_attention" layers (unscaled; None: rope_theta's)
    # Mistral, Qwen2 / Qwen3 with use_sliding_window, Gemma 3: a query sees the keys less than this many positions
    # back, on the layer_types' sliding layers (every layer without layer_types); None: no window
    sliding_window: int | None = None
    # SmolLM3: None (RoPE on every layer), or per layer whether it applies RoPE (False: a NoPE layer, q and k unrotated)
    rope_layers: tuple | None = None
    # Phi-3 / Phi-4-mini: RoPE on the first `rotary_dim` = int(head_dim * this) dims of each head, the rest passed
    # through unrotated (1.0: every dim, the other families)
    partial_rotary_factor: float = 1.0
    # Gemma 2 (and a Gemma 3 that sets them): scores or output logits z become cap * tanh(z / cap); None: not capped
    attn_softcap: float | None = None  # attention scores, before the mask and softmax (attn_logit_softcapping)
    logit_softcap: float | None = None  # output logits (final_logit_softcapping)

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "d_ff",
            "attention_segments",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})."
            )
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}.")
        if self.qk_norm and self.qkv_bias:
            raise ValueError(
                "model.qk_norm (Qwen3) with model.qkv_bias (Qwen2) is a model no Hugging Face family holds, so it "
                "could not be exported; set one of them to False."
            )
        if self.rope_scaling is not None:
            if not _valid_rope_scaling(self.rope_scaling):
                raise ValueError(f"model.rope_scaling must be None or {ROPE_SCALING_FORMS}, got {self.rope_scaling!r}.")
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        self._check_rotary()
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}.")
        for name in ("query_pre_attn_scalar", "sliding_window"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ValueError(f"model.{name} must be None or a positive integer, got {value!r}.")
        if self.sliding_window is not None:
            object.__setattr__(self, "sliding_window", int(self.sliding_window))
        for name in ("attn_softcap", "logit_softcap"):
            value = getattr(self, name)
            number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
                value, (bool, np.bool_)
            )
            if value is not None and not (number and 0 < value < math.inf):
                raise ValueError(f"model.{name} must be None or a positive number (the cap), got {value!r}.")
            if value is not None:
                object.__setattr__(self, name, float(value))
        self._check_layer_types()
        self._check_rope_layers()
        self._check_gemma()
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}.")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"model.attention must be one of {', '.join(IMPLEMENTATIONS)}, got {self.attention!r}.")
        if self.windowed:
            refuse_unwindowed(self.attention)
        if self.attn_softcap is not None:
            refuse_uncapped(self.attention)
        object.__setattr__(self, "scan_layers", resolve_scan_layers(self.scan_layers, int(self.num_layers), self.remat))
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"model.{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}.")

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (transformers' int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def windowed(self) -> bool:
        """Whether some layer attends within `sliding_window`."""
        return self.sliding_window is not None and (self.layer_types is None or SLIDING in self.layer_types)

    def _check_rotary(self) -> None:
        """`partial_rotary_factor` (its rotated part of a head even and not empty) and longrope `rope_scaling` (one
        short and one long factor per rotated frequency, stored as tuples of floats) are Phi-3's, a Llama's numerics
        otherwise: with another RoPE scaling or Qwen's, Gemma 3's or SmolLM3's fields they make a model no Hugging
        Face family holds."""
        factor = self.partial_rotary_factor
        number = isinstance(factor, (int, float, np.integer, np.floating)) and not isinstance(factor, (bool, np.bool_))
        if not number or not 0 < factor <= 1:
            raise ValueError(f"model.partial_rotary_factor must be a number in (0, 1], got {factor!r}.")
        object.__setattr__(self, "partial_rotary_factor", float(factor))
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"model.partial_rotary_factor={factor} rotates int(head_dim * factor) = {self.rotary_dim} dims of each "
                "head, which must be even and at least 2; pick another factor."
            )
        longrope = self.rope_scaling is not None and self.rope_scaling[0] == "longrope"
        if longrope:
            kind, original, attention_factor, short, long = self.rope_scaling
            short, long = tuple(map(float, short)), tuple(map(float, long))
            if len(short) != self.rotary_dim // 2 or len(long) != self.rotary_dim // 2:
                raise ValueError(
                    "model.rope_scaling's longrope short_factor and long_factor must give one factor per rotated "
                    f"frequency (rotary_dim / 2 = {self.rotary_dim // 2}), got {len(short)} and {len(long)}."
                )
            object.__setattr__(self, "rope_scaling", (kind, int(original), float(attention_factor), short, long))
            if self.head_dim * self.num_heads != self.d_model:  # (Phi3Config checks the factors against that width)
                raise ValueError(
                    f"model.rope_scaling longrope (Phi-3's) needs model.head_dim * num_heads = d_model, got head_dim "
                    f"{self.head_dim} for d_model {self.d_model}: transformers' Phi-3 checks the factors against "
                    f"d_model / num_heads, so it could not be exported; set head_dim to "
                    f"{self.d_model // self.num_heads}."
                )
        if self.partial_rotary_factor == 1.0 and not longrope:
            return
        others = dict(
            rope_scaling=self.rope_scaling is not None and not longrope,
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            sandwich_norms=self.sandwich_norms,
            layer_types=self.layer_types is not None,
            rope_layers=self.rope_layers is not None,
        )
        on = ", ".join(k for k, v in others.items() if v)
        if on:
            raise ValueError(
                f"model.partial_rotary_factor={self.partial_rotary_factor} and longrope rope_scaling are Phi-3's, and "
                f"with {on} (another family's) they make a model no Hugging Face family holds, so it could not be "
                f"exported; set partial_rotary_factor to 1.0 without longrope, or {on} to the default."
            )

    def _check_layer_types(self) -> None:
        """`layer_types`, one type per layer (stored as a tuple), says which layers `sliding_window` and
        `rope_local_theta` (which need it) apply to; it is set with one of them."""
        types, theta = self.layer_types, self.rope_local_theta
        if types is None and theta is None:
            return
        if types is None or isinstance(types, str) or len(types) != int(self.num_layers):
            raise ValueError(
                f"model.layer_types must list one of {', '.join(LAYER_TYPES)} for each of the {self.num_layers} "
                f"layers when model.rope_local_theta is set, got {types!r}."
            )
        if any(t not in LAYER_TYPES for t in types):
            raise ValueError(f"model.layer_types must name only {', '.join(LAYER_TYPES)}, got {types!r}.")
        object.__setattr__(self, "layer_types", tuple(types))
        if theta is None and self.sliding_window is None:
            raise ValueError(
                "model.layer_types names the layers that model.sliding_window or model.rope_local_theta apply to; "
                "set one of them, or set layer_types to None."
            )
        if theta is not None and not (
            isinstance(theta, (int, float)) and not isinstance(theta, bool) and 0 < theta < math.inf
        ):
            raise ValueError(
                "model.rope_local_theta (the sliding layers' RoPE base) must be None or a positive number, "
                f"got {theta!r}."
            )

    def _check_rope_layers(self) -> None:
        """`rope_layers`, one bool per layer (stored as a tuple; all True, RoPE everywhere, stored as None), is
        SmolLM3's, a Llama's numerics: with Qwen's or Gemma 3's it is a model no Hugging Face family holds."""
        flags = self.rope_layers
        if flags is None:
            return
        if (
            isinstance(flags, str)
            or not isinstance(flags, (tuple, list))
            or len(flags) != int(self.num_layers)
            or any(not isinstance(f, (bool, int, np.bool_, np.integer)) or f not in (0, 1) for f in flags)
        ):
            raise ValueError(
                f"model.rope_layers must list one of 1 / True (RoPE) or 0 / False (no RoPE) for each of the "
                f"{self.num_layers} layers, or be None (RoPE on every layer), got {flags!r}."
            )
        flags = tuple(bool(f) for f in flags)
        object.__setattr__(self, "rope_layers", None if all(flags) else flags)
        if self.rope_layers is not None and (self.qkv_bias or self.qk_norm or self.rope_local_theta is not None):
            raise ValueError(
                "model.rope_layers (SmolLM3's layers without RoPE) with qkv_bias (Qwen2), qk_norm (Qwen3, Gemma 3) or "
                "rope_local_theta is a model no Hugging Face family holds, so it could not be exported; set "
                "rope_layers to None or those to their defaults."
            )

    @property
    def gemma(self) -> bool:
        """Whether this is a Gemma model (`_check_gemma`: Gemma 3 with qk_norm, Gemma 2 without)."""
        return self.sandwich_norms

    def _check_gemma(self) -> None:
        """Gemma's numerics come together (norm_plus_one, embed_scale, gelu_tanh, sandwich_norms; Gemma 3 adds
        qk_norm and may give its sliding layers their own RoPE base, Gemma 2 has neither): a part of them is a model
        no Hugging Face family holds. Soft-capping is Gemma's only: the logits' (`logit_softcap`) on either, the
        attention scores' (`attn_softcap`) on a Gemma 2 (transformers' Gemma 3 keeps the value and never applies it)."""
        parts = dict(
            norm_plus_one=self.norm_plus_one,
            embed_scale=self.embed_scale,
            activation=self.activation == "gelu_tanh",
            sandwich_norms=self.sandwich_norms,
        )
        extras = self.query_pre_attn_scalar is not None
        if (any(parts.values()) or extras) and not all(parts.values()):
            off = [k for k, v in parts.items() if not v]
            raise ValueError(
                "model.norm_plus_one, embed_scale, activation='gelu_tanh' and sandwich_norms make a Gemma model "
                "together (with qk_norm a Gemma 3, without it a Gemma 2; query_pre_attn_scalar only with them), and a "
                "part of them is a model no Hugging Face family holds, so it could not be exported; set all of them or "
                f"none ({', '.join(off)} not set)."
            )
        if self.rope_local_theta is not None and not (self.gemma and self.qk_norm):
            raise ValueError(
                "model.rope_local_theta (the sliding layers' own RoPE base) is Gemma 3's (Gemma's numerics with "
                "qk_norm); on another model no Hugging Face family holds it, so it could not be exported; set it to "
                "None."
            )
        capped = [name for name in ("attn_softcap", "logit_softcap") if getattr(self, name) is not None]
        if capped and not self.gemma:
            raise ValueError(
                f"model.{capped[0]} (logit soft-capping) is Gemma's (Gemma 2's, or a Gemma 3 that sets it); on a model "
                "without Gemma's numerics no Hugging Face family holds it, so it could not be exported; set it to None."
            )
        if self.attn_softcap is not None and self.qk_norm:
            raise ValueError(
                "model.attn_softcap on a Gemma 3 model (Gemma's numerics with qk_norm) is a model no Hugging Face "
                "family holds (transformers' Gemma 3 never caps its attention scores), so it could not be exported; "
                "set it to None, or qk_norm to False (a Gemma 2)."
            )
        if self.layer_types is not None and not (
            self.qkv_bias or self.qk_norm or self.rope_layers is not None or self.gemma
        ):
            raise ValueError(
                "model.layer_types (sliding and full layers) on a model without qkv_bias (Qwen2), qk_norm (Qwen3), "
                "rope_layers (SmolLM3) or Gemma's numerics is a model no Hugging Face family holds, so it could not "
                "be exported; set layer_types to None (every layer slides, as Mistral's)."
            )
        if self.sandwich_norms and self.sliding_window is not None and self.layer_types is None:
            raise ValueError(
                "model.sliding_window on a Gemma model needs model.layer_types (which layers slide), as its "
                "config.json has them; set layer_types."
            )

    def num_params(self) -> int:
        """Total parameter count (embedding counted once when tied)."""
        d, h, g, e, f = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.d_ff
        attn = d * h * e + 2 * d * g * e + h * e * d + (h * e + 2 * g * e if self.qkv_bias else 0)
        attn += 2 * e if self.qk_norm else 0
        block = attn + 3 * d * f + (4 if self.sandwich_norms else 2) * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * block + d + head

    def to_config(self) -> ml_collections.ConfigDict:
        """This config as a ConfigDict with the fields of `default_config()`."""
        cd = default_config()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            cd[field.name] = list(value) if isinstance(value, tuple) else value
        return cd

    @classmethod
    def from_config(cls, cd) -> ModelConfig:
        """Builds a ModelConfig from a ConfigDict (or mapping) with the fields of `default_config()`
        (a config group's `init_from`, where its weights come from, is not a shape field: skipped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in cd.items() if k != "init_from"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown model config field(s) {unknown}; known fields are {sorted(known)}.")
        for name in ("rope_scaling", "layer_types", "rope_layers"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)


# Unrolled layers make the CPU train step 10-15% faster at 4 layers (benchmarks/train_step.py
# --scanned) and compile about as fast up to a handful of layers; compile time then grows with
# depth (benchmarks/compile_time.py: 17.4 s scanned vs 96.1 s unrolled at 32 layers). Under remat
# only the scan saves memory on XLA:CPU (6 layers, full remat: temporaries 18.5 of 20.0 MB unrolled,
# 4.7 of 26.3 MB scanned), so "auto" scans whenever a remat policy is set. On an H200 the scan cost
# the 1.1B student's train step 15% (benchmarks/gpu_check.py: MFU 39.6-40.4% scanned vs 46.5-47.3%
# unrolled at 16 layers, compile 8-15 s either way): there "auto" unrolls at any depth without remat.
AUTO_UNROLL_MAX_LAYERS = 8


def default_platform() -> str:
    """jax's default platform without initialising a backend (configs are built before
    `jax.distributed.initialize`, which must come first): the initialised backend's when there is one,
    else the first of `jax_platforms` (JAX_PLATFORMS), else "gpu" when a CUDA or ROCm plugin is
    installed, else "cpu"."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return jax.default_backend()
    if jax.config.jax_platforms:
        return jax.config.jax_platforms.split(",")[0].strip().lower()
    try:
        import jax_plugins
    except ImportError:
        return "cpu"
    names = [m.name for m in pkgutil.iter_modules(getattr(jax_plugins, "__path__", []))]
    return "gpu" if any("cuda" in n or "rocm" in n for n in names) else "cpu"


def resolve_scan_layers(value, num_layers: int, remat: str = "none", platform: str | None = None) -> bool:
    """`model.scan_layers` as a bool: True / False as given; "auto" unrolls models without
    rematerialisation that have at most `AUTO_UNROLL_MAX_LAYERS` layers or run on a GPU (`platform`,
    default `default_platform()`), and scans the rest."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() == "auto":
        if remat != "none":
            return True
        platform = platform or default_platform()
        return num_layers > AUTO_UNROLL_MAX_LAYERS and platform not in GPU_PLATFORMS
    raise ValueError(f"model.scan_layers must be True, False or 'auto', got {value!r}.")


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `model` config group (a tiny model; presets override every shape field)."""
    cd = ml_collections.ConfigDict()
    cd.vocab_size = 512  # vocabulary size: embedding rows, at least the tokenizer's tokens (padded rows are fine)
    cd.d_model = 64  # residual stream width D
    cd.num_layers = 2  # number of decoder blocks
    cd.num_heads = 4  # query heads H
    cd.num_kv_heads = 2  # key/value heads G (grouped-query attention; H % G == 0)
    cd.head_dim = 16  # per-head width E
    cd.d_ff = 128  # SwiGLU hidden width F
    cd.rope_theta = 10000.0  # RoPE base
    cd.rope_scaling = ml_collections.FieldReference(
        None, field_type=tuple
    )  # None or ("linear" | "llama3" | "yarn" | "longrope", ...): models/config.py ROPE_SCALING_FORMS
    cd.rms_eps = 1e-5  # RMSNorm epsilon
    cd.qkv_bias = False  # bias on q/k/v projections (Qwen2)
    cd.qk_norm = False  # per-head RMSNorm of queries and keys after the projection, before RoPE (Qwen3)
    cd.tie_embeddings = False  # share the input embedding with the output layer
    cd.max_seq_len = 2048  # longest sequence the model is used with
    cd.param_dtype = "float32"  # storage dtype of parameters
    cd.dtype = "float32"  # compute dtype of activations (logits are always float32)
    auto = ml_collections.FieldReference("auto", field_type=object)  # a bool or "auto"
    cd.scan_layers = auto  # True: lax.scan over layers; False: unrolled; auto: unroll w/o remat (<= 8 layers on CPU)
    cd.remat = "none"  # per-layer rematerialisation: none, full, save_dots, dots_with_no_batch_dims, offload
    cd.attention = "auto"  # auto, blocked, xla, cudnn, cudnn_masked, pallas (models/attention.py)
    cd.attention_segments = PACKED_MAX_SEGMENTS  # cudnn: segments per row (a padding tail is free); more: the mask
    cd.norm_plus_one = False  # RMSNorm scales by 1 + weight, weights initialised at 0 (Gemma 3)
    cd.embed_scale = False  # embeddings times sqrt(d_model) before the first layer (Gemma 3)
    cd.activation = "silu"  # gated MLP activation: silu (SwiGLU) or gelu_tanh (Gemma 3)
    cd.sandwich_norms = False  # RMSNorm on the attention and MLP outputs before each residual add (Gemma 3)
    cd.query_pre_attn_scalar = ml_collections.FieldReference(
        None, field_type=int
    )  # attention scores times its ** -0.5; None: head_dim's (Gemma 3 sets it)
    cd.layer_types = ml_collections.FieldReference(
        None, field_type=tuple
    )  # None or per layer "sliding_attention" / "full_attention": which layers slide (Gemma 3, Qwen2 / Qwen3)
    cd.rope_local_theta = ml_collections.FieldReference(None, field_type=float)  # sliding layers' RoPE base
    cd.sliding_window = ml_collections.FieldReference(
        None, field_type=int
    )  # None, or the keys a query sees on sliding layers (layer_types'; all without): Mistral, Qwen, Gemma 3
    cd.rope_layers = ml_collections.FieldReference(
        None, field_type=tuple
    )  # None (RoPE on every layer) or per layer True (RoPE) / False (no RoPE: SmolLM3's NoPE layers)
    cd.partial_rotary_factor = 1.0  # RoPE on the first int(head_dim * this) dims of each head (Phi-4-mini: 0.75)
    # scores / output logits z become cap * tanh(z / cap) (Gemma 2: 50 and 30); None: not capped
    cd.attn_softcap = ml_collections.FieldReference(None, field_type=float)  # attention scores, before the mask
    cd.logit_softcap = ml_collections.FieldReference(None, field_type=float)  # output logits
    return cd
