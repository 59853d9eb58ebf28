"""HF import/export parity with transformers (torch, float32) on tiny random models."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig

COMMON = dict(
    vocab_size=67,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
)
TOKENS = np.random.default_rng(0).integers(0, 67, (2, 19))


def _hf_model(kind, seed=0, **kw):
    torch.manual_seed(seed)
    cfg_cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[kind]
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[kind]
    model = model_cls(cfg_cls(**{**COMMON, **kw})).float().eval()
    with torch.no_grad():  # HF init is tiny (std 0.02) and biases/norms trivial: make every tensor matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@nnx.jit
def _forward(model, tokens_BxL, segment_ids_BxL):
    return model(tokens_BxL, None, segment_ids_BxL)


def _logits(model, tokens_BxL, segment_ids_BxL=None) -> np.ndarray:
    """Our `model`'s logits as one compiled program, to set beside `_hf_logits`: run op by op, a forward of these
    tiny models costs seconds of dispatch, a compile per op and shape, never found in the persistent cache."""
    segments = None if segment_ids_BxL is None else jnp.asarray(segment_ids_BxL)
    return np.asarray(_forward(model, jnp.asarray(tokens_BxL), segments))


def packed_and_cached_match(ref, model, draw) -> np.ndarray:
    """Checks an imported `model` against transformers' `ref` on packed and padded rows (sequences of 6 and 9
    tokens, then a padding tail; and one of 19), each sequence as if alone, and a prompt prefill then two steps of
    decoding through the KV cache against the full forward; `draw(n)`: n random token ids. Returns the 19."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    a, b, c = draw(6), draw(9), draw(19)
    tokens = np.stack([np.concatenate([a, b, np.zeros(4, int)]), c])
    segments = np.array([[1] * 6 + [2] * 9 + [0] * 4, [1] * 19])
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, t, s: nnx.merge(graphdef, st)(t, None, s))
    logits = np.asarray(forward(state, jnp.asarray(tokens), jnp.asarray(segments)))
    for row, start, seq in ((0, 0, a), (0, 6, b), (1, 0, c)):  # each packed sequence as if alone
        expected = _hf_logits(ref, seq[None])[0]
        np.testing.assert_allclose(logits[row, start : start + len(seq)], expected, atol=1e-4, rtol=1e-4)
    decode = jax.jit(lambda st, t, p, cache: nnx.merge(graphdef, st).decode(t, p, jnp.ones_like(p), cache))
    cache, parts = model.init_cache(1, 19), []
    for lo, hi in ((0, 17), (17, 18), (18, 19)):
        out, cache = decode(state, jnp.asarray(tokens[1:, lo:hi]), jnp.arange(lo, hi, dtype=jnp.int32)[None], cache)
        parts.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), logits[1:], atol=1e-4, rtol=1e-4)
    return c


@pytest.mark.parametrize(
    "kind,kw",
    [
        (
            "llama",
            dict(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            ),
        ),
        ("llama", dict(tie_word_embeddings=True, head_dim=16)),
        ("mistral", dict(rope_theta=1000.0)),
        ("qwen2", dict()),
    ],
)
def test_import_matches_transformers(tmp_path, kind, kw):
    ref = _hf_model(kind, **kw)
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path)
    assert cfg.qkv_bias == (kind == "qwen2")
    assert cfg.tie_embeddings == bool(kw.get("tie_word_embeddings"))
    assert (cfg.rope_scaling is not None) == ("rope_scaling" in kw)
    expected = _hf_logits(ref, TOKENS)
    assert np.std(expected) > 0.5
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kw", [dict(), dict(qkv_bias=True, tie_embeddings=True, rope_scaling=("llama3", 4.0, 1.0, 4.0, 16))]
)
def test_export_loads_in_transformers(tmp_path, kw):
    cfg = ModelConfig(
        vocab_size=67, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48, max_seq_len=128, **kw
    )
    model = Llama(cfg, rngs=nnx.Rngs(3))
    hf.save_hf(model, cfg, tmp_path)
    arch = json.loads((tmp_path / "config.json").read_text())["architectures"]
    assert arch == ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(ref, TOKENS), np.asarray(model(jnp.asarray(TOKENS))), atol=1e-4, rtol=1e-4)
    cfg2, model2 = hf.load_hf(tmp_path)
    assert cfg2 == cfg


