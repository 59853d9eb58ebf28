"""Seeded fuzz of the Hugging Face import and export against transformers, over random tiny configs of every
supported architecture (`hf_config.SUPPORTED`).

`random_spec(arch, rng)` draws a transformers config (2-3 layers, d_model 32-96, grouped-query heads 1/2/4 to a
key/value head, explicit head_dim unlike d_model / heads where the family takes one, tied or not, random eps and RoPE
base, each RoPE scaling the family runs, sliding windows with layer_types / max_window_layers / use_sliding_window /
no_rope_layers, vocabularies not a multiple of 8), and now and then a field we do not run (`refused`: what our import
must name in its one-sentence refusal). `check_spec` builds it in transformers with every tensor random, saves it
(now and then rewriting config.json in the form before transformers 5, or without the keys transformers derives),
imports it, and compares logits on random rows and on packed and padded rows (each sequence against transformers
alone) past the window and the original context; then exports ours (from its config, and with the source folder)
and checks that transformers loads the export with no missing or unexpected tensors and the same logits, and that
it reads back as the same config.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama

CLASSES = {
    "LlamaForCausalLM": transformers.LlamaConfig,
    "MistralForCausalLM": transformers.MistralConfig,
    "Qwen2ForCausalLM": transformers.Qwen2Config,
    "Qwen3ForCausalLM": transformers.Qwen3Config,
    "Gemma2ForCausalLM": transformers.Gemma2Config,
    "Gemma3ForCausalLM": transformers.Gemma3TextConfig,
    "SmolLM3ForCausalLM": transformers.SmolLM3Config,
    "Phi3ForCausalLM": transformers.Phi3Config,
}
GEMMA2, GEMMA3, PHI3, SMOLLM3 = "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "SmolLM3ForCausalLM"
GEMMAS = (GEMMA2, GEMMA3)
# Each family's place in the seeds: the families in the order they had before Gemma 2 came, then it (so that the other
# families' seeded draws stay what they were)
ARCHS = (*sorted(set(CLASSES) - {GEMMA2}), GEMMA2)
QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
TOL = 1e-4  # on logits of std about 1-10 (float32 both sides)


def _vocab(rng) -> int:
    v = int(rng.integers(50, 400))
    return v + 1 if v % 8 == 0 else v


def _window(rng, max_pos: int) -> int:
    """A window shorter than the test rows, or now and then one as long as the context (no window)."""
    return int(rng.integers(3, 17)) if rng.random() < 0.9 else max_pos + int(rng.integers(0, 3))


def _scaled_rope(kind: str, rng, max_pos: int) -> dict:
    """A RoPE dict of `kind` with random parameters (original contexts below the test rows)."""
    original = int(rng.choice([8, 12, 16, 24]))
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(rng.uniform(1.0, 8.0))}
    if kind == "dynamic":
        return {"rope_type": "dynamic", "factor": float(rng.uniform(1.0, 8.0))}
    if kind == "llama3":
        low = float(rng.uniform(0.5, 2.0))
        rope = {"rope_type": "llama3", "factor": float(rng.uniform(2.0, 16.0)), "low_freq_factor": low}
        rope["high_freq_factor"] = low + float(rng.uniform(0.5, 4.0))
        if rng.random() < 0.8:  # else the context's
            rope["original_max_position_embeddings"] = original
        return rope
    if kind == "yarn":
        rope = {"rope_type": "yarn", "factor": float(rng.uniform(1.5, 8.0))}
        if rng.random() < 0.8:
            rope["original_max_position_embeddings"] = original
        if rng.random() < 0.5:
            rope.update(beta_fast=float(rng.uniform(8, 64)), beta_slow=float(rng.uniform(0.5, 4)))
        if rng.random() < 0.4:
            rope["truncate"] = bool(rng.random() < 0.5)
        pick = rng.random()
        if pick < 0.3:
            rope["attention_factor"] = float(rng.uniform(0.5, 2.0))
        elif pick < 0.6:
            rope.update(mscale=float(rng.uniform(0.5, 2.0)), mscale_all_dim=float(rng.uniform(0.5, 2.0)))
        return rope
    raise AssertionError(kind)


def _longrope(rng, rotary_half: int) -> dict:
    rope = {"rope_type": "longrope", "short_factor": (1 + rng.random(rotary_half)).tolist()}
    rope["long_factor"] = (2 + 6 * rng.random(rotary_half)).tolist()
    if rng.random() < 0.3:
        rope["attention_factor"] = float(rng.uniform(0.8, 1.6))
    elif rng.random() < 0.3:
        rope["factor"] = float(rng.uniform(1.5, 8.0))
    return rope


def _heads(rng, arch: str) -> tuple[int, int, int, int | None]:
    """(d_model, heads, key/value heads, explicit head_dim or None)."""
    heads = int(rng.choice([2, 4, 8]))
    kv = heads // int(rng.choice([r for r in (1, 2, 4) if heads % r == 0]))
    d_model = heads * int(rng.choice([k for k in range(4, 49, 2) if 32 <= heads * k <= 96]))
    head_dim = None
    if arch in (*GEMMAS, "Qwen3ForCausalLM") or rng.random() < 0.6:
        head_dim = int(rng.choice([8, 12, 16, 20, 24]))
    if head_dim and arch not in ("LlamaForCausalLM", *GEMMAS) and rng.random() < 0.25:  # (their configs refuse it)
        d_model = int(rng.choice([d for d in range(32, 97) if d % heads]))
    return d_model, heads, kv, head_dim


def random_spec(arch: str, rng) -> tuple[dict, set]:
    """(transformers config kwargs for `arch`, the config.json fields our import must refuse: empty when it runs
    them)."""
    d_model, heads, kv, head_dim = _heads(rng, arch)
    layers, max_pos = int(rng.integers(2, 4)), int(rng.choice([64, 96, 128]))
    theta = float(10 ** rng.uniform(2, 6))
    spec = dict(
        vocab_size=_vocab(rng),
        hidden_size=d_model,
        intermediate_size=int(rng.integers(24, 130)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        rms_norm_eps=float(10 ** rng.uniform(-6, -2)),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(rng.random() < 0.5),
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    if head_dim is not None:
        spec["head_dim"] = head_dim
    refused: set = set()
    if rng.random() < 0.05 and arch not in GEMMAS:
        spec["hidden_act"] = "gelu"
        refused.add("hidden_act")
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", SMOLLM3, *GEMMAS) and rng.random() < 0.08:
        spec["attention_bias"] = True
        refused.add("attention_bias")
    if arch in ("LlamaForCausalLM", SMOLLM3) and rng.random() < 0.05:
        spec["mlp_bias"] = True
        refused.add("mlp_bias")
    if arch == GEMMA3:
        return _gemma3_spec(spec, rng, theta, refused)
    if arch == GEMMA2:
        return _gemma2_spec(spec, rng, theta, refused)
    if arch == PHI3:
        return _phi3_spec(spec, rng, theta, refused)
    kinds = ["default", "linear", "llama3", "yarn", "dynamic", "longrope"]
    kind = str(rng.choice(kinds, p=[0.3, 0.15, 0.2, 0.25, 0.05, 0.05]))
    if kind == "longrope":
        rope = _longrope(rng, (head_dim or d_model // heads) // 2)
        rope["original_max_position_embeddings"] = 16
        refused.add("longrope")
    else:
        rope = {"rope_type": "default"} if kind == "default" else _scaled_rope(kind, rng, max_pos)
        refused |= {"dynamic"} if kind == "dynamic" else set()
    spec["rope_parameters"] = {**rope, "rope_theta": theta}
    if arch == "MistralForCausalLM":
        spec["sliding_window"] = None if rng.random() < 0.3 else _window(rng, max_pos)
    elif arch in QWEN:
        spec["use_sliding_window"] = bool(rng.random() < 0.7)
        spec["sliding_window"] = _window(rng, max_pos)
        spec["max_window_layers"] = int(rng.integers(0, layers + 1))
        if rng.random() < 0.5 and spec["use_sliding_window"]:  # (sliding layers without it: transformers fails)
            spec["layer_types"] = [str(rng.choice(["sliding_attention", "full_attention"])) for _ in range(layers)]
    elif arch == SMOLLM3:
        if rng.random() < 0.7:
            spec["no_rope_layers"] = [int(rng.random() < 0.6) for _ in range(layers)]
        else:
            spec["no_rope_layer_interval"] = int(rng.integers(2, 4))
        spec["use_sliding_window"] = bool(rng.random() < 0.6)
        spec["sliding_window"] = _window(rng, max_pos) if rng.random() < 0.8 else None
        if rng.random() < 0.3 and spec["use_sliding_window"] and spec["sliding_window"]:  # (else: transformers fails)
            spec["layer_types"] = types = [
                str(rng.choice(["sliding_attention", "full_attention"])) for _ in range(layers)
            ]
            interval = spec.get("no_rope_layer_interval", 4)
            flags = spec.get("no_rope_layers") or [(i + 1) % interval != 0 for i in range(layers)]
            if all(flags) and len(set(types)) > 1 and (spec["sliding_window"] or max_pos) < max_pos:
                refused.add("layer_types")  # RoPE on every layer: a window on some layers only is no config of ours
    return spec, refused


def _gemma3_spec(spec: dict, rng, theta: float, refused: set) -> tuple[dict, set]:
    layers, max_pos = spec["num_hidden_layers"], spec["max_position_embeddings"]
    spec["query_pre_attn_scalar"] = int(rng.choice([spec["head_dim"], int(rng.integers(8, 65))]))
    spec["sliding_window"] = _window(rng, max_pos)
    if rng.random() < 0.6:
        spec["layer_types"] = [str(rng.choice(["sliding_attention", "full_attention"])) for _ in range(layers)]
    else:
        spec["sliding_window_pattern"] = int(rng.integers(1, 4))
    kind = str(rng.choice(["default", "linear", "llama3", "yarn"]))
    full = {"rope_type": "default"} if kind == "default" else _scaled_rope(kind, rng, max_pos)
    local = {"rope_type": "default", "rope_theta": float(10 ** rng.uniform(2, 5))}
    if rng.random() < 0.05:
        local.update(rope_type="linear", factor=2.0)
        refused.add("sliding_attention")
    spec["rope_parameters"] = {"full_attention": {**full, "rope_theta": theta}, "sliding_attention": local}
    _softcaps(spec, rng, 0.3)
    return spec, refused


def _softcaps(spec: dict, rng, p: float) -> None:
    """Each of Gemma's soft-caps, with probability `p`, set small enough to bind on the random weights (else left
    out: transformers' default, Gemma 2's 50 and 30, Gemma 3's none), now and then null (no cap)."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        pick = rng.random()
        if pick < p:
            spec[key] = float(rng.uniform(0.5, 8.0))
        elif pick < p + 0.1:
            spec[key] = None


