"""Align-stage pieces: rows and pairs, LoRA, DPO + NLL objective, sampling, KL to a known teacher.

Model forwards and gradients run jitted (eager op-by-op dispatch dominated this file's runtime).
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from proxykd_jax.align import lora, objectives, pairs, phases
from proxykd_jax.errors import ConfigError, ProxyKDError
from proxykd_jax.eval import known_teacher
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.sampling import generate
from proxykd_jax.parallel import LOGICAL_RULES, make_mesh

CFG = ModelConfig(
    vocab_size=96, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=32
)


def _model(seed=0):
    return Llama(CFG, rngs=nnx.Rngs(params=seed))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens_BxL, segment_ids_BxL):
    """Logits of a model, or of (base, adapters) merged, in one jitted call."""
    module = nnx.merge(graphdef, state)
    model = lora.merged(*module) if isinstance(module, tuple) else module
    return model(tokens_BxL, None, segment_ids_BxL)


def _logits(module, tokens_BxL, segment_ids_BxL=None):
    tokens_BxL = jnp.asarray(tokens_BxL)
    seg = jnp.ones_like(tokens_BxL) if segment_ids_BxL is None else jnp.asarray(segment_ids_BxL)
    return _forward(*nnx.split(module), tokens_BxL, seg)


def _random_pairs(rng, n, length=24):
    out = []
    for _ in range(n):
        p = int(rng.integers(2, 7))
        out.append(
            (
                tuple(rng.integers(3, 96, p)),
                tuple(rng.integers(3, 96, int(rng.integers(2, 9)))),
                tuple(rng.integers(3, 96, int(rng.integers(1, 9)))),
            )
        )
    return pairs.pair_rows(out, length)


def _dense_logp64(model, rows, prefix=""):
    """float64 sum over masked targets of log-softmax(full logits)."""
    logits = np.asarray(_logits(model, rows[prefix + "tokens"], rows[prefix + "segment_ids"]), np.float64)
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    tgt = np.take_along_axis(logits, rows[prefix + "targets"][..., None], -1)[..., 0]
    return np.sum((tgt - logz) * rows[prefix + "loss_mask"], -1)


def test_rows_and_examples():
    rows = pairs.pad_rows([(5, 6, 7)], [(8, 9, 2)], 8, pad_id=0)
    np.testing.assert_array_equal(rows["tokens"][0], [5, 6, 7, 8, 9, 2, 0, 0])
    np.testing.assert_array_equal(rows["targets"][0], [6, 7, 8, 9, 2, 0, 0, 0])
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 1, 1, 0, 0])
    rec = {
        "sample_id": 3,
        "prompt_id": 9,
        "tokens": np.array([5, 6, 7, 8, 9, 2], np.int32),
        "loss_mask": np.array([0, 0, 0, 1, 1, 1], bool),
    }
    (ex,) = pairs.examples_from_records([rec])
    assert ex.prompt == (5, 6, 7) and ex.response == (8, 9, 2) and ex.sample_id == 3
    with pytest.raises(ProxyKDError, match=r"align\.seq_len=8"):  # one line from the CLI, no traceback
        pairs.pad_rows([tuple(range(8))], [(1,)], 8)


def test_build_pairs_drops_equal_samples():
    exs = [pairs.Example(0, 0, (1, 2), (3, 4)), pairs.Example(1, 1, (5,), (6,))]
    got, dropped = pairs.build_pairs(exs, [[(3, 4), (3, 5)], [(6,), ()]])
    assert got == [((1, 2), (3, 4), (3, 5))] and dropped == 3


def test_rows_of_length_l_score_every_response_token_of_l_plus_1_token_records():
    """`prepare` accepts samples of data.seq_len + 1 tokens (the distill rows' L + 1 tokens for L targets);
    the align rows of align.seq_len = data.seq_len positions must score all their response tokens, the
    final eos included (it was cut)."""
    rec = {
        "sample_id": 0,
        "prompt_id": 0,
        "tokens": np.array([5, 6, 7, 8, 9, 10, 11, 12, 2], np.int32),
        "loss_mask": np.array([0, 0, 0, 1, 1, 1, 1, 1, 1], bool),
    }
    rows = pairs.example_rows(pairs.examples_from_records([rec]), 8)
    np.testing.assert_array_equal(rows["tokens"][0], [5, 6, 7, 8, 9, 10, 11, 12])
    np.testing.assert_array_equal(rows["targets"][0], [6, 7, 8, 9, 10, 11, 12, 2])
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1] * 8)
    cut = pairs.pad_rows([(5, 6, 7)], [(8, 9, 10, 11, 12, 13, 14)], 8)  # longer: cut after L + 1 tokens
    np.testing.assert_array_equal(cut["targets"][0], [6, 7, 8, 9, 10, 11, 12, 13])


def test_build_pairs_drops_samples_equal_within_the_row():
    """A sample that differs from the teacher response only past the row's end (here the response fills
    the row: prompt 3 + response 5 = the 8 tokens of a row of length 7) would make identical chosen and
    rejected rows."""
    ex = pairs.Example(0, 0, (5, 6, 7), (8, 9, 10, 11, 12))
    samples = [[(8, 9, 10, 11, 12, 13, 2), (8, 9, 10, 11, 14, 2)]]
    got, dropped = pairs.build_pairs([ex], samples, 7)
    assert got == [((5, 6, 7), (8, 9, 10, 11, 12), (8, 9, 10, 11, 14, 2))] and dropped == 1
    rows = pairs.pair_rows(got, 7)
    assert not np.array_equal(rows["chosen_targets"], rows["rejected_targets"])
    assert pairs.build_pairs([ex], samples)[1] == 0  # without the row length: compared whole


def test_round_pairs_never_hold_identical_rows(monkeypatch):
    """`make_round_pairs` compares the samples with the teacher responses as its rows of align.seq_len hold them."""
    from proxykd_jax.align import config as align_config
    from proxykd_jax.align import rounds

    examples = [pairs.Example(0, 0, (5, 6, 7), (8, 9, 10, 11, 12)), pairs.Example(1, 1, (5, 6), (8, 9, 2))]
    sampled = [(8, 9, 10, 11, 12, 13, 2), (8, 2)]  # the first equals its teacher response within the 8 tokens
    monkeypatch.setattr(rounds.pairs_lib, "sample_responses", lambda *args, **kwargs: list(sampled))
    acfg = align_config.default_config()
    acfg.update(max_new_tokens=8, eval_batch_size=2, logprob_chunk=16)
    rows, dropped = rounds.make_round_pairs(
        _model(), (), examples, acfg, seed=0, round_index=0, seq_len=7, stop_tokens=(2,), pad_id=0, put_batch=None
    )
    assert dropped == 1 and rows["chosen_tokens"].shape[0] == 1
    for k in pairs.ROW_FIELDS:
        assert not np.array_equal(rows["chosen_" + k], rows["rejected_" + k]), k


def test_lora_refuses_unknown_or_no_targets_with_a_config_error():
    for targets, match in ((("wq", "attn"), r"unknown weight names \['attn'\]"), ((), "matched no weight")):
        with pytest.raises(ConfigError, match=match):
            lora.LoraAdapters(_model(), rank=2, alpha=4.0, targets=targets, rngs=nnx.Rngs(0))


def test_lora_merge_matches_manual_weights():
    base = _model()
    adapters = lora.LoraAdapters(base, rank=3, alpha=6.0, targets=("wq", "wo", "w_down"), rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 9)))
    np.testing.assert_allclose(_logits((base, adapters), tokens), _logits(base, tokens), atol=0)  # B = 0 at init
    for i, b in enumerate(adapters.b):
        b[...] = jax.random.normal(jax.random.key(i), b[...].shape) * 0.3
    manual = _model()
    wo_a, wo_b = [
        (a[...], b[...]) for p, a, b in zip(adapters.paths, adapters.a, adapters.b) if p == ("layers", "attn", "wo")
    ][0]
    n_layers = manual.cfg.num_layers
    for p, a, b in zip(adapters.paths, adapters.a, adapters.b):  # one adapter per layer of the stacked weight
        holder = manual.layers.attn if p[1] == "attn" else manual.layers.mlp
        w = getattr(holder, p[2])
        a_np, b_np = np.asarray(a[...]), np.asarray(b[...])
        n_in = a_np.ndim - 2
        delta = np.stack([np.tensordot(a_np[i], b_np[i], axes=([n_in], [0])) for i in range(n_layers)])
        w[...] = w[...] + 2.0 * delta
    assert wo_a.shape == (n_layers, 4, 8, 3) and wo_b.shape == (n_layers, 3, 32)
    merged_logits = _logits((base, adapters), tokens)
    np.testing.assert_allclose(merged_logits, _logits(manual, tokens), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(merged_logits - _logits(base, tokens))).max() > 1e-3


def test_sequence_logprobs_match_dense_float64():
    model = _model()
    rows = _random_pairs(np.random.default_rng(1), 5)
    got = objectives.sequence_logprobs(model, {k: jnp.asarray(v) for k, v in rows.items()}, "chosen_", chunk=16)
    np.testing.assert_allclose(got, _dense_logp64(model, rows, "chosen_"), rtol=1e-5, atol=1e-5)


def test_dpo_objective_hand_computed():
    model = _model()
    rows = _random_pairs(np.random.default_rng(2), 4)
    ref_c = np.array([-30.0, -12.5, -20.0, -7.0], np.float32)
    ref_r = np.array([-25.0, -15.0, -9.0, -11.0], np.float32)
    rows.update(ref_chosen_logp=ref_c, ref_rejected_logp=ref_r)
    batch = {k: jnp.asarray(v) for k, v in phases.interleave_pairs(rows).items()}
    graphdef, state = nnx.split(model)
    loss_fn = functools.partial(objectives.dpo_loss_fn, beta=0.1, nll_weight=0.7, chunk=8)
    loss, metrics = jax.jit(lambda st, b: loss_fn(nnx.merge(graphdef, st), b))(state, batch)
    pc, pr = _dense_logp64(model, rows, "chosen_"), _dense_logp64(model, rows, "rejected_")
    margin = 0.1 * ((pc - ref_c) - (pr - ref_r))
    dpo = np.mean([math.log1p(math.exp(-m)) for m in margin])
    nll = -pc.sum() / rows["chosen_loss_mask"].sum()
    np.testing.assert_allclose(float(metrics["dpo_loss"]), dpo, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["nll"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.7 * nll + dpo, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["dpo/accuracy"]), np.mean(margin > 0), atol=1e-6)
    np.testing.assert_allclose(float(metrics["dpo/margin"]), np.mean(margin), rtol=1e-4, atol=1e-5)


def test_dpo_loss_literal_example():
    """beta = 0.5: rewards 0.5 * (-10 + 11) = 0.5 and 0.5 * (-12 + 11) = -0.5, margin 1, loss log(1 + e^-1);
    second pair: rewards 0.5 * (-4 + 2) = -1 and 0.5 * (-3 + 5) = 1, margin -2, loss log(1 + e^2)."""
    from proxykd_jax.losses import dpo_loss

    loss, m = dpo_loss(
        jnp.array([-10.0, -4.0]), jnp.array([-12.0, -3.0]), jnp.array([-11.0, -2.0]), jnp.array([-11.0, -5.0]), 0.5
    )
    np.testing.assert_allclose(float(loss), (0.31326168751822286 + 2.1269280110429727) / 2, rtol=1e-6)
    np.testing.assert_allclose([float(m["margin"]), float(m["accuracy"])], [-0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose([float(m["rewards_chosen"]), float(m["rewards_rejected"])], [-0.25, 0.25], rtol=1e-6)


def _preference_ref64(pc, pr, rc, rr, beta, loss_type, eps):
    """float64 numpy: (loss, d loss / d h per pair) of DPO / conservative DPO / IPO."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "ipo":
        return np.mean((h - 1.0 / (2.0 * beta)) ** 2), 2.0 * (h - 1.0 / (2.0 * beta)) / h.size
    z = beta * h
    loss = np.mean((1 - eps) * np.logaddexp(0.0, -z) + eps * np.logaddexp(0.0, z))
    sig = 1.0 / (1.0 + np.exp(-z))
    return loss, beta * (-(1 - eps) * (1 - sig) + eps * sig) / h.size


