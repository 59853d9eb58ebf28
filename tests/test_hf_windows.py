"""Sliding-window models (Mistral, Qwen2 with `use_sliding_window`): imported with their window (`sliding_window`, and
`layer_types` where only some layers slide, as transformers reads `max_window_layers` / `layer_types`) and their full
context, they equal transformers' logits on rows longer than the window (scanned and unrolled layers, packed rows
against each sequence alone, KV-cache decoding past the window); an export keeps the window, from the source folder's
config.json or written from ours."""

import json
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_hf import _hf_logits, _hf_model

from proxykd_jax import config as config_lib
from proxykd_jax.errors import ConfigError
from proxykd_jax.models import hf

WINDOWED = [
    ("mistral", dict(sliding_window=8), None),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
     ("full_attention", "sliding_attention")),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
     ("sliding_attention", "full_attention")),
]  # fmt: skip


def _model(kind, **kw):
    return _hf_model(kind, seed=int(np.random.default_rng().integers(1 << 31)), attn_implementation="eager", **kw)


def _tokens(rows, length):
    return np.random.default_rng().integers(0, 67, (rows, length))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("kind, kw, types", WINDOWED)
def test_a_windowed_model_matches_transformers_past_its_window(tmp_path, kind, kw, types, scan):
    ref = _model(kind, **kw)
    ref.save_pretrained(tmp_path / "src")
    cfg, model = hf.load_hf(tmp_path / "src", run={"scan_layers": scan})
    assert (cfg.max_seq_len, cfg.sliding_window, cfg.layer_types, cfg.scan_layers) == (128, 8, types, scan)
    tokens = _tokens(2, 24)
    expected = _hf_logits(ref, tokens)
    ours = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
    # the same weights without a window differ past it: the window is what made them agree
    spec = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "full").mkdir()
    no_window = {**spec, "sliding_window": spec["max_position_embeddings"]}  # (a null: refused where layers slide)
    (tmp_path / "full" / "config.json").write_text(json.dumps(no_window))
    (tmp_path / "full" / "model.safetensors").symlink_to(tmp_path / "src" / "model.safetensors")
    _, full = hf.load_hf(tmp_path / "full", run={"scan_layers": scan})
    gap = np.abs(np.asarray(full(jnp.asarray(tokens))) - ours).max(axis=(0, 2))
    assert gap[:8].max() < 1e-5 and gap[8:].max() > 1e-3, gap
    # packed rows: two sequences each longer than the window (and padding), each as if alone
    a, b, c = _tokens(1, 11)[0], _tokens(1, 10)[0], _tokens(1, 24)[0]
    packed = np.stack([np.concatenate([a, b, np.zeros(3, int)]), c])
    segments = jnp.asarray([[1] * 11 + [2] * 10 + [0] * 3, [1] * 24])
    logits = np.asarray(model(jnp.asarray(packed), None, segments))
    for row, start, seq in ((0, 0, a), (0, 11, b), (1, 0, c)):
        np.testing.assert_allclose(logits[row, start : start + len(seq)], _hf_logits(ref, seq[None])[0], atol=1e-4)


@pytest.mark.parametrize("kind, kw, types", WINDOWED[:2])
def test_cached_decoding_past_the_window_equals_the_full_forward(tmp_path, kind, kw, types):
    ref = _model(kind, **kw)
    ref.save_pretrained(tmp_path)
    _, model = hf.load_hf(tmp_path, run={"scan_layers": True})
    tokens = jnp.asarray(_tokens(1, 24))
    graphdef, state = nnx.split(model)
    full = np.asarray(model(tokens))
    decode = jax.jit(lambda st, t, p, c: nnx.merge(graphdef, st).decode(t, p, jnp.ones_like(p), c))
    cache, parts = model.init_cache(1, 24), []
    for lo, hi in ((0, 10), (10, 11), (11, 20), *((i, i + 1) for i in range(20, 24))):
        out, cache = decode(state, tokens[:, lo:hi], jnp.arange(lo, hi, dtype=jnp.int32)[None], cache)
        parts.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kw",
    [
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=28),  # no layer from 28 on: none slides
        dict(use_sliding_window=False, sliding_window=8),
    ],
)
def test_a_qwen2_whose_layers_do_not_slide_has_no_window(tmp_path, kw):
    ref = _model("qwen2", **kw)
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path)
    assert (cfg.max_seq_len, cfg.sliding_window, cfg.layer_types) == (128, None, None)
    tokens = _tokens(2, 19)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), _hf_logits(ref, tokens), atol=1e-4, rtol=1e-4)


def test_an_export_from_a_mistral_folder_stays_a_mistral_with_its_window(tmp_path):
    ref = _model("mistral", sliding_window=8, rope_theta=1e6)
    ref.save_pretrained(tmp_path / "src")
    cfg, model = hf.load_hf(tmp_path / "src")
    hf.save_hf(model, cfg, tmp_path / "out", source=tmp_path / "src")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["MistralForCausalLM"] and written["model_type"] == "mistral"
    assert (written["sliding_window"], written["max_position_embeddings"]) == (8, 128)
    assert written["rope_theta"] == 1e6  # top-level too (readers before transformers 5), whatever the source had
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = _tokens(2, 24)  # past the window too: transformers applies it, as the source did
    np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(ref, tokens), atol=1e-5, rtol=1e-5)
    assert hf.read_config(tmp_path / "out") == cfg
    # without the source (or one that describes another model) the config is written from ours: a Mistral too
    other = _model("mistral", sliding_window=8, intermediate_size=40)
    other.save_pretrained(tmp_path / "other")
    for source in (None, tmp_path / "other"):
        hf.save_hf(model, cfg, tmp_path / "plain", source=source)
        written = json.loads((tmp_path / "plain" / "config.json").read_text())
        assert written["architectures"] == ["MistralForCausalLM"]
        assert (written["sliding_window"], written["max_position_embeddings"]) == (8, 128)
        assert hf.read_config(tmp_path / "plain") == cfg
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
        np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(ref, tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind, kw, types", WINDOWED[1:])
def test_a_qwen2_with_sliding_layers_exports_them(tmp_path, kind, kw, types):
    ref = _model(kind, **kw)
    ref.save_pretrained(tmp_path / "src")
    cfg, model = hf.load_hf(tmp_path / "src")
    hf.save_hf(model, cfg, tmp_path / "out")  # written from ours
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["Qwen2ForCausalLM"] and written["use_sliding_window"] is True
    assert (written["sliding_window"], tuple(written["layer_types"])) == (8, types)
    assert hf.read_config(tmp_path / "out") == cfg
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = _tokens(2, 24)
    np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(ref, tokens), atol=1e-4, rtol=1e-4)


def test_align_is_not_refused_over_distill_schedule_fields():
    """align's phases set their own steps and warm-up: optim.warmup_steps over train.steps concerns distill only."""
    cfg = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "configs" / "demo.py"))["get_config"]()
    with cfg.unlocked():
        cfg.train.steps, cfg.optim.warmup_steps = 40, 100
    config_lib.validate(cfg, stage="align")
    with pytest.raises(ConfigError, match="config.optim.warmup_steps=100 must be below the schedule's 40"):
        config_lib.validate(cfg, stage="distill")
