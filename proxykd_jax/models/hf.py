"""Hugging Face safetensors import/export for Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, SmolLM3 and Phi-3
causal LMs (no torch needed).

`load_hf(folder, mesh=..., rules=...)` reads config.json (`models.hf_config`) and model.safetensors (or a sharded
model.safetensors.index.json), checks every tensor's shape against the config from the file headers
alone, then builds each parameter straight into its sharded global array, every device reading
only its own block (`safetensors_io`); nothing is randomly initialised or built whole on one host.
`save_hf(model, cfg, folder)` writes a folder `transformers` loads (with `source`, the folder the model was
imported from, its config.json: the same family; else Phi3ForCausalLM when it has Phi-3's partial rotary or
longrope, Gemma3ForCausalLM when the model has Gemma's norms and q/k norms, Gemma2ForCausalLM with Gemma's norms alone,
Qwen3ForCausalLM when it has q/k norms, Qwen2ForCausalLM when it has q/k/v bias, MistralForCausalLM when it has a
sliding window or a d_model not a multiple of its heads, LlamaForCausalLM otherwise), one tensor at a time, in files
of at most 5 GB, with the tokenizer and a generation_config.json of its stop ids (and `source`'s sampling defaults).
`tensor_map` is the one place that maps our parameter paths to HF tensor names and layouts; Phi-3's fused
qkv_proj and gate_up_proj are read as the row ranges of the q/k/v and gate/up tensors they hold (`_Unfused`, block by
block as any tensor) and written fused back (`_FUSED`) when the export's config.json names Phi3ForCausalLM.
How a config.json maps to a `ModelConfig` and back (RoPE, sliding windows, Gemma's fields) is `models.hf_config`'s;
its `config_from_hf`, `read_config`, `sliding_window`, `SUPPORTED` and `RUN_FIELDS` are importable from here too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models.hf_config import (
    GEMMA2,
    GEMMA3,
    PHI3,
    RUN_FIELDS,
    SUPPORTED,  # noqa: F401  (re-exported, as config_from_hf and sliding_window)
    _hf_config,
    config_from_hf,  # noqa: F401
    is_phi3,
    read_config,
    sliding_window,  # noqa: F401
    source_config,
)
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.safetensors_io import SafetensorsFolder, TensorMap, host_value, load_leaf, write_sharded

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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


# Phi-3's fused projections (after `model.layers.{i}.`): one tensor holding the unfused ones on its rows, in order
_FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def _fused_parts(layers) -> dict[str, tuple[str, ...]]:
    """Fused tensor name -> the unfused names it holds, for each of `layers` (indices)."""
    return {
        f"model.layers.{i}.{fused}": tuple(f"model.layers.{i}.{part}" for part in parts)
        for i in layers
        for fused, parts in _FUSED.items()
    }


class _Unfused:
    """A folder's tensors (`SafetensorsFolder`'s `files`, `shape` and `read`) with Phi-3's fused ones (`_FUSED`) seen
    as the unfused tensors they hold (`expected`: name -> shape): each is a row range of its fused tensor, so a
    device's block of it is still read alone, lazily, as `safetensors_io.load_leaf` reads any tensor."""

    def __init__(self, source: SafetensorsFolder, expected: dict[str, tuple]):
        self.source, self.files, self.parts = source, dict(source.files), {}
        names = [n.split(".") for n in source.files if n.startswith("model.layers.")]
        for fused, parts in _fused_parts(sorted({int(n[2]) for n in names if n[2].isdigit()})).items():
            shapes = [expected.get(part) for part in parts]
            if fused not in source.files or None in shapes:  # (parts the config lacks: the fused tensor is unexpected)
                continue
            path, start = self.files.pop(fused), 0
            for part, shape in zip(parts, shapes):
                self.parts[part], self.files[part] = (fused, start, shape), path
                start += shape[0]
            if source.shape(fused) != (start, *shapes[0][1:]):
                raise ValueError(
                    f"Tensor {fused} in {path.name} has shape {source.shape(fused)}, but config.json implies "
                    f"{(start, *shapes[0][1:])}."
                )

    def shape(self, name: str) -> tuple[int, ...]:
        return self.parts[name][2] if name in self.parts else self.source.shape(name)

    def read(self, name: str, ranges: tuple[slice, ...]) -> np.ndarray:
        if name not in self.parts:
            return self.source.read(name, ranges)
        fused, start, shape = self.parts[name]
        ranges = tuple(ranges) or (slice(None),) * len(shape)
        lo, hi, _ = ranges[0].indices(shape[0])
        return self.source.read(fused, (slice(start + lo, start + hi), *ranges[1:]))


def _same_rows(source: SafetensorsFolder, a: str, b: str, rows: int = 4096) -> bool:
    """Whether tensors `a` and `b` of `source` are equal, read `rows` rows at a time (b may be absent: False)."""
    if b not in source.files or source.shape(a) != source.shape(b):
        return False
    size = source.shape(a)[0]
    blocks = [(slice(i, min(i + rows, size)),) for i in range(0, size, rows)]
    return all(np.array_equal(source.read(a, block), source.read(b, block)) for block in blocks)


