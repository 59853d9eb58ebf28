"""Phi-3 / Phi-3.5 / Phi-4-mini models (`Phi3ForCausalLM`): fused qkv_proj and gate_up_proj split on import (also
block by block onto 8 devices) and fused back on export, RoPE on part of each head (`partial_rotary_factor`),
longrope scaling (short factors up to original_max_position_embeddings, the long ones past it, with its
attention_factor) and the window on every layer. Import equals transformers' logits (scanned and unrolled, packed and
padded rows, cached decoding, greedy generation), config.json is read as transformers reads it, the export loads back
in transformers as a Phi-3 with the same logits and fields, and what transformers' Phi-3 does not run is refused."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_hf import _hf_logits, _logits, packed_and_cached_match
from test_hf_sharded import _bits, _CountingReads, _mesh
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from proxykd_jax.models import hf, llama
from proxykd_jax.models.config import default_config
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.safetensors_io import SafetensorsFolder
from proxykd_jax.models.sampling import generate
from proxykd_jax.parallel import LOGICAL_RULES

VOCAB = 300
PHI3 = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,  # head_dim 16
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
)
PARTIAL = dict(partial_rotary_factor=0.75)  # Phi-4-mini's: 12 of each head's 16 dims rotate, 6 frequencies


def _longrope(original: int, **kw) -> dict:
    """Phi-3.5's form: top-level original_max_position_embeddings, a `rope_scaling` of random factors."""
    rng = np.random.default_rng()
    short, long = (1 + rng.random(6)).tolist(), (2 + 6 * rng.random(6)).tolist()
    rope = {"type": "longrope", "short_factor": short, "long_factor": long, **kw}
    return dict(PARTIAL, original_max_position_embeddings=original, rope_scaling=rope, rope_parameters=None)


def _tokens(rows: int, length: int) -> np.ndarray:
    return np.random.default_rng().integers(0, VOCAB, (rows, length))


def _phi3(**kw):
    """A tiny Phi-3 with every tensor random (norm weights too)."""
    torch.manual_seed(int(np.random.default_rng().integers(1 << 31)))
    spec = json.loads(json.dumps({**PHI3, **kw}))  # (transformers fills its defaults into the RoPE dicts it gets)
    config = transformers.Phi3Config(**spec, attn_implementation="eager")
    model = transformers.Phi3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.2 * torch.randn_like(p))
    return model


def _greedy_matches(ref, model, prompt: np.ndarray, new: int = 6) -> None:
    key = jax.random.key(0)
    out = generate(model, jnp.asarray(prompt[None]), np.array([len(prompt)]), key, max_new_tokens=new, temperature=0)
    with torch.no_grad():
        ids = torch.tensor(prompt[None])
        theirs = ref.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, eos_token_id=None
        )
    np.testing.assert_array_equal(np.asarray(out.tokens_BxT)[0], theirs[0, len(prompt) :].numpy())


@pytest.mark.parametrize(
    "kw, scan",
    [(dict(), True), (dict(PARTIAL, tie_word_embeddings=True), False), (_longrope(64, attention_factor=1.3), True)],
    ids=["phi3-mini", "partial-tied", "longrope"],
)
def test_import_matches_transformers(tmp_path, kw, scan):
    ref = _phi3(**kw)
    ref.save_pretrained(tmp_path)
    assert "model.layers.0.self_attn.qkv_proj.weight" in SafetensorsFolder(tmp_path).headers
    cfg, model = hf.load_hf(tmp_path, run={"scan_layers": scan})
    assert (cfg.head_dim, cfg.rope_theta, cfg.scan_layers) == (16, 1e4 if "rope_scaling" in kw else 500.0, scan)
    assert cfg.partial_rotary_factor == kw.get("partial_rotary_factor", 1.0) and cfg.rms_eps == 1e-5
    assert cfg.tie_embeddings == kw.get("tie_word_embeddings", False) and cfg.sliding_window is None
    assert cfg.num_params() == sum(p.numel() for p in ref.parameters())
    if "rope_scaling" in kw:
        rope = kw["rope_scaling"]
        assert cfg.rope_scaling == ("longrope", 64, 1.3, tuple(rope["short_factor"]), tuple(rope["long_factor"]))
    tokens = _tokens(2, 40)
    expected = _hf_logits(ref, tokens)
    assert np.std(expected) > 0.5
    ours = _logits(model, tokens)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
    if cfg.partial_rotary_factor != 1.0:  # the unrotated dims matter: full-width RoPE computes other logits
        full = Llama(ModelConfig(**{**vars(cfg), "partial_rotary_factor": 1.0, "rope_scaling": None}), rngs=nnx.Rngs(0))
        nnx.update(full, nnx.state(model))
        assert np.abs(_logits(full, tokens) - ours).max() > 1e-2


