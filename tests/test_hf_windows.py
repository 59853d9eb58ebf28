"""Sliding-window models (Mistral, Qwen2 with `use_sliding_window`): proxykd runs full attention, which equals the
window's up to the window, so an imported model's max_seq_len is capped there and the model refuses longer rows
(a silent mismatch before); Qwen2 caps only where some layer slides (`max_window_layers`, `layer_types`), as
transformers reads it; an export from the imported folder keeps its family, window and context in config.json."""

import dataclasses
import json
import pathlib
import runpy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_hf import _hf_logits, _hf_model

from proxykd_jax import config as config_lib
from proxykd_jax.errors import ConfigError
from proxykd_jax.models import hf


def _model(kind, **kw):
    return _hf_model(kind, seed=int(np.random.default_rng().integers(1 << 31)), **kw)


def _tokens(length):
    return np.random.default_rng().integers(0, 67, (2, length))


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("mistral", dict(sliding_window=8)),
        ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
        ("qwen2", dict(use_sliding_window=True, sliding_window=8, layer_types=["full_attention", "sliding_attention"])),
    ],
)
def test_a_windowed_model_is_capped_at_its_window_and_refuses_longer_rows(tmp_path, kind, kw):
    ref = _model(kind, **kw)
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path)
    assert cfg.max_seq_len == 8
    tokens = _tokens(8)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), _hf_logits(ref, tokens), atol=1e-4, rtol=1e-4)
    longer = _tokens(19)
    with pytest.raises(ValueError, match="rows of 19 tokens are longer than the model's max_seq_len 8"):
        model(jnp.asarray(longer))
    model.cfg = dataclasses.replace(cfg, max_seq_len=128)  # what ran before: full attention past the window
    gap = np.abs(np.asarray(model(jnp.asarray(longer))) - _hf_logits(ref, longer)).max(axis=(0, 2))
    # Each position past the window differs by more than the bound of equal above (float32 agreement is ~1e-5).
    # Not 1e-2: where one layer slides (qwen2 here) position 8 loses one key in that layer, whose random weight
    # can be small (gap[8] under 1e-2 in 0.2% of draws, 0.005 the least of 2000; under 1e-3 ~1e-5, extrapolated).
    assert gap[:8].max() < 1e-3 and gap[8:].min() > 1e-3, gap


@pytest.mark.parametrize(
    "kw",
    [
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=28),  # no layer from 28 on: none slides
        dict(use_sliding_window=False, sliding_window=8),
    ],
)
def test_a_qwen2_whose_layers_do_not_slide_keeps_its_context(tmp_path, kw):
    ref = _model("qwen2", **kw)
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path)
    assert cfg.max_seq_len == 128
    tokens = _tokens(19)
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
    tokens = _tokens(19)  # past the window too: transformers applies it, as the source did
    np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(ref, tokens), atol=1e-5, rtol=1e-5)
    assert hf.read_config(tmp_path / "out") == cfg
    # without the source (or one that describes another model) the config is written from ours: a Llama capped there
    other = _model("mistral", sliding_window=8, intermediate_size=40)
    other.save_pretrained(tmp_path / "other")
    for source in (None, tmp_path / "other"):
        hf.save_hf(model, cfg, tmp_path / "plain", source=source)
        written = json.loads((tmp_path / "plain" / "config.json").read_text())
        assert (written["architectures"], written["max_position_embeddings"]) == (["LlamaForCausalLM"], 8)


def test_align_is_not_refused_over_distill_schedule_fields():
    """align's phases set their own steps and warm-up: optim.warmup_steps over train.steps concerns distill only."""
    cfg = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "configs" / "demo.py"))["get_config"]()
    with cfg.unlocked():
        cfg.train.steps, cfg.optim.warmup_steps = 40, 100
    config_lib.validate(cfg, stage="align")
    with pytest.raises(ConfigError, match="config.optim.warmup_steps=100 must be below the schedule's 40"):
        config_lib.validate(cfg, stage="distill")