def _gemma2_spec(spec: dict, rng, theta: float, refused: set) -> tuple[dict, set]:
    layers, max_pos = spec["num_hidden_layers"], spec["max_position_embeddings"]
    spec["query_pre_attn_scalar"] = int(rng.choice([spec["head_dim"], int(rng.integers(8, 65))]))
    spec["sliding_window"] = _window(rng, max_pos)
    if rng.random() < 0.6:  # (else transformers' default: every other layer sliding)
        spec["layer_types"] = [str(rng.choice(["sliding_attention", "full_attention"])) for _ in range(layers)]
    kind = str(rng.choice(["default", "linear", "llama3", "yarn"], p=[0.5, 0.2, 0.15, 0.15]))
    rope = {"rope_type": "default"} if kind == "default" else _scaled_rope(kind, rng, max_pos)
    spec["rope_parameters"] = {**rope, "rope_theta": theta}
    _softcaps(spec, rng, 0.6)
    return spec, refused


def _phi3_spec(spec: dict, rng, theta: float, refused: set) -> tuple[dict, set]:
    natural = 2 * (spec["hidden_size"] // spec["num_attention_heads"] // 2)  # (an even head)
    longrope = rng.random() < 0.6
    if longrope:  # (transformers checks longrope's factors against hidden_size / heads)
        spec.pop("head_dim", None)
        spec["hidden_size"] = natural * spec["num_attention_heads"]
    head_dim = spec.get("head_dim", natural)
    partial = float(rng.choice([p for p in (1.0, 0.75, 0.5) if int(head_dim * p) % 2 == 0]))
    rope = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial}
    if longrope:
        rope.update(_longrope(rng, int(head_dim * partial) // 2))
        spec["original_max_position_embeddings"] = int(rng.choice([8, 12, 16, 24]))
    spec["rope_parameters"] = rope
    spec["sliding_window"] = None if rng.random() < 0.5 else _window(rng, spec["max_position_embeddings"])
    return spec, refused


# ---------------------------------------------------------------------------------------------- the checks


def _reference(arch: str, spec: dict, seed: int):
    """The transformers model of `spec` in float32, every tensor random (norms around 1, Gemma's around 0)."""
    torch.manual_seed(seed)
    config = CLASSES[arch](**json.loads(json.dumps(spec)))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = p.ndim == 1 and "norm" in name
            p.copy_((0.0 if arch in GEMMAS or not norm else 1.0) + 0.2 * torch.randn_like(p))
    return model


def _legacy(folder, arch: str) -> None:
    """Rewrites a saved config.json's RoPE as before transformers 5: top-level rope_theta (Gemma 3's
    rope_local_base_freq), partial_rotary_factor and a `rope_scaling` dict with `type`."""
    spec = json.loads((folder / "config.json").read_text())
    rope = spec.pop("rope_parameters")
    if arch == GEMMA3:
        spec["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    spec["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        spec["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type")
    spec["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    (folder / "config.json").write_text(json.dumps(spec))


def _derived_left_out(folder, arch: str) -> None:
    """Drops from a saved config.json the keys transformers derives when they are missing (layer_types from
    max_window_layers, no_rope_layers from no_rope_layer_interval, Gemma 3's layer_types for the
    sliding_window_pattern that gives them)."""
    spec = json.loads((folder / "config.json").read_text())
    for key in ("layer_types",) if arch in QWEN else ("layer_types", "no_rope_layers") if arch == SMOLLM3 else ():
        spec.pop(key, None)
    if arch == GEMMA2 and spec["layer_types"] == [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(len(spec["layer_types"]))
    ]:
        spec.pop("layer_types")
    for pattern in range(1, 7) if arch == GEMMA3 else ():
        every = [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(len(spec["layer_types"]))
        ]
        if spec["layer_types"] == every:
            spec.pop("layer_types")
            spec["sliding_window_pattern"] = pattern
            break
    (folder / "config.json").write_text(json.dumps(spec))


def _load_transformers(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


@nnx.jit
def _forward(model, tokens_BxL, segment_ids_BxL):
    return model(tokens_BxL, None, segment_ids_BxL)


def _close(ours, theirs, what: str, exact=None) -> None:
    """Our logits equal transformers' float32 `theirs` to `TOL` (loosened in proportion where they run past 10), or,
    given `exact` (transformers' in float64), are as close to those as twice transformers' own float32 error: a
    sharp attention (YaRN's attention_factor) rounds both sides apart by more than `TOL`."""
    scale = max(1.0, float(np.abs(theirs).max()) / 10)
    if exact is not None and np.abs(ours - exact).max() <= max(TOL * scale, 2 * np.abs(theirs - exact).max()):
        return
    np.testing.assert_allclose(ours, theirs, atol=TOL * scale, rtol=TOL, err_msg=what)


def check_spec(arch: str, spec: dict, refused: set, tmp_path, rng) -> str:
    """Imports, compares and exports one config (see the module docstring); returns "ok", or "refused: " and the
    refusal."""
    ref = _reference(arch, spec, int(rng.integers(1 << 31)))
    src = tmp_path / "src"
    ref.save_pretrained(src)
    if rng.random() < 0.3 and not refused:
        _legacy(src, arch)
    if rng.random() < 0.4 and not refused:
        _derived_left_out(src, arch)
    ref = _load_transformers(src)  # what transformers reads from the folder, as our import reads it
    if refused:
        with pytest.raises(ValueError) as e:
            hf.load_hf(src)
        message = str(e.value)
        assert any(field in message for field in refused), (refused, message)
        assert message.count(". ") == 0 and message.endswith("."), message
        return f"refused: {message}"
    cfg, model = hf.load_hf(src, run={"scan_layers": bool(rng.random() < 0.5)})
    vocab, length = spec["vocab_size"], int(rng.integers(26, 41))
    tokens = rng.integers(0, vocab, (2, length))
    expected, exact = _hf_logits(ref, tokens), _hf_logits(ref64 := copy.deepcopy(ref).double(), tokens)
    assert np.std(expected) > 0.1
    ones = np.ones_like(tokens)
    _close(np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(ones))), expected, f"{arch} {cfg}", exact)
    # packed and padded rows (the same compiled program): each sequence as if alone
    cut = int(rng.integers(5, length - 8))
    pad = int(rng.integers(1, 4))
    a, b, c = tokens[0, :cut], rng.integers(0, vocab, length - cut - pad), tokens[1]
    packed = np.stack([np.concatenate([a, b, np.zeros(pad, int)]), c])
    segments = np.array([[1] * cut + [2] * len(b) + [0] * pad, [1] * length])
    ours = np.asarray(_forward(model, jnp.asarray(packed), jnp.asarray(segments)))
    for row, start, seq in ((0, 0, a), (0, cut, b), (1, 0, c)):
        theirs, alone = _hf_logits(ref, seq[None])[0], _hf_logits(ref64, seq[None])[0]
        _close(ours[row, start : start + len(seq)], theirs, f"packed {arch} {cfg}", alone)
    # exports, written from our config and from the source folder's: transformers runs them as the source
    for out, source in ((tmp_path / "ours", None), (tmp_path / "like", src)):
        hf.save_hf(model, cfg, out, source=source)
        back = _load_transformers(out)
        if source is not None:
            assert type(back).__name__ == arch
        _close(_hf_logits(back, tokens), expected, f"export {arch} {cfg} source={source}")
        back_cfg = dataclasses.replace(hf.read_config(out), scan_layers=cfg.scan_layers)  # (how it runs: not saved)
        assert back_cfg == cfg, [(k, v, getattr(cfg, k)) for k, v in vars(back_cfg).items() if v != getattr(cfg, k)]
    return "ok"


CONFIGS_PER_ARCH = 2


@pytest.mark.parametrize("index", range(CONFIGS_PER_ARCH))
@pytest.mark.parametrize("arch", sorted(CLASSES))
def test_random_configs_match_transformers(tmp_path, arch, index):
    rng = np.random.default_rng([ARCHS.index(arch), index, 20240])
    spec, refused = random_spec(arch, rng)
    check_spec(arch, spec, refused, tmp_path, rng)


def test_the_generator_reaches_what_each_family_runs_and_refuses():
    """Over a few hundred draws (no model built) every family gets each RoPE type it runs, a window, grouped-query
    heads and an explicit head_dim, and the refusals come up: the seeded configs above are a sample of these."""
    seen: dict = {arch: set() for arch in CLASSES}
    for seed in range(300):
        for arch in CLASSES:
            spec, refused = random_spec(arch, np.random.default_rng([seed, ARCHS.index(arch)]))
            rope = spec["rope_parameters"]
            seen[arch] |= {rope.get("full_attention", rope)["rope_type"], *refused}
            seen[arch] |= {"gqa"} if spec["num_key_value_heads"] < spec["num_attention_heads"] else set()
            seen[arch] |= {"head_dim"} if spec.get("head_dim") else set()
            seen[arch] |= {"window"} if (spec.get("sliding_window") or 999) < spec["max_position_embeddings"] else set()
            seen[arch] |= (
                {"softcap"} if spec.get("attn_logit_softcapping") or spec.get("final_logit_softcapping") else set()
            )
    scaled = {"default", "linear", "llama3", "yarn"}
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", *QWEN, SMOLLM3):
        assert seen[arch] >= scaled | {"dynamic", "longrope", "gqa", "head_dim"}, (arch, seen[arch])
    assert seen[GEMMA3] >= scaled | {"gqa", "head_dim", "window", "sliding_attention", "softcap"}
    assert seen[GEMMA2] >= scaled | {"gqa", "head_dim", "window", "softcap", "attention_bias"}
    assert seen[PHI3] >= {"default", "longrope", "gqa", "head_dim", "window"}
    assert all("window" in seen[arch] for arch in ("MistralForCausalLM", *QWEN, SMOLLM3))


# ---------------------------------------------------------------------------------------------- regressions


def test_a_gemma3_yarn_runs_truncated_as_in_transformers_whatever_its_truncate(tmp_path):
    """transformers 5 reads YaRN's `truncate` beside a Gemma 3's per-layer-type RoPE dicts, never inside them, so it
    runs a Gemma 3's YaRN truncated even where config.json's full_attention dict says false; the import did not
    (other frequencies past original_max_position_embeddings, found by this fuzz). A config whose YaRN is not
    truncated cannot be exported as a Gemma 3."""
    rng = np.random.default_rng()
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": False}
    spec = dict(
        vocab_size=211, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=None, bos_token_id=None, eos_token_id=None,
        rope_parameters={"full_attention": {**yarn, "rope_theta": 1e4}, "sliding_attention": {"rope_type": "default"}},
    )  # fmt: skip
    ref = _reference(GEMMA3, spec, int(rng.integers(1 << 31)))
    ref.save_pretrained(tmp_path / "src")
    assert (
        json.loads((tmp_path / "src" / "config.json").read_text())["rope_parameters"]["full_attention"]["truncate"]
        is False
    )
    cfg, model = hf.load_hf(tmp_path / "src")
    theirs, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](ref.config, layer_type="full_attention")
    from proxykd_jax.models.rope import rope_inv_freq

    np.testing.assert_allclose(rope_inv_freq(cfg), theirs.numpy(), rtol=1e-6)
    tokens = rng.integers(0, 211, (2, 100))  # positions past the original 64
    ours = np.asarray(_forward(model, jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32)))
    _close(ours, _hf_logits(ref, tokens), "gemma3 yarn")
    hf.save_hf(model, cfg, tmp_path / "out")
    _close(_hf_logits(_load_transformers(tmp_path / "out"), tokens), ours, "gemma3 yarn export")
    untruncated = dataclasses.replace(cfg, rope_scaling=(*cfg.rope_scaling[:5], False, cfg.rope_scaling[6]))
    with pytest.raises(ValueError, match=r"^model.rope_scaling sets YaRN's truncate to False, which a Gemma 3 export"):
        hf.save_hf(Llama(untruncated, rngs=nnx.Rngs(0)), untruncated, tmp_path / "bad")


def _tied_in_config(folder) -> None:
    spec = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**spec, "tie_word_embeddings": True}))


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", SMOLLM3])
def test_a_tied_config_json_over_its_own_lm_head_is_run_as_transformers_runs_it(tmp_path, arch):
    """A folder whose config.json ties the embeddings but which holds an lm_head.weight: transformers ties them only
    where the two are equal, and runs a different one untied; the import used the embedding as the head either way
    (other logits, found by this fuzz with config.json keys left out: Gemma 3's and SmolLM3's default is tied), and
    now refuses the different one, naming tie_word_embeddings."""
    rng = np.random.default_rng()
    spec = dict(
        vocab_size=91, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=None,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    ref = _reference(arch, spec, int(rng.integers(1 << 31)))
    ref.save_pretrained(tmp_path / "differ")
    _tied_in_config(tmp_path / "differ")
    with pytest.raises(ValueError, match=r"holds an lm_head.weight unlike its model.embed_tokens.weight while config"):
        hf.load_hf(tmp_path / "differ")
    with torch.no_grad():
        ref.lm_head.weight.copy_(ref.model.embed_tokens.weight)
    ref.save_pretrained(tmp_path / "same")
    _tied_in_config(tmp_path / "same")
    theirs = _load_transformers(tmp_path / "same")
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()  # tied
    cfg, model = hf.load_hf(tmp_path / "same")
    assert cfg.tie_embeddings
    tokens = rng.integers(0, 91, (2, 20))
    ours = np.asarray(_forward(model, jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32)))
    _close(ours, _hf_logits(theirs, tokens), "tied")


