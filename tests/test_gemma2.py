"""Gemma 2 models (`Gemma2ForCausalLM`) as student and proxy: Gemma's numerics without q/k norms, every other layer
sliding by default, and soft-capped attention scores and output logits (cap * tanh(z / cap)). Import equals
transformers' logits (scanned and unrolled, packed and padded rows, cached decoding, greedy generation, longer than
the window) with caps small enough to bind; the fused training losses of a Gemma 2 equal a float64 loss of
transformers' capped logits, gradients included; export loads back in transformers as a Gemma 2; a Gemma 3 that sets
the caps is read with them; what we do not run is refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from test_gemma3 import (
    GEMMA3,
    VOCAB,
    _randomised,
    _seed,
    _tokens,
    exported_and_loaded_back,
    packed_cached_and_generated_match,
    random_gemma,
)
from test_gemma3 import tiny_config as gemma3_tiny_config
from test_hf import _hf_logits, _logits

from proxykd_jax import losses
from proxykd_jax.align import objectives
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.train import distill

GEMMA2 = {k: v for k, v in GEMMA3.items() if k not in ("layer_types", "rope_parameters")} | dict(
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    attn_logit_softcapping=2.0,  # small enough that random weights' scores pass it
    final_logit_softcapping=3.0,
)  # (Gemma 3's shapes: head_dim 16 != hidden_size / heads, query_pre_attn_scalar 24 != head_dim; window 64)


def _gemma2(**kw):
    return random_gemma(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, {**GEMMA2, **kw})


def _uncapped_logits(ref, tokens) -> np.ndarray:
    """transformers' logits of `ref` with both caps off (to show that the caps bind on these weights)."""
    config = ref.config
    saved = config.attn_logit_softcapping, config.final_logit_softcapping
    config.attn_logit_softcapping = config.final_logit_softcapping = None
    for layer in ref.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    try:
        return _hf_logits(ref, tokens)
    finally:
        config.attn_logit_softcapping, config.final_logit_softcapping = saved
        for layer in ref.model.layers:
            layer.self_attn.attn_logit_softcapping = saved[0]


@pytest.mark.parametrize("scan, tie", [(True, True), (False, False)])
def test_import_matches_transformers(tmp_path, scan, tie):
    ref = _gemma2(tie_word_embeddings=tie, sliding_window=8)
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path, run={"scan_layers": scan})
    assert (cfg.head_dim, cfg.query_pre_attn_scalar, cfg.max_seq_len, cfg.sliding_window) == (16, 24, 128, 8)
    assert cfg.norm_plus_one and cfg.embed_scale and cfg.sandwich_norms and not cfg.qk_norm
    assert (cfg.activation, cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == ("gelu_tanh", 5000.0, None, None)
    assert (cfg.attn_softcap, cfg.logit_softcap) == (2.0, 3.0)
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2  # transformers' default: every other layer
    assert (cfg.tie_embeddings, cfg.scan_layers) == (tie, scan)
    assert cfg.num_params() == sum(p.numel() for p in ref.parameters())
    tokens = _tokens(2, 40)
    expected = _hf_logits(ref, tokens)
    assert np.abs(expected).max() < 3.0 and np.std(expected) > 0.5
    assert np.abs(_uncapped_logits(ref, tokens) - expected).max() > 0.5  # the caps bind
    np.testing.assert_allclose(_logits(model, tokens), expected, atol=1e-4, rtol=1e-4)


def test_packed_rows_cached_decoding_and_generation_match_transformers(tmp_path):
    packed_cached_and_generated_match(_gemma2(sliding_window=5), tmp_path)  # every sequence longer than the window


def _batch(tokens: np.ndarray) -> dict:
    rng = np.random.default_rng()
    rows, length = tokens.shape
    segments = np.ones((rows, length), np.int32)
    segments[0, length - 5 :] = 0  # a padding tail
    mask = (rng.random((rows, length)) < 0.8) * (segments > 0)
    return dict(
        tokens=jnp.asarray(tokens, jnp.int32),
        targets=jnp.asarray(np.roll(tokens, -1, axis=1), jnp.int32),
        positions=jnp.asarray(np.broadcast_to(np.arange(length), (rows, length)), jnp.int32),
        segment_ids=jnp.asarray(segments),
        loss_mask=jnp.asarray(mask, jnp.float32),
    )


def test_training_losses_equal_a_float64_loss_of_transformers_capped_logits(tmp_path):
    """The distill and SFT steps' fused chunked CE (its hidden-state and unembedding gradients computed in the forward
    pass) caps the logits as transformers' forward does: the loss equals a float64 CE of transformers' logits, and
    its gradient wrt every parameter equals autodiff of the same CE of our model's capped forward."""
    ref = _gemma2(sliding_window=6)
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path)
    batch = _batch(_tokens(2, 24))
    logits = _hf_logits(ref, np.asarray(batch["tokens"])).astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"], np.float64)
    expected = -(picked * mask).sum() / mask.sum()

    distill_loss = jax.jit(distill.make_loss_fn(_sft_loss_cfg()))
    sft = jax.jit(lambda m, b: objectives.sft_loss_fn(m, b, chunk=7)[0])
    np.testing.assert_allclose(float(sft(model, batch)), expected, rtol=2e-5)
    np.testing.assert_allclose(float(distill_loss(model, batch)[0]), expected, rtol=2e-5)

    def dense(m, b):  # autodiff of the same CE of the model's capped logits
        logp = jax.nn.log_softmax(m(b["tokens"], b["positions"], b["segment_ids"]), -1)
        nll = -jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        return jnp.sum(nll * b["loss_mask"]) / jnp.sum(b["loss_mask"])

    fused = nnx.grad(lambda m: objectives.sft_loss_fn(m, batch, chunk=7)[0])(model)
    reference = nnx.grad(lambda m: dense(m, batch))(model)
    for (path, a), (_, b) in zip(nnx.to_flat_state(fused), nnx.to_flat_state(reference), strict=True):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        np.testing.assert_allclose(a, b, atol=2e-5 * np.abs(b).max(), err_msg=str(path))
    capped = losses.cross_entropy_chunked  # the caps bind: without them the loss differs
    hidden = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"]).reshape(-1, cfg.d_model)
    uncapped = capped(hidden, model.unembedding(), batch["targets"].reshape(-1), batch["loss_mask"].reshape(-1))
    assert abs(float(uncapped[0] / uncapped[1]) - expected) > 0.05