@pytest.mark.parametrize(
    "kw", [dict(PARTIAL, sliding_window=5), dict(_longrope(64), tie_word_embeddings=True)], ids=["window", "longrope"]
)
def test_packed_rows_cached_decoding_and_generation_match_transformers(tmp_path, kw):
    ref = _phi3(**kw)
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path, run={"scan_layers": True})
    assert cfg.sliding_window == kw.get("sliding_window") and cfg.windowed == ("sliding_window" in kw)
    c = packed_and_cached_match(ref, model, lambda n: _tokens(1, n)[0])  # (every row within the original 64)
    _greedy_matches(ref, model, c[:8])


def test_longrope_takes_the_long_factors_past_the_original_context(tmp_path):
    """transformers switches per call: rows longer than original_max_position_embeddings (16 here) run wholly on
    the long factors, shorter ones on the short; cached decoding past it, and generation from a prompt past it, too."""
    ref = _phi3(**_longrope(16))
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path, run={"scan_layers": False})
    assert cfg.rope_scaling[:2] == ("longrope", 16)
    assert llama.rope_attention_factor(cfg) == pytest.approx(np.sqrt(1 + np.log(128 / 16) / np.log(16)), rel=1e-12)
    row = _tokens(1, 40)
    short, long = _logits(model, row[:, :12]), _logits(model, row)
    np.testing.assert_allclose(short, _hf_logits(ref, row[:, :12]), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(long, _hf_logits(ref, row), atol=1e-4, rtol=1e-4)
    assert np.abs(long[:, :12] - short).max() > 1e-2  # the same tokens, the other factors
    padded = np.concatenate([row[:, :12], np.zeros((1, 30), int)], axis=1)  # padding (segment 0) reaches no further
    out = _logits(model, padded, [[1] * 12 + [0] * 30])
    np.testing.assert_allclose(out[:, :12], short, atol=1e-5, rtol=1e-5)
    graphdef, state = nnx.split(model)
    decode = jax.jit(lambda st, t, p, cache: nnx.merge(graphdef, st).decode(t, p, jnp.ones_like(p), cache))
    cache, parts = model.init_cache(1, 40), []
    for lo, hi in ((0, 37), (37, 38), (38, 40)):
        out, cache = decode(state, jnp.asarray(row[:, lo:hi]), jnp.arange(lo, hi, dtype=jnp.int32)[None], cache)
        parts.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), long, atol=1e-4, rtol=1e-4)
    _greedy_matches(ref, model, row[0, :20])