@pytest.mark.parametrize(
    "loss_type,eps,beta",
    [("dpo", 0.0, 0.1), ("dpo", 0.1, 0.1), ("dpo", 0.3, 0.5), ("ipo", 0.0, 0.1), ("ipo", 0.0, 0.5)],
)
def test_preference_losses_match_float64(loss_type, eps, beta):
    rng = np.random.default_rng([3, int(eps * 10), int(beta * 10)])
    pc, pr, rc, rr = (-rng.uniform(2.0, 40.0, 16) for _ in range(4))
    fn = jax.jit(
        lambda a, b: objectives.preference_loss(
            a,
            b,
            jnp.asarray(rc, jnp.float32),
            jnp.asarray(rr, jnp.float32),
            beta=beta,
            loss_type=loss_type,
            label_smoothing=eps,
        ),
        static_argnums=(),
    )
    (loss, metrics), (g_c, g_r) = jax.value_and_grad(lambda a, b: fn(a, b), argnums=(0, 1), has_aux=True)(
        jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32)
    )
    want, dh = _preference_ref64(pc, pr, rc, rr, beta, loss_type, eps)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_c), dh, rtol=1e-4, atol=1e-7)  # dh/d log pi(chosen) = 1
    np.testing.assert_allclose(np.asarray(g_r), -dh, rtol=1e-4, atol=1e-7)  # dh/d log pi(rejected) = -1
    h = (pc - rc) - (pr - rr)
    np.testing.assert_allclose(float(metrics["margin"]), np.mean(beta * h), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(h > 0), atol=1e-6)
    if loss_type == "dpo" and eps == 0.0:  # the default path is today's `losses.dpo_loss`, bit for bit
        from proxykd_jax.losses import dpo_loss

        old, _ = dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)), beta)
        assert float(old) == float(loss)


