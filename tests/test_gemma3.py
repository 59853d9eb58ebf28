"""Gemma 3 text models (`Gemma3ForCausalLM`) as student and proxy: RMSNorm x * (1 + w), embeddings times
sqrt(d_model), gelu-tanh MLP, post-attention and post-MLP norms, attention scaled by query_pre_attn_scalar, and per
layer RoPE (sliding layers their own theta, full layers theirs with scaling) and sliding window. Import equals
transformers' logits (scanned and unrolled, packed and padded rows, cached decoding, greedy generation, all longer
than the window), both config.json RoPE forms are read as transformers reads them, export loads back in transformers
as a Gemma 3, and what we do not run is refused (its soft-caps, read since Gemma 2: tests/test_gemma2.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_hf import _hf_logits, _logits, packed_and_cached_match

from proxykd_jax.align import lora
from proxykd_jax.models import hf
from proxykd_jax.models.config import default_config
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.sampling import generate

VOCAB = 300
TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
GEMMA3 = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # not hidden_size / heads = 8
    query_pre_attn_scalar=24,  # not head_dim
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
    sliding_window=64,
    layer_types=TYPES,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5000.0},
    },
)


def _seed() -> int:
    return int(np.random.default_rng().integers(1 << 31))


def _tokens(rows: int, length: int) -> np.ndarray:
    return np.random.default_rng().integers(0, VOCAB, (rows, length))


def random_gemma(config_cls, model_cls, spec: dict):
    """A tiny transformers Gemma of `spec` (eager attention) with every tensor random (norm weights too, around 0:
    Gemma's norms scale by 1 + w)."""
    torch.manual_seed(_seed())
    model = model_cls(config_cls(**spec, attn_implementation="eager")).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.2))
    return model


def _gemma3(**kw):
    return random_gemma(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, {**GEMMA3, **kw})


@pytest.mark.parametrize("scan, tie", [(True, True), (False, False)])
def test_import_matches_transformers(tmp_path, scan, tie):
    ref = _gemma3(tie_word_embeddings=tie, sliding_window=8)
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path, run={"scan_layers": scan})
    assert (cfg.head_dim, cfg.query_pre_attn_scalar, cfg.max_seq_len, cfg.sliding_window) == (16, 24, 128, 8)
    assert cfg.norm_plus_one and cfg.embed_scale and cfg.sandwich_norms and cfg.qk_norm
    assert (cfg.activation, cfg.rope_theta, cfg.rope_local_theta) == ("gelu_tanh", 5000.0, 100.0)
    assert cfg.rope_scaling == ("linear", 8.0) and cfg.layer_types == tuple(TYPES)
    assert (cfg.tie_embeddings, cfg.scan_layers) == (tie, scan)
    assert cfg.num_params() == sum(p.numel() for p in ref.parameters())
    tokens = _tokens(2, 40)
    expected = _hf_logits(ref, tokens)
    assert np.std(expected) > 0.5
    np.testing.assert_allclose(_logits(model, tokens), expected, atol=1e-4, rtol=1e-4)


def test_packed_rows_cached_decoding_and_generation_match_transformers(tmp_path):
    packed_cached_and_generated_match(_gemma3(sliding_window=5), tmp_path)  # every sequence longer than the window


def packed_cached_and_generated_match(ref, tmp_path) -> None:
    """`ref` saved and imported (scanned): packed and padded rows and cached decoding match transformers
    (`packed_and_cached_match`), and so does greedy generation, transformers' own continuation."""
    ref.save_pretrained(tmp_path)
    _, model = hf.load_hf(tmp_path, run={"scan_layers": True})
    c = packed_and_cached_match(ref, model, lambda n: _tokens(1, n)[0])
    out = generate(model, jnp.asarray(c[None, :8]), np.array([8]), jax.random.key(0), max_new_tokens=6, temperature=0)
    with torch.no_grad():  # (a whole mask: without one, transformers masks out a prompt token equal to the pad id)
        prompt = torch.tensor(c[None, :8])
        theirs = ref.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, eos_token_id=None
        )
    np.testing.assert_array_equal(np.asarray(out.tokens_BxT)[0], theirs[0, 8:].numpy())