def test_a_smollm3_with_rope_on_every_layer_slides_all_of_them_or_is_refused(tmp_path):
    """A SmolLM3 whose no_rope_layers give every layer RoPE is a Llama: with every layer sliding it imports as a
    Mistral's window (the import refused it, through `ModelConfig`'s layer_types check, found by this fuzz), and
    with only some sliding, which no config of ours holds, config.json's fields are named."""
    rng = np.random.default_rng()
    spec = dict(
        vocab_size=91, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=None, bos_token_id=None, eos_token_id=None,
        no_rope_layers=[1, 1], use_sliding_window=True, sliding_window=5, layer_types=["sliding_attention"] * 2,
    )  # fmt: skip
    ref = _reference(SMOLLM3, spec, int(rng.integers(1 << 31)))
    ref.save_pretrained(tmp_path / "src")
    cfg, model = hf.load_hf(tmp_path / "src")
    assert (cfg.rope_layers, cfg.layer_types, cfg.sliding_window) == (None, None, 5)
    tokens = rng.integers(0, 91, (2, 24))
    ours = np.asarray(_forward(model, jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32)))
    _close(ours, _hf_logits(ref, tokens), "smollm3 every layer sliding")
    hf.save_hf(model, cfg, tmp_path / "out")
    _close(_hf_logits(_load_transformers(tmp_path / "out"), tokens), ours, "smollm3 export")
    mixed = {**json.loads((tmp_path / "src" / "config.json").read_text())}
    mixed["layer_types"] = ["full_attention", "sliding_attention"]
    with pytest.raises(
        ValueError, match=r"^config.json's layer_types slide only some layers of a SmolLM3 whose no_rope"
    ):
        hf.config_from_hf(mixed)