def test_preference_gradient_signs_and_limits():
    """DPO always pushes h up, vanishing as h -> inf; conservative DPO and IPO push back past a
    finite margin: log((1 - eps) / eps) / beta and 1 / (2 beta)."""

    def dloss_dh(h, loss_type, eps, beta):
        def f(x):
            return objectives.preference_loss(
                x,
                jnp.zeros_like(x),
                jnp.zeros_like(x),
                jnp.zeros_like(x),
                beta=beta,
                loss_type=loss_type,
                label_smoothing=eps,
            )[0]

        return float(jax.grad(f)(jnp.array([h], jnp.float32))[0])

    beta = 0.1
    for h in (-50.0, 0.0, 10.0, 50.0):
        assert dloss_dh(h, "dpo", 0.0, beta) < 0
    assert abs(dloss_dh(400.0, "dpo", 0.0, beta)) < 1e-12
    assert abs(dloss_dh(-400.0, "dpo", 0.0, beta) + beta) < 1e-6  # saturates at -beta
    eps = 0.1
    h_star = math.log((1 - eps) / eps) / beta
    assert dloss_dh(h_star - 1.0, "dpo", eps, beta) < 0 < dloss_dh(h_star + 1.0, "dpo", eps, beta)
    assert abs(dloss_dh(h_star, "dpo", eps, beta)) < 1e-6
    np.testing.assert_allclose(dloss_dh(400.0, "dpo", eps, beta), eps * beta, rtol=1e-5)
    target = 1.0 / (2.0 * beta)
    assert dloss_dh(target - 1.0, "ipo", 0.0, beta) < 0 < dloss_dh(target + 1.0, "ipo", 0.0, beta)
    assert dloss_dh(target, "ipo", 0.0, beta) == 0.0
    np.testing.assert_allclose(dloss_dh(target + 100.0, "ipo", 0.0, beta), 200.0, rtol=1e-5)  # grows, no saturation
    with pytest.raises(ValueError, match="align.loss_type"):
        objectives.preference_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), beta=0.1, loss_type="kto")