def test_export_loads_back_as_phi3_with_its_fields(tmp_path):
    ref = _phi3(**_longrope(32), sliding_window=9, tie_word_embeddings=True)
    ref.save_pretrained(tmp_path / "src")
    cfg, model = hf.load_hf(tmp_path / "src")
    assert cfg.windowed and cfg.tie_embeddings
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    tokens = _tokens(2, 40)  # past the original 32: the long factors
    ours = {n: _logits(model, tokens[:, :n]) for n in (20, 40)}  # (the one model both exports are compared with)
    for out, src in ((tmp_path / "with-source", tmp_path / "src"), (tmp_path / "from-config", None)):
        hf.save_hf(model, cfg, out, source=src)
        written = json.loads((out / "config.json").read_text())
        assert written["architectures"] == ["Phi3ForCausalLM"]
        for key in ("partial_rotary_factor", "original_max_position_embeddings", "sliding_window"):
            assert written[key] == source[key], key
        assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 1e4  # (and for readers before v5)
        for key in ("short_factor", "long_factor"):  # transformers 5 writes rope_parameters only
            assert written["rope_scaling"][key] == source["rope_parameters"][key] == written["rope_parameters"][key]
        names = SafetensorsFolder(out).headers
        assert names["model.layers.1.self_attn.qkv_proj.weight"] == ((128, 64), "F32")  # 4 + 2 * 2 heads of 16
        assert names["model.layers.1.mlp.gate_up_proj.weight"] == ((192, 64), "F32")
        assert not any("q_proj" in n or "gate_proj." in n for n in names)
        back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(back).__name__ == "Phi3ForCausalLM"
        for n in (20, 40):
            np.testing.assert_allclose(_hf_logits(back, tokens[:, :n]), ours[n], atol=1e-4, rtol=1e-4)
        assert hf.read_config(out) == cfg


