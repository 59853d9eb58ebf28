"""Seeded fuzz of config.json keys left out (and set to null) against transformers' own config classes, for every
supported family (`hf_families.DEFAULTS`: each family's class defaults, its optional fields' nulls, the bias keys its
modelling code ignores).

`dropped_folder` draws a config as `test_hf_fuzz.random_spec` does (now and then in the form before transformers 5),
writes its config.json and drops a random subset of the keys transformers has a class default for. `theirs` reads what
transformers runs from that folder (its model built on the meta device: heads, head_dim, the attention scale, biases,
q/k norms, norm eps, activation, tying, context, each layer's window and RoPE frequencies, and longrope's long ones)
and `ours` the same from our `ModelConfig`; where transformers refuses or cannot run the folder (a null its strict
fields refuse, query heads not a multiple of the key/value heads, an odd head), our import must refuse in one sentence
naming a config.json key. Most cases compare configs; a handful build the transformers model from the folder with
random weights and compare logits (float32, `test_hf_fuzz._close`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_hf_fuzz import (
    ARCHS,
    CLASSES,
    GEMMA2,
    GEMMA3,
    GEMMAS,
    PHI3,
    SMOLLM3,
    _close,
    _forward,
    _hf_logits,
    _legacy,
    random_spec,
)

from proxykd_jax.models import hf, hf_families
from proxykd_jax.models.rope import rope_attention_factor, rope_inv_freq

MISTRAL, QWEN2, QWEN3, LLAMA = "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"
# Kept in every config.json: the shapes (our import requires them) and what describes no model (token ids: their
# defaults lie past the tiny vocabularies; training-only fields)
KEPT = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "architectures"}
KEPT |= {"model_type", "transformers_version", "dtype", "pad_token_id", "bos_token_id", "eos_token_id"}
NOT_MODEL = {"use_cache", "initializer_range", "attention_dropout", "resid_pdrop", "embd_pdrop", "pretraining_tp"}
# Our refusals of folders transformers runs: SmolLM3 layers that transformers slides by attention kernel, or only
# some of them with RoPE on every layer (`test_hf_fuzz`'s "layer_types")
OURS_ONLY = ("while use_sliding_window is false", "slide only some layers of a SmolLM3")


def dropped_folder(arch: str, rng, folder, nulls: float = 0.0) -> dict | None:
    """Writes into `folder` a random config.json of `arch` with each optional key dropped at 35% (set to null at
    `nulls`); returns it, or None where the drawn config is one `random_spec` means to be refused."""
    spec, refused = random_spec(arch, rng)
    if refused:
        return None
    config = CLASSES[arch](**json.loads(json.dumps(spec)))
    config.architectures = [arch]
    config.save_pretrained(folder)
    if rng.random() < 0.3:
        _legacy(folder, arch)
    written = json.loads((folder / "config.json").read_text())
    for key in sorted(set(written) - KEPT):
        draw = rng.random()
        if draw < 0.35:
            written.pop(key)
        elif draw < 0.35 + nulls and key not in NOT_MODEL:
            written[key] = None
    (folder / "config.json").write_text(json.dumps(written))
    return written


def _layers_windows(config, arch: str) -> list:
    """Each layer's window in transformers' masks (eager / sdpa), None where its mask is causal."""
    n, window = config.num_hidden_layers, config.sliding_window if arch != LLAMA else None
    if arch in (MISTRAL, PHI3, LLAMA):
        return [window] * n
    sliding = [t == "sliding_attention" for t in config.layer_types]
    if (any(sliding) or arch in GEMMAS) and window is None:  # (a Gemma builds the sliding mask whatever its layers)
        raise RuntimeError("transformers builds no mask for sliding layers without a sliding_window")
    return [window if s else None for s in sliding]


def theirs(folder, arch: str) -> dict:
    """What transformers runs from `folder` (see the module docstring); raises where it cannot run it."""
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    rotary = type(model.model.rotary_emb)(config=config)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    if config.num_attention_heads % config.num_key_value_heads:
        raise RuntimeError("transformers' grouped-query attention needs heads a multiple of the key/value heads")
    partial = (config.rope_parameters.get("partial_rotary_factor") or 1.0) if arch == PHI3 else 1.0
    if attn.head_dim % 2 or int(attn.head_dim * partial) % 2:
        raise RuntimeError("transformers' rotate_half needs an even number of rotated dims")
    ropes = []
    for i, kind in enumerate(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers):
        if arch == SMOLLM3 and not config.no_rope_layers[i]:
            ropes.append(None)
            continue
        named = arch == GEMMA3
        inv_freq = getattr(rotary, f"{kind}_inv_freq" if named else "inv_freq")
        scale = getattr(rotary, f"{kind}_attention_scaling" if named else "attention_scaling")
        long = None
        if (rotary.rope_type[kind] if named else rotary.rope_type) == "longrope":
            original = config.rope_parameters["original_max_position_embeddings"]
            init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"]
            long = (original, init(config, None, seq_len=original + 1)[0].double().numpy())
        ropes.append((inv_freq.double().numpy(), float(scale), long))
    q, gate = getattr(attn, "q_proj", None) or attn.qkv_proj, getattr(mlp, "gate_proj", None) or mlp.gate_up_proj
    norm, act = model.model.norm, getattr(mlp, "act_fn", None) or mlp.activation_fn
    max_pos = config.max_position_embeddings
    return dict(
        shape=(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.intermediate_size),
        heads=(config.num_attention_heads, config.num_key_value_heads, attn.head_dim),
        scaling=attn.scaling,
        biases=(q.bias is not None, attn.o_proj.bias is not None, gate.bias is not None),
        qk_norm=hasattr(attn, "q_norm"),
        eps=getattr(norm, "variance_epsilon", getattr(norm, "eps", None)),
        act={"SiLUActivation": "silu", "SiLU": "silu", "GELUTanh": "gelu_tanh"}.get(type(act).__name__, act),
        tie=bool(config.tie_word_embeddings),
        max_pos=max_pos,
        windows=[w if w is not None and w < max_pos else None for w in _layers_windows(config, arch)],
        ropes=ropes,
        caps=(  # (transformers 5's Gemma 3 attention never applies its attn_logit_softcapping)
            getattr(config, "attn_logit_softcapping", None) if arch == GEMMA2 else None,
            getattr(config, "final_logit_softcapping", None),
        ),
    )


def ours(cfg) -> dict:
    """`theirs`' facts of our `cfg`."""
    types = cfg.layer_types or ["sliding_attention"] * cfg.num_layers
    ropes = []
    for i, kind in enumerate(types):
        if cfg.rope_layers is not None and not cfg.rope_layers[i]:
            ropes.append(None)
            continue
        layer = cfg
        if cfg.rope_local_theta is not None and kind == "sliding_attention":
            layer = dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None)
        long = None
        if layer.rope_scaling is not None and layer.rope_scaling[0] == "longrope":
            long = (layer.rope_scaling[1], rope_inv_freq(layer, long=True))
        ropes.append((rope_inv_freq(layer), rope_attention_factor(layer), long))
    windows = [cfg.sliding_window if kind == "sliding_attention" else None for kind in types]
    return dict(
        shape=(cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.d_ff),
        heads=(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
        scaling=(cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5,
        biases=(cfg.qkv_bias, False, False),
        qk_norm=cfg.qk_norm,
        eps=cfg.rms_eps,
        act=cfg.activation,
        tie=cfg.tie_embeddings,
        max_pos=cfg.max_seq_len,
        windows=[w if w is not None and w < cfg.max_seq_len else None for w in windows],
        ropes=ropes,
        caps=(cfg.attn_softcap, cfg.logit_softcap),
    )


def assert_same(t: dict, o: dict, what: str) -> None:
    """`theirs` equals `ours`: RoPE frequencies to float32's precision (transformers computes them in float32)."""
    for key in t:
        if key != "ropes":
            same = math.isclose(t[key], o[key], rel_tol=1e-9) if key in ("eps", "scaling") else t[key] == o[key]
            assert same, (what, key, t[key], o[key])
    for i, (a, b) in enumerate(zip(t["ropes"], o["ropes"], strict=True)):
        assert (a is None) == (b is None), (what, "rope on layer", i)
        if a is not None:
            np.testing.assert_allclose(a[0], b[0], rtol=1e-5, err_msg=f"{what} layer {i}")
            assert math.isclose(a[1], b[1], rel_tol=1e-5) and (a[2] is None) == (b[2] is None), (what, i, a[1], b[1])
            if a[2] is not None:
                assert a[2][0] == b[2][0], (what, i)
                np.testing.assert_allclose(a[2][1], b[2][1], rtol=1e-5, err_msg=f"{what} layer {i} long")


def compare_folder(folder, arch: str, written: dict, what: str) -> str:
    """Our import of `written` against transformers' read of `folder`; returns the outcome."""
    try:
        t, cannot = theirs(folder, arch), None
    except Exception as e:  # (transformers' strict fields, or what its model cannot run)
        t, cannot = None, e
    try:
        cfg, refusal = hf.config_from_hf(json.loads(json.dumps(written))), None
    except ValueError as e:
        cfg, refusal = None, str(e)
    if refusal is not None:
        assert "config.json" in refusal and refusal.endswith(".") and ". " not in refusal, (what, refusal)
    if cannot is not None:
        windowless = "without a sliding_window" in str(cannot)  # (null window: we run none; `sliding_window`)
        assert refusal is not None or (windowless and not cfg.windowed), (what, cannot, cfg)
        return "transformers cannot run it"
    if refusal is not None:
        assert any(s in refusal for s in OURS_ONLY), (what, refusal)
        return "refused"
    assert_same(t, ours(cfg), what)
    return "same"


@pytest.mark.parametrize("arch", sorted(CLASSES))
def test_config_json_keys_left_out_are_read_as_transformers_reads_them(tmp_path, arch):
    """16 seeded drops per family, each read as transformers reads it; across them each family default is left out in
    some folder (Qwen's 32 key/value heads: one transformers cannot run with our 2-8 query heads, refused)."""
    outcomes, checked = [], set()
    for index in range(16):
        rng = np.random.default_rng([ARCHS.index(arch), index, 5150])
        folder = tmp_path / str(index)
        written = dropped_folder(arch, rng, folder)
        if written is None:
            continue
        outcome = compare_folder(folder, arch, written, f"{arch} #{index}: {sorted(written)}")
        outcomes.append(outcome)
        checked |= set(hf_families.DEFAULTS[arch]) - set(written)
    assert outcomes.count("same") >= 6, outcomes
    assert checked >= set(hf_families.DEFAULTS[arch]) - {"rope_theta", "rope_local_base_freq"}, checked


def test_config_json_nulls_are_read_or_refused_as_transformers_does(tmp_path):
    """Keys set to null: read where transformers' class field is optional (key/value heads, a Llama's head_dim, no
    window), refused naming the key where its strict fields refuse them (the import read some as the default and
    failed on others with a traceback: max_position_embeddings, rms_norm_eps)."""
    outcomes = []
    older = ARCHS[: ARCHS.index(GEMMA2)]  # (their draws as before Gemma 2 came, then Gemma 2's)
    for index, arch in [*((i, older[i % len(older)]) for i in range(40)), *((i, GEMMA2) for i in range(40, 46))]:
        rng = np.random.default_rng([index, 5151])
        written = dropped_folder(arch, rng, tmp_path / str(index), nulls=0.1)
        if written is not None:
            outcomes.append(compare_folder(tmp_path / str(index), arch, written, f"{arch} #{index}: {written}"))
    assert outcomes.count("same") >= 5 and outcomes.count("transformers cannot run it") >= 5, outcomes


# ---------------------------------------------------------------------------------------------- the defects


def _minimal(arch: str, **extra) -> dict:
    """A tiny config.json of `arch` holding only its shapes and `extra`."""
    model_type = CLASSES[arch].model_type
    spec = dict(vocab_size=91, hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=16)
    return dict(spec, architectures=[arch], model_type=model_type, pad_token_id=None, bos_token_id=None, **extra)


def _both(tmp_path, spec: dict):
    """(transformers' facts, ours) of config.json `spec`."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return theirs(tmp_path, spec["architectures"][0]), ours(hf.config_from_hf(spec))


def test_a_mistral_without_sliding_window_runs_transformers_default_window(tmp_path):
    """MistralConfig's sliding_window default is 4096 (a null: none) and its context 131072: a config.json without
    the key imported without a window and with a context of 2048."""
    t, o = _both(tmp_path / "left_out", _minimal(MISTRAL, num_key_value_heads=4))
    assert o["windows"] == [4096, 4096] and o["max_pos"] == 131_072
    assert_same(t, o, "mistral without sliding_window")
    t, o = _both(tmp_path / "null", _minimal(MISTRAL, num_key_value_heads=4, sliding_window=None))
    assert o["windows"] == [None, None]
    assert_same(t, o, "mistral with a null sliding_window")


@pytest.mark.parametrize(
    "arch, defaults",
    [
        (MISTRAL, dict(kv=8, max_pos=131_072)),
        (QWEN2, dict(kv=32, max_pos=32_768)),  # (64 query heads, below)
        (QWEN3, dict(kv=32, max_pos=32_768, head_dim=128)),
        (SMOLLM3, dict(kv=4, max_pos=32_768)),
        (GEMMA3, dict(kv=4, max_pos=131_072, head_dim=256)),
        (GEMMA2, dict(kv=4, max_pos=8192, head_dim=256)),
        (PHI3, dict(kv=64, max_pos=4096)),
        (LLAMA, dict(kv=64, max_pos=2048)),
    ],
)
def test_each_family_reads_a_left_out_key_value_heads_and_context_as_its_class_default(tmp_path, arch, defaults):
    """num_key_value_heads and max_position_embeddings left out: each class's default (the import took the query
    heads and 2048 for every family)."""
    spec = _minimal(arch, num_attention_heads=64, hidden_size=256, query_pre_attn_scalar=64)
    t, o = _both(tmp_path, spec)
    assert (o["heads"][1], o["max_pos"]) == (defaults["kv"], defaults["max_pos"])
    assert o["heads"][2] == defaults.get("head_dim", 4)
    assert_same(t, o, arch)


def test_qwen_use_sliding_window_without_sliding_window_slides_by_4096(tmp_path):
    """Qwen2Config's sliding_window default is 4096: with use_sliding_window and the key left out, the layers from
    max_window_layers on slide (the import ran them without a window)."""
    spec = _minimal(QWEN2, num_key_value_heads=8, use_sliding_window=True, max_window_layers=1)
    t, o = _both(tmp_path, spec)
    assert o["windows"] == [None, 4096]
    assert_same(t, o, "qwen2 window")


BIAS_READ = {LLAMA: ("attention_bias", "mlp_bias"), SMOLLM3: ("attention_bias", "mlp_bias")}
BIAS_READ |= {QWEN3: ("attention_bias",), GEMMA3: ("attention_bias",), MISTRAL: (), QWEN2: (), PHI3: ()}
BIAS_READ |= {GEMMA2: ("attention_bias",)}


@pytest.mark.parametrize("key", ["attention_bias", "mlp_bias"])
@pytest.mark.parametrize("arch", sorted(CLASSES))
def test_a_bias_key_is_refused_where_transformers_reads_it_and_ignored_where_it_does_not(tmp_path, arch, key, caplog):
    """transformers builds Mistral's, Phi-3's and Qwen2's projections with fixed biases (Qwen2: q/k/v biased, o and
    the MLP not), and Qwen3's and Gemma 3's MLPs without: there attention_bias / mlp_bias are ignored, as the
    import now does (it refused them); where a family reads them, the biases they add are refused."""
    spec = _minimal(arch, num_key_value_heads=8, head_dim=4, query_pre_attn_scalar=4, **{key: True})
    if key in BIAS_READ[arch]:
        with pytest.raises(ValueError, match=rf"^config.json sets {key}=true \(bias"):
            hf.config_from_hf(spec)
        return
    with caplog.at_level(logging.INFO, logger="proxykd_jax.models.hf_families"):
        t, o = _both(tmp_path, spec)
    assert t["biases"] == o["biases"] == (arch == QWEN2, False, False)
    assert_same(t, o, f"{arch} {key}")
    assert f"config.json sets ['{key}'], which a {arch} ignores" in caplog.text


@pytest.mark.parametrize(
    "arch, extra, pattern",
    [
        (MISTRAL, dict(num_attention_heads=4, hidden_size=64), r"num_attention_heads \(4\) is not a multiple of its "
         r"num_key_value_heads \(8, the MistralForCausalLM default without the key\)"),
        (QWEN2, dict(num_attention_heads=4, num_key_value_heads=3), r"num_attention_heads \(4\) is not a multiple"),
        (QWEN2, dict(num_attention_heads=2, hidden_size=38, num_key_value_heads=2),
         r"head_dim is 19 \(hidden_size // num_attention_heads without a head_dim\)"),
        (PHI3, dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=40, partial_rotary_factor=0.75),
         r"partial_rotary_factor=0.75 rotates int\(head_dim \* factor\) = 7 dims of its 10-dim heads"),
        (PHI3, dict(num_attention_heads=4, num_key_value_heads=4, original_max_position_embeddings=16,
                    rope_scaling=dict(type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4)),
         r"longrope short_factor and long_factor give \[4\] factors where each rotated frequency needs one "
         r"\(int\(head_dim \* partial_rotary_factor\) / 2 = 8\)"),  # (a partial_rotary_factor of 0.5 left out)
        (QWEN3, dict(max_position_embeddings=None), r"sets max_position_embeddings to null, which transformers"),
        (MISTRAL, dict(rms_norm_eps=None), r"sets rms_norm_eps to null"),
        (QWEN2, dict(head_dim=None), r"sets head_dim to null"),
        (GEMMA3, dict(num_key_value_heads=None), r"sets num_key_value_heads to null"),
    ],
)  # fmt: skip
def test_what_transformers_cannot_run_is_refused_in_one_sentence_naming_the_key(tmp_path, arch, extra, pattern):
    """Folders transformers refuses (nulls its strict fields refuse, longrope factors for another rotary) or fails on
    (heads, odd rotated dims): the import refused some naming model fields, imported others, and failed on nulls with
    a traceback."""
    spec = _minimal(arch, query_pre_attn_scalar=4, **extra)
    (tmp_path / "config.json").write_text(json.dumps(spec))
    with pytest.raises(Exception):  # noqa: B017, PT011  (transformers' own errors, of many types)
        theirs(tmp_path, arch)
    with pytest.raises(ValueError, match=pattern) as e:
        hf.config_from_hf(spec)
    message = str(e.value)
    assert message.startswith("config.json") and message.endswith(".") and ". " not in message, message


def _runs_in_transformers(folder) -> str | None:
    """None where transformers' model of `folder` (random weights) runs a forward with eager and with sdpa
    attention; else its first error."""
    config = transformers.AutoConfig.from_pretrained(folder)
    for kernel in ("eager", "sdpa"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=kernel).eval()
            with torch.no_grad():
                model(torch.randint(0, config.vocab_size, (1, 12)))
        except Exception as e:  # (its own errors, of several types)
            return f"{kernel}: {type(e).__name__}: {e}"
    return None


NULL_WINDOW = dict(sliding_window=None, num_key_value_heads=8, head_dim=4, query_pre_attn_scalar=4)
SLIDING = dict(layer_types=["full_attention", "sliding_attention"])


@pytest.mark.parametrize(
    "arch, extra, named",
    [
        (GEMMA3, SLIDING, "config.json's layer_types name sliding_attention layers while sliding_window is null"),
        (GEMMA3, dict(sliding_window_pattern=2), "config.json's layer_types (sliding_window_pattern without them)"),
        (GEMMA3, dict(layer_types=["full_attention"] * 2), "config.json sets sliding_window to null"),
        (QWEN2, dict(SLIDING, use_sliding_window=True), "layer_types name sliding_attention layers while sliding_"),
        (QWEN2, dict(SLIDING, use_sliding_window=False), "layer_types name sliding_attention layers while sliding_"),
        (QWEN3, dict(SLIDING, use_sliding_window=True), "layer_types name sliding_attention layers while sliding_"),
        (SMOLLM3, dict(SLIDING, use_sliding_window=True, no_rope_layers=[1, 0]), "layer_types name sliding_attention"),
    ],
)
def test_a_null_sliding_window_is_refused_where_transformers_cannot_run_it(tmp_path, arch, extra, named):
    """A null sliding_window where layer_types (or a Gemma 3's sliding_window_pattern) name sliding layers, and on
    any Gemma 3: transformers reads the config but its model fails on the first forward (its sliding mask and cache
    need the window); the import read it as no window and ran every layer full. Refused in one sentence naming
    sliding_window and layer_types."""
    spec = _minimal(arch, **NULL_WINDOW, **extra)
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert _runs_in_transformers(tmp_path) is not None
    with pytest.raises(ValueError) as e:
        hf.config_from_hf(spec)
    message = str(e.value)
    assert message.startswith("config.json") and named in message, message
    assert message.endswith(".") and ". " not in message, message
    assert "sliding_window" in message and "layer_types" in message, message


@pytest.mark.parametrize(
    "arch, extra",
    [
        (QWEN2, dict(use_sliding_window=True, max_window_layers=1)),  # (no layer_types: the null window slides none)
        (QWEN3, dict(use_sliding_window=True)),
        (SMOLLM3, dict(use_sliding_window=True, no_rope_layers=[1, 0])),
        (MISTRAL, {}),
        (PHI3, {}),
    ],
)
def test_a_null_sliding_window_transformers_runs_is_read_as_no_window(tmp_path, arch, extra):
    """Where transformers runs a null sliding_window (no layer_types naming sliding layers; Mistral's and Phi-3's
    every layer) it runs it as no window, as the import does."""
    spec = _minimal(arch, **NULL_WINDOW, **extra)
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert _runs_in_transformers(tmp_path) is None
    t, o = _both(tmp_path, spec)
    assert o["windows"] == [None, None]
    assert_same(t, o, f"{arch} with a null sliding_window")


# ---------------------------------------------------------------------------------------------- logits


def _random_weights(model, arch: str, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = p.ndim == 1 and "norm" in name
            p.copy_((0.0 if arch in GEMMAS or not norm else 1.0) + 0.2 * torch.randn_like(p))
    return model.eval()


LOGIT_CASES = [
    (MISTRAL, dict(attention_bias=True, mlp_bias=True)),  # 16 heads, 8 key/value heads, window 4096, context
    (QWEN2, dict(num_attention_heads=8, num_key_value_heads=4, mlp_bias=True, use_sliding_window=True)),
    (GEMMA3, dict(num_attention_heads=8, head_dim=8, query_pre_attn_scalar=8, mlp_bias=True, sliding_window=5)),
    (GEMMA2, dict(num_attention_heads=8, head_dim=8, query_pre_attn_scalar=8, sliding_window=5)),  # (caps 50, 30)
    (PHI3, dict(num_attention_heads=8, attention_bias=True, mlp_bias=True, sliding_window=6)),
]


@pytest.mark.parametrize("arch, extra", LOGIT_CASES)
def test_logits_of_a_folder_with_keys_left_out_match_transformers(tmp_path, arch, extra):
    """transformers' model of a config.json with keys left out (and bias keys it ignores), random weights, saved
    with that config.json: our import's logits equal its own on random tokens."""
    spec = _minimal(arch, **extra)
    (tmp_path / "config.json").write_text(json.dumps(spec))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    rng = np.random.default_rng()
    model = _random_weights(transformers.AutoModelForCausalLM.from_config(config), arch, int(rng.integers(1 << 31)))
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "config.json").write_text(json.dumps(spec))  # (save_pretrained writes every key)
    cfg, ours_model = hf.load_hf(tmp_path / "src")
    tokens = rng.integers(0, spec["vocab_size"], (2, 24))
    logits = np.asarray(_forward(ours_model, jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32)))
    _close(logits, _hf_logits(model, tokens), f"{arch} {cfg}", _hf_logits(model.double(), tokens))
