"""SmolLM3 models (`SmolLM3ForCausalLM`): a Llama whose `no_rope_layers` run without RoPE (NoPE), imported as
`model.rope_layers`, a scanned per-layer flag. Import equals transformers' logits (scanned and unrolled, packed and
padded rows, cached decoding, with and without a sliding window), export loads back in transformers as a SmolLM3, a
config.json without `no_rope_layers` gets transformers' default (every 4th layer NoPE), and a model without the field
is a Llama as before."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_hf import _hf_logits, packed_and_cached_match

from proxykd_jax.models import hf
from proxykd_jax.models.config import default_config
from proxykd_jax.models.llama import Llama, ModelConfig

VOCAB = 300
SMOL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    no_rope_layers=[1, 1, 1, 0],
    pad_token_id=None,
)


def _tokens(rows: int, length: int) -> np.ndarray:
    return np.random.default_rng().integers(0, VOCAB, (rows, length))


def _smollm3(**kw):
    """A tiny SmolLM3 with every tensor random (norm weights too)."""
    torch.manual_seed(int(np.random.default_rng().integers(1 << 31)))
    config = transformers.SmolLM3Config(**{**SMOL, **kw}, attn_implementation="eager")
    model = transformers.SmolLM3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("scan, tie", [(True, True), (False, False)])
def test_import_matches_transformers(tmp_path, scan, tie):
    ref = _smollm3(tie_word_embeddings=tie)
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path, run={"scan_layers": scan})
    assert cfg.rope_layers == (True, True, True, False) and cfg.rope_theta == 500.0
    assert (cfg.tie_embeddings, cfg.scan_layers, cfg.sliding_window, cfg.layer_types) == (tie, scan, None, None)
    assert cfg.num_params() == sum(p.numel() for p in ref.parameters())
    tokens = _tokens(2, 40)
    expected = _hf_logits(ref, tokens)
    assert np.std(expected) > 0.5
    ours = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
    # the NoPE layer matters: the same weights with RoPE on every layer compute other logits
    everywhere = Llama(ModelConfig(**{**vars(cfg), "rope_layers": None}), rngs=nnx.Rngs(0))
    nnx.update(everywhere, nnx.state(model))
    assert np.abs(np.asarray(everywhere(jnp.asarray(tokens))) - ours).max() > 1e-2


@pytest.mark.parametrize("window", [None, 5])
def test_packed_rows_and_cached_decoding_match_transformers(tmp_path, window):
    slide = dict(use_sliding_window=True, sliding_window=window) if window else {}
    ref = _smollm3(**slide)  # with a window: transformers' default, the NoPE layer slides
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path, run={"scan_layers": True})
    types = ("full_attention",) * 3 + ("sliding_attention",)
    assert (cfg.sliding_window, cfg.layer_types) == ((window, types) if window else (None, None))
    packed_and_cached_match(ref, model, lambda n: _tokens(1, n)[0])


def test_export_loads_back_as_smollm3(tmp_path):
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,  # not d_model / heads
        d_ff=48,
        max_seq_len=128,
        tie_embeddings=True,
        rope_theta=300.0,
        rope_layers=(False, True, True, False),
        scan_layers=False,
    )
    model = Llama(cfg, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 31))))
    hf.save_hf(model, cfg, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["architectures"], written["no_rope_layers"]) == (["SmolLM3ForCausalLM"], [0, 1, 1, 0])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back).__name__ == "SmolLM3ForCausalLM"
    tokens = _tokens(2, 30)
    np.testing.assert_allclose(_hf_logits(back, tokens), np.asarray(model(jnp.asarray(tokens))), atol=1e-4, rtol=1e-4)
    assert hf.read_config(tmp_path) == cfg


def test_transformers_defaults_for_keys_a_config_json_leaves_out():
    spec = {k: v for k, v in SMOL.items() if k not in ("no_rope_layers", "rope_parameters")}
    spec.update(architectures=["SmolLM3ForCausalLM"], num_hidden_layers=8)
    theirs = transformers.SmolLM3Config(**{k: v for k, v in spec.items() if k != "architectures"})
    ours = hf.config_from_hf(spec)
    assert ours.rope_layers == tuple(bool(b) for b in theirs.no_rope_layers) == (True, True, True, False) * 2
    assert (ours.rope_theta, ours.tie_embeddings) == (theirs.rope_parameters["rope_theta"], True) == (2e6, True)
    every = hf.config_from_hf({**spec, "no_rope_layers": [1] * 8})
    assert every.rope_layers is None  # RoPE on every layer: the neutral value, a Llama
    with pytest.raises(ValueError, match="config.json's no_rope_layers must list"):
        hf.config_from_hf({**spec, "no_rope_layers": [1, 0]})
    types = ["full_attention", "sliding_attention"] * 4  # sliding layers without use_sliding_window: refused
    with pytest.raises(ValueError, match="use_sliding_window is false"):
        hf.config_from_hf({**spec, "layer_types": types, "sliding_window": 8})


def test_a_model_without_the_field_is_unchanged_and_bad_values_are_refused():
    cd = default_config()
    assert cd.rope_layers is None and ModelConfig.from_config(cd).rope_layers is None
    cd.rope_layers = (1, 0)
    assert ModelConfig.from_config(cd).rope_layers == (True, False)
    assert ModelConfig.from_config(ModelConfig.from_config(cd).to_config()).rope_layers == (True, False)
    base = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48)
    plain, noped = ModelConfig(**base), ModelConfig(**base, rope_layers=(True, True))
    assert noped == plain  # RoPE on every layer is the default
    tokens = jnp.asarray(_tokens(1, 12))
    a, b = Llama(plain, rngs=nnx.Rngs(1)), Llama(noped, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(a(tokens)), np.asarray(b(tokens)))
    for bad in [(True,), (1, 2), "10", (1.0, 0)]:
        with pytest.raises(ValueError, match="model.rope_layers must list"):
            ModelConfig(**base, rope_layers=bad)
    with pytest.raises(ValueError, match="model.rope_layers"):
        ModelConfig(**base, rope_layers=(True, False), qk_norm=True)