def test_export_of_a_config_keeps_an_attention_factor_of_its_own(tmp_path):
    """A Phi-3 made from a config (no source folder): its longrope attention_factor, not the one transformers derives
    from the context over the original, is written and read back; without Phi-3's numerics a model exports as the
    Llama it computes."""
    factors = tuple(np.random.default_rng().uniform(1.0, 4.0, 4))
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=48,
        max_seq_len=64, partial_rotary_factor=0.5, rope_scaling=("longrope", 16, 1.7, factors, factors[::-1]),
    )  # fmt: skip
    model = Llama(cfg, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 31))))
    hf.save_hf(model, cfg, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_scaling"]["attention_factor"] == written["rope_parameters"]["attention_factor"] == 1.7
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = _tokens(2, 30)
    np.testing.assert_allclose(_hf_logits(back, tokens), _logits(model, tokens), atol=1e-4, rtol=1e-4)
    assert hf.read_config(tmp_path) == cfg
    plain = ModelConfig(**{**vars(cfg), "partial_rotary_factor": 1.0, "rope_scaling": None})
    hf.save_hf(Llama(plain, rngs=nnx.Rngs(0)), plain, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize(
    "rope",
    [
        # old names; transformers runs the top-level original_max_position_embeddings (by default 4096)
        dict(rope_scaling={"type": "su", "original_max_position_embeddings": 8}, original_max_position_embeddings=32),
        dict(rope_scaling={"type": "yarn", "original_max_position_embeddings": 8}),
        dict(
            rope_parameters={"rope_type": "longrope", "factor": 3.0, "rope_theta": 700.0, "partial_rotary_factor": 0.5}
        ),
        dict(rope_scaling={"type": "longrope", "attention_factor": 1.25}, original_max_position_embeddings=16),
    ],
    ids=["su", "yarn", "rope_parameters", "attention_factor"],
)
def test_config_json_rope_is_read_as_transformers_reads_it(rope):
    rng = np.random.default_rng()
    spec = {**PHI3, "architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.75, "rope_theta": 300.0}
    spec.update(rope_parameters=None, max_position_embeddings=8192)
    spec.update(json.loads(json.dumps(rope)))
    dims = int(16 * (spec.get("rope_parameters") or {}).get("partial_rotary_factor", 0.75)) // 2
    for d in (spec.get("rope_scaling"), spec.get("rope_parameters")):
        if d is not None:
            d.update(short_factor=(1 + rng.random(dims)).tolist(), long_factor=(2 + rng.random(dims)).tolist())
    theirs = transformers.Phi3Config(**{k: v for k, v in spec.items() if k != "architectures"})
    ours = hf.config_from_hf(spec)
    ROPE_INIT_FUNCTIONS["longrope"](theirs)  # (as the model builds it: the original it runs with in rope_parameters)
    params = theirs.rope_parameters
    assert (ours.rope_theta, ours.partial_rotary_factor) == (params["rope_theta"], params["partial_rotary_factor"])
    assert ours.rope_scaling[1] == params["original_max_position_embeddings"]
    for long in (False, True):
        seq_len = params["original_max_position_embeddings"] + 1 if long else None
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](theirs, seq_len=seq_len)
        np.testing.assert_allclose(llama.rope_inv_freq(ours, long=long), inv_freq.numpy(), rtol=1e-6)
        assert llama.rope_attention_factor(ours) == pytest.approx(attention_factor, rel=1e-12)


def test_transformers_defaults_for_keys_a_config_json_leaves_out():
    spec = {k: v for k, v in PHI3.items() if k not in ("max_position_embeddings", "rope_parameters")}
    theirs = transformers.Phi3Config(**spec)
    ours = hf.config_from_hf({**spec, "architectures": ["Phi3ForCausalLM"]})
    assert (ours.max_seq_len, ours.rms_eps, ours.rope_theta) == (4096, 1e-5, 1e4)
    assert (theirs.max_position_embeddings, theirs.rms_norm_eps, theirs.rope_parameters["rope_theta"]) == (
        4096,
        1e-5,
        1e4,
    )
    assert (ours.sliding_window, ours.partial_rotary_factor, ours.rope_scaling) == (None, 1.0, None)
    # Phi-3-mini-4k's window (2047 of a 4096 context) slides on every layer; Phi-3.5's (longer than its context) none
    assert (
        hf.config_from_hf({**spec, "architectures": ["Phi3ForCausalLM"], "sliding_window": 2047}).sliding_window == 2047
    )
    long = {**spec, "architectures": ["Phi3ForCausalLM"], "sliding_window": 262144, "max_position_embeddings": 131072}
    assert hf.config_from_hf(long).sliding_window is None


def test_what_phi3_does_not_run_is_refused(tmp_path):
    spec = {**PHI3, "architectures": ["Phi3ForCausalLM"]}
    with pytest.raises(ValueError, match=r"rope type 'linear' is not one a Phi3ForCausalLM runs; supported: default"):
        hf.config_from_hf({**spec, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match=r"lacks the field 'short_factor' that a Phi3ForCausalLM config must have"):
        hf.config_from_hf({**spec, "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 8}})
    with pytest.raises(ValueError, match=r"hidden_act='gelu_new'; only silu"):
        hf.config_from_hf({**spec, "hidden_act": "gelu_new"})
    llama_spec = {**spec, "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(
        ValueError, match=r"partial_rotary_factor=0.5 \(RoPE on part of each head\), which is supported"
    ):
        hf.config_from_hf({**llama_spec, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match=r"rope type 'longrope' is not supported; .*longrope on a Phi3ForCausalLM"):
        hf.config_from_hf({**llama_spec, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8}})
    # a fused tensor of another width than config.json's heads
    ref = _phi3()
    ref.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**written, "num_key_value_heads": 4}))
    with pytest.raises(ValueError, match=r"Tensor model.layers.0.self_attn.qkv_proj.weight in model.safetensors has "):
        hf.load_hf(tmp_path)


def test_model_config_field_defaults_and_refusals():
    cd = default_config()
    assert cd.partial_rotary_factor == 1.0 and ModelConfig.from_config(cd).partial_rotary_factor == 1.0
    base = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=48)
    assert ModelConfig(**base, partial_rotary_factor=1) == ModelConfig(**base)  # the default, every other family's
    rope = ["longrope", 64.0, 1.2, [1, 2.5, 3, 4], [5, 6, 7, 8]]  # as a JSON record or the command line give it
    cd.update(base, partial_rotary_factor=0.5, rope_scaling=rope)
    cfg = ModelConfig.from_config(cd)
    assert cfg.rotary_dim == 8 and cfg.rope_scaling == ("longrope", 64, 1.2, (1.0, 2.5, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0))
    assert ModelConfig.from_config(cfg.to_config()) == cfg
    for bad in (0.0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match=r"model.partial_rotary_factor must be a number in \(0, 1\]"):
            ModelConfig(**base, partial_rotary_factor=bad)
    with pytest.raises(
        ValueError, match=r"rotates int\(head_dim \* factor\) = 3 dims of each head, which must be even"
    ):
        ModelConfig(**base, partial_rotary_factor=0.1875)
    with pytest.raises(ValueError, match=r"one factor per rotated frequency \(rotary_dim / 2 = 8\), got 4 and 4"):
        ModelConfig(**base, rope_scaling=tuple(rope))
    for bad in (("longrope", 64, 1.2, (1.0,) * 4), ("longrope", 64, 0.0, (1.0,) * 4, (1.0,) * 4)):
        with pytest.raises(ValueError, match=r"model.rope_scaling must be None or"):
            ModelConfig(**base, partial_rotary_factor=0.5, rope_scaling=bad)
    with pytest.raises(
        ValueError, match=r"longrope \(Phi-3's\) needs model.head_dim \* num_heads = d_model, got head_"
    ):
        ModelConfig(**{**base, "head_dim": 8}, rope_scaling=("longrope", 64, 1.2, (1.0,) * 4, (1.0,) * 4))
    for other in (dict(qk_norm=True), dict(rope_scaling=("linear", 2.0)), dict(rope_layers=(True, False))):
        with pytest.raises(ValueError, match=r"are Phi-3's, and with \w+ \(another family's\) they make a model no"):
            ModelConfig(**base, partial_rotary_factor=0.5, **other)


def test_mesh_load_splits_the_fused_tensors_block_by_block(tmp_path, monkeypatch):
    """On fsdp 4 x tensor 2, each device reads its block of q, k, v, gate and up as a row range of the fused tensor:
    bit for bit the single-device load, every element read once; the export fuses them back bit for bit."""
    _phi3(**PARTIAL).to(torch.bfloat16).save_pretrained(tmp_path / "m", max_shard_size="40KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    _, single = hf.load_hf(tmp_path / "m", param_dtype="bfloat16")
    reads = _CountingReads(monkeypatch)
    cfg, sharded = hf.load_hf(tmp_path / "m", param_dtype="bfloat16", mesh=_mesh(), rules=LOGICAL_RULES)
    a = dict(nnx.to_flat_state(nnx.state(sharded, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(single, nnx.Param)))
    for key in a:
        x, y = a[key].get_value(), b[key].get_value()
        assert len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated, key
        np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=str(key))
    assert sum(n for _, n in reads.reads) == sum(int(np.prod(v.get_value().shape)) for v in a.values())
    biggest = max(max(s.data.size for s in v.get_value().addressable_shards) for v in a.values())
    assert max(n for _, n in reads.reads) <= biggest
    wk = np.asarray(a[("layers", "attn", "wk")].get_value())[1]  # layer 1's k: rows 64-95 of its qkv_proj
    qkv = SafetensorsFolder(tmp_path / "m").read("model.layers.1.self_attn.qkv_proj.weight", ())
    np.testing.assert_array_equal(_bits(wk), _bits(qkv[64:96].T.reshape(64, 2, 16).astype(ml_dtypes.bfloat16)))
    hf.save_hf(sharded, cfg, tmp_path / "out", source=tmp_path / "m", max_shard_bytes=30_000)
    ours, theirs = SafetensorsFolder(tmp_path / "out"), SafetensorsFolder(tmp_path / "m")
    assert ours.headers == theirs.headers
    for name in theirs.headers:
        np.testing.assert_array_equal(_bits(ours.read(name, ())), _bits(theirs.read(name, ())), err_msg=name)
