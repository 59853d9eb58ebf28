"""Hugging Face safetensors import/export for Llama, Mistral and Qwen2 causal LMs (no torch needed).

`load_hf(folder)` reads config.json and model.safetensors (or a sharded model.safetensors.index.json),
checks every tensor's shape against the config from the file headers alone, then builds the model
without a random initialisation. `save_hf(model, cfg, folder)` writes a folder `transformers` loads:
Qwen2ForCausalLM when the model has q/k/v bias, LlamaForCausalLM otherwise.

Mistral / Qwen2 sliding-window attention is not implemented; the imported config's `max_seq_len` is
capped at the window, where full causal attention is identical.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from proxykd_jax.models.llama import Llama, ModelConfig

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def config_from_hf(hf: dict, *, dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (old top-level or v5 `rope_parameters` RoPE keys)."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise ValueError(
            f"Unsupported architecture {archs or hf.get('model_type')!r}; supported: {', '.join(SUPPORTED)}."
        )
    try:
        d_model, num_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_theta = float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        if rope_type in (None, "default"):
            rope_scaling = None
        elif rope_type == "llama3":
            rope_scaling = (
                "llama3",
                float(rope["factor"]),
                float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]),
            )
        else:
            raise ValueError(f"config.json rope type {rope_type!r} is not supported; supported: default, llama3.")
        if arch != "Qwen2ForCausalLM" and hf.get("attention_bias"):
            raise ValueError("config.json sets attention_bias=true (bias on o_proj too), which is not supported.")
        max_seq_len = int(hf.get("max_position_embeddings", 2048))
        window = hf.get("sliding_window")
        if window and (arch == "MistralForCausalLM" or hf.get("use_sliding_window")):
            max_seq_len = min(max_seq_len, int(window))
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or d_model // num_heads),
            d_ff=int(hf["intermediate_size"]),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=arch == "Qwen2ForCausalLM",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=max_seq_len,
            param_dtype=param_dtype,
            dtype=dtype,
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks the field {e.args[0]!r} that a {arch} config must have.") from None


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
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
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
    return shapes


_LAYER_KEYS = {
    "self_attn.q_proj.weight": ("attn", "wq"),
    "self_attn.k_proj.weight": ("attn", "wk"),
    "self_attn.v_proj.weight": ("attn", "wv"),
    "self_attn.o_proj.weight": ("attn", "wo"),
    "self_attn.q_proj.bias": ("attn", "bq"),
    "self_attn.k_proj.bias": ("attn", "bk"),
    "self_attn.v_proj.bias": ("attn", "bv"),
    "mlp.gate_proj.weight": ("mlp", "w_gate"),
    "mlp.up_proj.weight": ("mlp", "w_up"),
    "mlp.down_proj.weight": ("mlp", "w_down"),
    "input_layernorm.weight": ("attn_norm", "scale"),
    "post_attention_layernorm.weight": ("mlp_norm", "scale"),
}
_TOP_KEYS = {
    "model.embed_tokens.weight": ("embedding",),
    "model.norm.weight": ("final_norm", "scale"),
    "lm_head.weight": ("lm_head",),
}


def _our_key(name: str) -> tuple[tuple, int | None]:
    """(path in our parameter state, layer index or None) of one HF tensor name: block parameters
    are stacked [layers, ...], so `model.layers.i.<x>` is row i of the stacked `layers.<x>`."""
    if name in _TOP_KEYS:
        return _TOP_KEYS[name], None
    _, _, i, rest = name.split(".", 3)
    return ("layers",) + _LAYER_KEYS[rest], int(i)


def _to_ours(name: str, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """One HF tensor in our layout (Linear weights are [out, in]; ours are [in, ...heads, out])."""
    d, h, e = cfg.d_model, cfg.num_heads, cfg.head_dim
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return x.T.reshape(d, -1, e)
    if name.endswith("o_proj.weight"):
        return x.T.reshape(h, e, d)
    if name.endswith("proj.bias"):
        return x.reshape(-1, e)
    if x.ndim == 2 and name != "model.embed_tokens.weight":  # lm_head and MLP weights
        return x.T
    return x


def _to_hf(name: str, x: np.ndarray) -> np.ndarray:
    """Inverse of `_to_ours`."""
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return x.reshape(x.shape[0], -1).T
    if name.endswith("o_proj.weight"):
        return x.reshape(-1, x.shape[-1]).T
    if name.endswith("proj.bias"):
        return x.reshape(-1)
    if x.ndim == 2 and name != "model.embed_tokens.weight":
        return x.T
    return x


def _weight_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> safetensors file, from the index when sharded."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) {missing} that are not in {folder}.")
        return {name: folder / f for name, f in weight_map.items()}
    if single.exists():
        with safe_open(str(single), framework="np") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json.")


def load_hf(folder, *, dtype: str = "float32", param_dtype: str = "float32") -> tuple[ModelConfig, Llama]:
    """Imports a local HF folder; returns (config, model) with parameters in `param_dtype`."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Model folder {folder} does not exist; pass a local Hugging Face model folder.")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; it must be a Hugging Face model folder.")
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()), dtype=dtype, param_dtype=param_dtype)
    files = _weight_files(folder)
    expected = _hf_shapes(cfg)
    present = {n: p for n, p in files.items() if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:
        present.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(present))
    if missing:
        raise ValueError(
            f"{folder} lacks tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''} the config requires."
        )
    unexpected = sorted(set(present) - set(expected))
    if unexpected:
        raise ValueError(f"{folder} has tensor(s) {unexpected[:4]} this {cfg.num_layers}-layer config does not use.")
    by_file: dict[pathlib.Path, list[str]] = {}
    for name, path in present.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():  # headers only: shapes are checked before any tensor is read
        with safe_open(str(path), framework="np") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ValueError(
                        f"Tensor {name} in {path.name} has shape {shape}, but config.json implies {expected[name]}."
                    )
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    values = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="np") as f:
            for name in names:
                array = _to_ours(name, f.get_tensor(name), cfg)
                key, layer = _our_key(name)
                if layer is None:
                    values[key] = array
                else:
                    values.setdefault(key, np.empty((cfg.num_layers, *array.shape), array.dtype))[layer] = array
    for key, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(np.ascontiguousarray(values[key]), dtype=param_dtype))
    return cfg, nnx.merge(graphdef, state)