def test_ipo_objective_through_the_model():
    model = _model()
    rows = _random_pairs(np.random.default_rng(4), 4)
    ref_c = np.array([-30.0, -12.5, -20.0, -7.0], np.float32)
    ref_r = np.array([-25.0, -15.0, -9.0, -11.0], np.float32)
    rows.update(ref_chosen_logp=ref_c, ref_rejected_logp=ref_r)
    batch = {k: jnp.asarray(v) for k, v in phases.interleave_pairs(rows).items()}
    graphdef, state = nnx.split(model)
    loss_fn = functools.partial(objectives.dpo_loss_fn, beta=0.5, nll_weight=0.3, chunk=8, loss_type="ipo")
    loss, metrics = jax.jit(lambda st, b: loss_fn(nnx.merge(graphdef, st), b))(state, batch)
    pc, pr = _dense_logp64(model, rows, "chosen_"), _dense_logp64(model, rows, "rejected_")
    ipo = np.mean(((pc - ref_c) - (pr - ref_r) - 1.0) ** 2)
    nll = -pc.sum() / rows["chosen_loss_mask"].sum()
    np.testing.assert_allclose(float(metrics["dpo_loss"]), ipo, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.3 * nll + ipo, rtol=1e-5)


def test_lora_gradients_reach_adapters_only():
    base = _model()
    adapters = lora.LoraAdapters(base, rank=2, alpha=4.0, targets=("wq", "wv"), rngs=nnx.Rngs(3))
    rows = {k: jnp.asarray(v) for k, v in pairs.pad_rows([(5, 6), (7, 8, 9)], [(10, 11, 2), (12, 2)], 12).items()}
    graphdef, state = nnx.split(adapters)

    @jax.jit
    def grad_fn(adapter_state, base_state):
        base_model = nnx.merge(*base_split[:1], base_state)
        return jax.grad(lambda st: objectives.sft_loss_fn(nnx.merge(graphdef, st), rows, base_model, chunk=8)[0])(
            adapter_state
        )

    base_split = nnx.split(base)
    grads = nnx.merge(graphdef, grad_fn(state, base_split[1]))
    assert len(grads.a) == len(grads.b) == 2  # wq and wv of the one layer
    # dL/dA = dL/dW_eff . B^T vanishes while B = 0; dL/dB does not
    assert all(float(jnp.abs(g[...]).max()) == 0.0 for g in grads.a)
    assert all(float(jnp.abs(g[...]).max()) > 0.0 for g in grads.b)