def _legacy(spec: dict) -> dict:
    """A config.json as written before transformers 5: top-level rope_theta / rope_local_base_freq / rope_scaling,
    the layer pattern as sliding_window_pattern."""
    rope = spec.pop("rope_parameters")
    spec.pop("layer_types")
    spec.update(rope_theta=rope["full_attention"]["rope_theta"], sliding_window_pattern=3)
    spec["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    spec["rope_scaling"] = {"rope_type": "linear", "factor": 2.5}
    return spec


def test_old_config_json_forms_are_read_as_transformers_reads_them(tmp_path):
    ref = _gemma3()
    ref.save_pretrained(tmp_path / "new")
    spec = _legacy(json.loads((tmp_path / "new" / "config.json").read_text()))
    theirs = transformers.Gemma3TextConfig(**{k: v for k, v in spec.items() if k != "architectures"})
    ours = hf.config_from_hf(spec)
    assert (
        ours.layer_types
        == tuple(theirs.layer_types)
        == ("sliding_attention",) * 2 + ("full_attention",) + ("sliding_attention",)
    )
    full, local = theirs.rope_parameters["full_attention"], theirs.rope_parameters["sliding_attention"]
    assert (ours.rope_theta, ours.rope_local_theta) == (full["rope_theta"], local["rope_theta"])
    assert ours.rope_scaling == ("linear", full["factor"]) and local["rope_type"] == "default"
    # the weights run as transformers runs them under this config
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(spec))
    (tmp_path / "old" / "model.safetensors").symlink_to(tmp_path / "new" / "model.safetensors")
    old_ref = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "old", dtype=torch.float32).eval()
    _, model = hf.load_hf(tmp_path / "old")
    tokens = _tokens(2, 30)
    np.testing.assert_allclose(_logits(model, tokens), _hf_logits(old_ref, tokens), atol=1e-4, rtol=1e-4)
    # no window key at all: transformers' default window of 4096, within the full context
    no_window = {k: v for k, v in spec.items() if k != "sliding_window"}
    cfg = hf.config_from_hf({**no_window, "max_position_embeddings": 8192})
    assert (cfg.max_seq_len, cfg.sliding_window) == (8192, 4096)


def test_what_gemma_runs_that_we_do_not_is_refused(tmp_path):
    _gemma3().save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "config.json").read_text())
    refusals = {
        "bidirectional": ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        "local scaling": (
            {
                "rope_parameters": {
                    **spec["rope_parameters"],
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0},
                }
            },
            "sliding_attention",
        ),
        "activation": ({"hidden_activation": "relu"}, "hidden_activation='relu'"),
    }
    for name, (extra, match) in refusals.items():
        with pytest.raises(ValueError, match=match) as e:
            hf.config_from_hf({**spec, **extra})
        assert "\n" not in str(e.value) and str(e.value).endswith("."), name


def tiny_config(**numerics) -> ModelConfig:
    """A 4-layer Gemma-3-shaped model: grouped-query attention, head_dim 16 != d_model / heads."""
    gemma = dict(
        norm_plus_one=True, embed_scale=True, activation="gelu_tanh", sandwich_norms=True, qk_norm=True,
        query_pre_attn_scalar=20, rope_theta=3e4, rope_local_theta=50.0, layer_types=tuple(TYPES),
        tie_embeddings=True, rms_eps=1e-6, max_seq_len=64,
    )  # fmt: skip
    return ModelConfig(
        vocab_size=VOCAB, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=48,
        **{**gemma, **numerics},
    )  # fmt: skip


def _randomised(model: Llama) -> Llama:
    rng = np.random.default_rng()
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(rng.normal(0.0, 0.3, var.get_value().shape), var.get_value().dtype))
    return model


@pytest.mark.parametrize("scaling, window", [(None, None), (("linear", 4.0), 7)])
def test_export_loads_in_transformers_as_gemma3(tmp_path, scaling, window):
    written = exported_and_loaded_back(
        tiny_config(rope_scaling=scaling, sliding_window=window), tmp_path, "Gemma3ForCausalLM"
    )
    assert written["model_type"] == "gemma3_text"
    expected = (TYPES, 20, window or 64)  # without a window: the context's, which is full attention
    assert (written["layer_types"], written["query_pre_attn_scalar"], written["sliding_window"]) == expected
    assert written["rope_local_base_freq"] == written["rope_parameters"]["sliding_attention"]["rope_theta"] == 50.0


def exported_and_loaded_back(cfg: ModelConfig, folder, arch: str) -> dict:
    """A random model of `cfg` exported to `folder`: its config.json names `arch`, transformers loads it as one with our
    logits, and it reads back as `cfg`. Returns the config.json written."""
    model = _randomised(Llama(cfg, rngs=nnx.Rngs(_seed())))
    hf.save_hf(model, cfg, folder)
    written = json.loads((folder / "config.json").read_text())
    assert written["architectures"] == [arch]
    back = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(back).__name__ == arch
    tokens = _tokens(2, 40)
    np.testing.assert_allclose(_hf_logits(back, tokens), _logits(model, tokens), atol=1e-4, rtol=1e-4)
    assert hf.read_config(folder) == cfg
    return written