def _checked_folder(folder: pathlib.Path, cfg: ModelConfig) -> SafetensorsFolder:
    """The folder's tensors, checked against the config from the file headers alone (Phi-3's fused ones as the
    unfused tensors they hold, `_Unfused`)."""
    source = SafetensorsFolder(folder)
    expected = _hf_shapes(cfg)
    if any(name.endswith(tuple(_FUSED)) for name in source.files):
        source = _Unfused(source, expected)
    present = {n for n in source.files if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_embeddings and "lm_head.weight" in present:  # (transformers ties them only where they are equal)
        present.discard("lm_head.weight")
        if not _same_rows(source, "lm_head.weight", "model.embed_tokens.weight"):
            raise ValueError(
                f"{folder} holds an lm_head.weight unlike its model.embed_tokens.weight while config.json sets "
                "tie_word_embeddings=true, which transformers runs untied; set tie_word_embeddings to false."
            )
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


def generation_stop_ids(folder: pathlib.Path) -> tuple:
    """The ids a folder's generation_config.json names as `eos_token_id` (one or a list: an instruct model
    ends a turn with its own token, Llama 3's <|eot_id|>, besides the tokenizer's eos); () without one."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        ids = json.loads(path.read_text()).get("eos_token_id")
    except (ValueError, AttributeError):
        raise ProxyKDError(f"{path} is not a JSON object; fix it or remove it.") from None
    ids = [ids] if isinstance(ids, int) else ids or []
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ProxyKDError(f"{path}: eos_token_id must be a token id or a list of them, not {ids!r}")
    return tuple(ids)


# generation_config.json keys an export writes itself (its stop ids), or that name the writer, not the model
_GENERATION_OURS = ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version")


def source_generation(folder) -> dict:
    """The fields of `folder`'s generation_config.json (a model's source folder; None or "": none) that an export
    keeps: its sampling defaults (do_sample, top_k, top_p, temperature, ...), every field but the stop ids and
    transformers_version, which the export writes itself; {} without one."""
    path = pathlib.Path(str(folder)).expanduser() / "generation_config.json" if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        spec = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError):
        spec = None
    if not isinstance(spec, dict):
        raise ProxyKDError(f"{path} is not a JSON object; fix it or remove it.")
    return {k: v for k, v in spec.items() if k not in _GENERATION_OURS}


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
    token ids and dtype; else one written from `cfg` (Phi3ForCausalLM with Phi-3's partial rotary or longrope, its
    q/k/v and gate/up fused as with a Phi-3 `source`, Gemma3ForCausalLM with Gemma's norms and q/k norms,
    Gemma2ForCausalLM with Gemma's norms without them, SmolLM3ForCausalLM with layers without RoPE,
    Qwen3ForCausalLM with q/k norms, Qwen2ForCausalLM with q/k/v bias, else MistralForCausalLM
    with a sliding window or a d_model not a multiple of num_heads (which LlamaConfig refuses), else LlamaForCausalLM).

    `params` maps our parameter paths to (possibly sharded) arrays. Nothing is gathered whole: each
    tensor (one layer of a stacked leaf) is brought to the host only when it is written. When the
    model spans several processes every process must call this (gathering a tensor is then
    collective) and process 0 writes all files; a model every process holds whole may be saved by
    process 0 alone. config.json and generation_config.json carry the tokenizer's bos/eos/pad ids
    (eos with the end-of-turn `stop_ids`, `token_ids_of`), so `generate()` in transformers and
    `proxykd serve` stop at them by themselves; generation_config.json also keeps `source`'s other fields, its
    sampling defaults (`source_generation`), so `generate()` samples as it did on the source."""
    # (a Mistral slides on every layer, or on none without a window: a Llama whose d_model need not be heads * E)
    plain = "MistralForCausalLM" if cfg.windowed or cfg.d_model % cfg.num_heads else "LlamaForCausalLM"
    arch = "Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.qkv_bias else plain
    gemma = GEMMA3 if cfg.qk_norm else GEMMA2  # (Gemma's numerics: `ModelConfig.gemma`)
    arch = gemma if cfg.gemma else "SmolLM3ForCausalLM" if cfg.rope_layers is not None else arch
    like = source_config(source, cfg)  # (every process: a Phi-3 source's config.json means fused tensors)
    arch = PHI3 if is_phi3(cfg) or PHI3 in ((like or {}).get("architectures") or []) else arch
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
    fused = _fused_parts(range(cfg.num_layers)) if arch == PHI3 else {}  # a Phi-3's fused tensors, at their first part
    first = {parts[0]: name for name, parts in fused.items()}
    tensors = {}
    for name in expected:
        dtype = np.dtype(params[where[name][0]].dtype)
        if name in first:
            rows = sum(expected[part][0] for part in fused[first[name]])
            tensors[first[name]] = ((rows, *expected[name][1:]), dtype)
        elif not any(name in parts for parts in fused.values()):
            tensors[name] = (expected[name], dtype)

    def fetch(name: str):
        if name in fused:  # (every part fetched on every process: gathering may be collective)
            values = [fetch(part) for part in fused[name]]
            return np.concatenate(values) if writer else None
        key, i, tmap = where[name]
        value = host_value(params[key] if i is None else _stack_element(params[key], i))
        return tmap.to_hf(value) if writer else None

    token_ids = token_ids_of(tokenizer, stop_ids)
    sampling = source_generation(source)  # (every process: a broken file fails them all, before any collective)
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
        config = _hf_config(cfg, arch, token_ids)
        if like is not None:
            # (and top-level RoPE, which readers before transformers 5 need: a v5 source has rope_parameters only)
            ours = [k for k in token_ids if config[k] is not None] + [
                "dtype",
                "torch_dtype",
                "rope_theta",
                "rope_scaling",
            ]
            ours += ["rope_local_base_freq"] if arch == GEMMA3 else []
            ours += ["partial_rotary_factor", "original_max_position_embeddings"] if arch == PHI3 else []
            config = {**like, **{k: config[k] for k in ours}}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        generation = {**sampling, **{k: v for k, v in token_ids.items() if v is not None}}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_sharded(folder, tensors, fetch, max_shard_bytes=max_shard_bytes, write=writer)
    if writer and tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