def test_sampling_respects_stop_tokens_and_lengths():
    model = _model(4)
    stop, max_new = 7, 6
    prompts = [tuple(np.random.default_rng(i).integers(8, 96, 2 + i % 4)) for i in range(11)]

    def sample_fn(p, l, rng):
        out = generate(model, p, l, rng, max_new_tokens=max_new, temperature=1.0, stop_tokens=(stop, 9))
        return out.tokens_BxT, out.lengths_B

    # a skewed model makes stops likely: bias the output layer towards the stop token
    model.lm_head[...] = model.lm_head[...].at[:, stop].add(0.6)
    got = pairs.sample_responses(sample_fn, prompts, jax.random.key(0), batch_size=4, width=6)
    assert len(got) == len(prompts)
    assert any(len(r) < max_new for r in got) and all(1 <= len(r) <= max_new for r in got)
    for r in got:
        assert all(t not in (stop, 9) for t in r[:-1])
        assert len(r) == max_new or r[-1] in (stop, 9)
    again = pairs.sample_responses(sample_fn, prompts, jax.random.key(0), batch_size=4, width=6)
    assert again == got


def test_kl_to_teacher_matches_dense():
    model, teacher = _model(5), _model(6)
    rows = pairs.example_rows([pairs.Example(0, 0, (3, 4, 5), (6, 7, 8, 9)), pairs.Example(1, 1, (10,), (11, 12))], 10)

    def teacher_probs(tokens, seg):
        return np.asarray(jax.nn.softmax(_logits(teacher, tokens, seg), -1), np.float64)

    got = known_teacher.proxy_kl_to_teacher(teacher_probs, model, rows, batch_size=1)
    q = teacher_probs(rows["tokens"], rows["segment_ids"])
    logp = np.asarray(jax.nn.log_softmax(_logits(model, rows["tokens"], rows["segment_ids"]), -1), np.float64)
    kl = np.sum(q * (np.log(q) - logp), -1)
    want = np.sum(kl * rows["loss_mask"]) / rows["loss_mask"].sum()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert known_teacher.proxy_kl_to_teacher(teacher_probs, teacher, rows) < 1e-5