def test_an_imported_gemma_exports_with_its_source_config(tmp_path):
    ref = _gemma3(max_position_embeddings=256, sliding_window=96)
    ref.save_pretrained(tmp_path / "src")
    cfg, model = hf.load_hf(tmp_path / "src")
    hf.save_hf(model, cfg, tmp_path / "out", source=tmp_path / "src")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["max_position_embeddings"], written["sliding_window"]) == (256, 96)  # the source's context
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = _tokens(1, 50)
    np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(ref, tokens), atol=1e-5, rtol=1e-5)
    assert hf.read_config(tmp_path / "out") == cfg


def test_config_fields_are_checked_and_settable():
    cd = default_config()
    assert ModelConfig.from_config(cd) == ModelConfig.from_config(cd)
    gemma = dict(norm_plus_one=True, embed_scale=True, activation="gelu_tanh", sandwich_norms=True, qk_norm=True)
    for key, value in gemma.items():
        cd[key] = value
    cd.query_pre_attn_scalar, cd.layer_types, cd.rope_local_theta = 12, ["sliding_attention", "full_attention"], 10.0
    cd.sliding_window = 6
    cfg = ModelConfig.from_config(cd)
    assert cfg.sliding_window == 6 and cfg.windowed
    assert (
        cfg.layer_types == ("sliding_attention", "full_attention") and ModelConfig.from_config(cfg.to_config()) == cfg
    )
    base = dict(vocab_size=8, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, d_ff=8, **gemma)
    bad = {
        "activation": dict(activation="relu"),
        "query_pre_attn_scalar": dict(query_pre_attn_scalar=-1),
        "layer_types": dict(layer_types=("sliding_attention",), rope_local_theta=10.0),
        "rope_local_theta": dict(layer_types=("sliding_attention", "full_attention")),
        "sliding_window": dict(sliding_window=0),
        "norm_plus_one": dict(sandwich_norms=False),  # a part of Gemma's numerics: no family to export it as
    }
    for name, fields in bad.items():
        with pytest.raises(ValueError, match=rf"model\.{name}") as e:
            ModelConfig(**{**base, **fields})
        assert "\n" not in str(e.value), name
    with pytest.raises(ValueError, match="sandwich_norms not set"):
        ModelConfig(**{**base, "sandwich_norms": False})
    # the window: layer_types without rope_local_theta (the sliding layers run the normal RoPE), checked paths
    windowed = ModelConfig(**{**base, "sliding_window": 4, "layer_types": ("sliding_attention", "full_attention")})
    assert windowed.windowed and windowed.rope_local_theta is None
    plain = {k: v for k, v in base.items() if k not in gemma}
    assert ModelConfig(**plain, sliding_window=4).windowed  # Mistral: every layer
    refusals = {
        "model.attention='cudnn' cannot apply a sliding window": dict(
            base, sliding_window=4, layer_types=("full_attention", "sliding_attention"), attention="cudnn"
        ),
        "model.attention='pallas' cannot apply a sliding window": dict(plain, sliding_window=4, attention="pallas"),
        "model.layer_types .* no Hugging Face family": dict(
            plain, sliding_window=4, layer_types=("full_attention",) * 2
        ),
        "model.sliding_window on a Gemma model needs model.layer_types": dict(base, sliding_window=4),
        "model.layer_types names the layers": dict(base, layer_types=("full_attention",) * 2),
    }
    for match, fields in refusals.items():
        with pytest.raises(ValueError, match=match) as e:
            ModelConfig(**fields)
        assert "\n" not in str(e.value) and str(e.value).endswith("."), match


def test_lora_on_a_gemma_model_adapts_its_projections_and_merges():
    """Adapters sit on the attention and MLP projections (not on the four norms per layer) and a merged model
    computes what the base does with W + scale * A @ B."""
    model = _randomised(Llama(tiny_config(), rngs=nnx.Rngs(0)))
    targets = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    adapters = lora.LoraAdapters(model, rank=2, alpha=4.0, targets=targets, rngs=nnx.Rngs(1))
    assert sorted(p[-1] for p in adapters.paths) == sorted(targets) and all(adapters.stacked)
    rng = np.random.default_rng()
    for b in adapters.b:
        b.set_value(jnp.asarray(rng.normal(0, 0.1, b.get_value().shape), b.get_value().dtype))
    tokens = _tokens(1, 12)
    merged = lora.merged(model, adapters)
    by_hand = _randomised(Llama(tiny_config(), rngs=nnx.Rngs(0)))
    nnx.update(by_hand, nnx.state(model))
    deltas = adapters.deltas()
    for path, var in nnx.to_flat_state(nnx.state(by_hand, nnx.Param)):
        if tuple(path) in deltas:
            var.set_value(var.get_value() + deltas[tuple(path)])
    merged_logits = _logits(merged, tokens)
    assert np.abs(merged_logits - _logits(model, tokens)).max() > 1e-3
    np.testing.assert_allclose(merged_logits, _logits(by_hand, tokens), atol=1e-5, rtol=1e-5)