def _sft_loss_cfg():
    from proxykd_jax.losses import objective

    cfg = objective.default_config()
    cfg.alpha = 0.0
    cfg.chunk_size = 7
    return cfg


def tiny_config(**numerics) -> ModelConfig:
    """The Gemma 3 tests' 4-layer model (`gemma3_tiny_config`) as a Gemma 2: no q/k norms nor local RoPE base, every
    other layer sliding (window 8), both caps."""
    types = ("sliding_attention", "full_attention") * 2
    gemma2 = dict(qk_norm=False, rope_local_theta=None, layer_types=types, sliding_window=8)
    return gemma3_tiny_config(**{**gemma2, "attn_softcap": 4.0, "logit_softcap": 6.0, **numerics})


@pytest.mark.parametrize("caps, window", [((4.0, 6.0), 7), ((None, None), None)])
def test_export_loads_in_transformers_as_gemma2(tmp_path, caps, window):
    types = None if window is None else tiny_config().layer_types
    cfg = tiny_config(attn_softcap=caps[0], logit_softcap=caps[1], sliding_window=window, layer_types=types)
    written = exported_and_loaded_back(cfg, tmp_path, "Gemma2ForCausalLM")
    assert written["model_type"] == "gemma2"
    assert (written["attn_logit_softcapping"], written["final_logit_softcapping"]) == caps  # (None: written null)
    assert (written["query_pre_attn_scalar"], written["sliding_window"]) == (20, window or 64)