def test_sharded_index_import_and_export(tmp_path):
    ref = _hf_model("llama")
    ref.save_pretrained(tmp_path / "a", max_shard_size="20KB")
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    cfg, model = hf.load_hf(tmp_path / "a")
    expected = _hf_logits(ref, TOKENS)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), expected, atol=1e-4, rtol=1e-4)
    hf.save_hf(model, cfg, tmp_path / "b", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, model_b = hf.load_hf(tmp_path / "b")
    np.testing.assert_allclose(np.asarray(model_b(jnp.asarray(TOKENS))), expected, atol=1e-4, rtol=1e-4)


def test_bf16_params_and_tokenizer_saved(tmp_path):
    from proxykd_jax.models.tokenizer import build_word_tokenizer, load_tokenizer

    ref = _hf_model("qwen2")
    ref.save_pretrained(tmp_path / "a")
    cfg, model = hf.load_hf(tmp_path / "a", dtype="bfloat16", param_dtype="bfloat16")
    assert model.embedding[...].dtype == jnp.bfloat16
    tok = build_word_tokenizer([f"w{i}" for i in range(60)])
    hf.save_hf(model, cfg, tmp_path / "b", tokenizer=tok)
    assert load_tokenizer(tmp_path / "b").encode("w3 w9") == tok.encode("w3 w9")
    _, back = hf.load_hf(tmp_path / "b", param_dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(back.embedding[...]), np.asarray(model.embedding[...]))


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_hf(tmp_path / "empty")
    with pytest.raises(ValueError, match="Unsupported architecture.*GPT2LMHeadModel.*LlamaForCausalLM"):
        hf.config_from_hf({"architectures": ["GPT2LMHeadModel"]})
    # Settings the model does not implement are refused, not imported into another computation.
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_attention_heads": 4}
    with pytest.raises(ValueError, match="hidden_act='gelu'; only silu"):
        hf.config_from_hf({**llama, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="mlp_bias=true"):
        hf.config_from_hf({**llama, "mlp_bias": True})
    ref = _hf_model("llama")
    ref.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(
        json.dumps({**json.loads((tmp_path / "m" / "config.json").read_text()), "intermediate_size": 64})
    )
    with pytest.raises(
        ValueError,
        match=r"Tensor model\.layers\.\d\.mlp\.\w+_proj\.weight .*shape \((48, 32|32, 48)\).*implies \((64, 32|32, 64)\)",
    ):
        hf.load_hf(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_hf(tmp_path / "m")


@pytest.mark.parametrize("first,second", [(None, 20_000), (20_000, None)])
def test_saving_over_an_earlier_export_leaves_only_the_new_weights(tmp_path, first, second):
    """An export into a folder that holds an earlier one (one file, or an index and shards) must not leave
    the old weight files behind: load_hf prefers an index, transformers a single model.safetensors."""
    cfg = ModelConfig(vocab_size=67, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48)
    old, new = Llama(cfg, rngs=nnx.Rngs(1)), Llama(cfg, rngs=nnx.Rngs(2))
    hf.save_hf(old, cfg, tmp_path, **({"max_shard_bytes": first} if first else {}))
    (tmp_path / "notes.safetensors").write_bytes(b"not ours")  # files the export does not name are kept
    hf.save_hf(new, cfg, tmp_path, **({"max_shard_bytes": second} if second else {}))
    weights = sorted(p.name for p in tmp_path.glob("model*"))
    if second:
        assert "model.safetensors" not in weights and "model.safetensors.index.json" in weights
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(weights) == {*index["weight_map"].values(), "model.safetensors.index.json"}
    else:
        assert weights == ["model.safetensors"]
    assert (tmp_path / "notes.safetensors").read_bytes() == b"not ours"
    expected = np.asarray(new(jnp.asarray(TOKENS)))
    assert np.abs(expected - np.asarray(old(jnp.asarray(TOKENS)))).max() > 0.1
    np.testing.assert_allclose(np.asarray(hf.load_hf(tmp_path)[1](jnp.asarray(TOKENS))), expected, atol=1e-5)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(ref, TOKENS), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("weight_map", [["model-00001-of-00005.safetensors"], {"model.norm.weight": 5}, None])
def test_a_malformed_index_is_refused_in_one_sentence(tmp_path, weight_map):
    cfg = ModelConfig(vocab_size=67, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48)
    hf.save_hf(Llama(cfg, rngs=nnx.Rngs(1)), cfg, tmp_path, max_shard_bytes=20_000)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not a safetensors index"):
        hf.load_hf(tmp_path)


@pytest.mark.parametrize(
    "kw",
    [
        dict(rope_scaling=("llama3", 8.0, 1.0, 4.0, 16)),
        dict(qkv_bias=True, rope_scaling=("llama3", 8.0, 1.0, 4.0, 16)),
        dict(),
    ],
)
def test_export_writes_legacy_rope_keys_beside_rope_parameters(tmp_path, kw):
    """Readers older than transformers 5 (and vLLM versions before it) read only the top-level rope_theta and
    rope_scaling (and torch_dtype); without them they run the model with theta 10000 and no scaling. Both forms carry the same
    numbers, and transformers 5 and our loader read them back unchanged and without a warning."""
    cfg = ModelConfig(
        vocab_size=67,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        d_ff=48,
        max_seq_len=128,
        rope_theta=500000.0,
        **kw,
    )
    hf.save_hf(Llama(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 500000.0
    assert written["torch_dtype"] == written["dtype"] == cfg.param_dtype  # torch_dtype: transformers 4's name
    if cfg.rope_scaling is None:
        assert written["rope_scaling"] is None and written["rope_parameters"]["rope_type"] == "default"
    else:
        legacy = written["rope_scaling"]
        assert legacy["rope_type"] == legacy["type"] == written["rope_parameters"]["rope_type"] == "llama3"
        fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        assert [legacy[f] for f in fields] == [written["rope_parameters"][f] for f in fields] == [8.0, 1.0, 4.0, 16]
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not messages
    assert {k: v for k, v in loaded.rope_parameters.items() if k != "type"} == written["rope_parameters"]
    assert hf.read_config(tmp_path) == cfg