@pytest.mark.parametrize("arch", ["MistralForCausalLM", PHI3])
def test_an_export_whose_d_model_is_not_a_multiple_of_its_heads_loads_in_transformers(tmp_path, arch):
    """Mistral and Phi-3 (and Qwen, SmolLM3) take an explicit head_dim with a hidden_size that is not a multiple of
    the heads; without a window or Phi-3's rotary such a model exported as a Llama, which transformers' LlamaConfig
    refuses (a traceback at the export, with or without the source folder, found by this fuzz): now a Mistral
    without a window."""
    rng = np.random.default_rng()
    spec = dict(
        vocab_size=91, hidden_size=36, intermediate_size=40, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=None, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    ref = _reference(arch, {**spec, "sliding_window": None}, int(rng.integers(1 << 31)))
    ref.save_pretrained(tmp_path / "src")
    cfg, model = hf.load_hf(tmp_path / "src")
    tokens = rng.integers(0, 91, (2, 24))
    expected = _hf_logits(ref, tokens)
    _close(np.asarray(_forward(model, jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32))), expected, arch)
    for out, source in ((tmp_path / "ours", None), (tmp_path / "like", tmp_path / "src")):
        hf.save_hf(model, cfg, out, source=source)
        back = _load_transformers(out)
        assert type(back).__name__ == ("MistralForCausalLM" if source is None else arch)
        _close(_hf_logits(back, tokens), expected, f"export of {arch}, source={source}")
        assert dataclasses.replace(hf.read_config(out), scan_layers=cfg.scan_layers) == cfg