def test_a_gemma3_with_caps_is_read_as_transformers_runs_it(tmp_path):
    """Gemma3TextConfig has the same soft-caps (None by default): transformers 5's Gemma 3 caps its logits with
    final_logit_softcapping, and keeps attn_logit_softcapping without ever applying it (in eager attention too), so
    the import reads the first and ignores the second; the export writes the logit cap back."""
    spec = {k: v for k, v in GEMMA2.items() if k != "rope_parameters"}
    spec["layer_types"] = ["sliding_attention", "full_attention"] * 2
    ref = random_gemma(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, spec)
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path)
    assert cfg.qk_norm and (cfg.attn_softcap, cfg.logit_softcap) == (None, 3.0)
    tokens = _tokens(2, 30)
    expected = _hf_logits(ref, tokens)
    assert np.abs(expected).max() < 3.0
    np.testing.assert_allclose(_logits(model, tokens), expected, atol=1e-4, rtol=1e-4)
    hf.save_hf(model, cfg, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["Gemma3ForCausalLM"] and written["final_logit_softcapping"] == 3.0
    assert hf.read_config(tmp_path / "out") == cfg
    with pytest.raises(ValueError, match=r"^model\.attn_softcap on a Gemma 3 model .* set it to None, or qk_norm"):
        ModelConfig(**{**cfg.__dict__, "attn_softcap": 2.0})


def test_config_json_defaults_and_refusals(tmp_path):
    _gemma2().save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "config.json").read_text())
    bare = {k: v for k, v in spec.items() if k not in ("attn_logit_softcapping", "final_logit_softcapping")}
    bare.pop("layer_types")
    cfg = hf.config_from_hf(bare)  # transformers' defaults: caps 50 and 30, every other layer sliding from the first
    theirs = transformers.Gemma2Config(**{k: v for k, v in bare.items() if k != "architectures"})
    assert (cfg.attn_softcap, cfg.logit_softcap) == (theirs.attn_logit_softcapping, theirs.final_logit_softcapping)
    assert list(cfg.layer_types) == theirs.layer_types == ["sliding_attention", "full_attention"] * 2
    nulls = hf.config_from_hf({**spec, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert (nulls.attn_softcap, nulls.logit_softcap) == (None, None)
    refusals = {
        "bidirectional": ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        "activation": ({"hidden_activation": "relu"}, "hidden_activation='relu'; a Gemma 2"),
        "cap": ({"attn_logit_softcapping": -1.0}, r"attn_logit_softcapping=-1\.0; it must be a positive number"),
        "null window": ({"sliding_window": None}, "sliding_window is null"),
    }
    for name, (extra, match) in refusals.items():
        with pytest.raises(ValueError, match=match) as e:
            hf.config_from_hf({**spec, **extra})
        assert "\n" not in str(e.value) and str(e.value).endswith("."), name


def test_model_config_checks_the_caps():
    base = tiny_config()
    assert base.gemma and not base.qk_norm
    plain = dict(vocab_size=8, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, d_ff=8)
    refusals = {
        r"model\.attn_softcap must be None or a positive number": dict(base.__dict__, attn_softcap=0.0),
        r"model\.logit_softcap must be None or a positive number": dict(base.__dict__, logit_softcap=float("inf")),
        r"model\.logit_softcap \(logit soft-capping\) is Gemma's": dict(plain, logit_softcap=30.0),
        r"model\.rope_local_theta .* is Gemma 3's": dict(base.__dict__, rope_local_theta=10.0),
    }
    for match, fields in refusals.items():
        with pytest.raises(ValueError, match=match) as e:
            ModelConfig(**fields)
        assert "\n" not in str(e.value) and str(e.value).endswith("."), match
    assert ModelConfig.from_config(base.to_config()) == base


def test_distill_steps_pass_the_models_caps_to_the_fused_losses(tmp_path):
    """Distill's sparse-KD loss and the white-box loss (a Gemma 2 teacher with its own caps) equal the dense
    references of the losses given each model's `logit_softcap`, and differ from them without it."""
    ref = _gemma2(sliding_window=6)
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path)
    teacher = _randomised(Llama(tiny_config(logit_softcap=2.5), rngs=nnx.Rngs(_seed())))
    batch = _batch(_tokens(2, 24))
    rng = np.random.default_rng()
    k = 5
    logprobs = np.log(rng.dirichlet(np.ones(k + 1), size=(2, 24)))
    batch.update(
        kd_ids=jnp.asarray(np.argsort(rng.random((2, 24, VOCAB)), -1)[..., :k], jnp.int32),  # (distinct, as a top-K)
        kd_logprobs=jnp.asarray(logprobs[..., :k], jnp.float32),
        kd_tail=jnp.asarray(logprobs[..., k], jnp.float32),
        weight=jnp.asarray(rng.uniform(0.2, 1.0, (2, 24)), jnp.float32),
        sample_ids=jnp.zeros((2, 24), jnp.int32),
    )
    loss_cfg = _sft_loss_cfg()
    loss_cfg.alpha = 3.0
    hidden = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"]).reshape(-1, cfg.d_model)
    flat = {name: batch[name].reshape(-1, *batch[name].shape[2:]) for name in batch}
    kw = losses.loss_kwargs(loss_cfg)

    def sparse(cap):
        ce, kd, n = losses.sparse_kd_loss_dense(
            hidden, model.unembedding(), flat["targets"], flat["kd_ids"], flat["kd_logprobs"], flat["kd_tail"],
            flat["loss_mask"], flat["weight"], softcap=cap, **kw,
        )  # fmt: skip
        return float((ce + 3.0 * kd) / n)

    ours = float(jax.jit(distill.make_loss_fn(loss_cfg))(model, batch)[0])
    np.testing.assert_allclose(ours, sparse(cfg.logit_softcap), rtol=2e-5)
    assert abs(ours - sparse(None)) > 1e-3 * abs(ours)

    teacher_hidden = teacher.hidden(batch["tokens"], batch["positions"], batch["segment_ids"]).reshape(-1, 32)
    kw.pop("tail_mode")

    def dense(cap, teacher_cap):
        ce, kd, n = losses.dense_kd_loss_dense(
            hidden, model.unembedding(), flat["targets"], teacher_hidden, teacher.unembedding(), flat["loss_mask"],
            jnp.ones_like(flat["loss_mask"]), sampled=False, softcap=cap, teacher_softcap=teacher_cap, **kw,
        )  # fmt: skip
        return float((ce + 3.0 * kd) / n)

    graphdef, state = nnx.split(teacher)
    white_box = jax.jit(distill.make_white_box_loss_fn(loss_cfg, graphdef))
    ours = float(white_box(model, batch, state)[0])
    np.testing.assert_allclose(ours, dense(cfg.logit_softcap, 2.5), rtol=2e-5)
    assert min(abs(ours - dense(cfg.logit_softcap, None)), abs(ours - dense(None, 2.5))) > 1e-3 * abs(ours)
