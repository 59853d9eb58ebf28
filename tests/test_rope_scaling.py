"""RoPE scaling beyond Llama-3's: `linear` (some Llama fine-tunes) and `yarn` (Qwen3 / Qwen2.5 long-context
folders). Frequencies and YaRN's attention factor equal transformers' own (`modeling_rope_utils`) on random
parameters; imported tiny models give transformers' logits past original_max_position_embeddings (both the
`rope_parameters` and the older `rope_scaling` config.json forms); an export reloads in transformers with the
same logits and reads back as the same config; `dynamic`, `longrope` and malformed tuples are refused."""

import json
import logging
import math
import pathlib
import runpy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_hf import _hf_logits, _hf_model
from test_qwen3 import QWEN3, _qwen3, _randomised, _seed, _tokens, tiny_config

from proxykd_jax.models import hf, llama
from proxykd_jax.models.llama import Llama, ModelConfig

LENGTH = 96  # positions up to 95: three times the yarn models' original 32
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
LLAMA3_FREQS = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _legacy_form(folder: pathlib.Path) -> None:
    """Rewrites a saved config.json's RoPE in the form before transformers 5: top-level rope_theta and a
    `rope_scaling` dict with `type`, no `rope_parameters`."""
    spec = json.loads((folder / "config.json").read_text())
    rope = spec.pop("rope_parameters")
    spec["rope_theta"] = rope.pop("rope_theta")
    spec["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    (folder / "config.json").write_text(json.dumps(spec))


def _warnings_of(fn):
    """(fn(), the messages transformers logged at WARNING or above meanwhile)."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        return fn(), messages
    finally:
        logging.getLogger("transformers").removeHandler(handler)


def test_frequencies_and_attention_factor_equal_transformers_on_random_parameters():
    rng = np.random.default_rng()
    for _ in range(40):
        head_dim = int(rng.choice([8, 16, 64, 128]))
        theta = float(rng.choice([1e4, 1e6])) * float(rng.uniform(0.5, 2.0))
        factor = float(rng.uniform(1.0, 16.0))
        original = int(rng.choice([16, 32, 4096, 32768]))
        rope = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
        if rng.random() < 0.5:
            rope.update(beta_fast=float(rng.uniform(8, 64)), beta_slow=float(rng.uniform(0.5, 4)))
        if rng.random() < 0.5:
            rope["truncate"] = bool(rng.random() < 0.5)
        pick = rng.random()
        if pick < 0.3:
            rope["attention_factor"] = float(rng.uniform(0.5, 2.0))
        elif pick < 0.6:
            rope.update(mscale=float(rng.uniform(0.5, 2.0)), mscale_all_dim=float(rng.uniform(0.5, 2.0)))
        spec = {**QWEN3, "head_dim": head_dim, "rope_theta": theta, "architectures": ["Qwen3ForCausalLM"]}
        spec["rope_scaling"] = rope
        theirs = transformers.Qwen3Config(
            **{k: v for k, v in json.loads(json.dumps(spec)).items() if k != "architectures"}
        )
        inv_freq, attention_factor = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](theirs)
        cfg = hf.config_from_hf(json.loads(json.dumps(spec)))
        assert cfg.rope_scaling[0] == "yarn" and len(cfg.rope_scaling) == 7, cfg.rope_scaling
        np.testing.assert_allclose(llama.rope_inv_freq(cfg), inv_freq.numpy(), rtol=2e-6, err_msg=str(rope))
        assert llama.rope_attention_factor(cfg) == pytest.approx(attention_factor, rel=1e-12), rope
    linear = {**QWEN3, "architectures": ["Qwen3ForCausalLM"], "rope_scaling": {"rope_type": "linear", "factor": 3.5}}
    cfg = hf.config_from_hf(linear)
    assert cfg.rope_scaling == ("linear", 3.5) and llama.rope_attention_factor(cfg) == 1.0
    theirs = transformers.Qwen3Config(**{k: v for k, v in linear.items() if k != "architectures"})
    inv_freq, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["linear"](theirs)
    np.testing.assert_allclose(llama.rope_inv_freq(cfg), inv_freq.numpy(), rtol=2e-6)


@pytest.mark.parametrize(
    "rope, legacy",
    [
        (YARN, False),
        (YARN, True),
        ({**YARN, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False, "mscale": 1.5, "mscale_all_dim": 0.5}, False),
        ({**YARN, "factor": 8.0, "attention_factor": 1.7}, True),
    ],
)
def test_yarn_qwen3_import_matches_transformers_past_the_original_context(tmp_path, rope, legacy):
    ref = _qwen3(rope_scaling=dict(rope))
    ref.save_pretrained(tmp_path / "src")
    if legacy:  # transformers reads the older form back as the same model
        _legacy_form(tmp_path / "src")
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    cfg, model = hf.load_hf(tmp_path / "src")
    assert cfg.rope_scaling[:3] == ("yarn", rope["factor"], 32)
    tokens = _tokens(2, LENGTH)
    expected = _hf_logits(ref, tokens)
    assert np.std(expected) > 0.5
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, atol=1e-4, rtol=1e-4)
    # exported with its source folder (whose config.json transformers keeps): the same logits again
    hf.save_hf(model, cfg, tmp_path / "out", source=tmp_path / "src")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(back, tokens), expected, atol=1e-4, rtol=1e-4)
    assert hf.read_config(tmp_path / "out") == cfg


@pytest.mark.parametrize("legacy", [False, True])
def test_linear_llama_import_matches_transformers(tmp_path, legacy):
    ref = _hf_model("llama", seed=_seed(), rope_scaling={"rope_type": "linear", "factor": 4.0})
    ref.save_pretrained(tmp_path)
    if legacy:
        _legacy_form(tmp_path)
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    cfg, model = hf.load_hf(tmp_path)
    assert cfg.rope_scaling == ("linear", 4.0)
    tokens = _tokens(2, LENGTH)
    expected = _hf_logits(ref, tokens)
    assert np.std(expected) > 0.5
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "scaling, qk_norm",
    [
        (("yarn", 4.0, 32, 32.0, 1.0, True, 0.1 * math.log(4.0) + 1.0), True),
        (("yarn", 4.0, 32, 24.0, 2.0, False, 1.25), False),
        (("linear", 2.5), False),
        (("linear", 2.5), True),
    ],
)
def test_export_reloads_in_transformers_with_the_same_logits(tmp_path, scaling, qk_norm):
    cfg = tiny_config(rope_theta=1e4, qk_norm=qk_norm, rope_scaling=scaling)
    model = _randomised(Llama(cfg, rngs=nnx.Rngs(_seed())))
    hf.save_hf(model, cfg, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == written["rope_scaling"]["type"] == scaling[0]
    assert {k: v for k, v in written["rope_scaling"].items() if k != "type"} == {
        k: v for k, v in written["rope_parameters"].items() if k != "rope_theta"
    }  # readers before transformers 5 read the same numbers
    back, messages = _warnings_of(
        lambda: transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    )
    assert not messages
    assert type(back).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    tokens = _tokens(2, LENGTH)
    np.testing.assert_allclose(_hf_logits(back, tokens), np.asarray(model(jnp.asarray(tokens))), atol=1e-4, rtol=1e-4)
    assert hf.read_config(tmp_path) == cfg


def test_rope_keys_are_read_with_transformers_priorities(tmp_path):
    """transformers reads `rope_scaling` before `rope_parameters`, and the RoPE dict's rope_theta before the
    top-level one."""
    spec = {
        **json.loads(json.dumps(QWEN3)),
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "rope_theta": 5000.0,
    }
    for extra in (
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 7000.0}},
        {"rope_scaling": {"type": "yarn", **YARN}, "rope_parameters": {"rope_type": "default", "rope_theta": 9e3}},
        {"rope_scaling": {"type": "yarn", "factor": 4.0}},  # original_max_position_embeddings: the context's
        {"rope_scaling": {**YARN}, "original_max_position_embeddings": 16},  # the dict's, not the top level's
        {"rope_scaling": {**LLAMA3_FREQS}},  # the context's (was refused)
        {"rope_scaling": {**LLAMA3_FREQS}, "original_max_position_embeddings": 16},  # still the context's
        {"rope_scaling": {**LLAMA3_FREQS, "original_max_position_embeddings": 64}},
    ):
        (tmp_path / "config.json").write_text(json.dumps({**spec, **extra}))
        theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
        ours = hf.read_config(tmp_path)
        assert ours.rope_theta == theirs["rope_theta"], extra
        assert ours.rope_scaling[:2] == (theirs["rope_type"], theirs["factor"]), extra
        original = {"yarn": 2, "llama3": 4}.get(theirs["rope_type"])
        if original:
            assert ours.rope_scaling[original] == theirs["original_max_position_embeddings"], extra


def test_refusals():
    spec = {**QWEN3, "architectures": ["Qwen3ForCausalLM"]}
    with pytest.raises(ValueError, match=r"rope type 'dynamic' .*sequence length .*supported: default, linear"):
        hf.config_from_hf({**spec, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match=r"rope type 'longrope' is not supported; supported: default, linear, llama3"):
        hf.config_from_hf({**spec, "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8}})
    for where in ("rope_parameters", None):  # read as full-width RoPE before: wrong numbers, silently
        partial = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}
        with pytest.raises(ValueError, match=r"partial_rotary_factor=0.5 \(RoPE on part of each head\)"):
            hf.config_from_hf({**spec, **(partial if where else {"partial_rotary_factor": 0.5})})
    shape = dict(vocab_size=8, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, d_ff=8)
    for bad in (
        ("linear",),
        ("linear", 0.0),
        ("linear", "2"),
        ("linear", 2.0, 1.0),
        ("dynamic", 2.0),
        "linear",
        ("yarn", 4.0, 32),
        ("yarn", 4.0, 32.5, 32.0, 1.0, True, 1.1),
        ("yarn", 4.0, 32, 32.0, 1.0, "yes", 1.1),
        ("yarn", 4.0, 32, 32.0, 1.0, True, float("nan")),
        ("llama3", 8.0, 1.0, 4.0),
    ):
        with pytest.raises(ValueError, match=r"model\.rope_scaling must be None or \('llama3', .*\('linear', fac"):
            ModelConfig(**shape, rope_scaling=bad)
    for good in (("llama3", 8.0, 1.0, 4.0, 8192), ("linear", 2), ("yarn", 4.0, 32, 32.0, 1.0, False, 1.1)):
        assert ModelConfig(**shape, rope_scaling=list(good)).rope_scaling == good  # kept as given


def test_a_yarn_folder_through_configs_hf(tmp_path):
    """`configs/hf.py` copies the yarn tuple (a bool inside) into its groups, and they build the folder's config."""
    _qwen3(rope_scaling=dict(YARN)).save_pretrained(tmp_path / "q3")
    get_config = runpy.run_path(str(pathlib.Path(__file__).parent.parent / "configs" / "hf.py"))["get_config"]
    cfg = get_config(str(tmp_path / "q3"))
    folder = hf.read_config(tmp_path / "q3")
    assert folder.rope_scaling[0] == "yarn"
    for group in (cfg.model, cfg.proxy):
        built = ModelConfig.from_config({k: v for k, v in group.items() if k not in ("dtype", "param_dtype")})
        assert built.rope_scaling == folder.rope_scaling and built.rope_theta == folder.rope_theta


@pytest.mark.parametrize("preset", ["configs/demo.py", "configs/llama.py:llama3-8b,70b"])
def test_the_command_line_turns_rope_scaling_off_with_none(preset, monkeypatch):
    """`--config.model.rope_scaling=None` was parsed as (None,) by ml_collections (a tuple field) and refused as
    no form of model.rope_scaling; it means None, as in a config file. A tuple is still read as one."""
    from proxykd_jax import cli

    for value, want in (("None", None), ("('linear', 2.0)", ("linear", 2.0))):
        argv = [f"--config={preset}", f"--config.model.rope_scaling={value}"]
        monkeypatch.setattr("sys.argv", ["proxykd", "distill", *argv])  # ml_collections reads overrides there
        cfg = cli.load_config("distill", argv)
        assert cfg.model.rope_scaling == want
        assert ModelConfig.from_config(cfg.model).rope_scaling == want