def _hf_config(cfg: ModelConfig, arch: str) -> dict:
    from transformers import LlamaConfig, Qwen2Config

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
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    if cfg.rope_scaling is not None:
        _, factor, low, high, orig = cfg.rope_scaling
        kwargs["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": orig,
        }
    hf_cfg = Qwen2Config(**kwargs) if arch == "Qwen2ForCausalLM" else LlamaConfig(attention_bias=False, **kwargs)
    out = hf_cfg.to_dict()
    out["architectures"] = [arch]
    out["dtype"] = cfg.param_dtype
    return out


def save_hf(model: Llama, cfg: ModelConfig, folder, tokenizer=None, *, max_shard_bytes: int | None = None) -> None:
    """Writes config.json + safetensors (sharded with an index above `max_shard_bytes`) + tokenizer."""
    arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {key: np.asarray(jax.device_get(var[...])) for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors = {}
    for name, shape in _hf_shapes(cfg).items():
        key, layer = _our_key(name)
        hf = _to_hf(name, flat[key] if layer is None else flat[key][layer])
        assert hf.shape == shape, (name, hf.shape, shape)
        tensors[name] = np.ascontiguousarray(hf)
    (folder / "config.json").write_text(json.dumps(_hf_config(cfg, arch), indent=2))
    if max_shard_bytes is None or sum(t.nbytes for t in tensors.values()) <= max_shard_bytes:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards, current, size = [], {}, 0
        for name, t in tensors.items():
            if current and size + t.nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name], size = t, size + t.nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