def test_reference_and_heldout_sharded_equal_single_device():
    mesh = make_mesh(ml_collections.ConfigDict({"shape": {"data": 2, "fsdp": 2, "tensor": 2}}))
    rows = _random_pairs(np.random.default_rng(7), 10)
    single = _model(8)
    ref1 = objectives.reference_logprobs(single, (), rows, batch_size=4, chunk=16)
    sharded = phases.shard_module(_model(8), mesh, LOGICAL_RULES)
    from proxykd_jax.parallel import global_batch

    put = lambda b: global_batch(b, mesh, LOGICAL_RULES)  # noqa: E731
    ref8 = objectives.reference_logprobs(sharded, (), rows, batch_size=4, chunk=16, put_batch=put)
    np.testing.assert_allclose(ref8[0], ref1[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref8[1], ref1[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref1[0], _dense_logp64(single, rows, "chosen_"), rtol=1e-5, atol=1e-5)
    held = {k[len("chosen_") :]: v for k, v in rows.items() if k.startswith("chosen_")}
    nll1 = objectives.heldout_nll(single, (), held, batch_size=4, chunk=16)
    nll8 = objectives.heldout_nll(sharded, (), held, batch_size=4, chunk=16, put_batch=put)
    np.testing.assert_allclose(nll8, nll1, rtol=1e-5)
    np.testing.assert_allclose(nll1, -ref1[0].astype(np.float64).sum() / held["loss_mask"].sum(), rtol=1e-5)


def test_phase_with_grad_accum_logs_the_lr_of_each_optimizer_update(tmp_path):
    """optim.grad_accum = 2 over a 6-step phase: 3 optimizer updates, align.warmup_steps = 10 capped at
    2 of them (not at steps - 1 = 5, which no schedule of 3 updates can hold), and the logged lr of
    loop step s is the schedule at update (s - 1) // 2; the phase updates the proxy."""
    import optax

    from proxykd_jax.align import config as align_config
    from proxykd_jax.align.rounds import PhaseTrainer
    from proxykd_jax.train import optim, read_metrics
    from proxykd_jax.train.loop import default_config as train_default_config

    acfg = align_config.default_config()
    acfg.update(warmup_steps=10, checkpoint_every=0)
    ocfg = optim.default_config()
    ocfg.grad_accum = 2
    tcfg = train_default_config()
    tcfg.update(log_every=1, tensorboard=False, progress=False, peak_flops=1e9)
    mesh = make_mesh(ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": 1, "tensor": 1}}), jax.devices()[:1])
    trainer = PhaseTrainer(acfg, ocfg, tcfg, mesh, LOGICAL_RULES, seq_len=16)
    rng = np.random.default_rng(3)
    rows = pairs.pad_rows(
        [tuple(rng.integers(3, 96, 3)) for _ in range(4)], [tuple(rng.integers(3, 96, 6)) for _ in range(4)], 16
    )
    model = _model(2)
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    loss_fn = functools.partial(objectives.sft_loss_fn, chunk=16)
    lr = 1e-3
    trained = trainer.train(
        tmp_path, model, (), loss_fn, phases.row_batches(rows, 4, 0), steps=6, lr=lr, rows_per_step=4
    )
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=2, decay_steps=3, end_value=0.1 * lr)
    logged = {r["step"]: r["lr"] for r in read_metrics(tmp_path) if "lr" in r}
    assert sorted(logged) == list(range(1, 7))
    expected = [float(schedule((s - 1) // 2)) for s in range(1, 7)]
    assert expected == pytest.approx([0.0, 0.0, lr / 2, lr / 2, lr, lr])  # warm-up over updates 0-1, peak at 2
    assert [logged[s] for s in range(1, 7)] == pytest.approx(expected, rel=1e-6)
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(trained, nnx.Param))]
    assert max(np.abs(a - b).max() for a, b in zip(after, before)) > 0


def test_sft_with_grad_accum_weights_micro_batches_by_their_response_tokens(tmp_path):
    """SFT rows with 2, 4, 8 and 13 response tokens, one per micro-batch at optim.grad_accum = 4: the
    phase's one update equals one step on all four rows at once (the token mean over all 27 tokens; the
    mean of the four row means, what the phase did, moved the parameters elsewhere)."""
    from proxykd_jax.align import config as align_config
    from proxykd_jax.align.rounds import PhaseTrainer
    from proxykd_jax.train import optim
    from proxykd_jax.train.loop import default_config as train_default_config

    acfg = align_config.default_config()
    acfg.update(warmup_steps=0, checkpoint_every=0)
    tcfg = train_default_config()
    tcfg.update(log_every=1, tensorboard=False, progress=False, peak_flops=1e9)
    mesh = make_mesh(ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": 1, "tensor": 1}}), jax.devices()[:1])
    rng = np.random.default_rng(5)
    rows = pairs.pad_rows(
        [tuple(rng.integers(3, 96, 2)) for _ in range(4)], [tuple(rng.integers(3, 96, n)) for n in (2, 4, 8, 13)], 16
    )
    assert sorted(rows["loss_mask"].sum(1).tolist()) == [2, 4, 8, 13]
    loss_fn = functools.partial(objectives.sft_loss_fn, chunk=16)
    params = {}
    for accum, batch in ((4, 1), (1, 4)):
        ocfg = optim.default_config()
        ocfg.grad_accum = accum
        trainer = PhaseTrainer(acfg, ocfg, tcfg, mesh, LOGICAL_RULES, seq_len=16)
        trained = trainer.train(
            tmp_path / f"accum{accum}",
            _model(2),
            (),
            loss_fn,
            phases.row_batches(rows, batch, 0),
            steps=accum,
            lr=1e-2,
            rows_per_step=batch,
            accum_weight="response_tokens",
        )
        params[accum] = [np.asarray(x) for x in jax.tree.leaves(nnx.state(trained, nnx.Param))]
    for a, b in zip(params[4], params[1]):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rank", [0, 2])
def test_phase_mfu_counts_no_weight_gradients_for_a_lora_base(tmp_path, monkeypatch, rank):
    """The loop's FLOPs per step (its MFU numerator) are those `proxykd plan` uses: forward + backward
    for full fine-tuning, about 2x forward for LoRA on a frozen base (it counted 3x forward)."""
    from proxykd_jax.align import config as align_config
    from proxykd_jax.align.rounds import PhaseTrainer
    from proxykd_jax.models.llama import flops_per_token
    from proxykd_jax.train import loop as loop_lib
    from proxykd_jax.train import optim
    from proxykd_jax.train.loop import default_config as train_default_config

    seen = {}

    class Stop(Exception):
        pass

    def fake_loop(*args, **kwargs):
        seen["flops"] = kwargs["flops_per_step"]
        raise Stop

    monkeypatch.setattr(loop_lib, "Loop", fake_loop)
    acfg = align_config.default_config()
    acfg.lora.rank = rank
    mesh = make_mesh(ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": 1, "tensor": 1}}), jax.devices()[:1])
    trainer = PhaseTrainer(acfg, optim.default_config(), train_default_config(), mesh, LOGICAL_RULES, seq_len=16)
    base = _model(2)
    trainable, frozen = (lora.LoraAdapters(base, rank=2, alpha=4.0, targets=("wq",), rngs=nnx.Rngs(1)), (base,))
    if not rank:
        trainable, frozen = base, ()
    loss_fn = functools.partial(objectives.sft_loss_fn, chunk=16)
    with pytest.raises(Stop):
        trainer.train(tmp_path, trainable, frozen, loss_fn, iter(()), steps=4, lr=1e-3, rows_per_step=4)
    forward = 4 * 16 * flops_per_token(base.cfg, 16, backward=False)
    assert seen["flops"](16) == pytest.approx(
        2 * forward if rank else 4 * 16 * flops_per_token(base.cfg, 16, backward=True)
    )
