"""Align-stage pieces: rows and pairs, LoRA, DPO + NLL objective, sampling, KL to a known teacher."""
import math

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from proxykd_jax.align import lora, objectives, pairs, phases
from proxykd_jax.eval import known_teacher
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.sampling import generate
from proxykd_jax.parallel import LOGICAL_RULES, make_mesh

CFG = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                  max_seq_len=64)


def _model(seed=0):
    return Llama(CFG, rngs=nnx.Rngs(params=seed))


def _random_pairs(rng, n, length=24):
    out = []
    for _ in range(n):
        p = int(rng.integers(2, 7))
        out.append((tuple(rng.integers(3, 96, p)), tuple(rng.integers(3, 96, int(rng.integers(2, 9)))),
                    tuple(rng.integers(3, 96, int(rng.integers(1, 9))))))
    return pairs.pair_rows(out, length)


def _dense_logp64(model, rows, prefix=""):
    """float64 sum over masked targets of log-softmax(full logits)."""
    logits = np.asarray(model(jnp.asarray(rows[prefix + "tokens"]), None,
                              jnp.asarray(rows[prefix + "segment_ids"])), np.float64)
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    tgt = np.take_along_axis(logits, rows[prefix + "targets"][..., None], -1)[..., 0]
    return np.sum((tgt - logz) * rows[prefix + "loss_mask"], -1)


def test_rows_and_examples():
    rows = pairs.pad_rows([(5, 6, 7)], [(8, 9, 2)], 8, pad_id=0)
    np.testing.assert_array_equal(rows["tokens"][0], [5, 6, 7, 8, 9, 2, 0, 0])
    np.testing.assert_array_equal(rows["targets"][0], [6, 7, 8, 9, 2, 0, 0, 0])
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 1, 1, 0, 0])
    rec = {"sample_id": 3, "prompt_id": 9, "tokens": np.array([5, 6, 7, 8, 9, 2], np.int32),
           "loss_mask": np.array([0, 0, 0, 1, 1, 1], bool)}
    (ex,) = pairs.examples_from_records([rec])
    assert ex.prompt == (5, 6, 7) and ex.response == (8, 9, 2) and ex.sample_id == 3
    with pytest.raises(ValueError, match="align.seq_len"):
        pairs.pad_rows([tuple(range(8))], [(1,)], 8)


def test_build_pairs_drops_equal_samples():
    exs = [pairs.Example(0, 0, (1, 2), (3, 4)), pairs.Example(1, 1, (5,), (6,))]
    got, dropped = pairs.build_pairs(exs, [[(3, 4), (3, 5)], [(6,), ()]])
    assert got == [((1, 2), (3, 4), (3, 5))] and dropped == 3


def test_lora_merge_matches_manual_weights():
    base = _model()
    adapters = lora.LoraAdapters(base, rank=3, alpha=6.0, targets=("wq", "wo", "w_down"), rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 9)))
    np.testing.assert_allclose(lora.merged(base, adapters)(tokens), base(tokens), atol=0)  # B = 0 at init
    for i, b in enumerate(adapters.b):
        b[...] = jax.random.normal(jax.random.key(i), b[...].shape) * 0.3
    manual = _model()
    wo_a, wo_b = [(a[...], b[...]) for p, a, b in zip(adapters.paths, adapters.a, adapters.b)
                  if p == ("layers", 1, "attn", "wo")][0]
    for p, a, b in zip(adapters.paths, adapters.a, adapters.b):
        layer = manual.layers[p[1]]
        holder = layer.attn if p[2] == "attn" else layer.mlp
        w = getattr(holder, p[3])
        n_in = a[...].ndim - 1
        w[...] = w[...] + 2.0 * np.tensordot(np.asarray(a[...]), np.asarray(b[...]), axes=([n_in], [0]))
    assert wo_a.shape == (4, 8, 3) and wo_b.shape == (3, 32)
    np.testing.assert_allclose(lora.merged(base, adapters)(tokens), manual(tokens), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(lora.merged(base, adapters)(tokens) - base(tokens))).max() > 1e-3


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
    loss, metrics = objectives.dpo_loss_fn(model, batch, beta=0.1, nll_weight=0.7, chunk=8)
    pc, pr = _dense_logp64(model, rows, "chosen_"), _dense_logp64(model, rows, "rejected_")
    margin = 0.1 * ((pc - ref_c) - (pr - ref_r))
    dpo = np.mean([math.log1p(math.exp(-m)) for m in margin])
    nll = -pc.sum() / rows["chosen_loss_mask"].sum()
    np.testing.assert_allclose(float(metrics["dpo_loss"]), dpo, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["nll"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.7 * nll + dpo, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["dpo/accuracy"]), np.mean(margin > 0), atol=1e-6)
    np.testing.assert_allclose(float(metrics["dpo/margin"]), np.mean(margin), rtol=1e-4, atol=1e-5)


def test_lora_gradients_reach_adapters_only():
    base = _model()
    adapters = lora.LoraAdapters(base, rank=2, alpha=4.0, targets=("wq", "wv"), rngs=nnx.Rngs(3))
    rows = {k: jnp.asarray(v) for k, v in pairs.pad_rows([(5, 6), (7, 8, 9)], [(10, 11, 2), (12, 2)], 12).items()}
    grads = nnx.grad(lambda a: objectives.sft_loss_fn(a, rows, base, chunk=8)[0])(adapters)
    norms = [float(jnp.abs(g[...]).sum()) for g in jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, nnx.Variable))]
    assert len(norms) == 8 and sum(n > 0 for n in norms) >= 4  # B gets gradient at B = 0, A does not yet


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
    rows = pairs.example_rows([pairs.Example(0, 0, (3, 4, 5), (6, 7, 8, 9)), pairs.Example(1, 1, (10,), (11, 12))],
                              10)

    def teacher_probs(tokens, seg):
        return np.asarray(jax.nn.softmax(teacher(jnp.asarray(tokens), None, jnp.asarray(seg)), -1), np.float64)

    got = known_teacher.proxy_kl_to_teacher(teacher_probs, model, rows, batch_size=1)
    q = teacher_probs(rows["tokens"], rows["segment_ids"])
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(rows["tokens"]), None, jnp.asarray(rows["segment_ids"])),
                                         -1), np.float64)
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
    held = {k[len("chosen_"):]: v for k, v in rows.items() if k.startswith("chosen_")}
    nll1 = objectives.heldout_nll(single, (), held, batch_size=4, chunk=16)
    nll8 = objectives.heldout_nll(sharded, (), held, batch_size=4, chunk=16, put_batch=put)
    np.testing.assert_allclose(nll8, nll1, rtol=1e-5)
    np.testing.assert_allclose(nll1, -ref1[0].astype(np.float64).sum() / held["loss_mask"].sum(), rtol=1e-5)
