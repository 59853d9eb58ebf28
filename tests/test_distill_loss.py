"""The distill stage's loss functions against plain float64 numpy formulas on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from proxykd_jax import losses
from proxykd_jax.context import student_name
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.train import distill

B, L, K, V = 2, 12, 5, 97


def tiny(seed, **kw):
    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=48, **kw)
    return Llama(cfg, rngs=nnx.Rngs(seed))


def random_batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, L)).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], rng.integers(0, V, (B, 1))], 1).astype(np.int32)
    segment_ids = np.ones((B, L), np.int32)
    segment_ids[1, 7:] = 2  # two packed samples in row 1
    segment_ids[0, 10:] = 0  # padding at the end of row 0
    positions = np.zeros((B, L), np.int32)
    for b in range(B):
        for t in range(1, L):
            positions[b, t] = 0 if segment_ids[b, t] != segment_ids[b, t - 1] else positions[b, t - 1] + 1
    loss_mask = (rng.random((B, L)) < 0.7).astype(np.float32) * (segment_ids > 0)
    kd_ids = np.stack([rng.permutation(V)[:K] for _ in range(B * L)]).reshape(B, L, K).astype(np.int32)
    probs = rng.dirichlet(np.ones(K + 1) * 0.5, size=(B, L))
    kd_logprobs = np.log(probs[..., :K]).astype(np.float32)
    kd_logprobs[0, 3, -2:] = -np.inf  # a row with fewer than K candidates
    kd_tail = (1.0 - np.exp(kd_logprobs.astype(np.float64)).sum(-1)).astype(np.float32)
    weight = np.where(segment_ids == 2, 0.3, 0.8).astype(np.float32)
    sample_ids = np.where(segment_ids > 0, segment_ids + 10, 0).astype(np.int32)
    return dict(
        tokens=tokens,
        targets=targets,
        positions=positions,
        segment_ids=segment_ids,
        loss_mask=loss_mask,
        sample_ids=sample_ids,
        kd_ids=kd_ids,
        kd_logprobs=kd_logprobs,
        kd_tail=kd_tail,
        weight=weight,
    )


def logsoftmax64(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def loss_cfg(**kw):
    cfg = losses.default_config()
    cfg.chunk_size = 7  # several tiles, the last one padded
    cfg.update(kw)
    return cfg


def reference_sparse(logq, batch, alpha):
    """CE + alpha * w * forward KL over K + tail bucket, per-token mean; float64."""
    ce = -np.take_along_axis(logq, batch["targets"][..., None], -1)[..., 0]
    logq_k = np.take_along_axis(logq, batch["kd_ids"], -1)
    p_k = np.exp(batch["kd_logprobs"].astype(np.float64))
    head = np.where(p_k > 0, p_k * (np.log(np.where(p_k > 0, p_k, 1)) - logq_k), 0.0).sum(-1)
    q_tail = 1.0 - np.where(p_k > 0, np.exp(logq_k), 0.0).sum(-1)
    p_tail = batch["kd_tail"].astype(np.float64)
    kd = head + p_tail * (np.log(p_tail) - np.log(q_tail))
    m, w = batch["loss_mask"], batch["weight"]
    return ((m * ce).sum() + alpha * (m * w * kd).sum()) / m.sum()


@pytest.mark.parametrize("alpha", [100.0, 0.5])
def test_sparse_loss_matches_float64(alpha):
    model, batch = tiny(0), random_batch(1)
    loss, metrics = jax.jit(distill.make_loss_fn(loss_cfg(alpha=alpha)))(model, batch)
    logq = logsoftmax64(model(batch["tokens"], batch["positions"], batch["segment_ids"]))
    expected = reference_sparse(logq, batch, alpha)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["tokens"]) == batch["loss_mask"].sum()
    np.testing.assert_allclose(float(metrics["ce"]) + alpha * float(metrics["kd"]), expected, rtol=1e-5)


def test_alpha_zero_is_pure_cross_entropy_and_ignores_the_store():
    model, batch = tiny(2), random_batch(3)
    sft_batch = {k: v for k, v in batch.items() if not k.startswith("kd_") and k != "weight"}
    loss, metrics = jax.jit(distill.make_loss_fn(loss_cfg(alpha=0.0)))(model, sft_batch)
    logq = logsoftmax64(model(batch["tokens"], batch["positions"], batch["segment_ids"]))
    ce = -np.take_along_axis(logq, batch["targets"][..., None], -1)[..., 0]
    expected = (batch["loss_mask"] * ce).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["kd"]) == 0.0


def test_white_box_loss_matches_float64_and_leaves_teacher_ungraded():
    student, teacher, batch = tiny(4), tiny(5), random_batch(6)
    teacher_graphdef, teacher_state = nnx.split(teacher)
    loss_fn = distill.make_white_box_loss_fn(loss_cfg(alpha=3.0, temperature=2.0), teacher_graphdef)
    loss, _ = jax.jit(loss_fn)(student, batch, teacher_state)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    s_logits = np.asarray(student(*args), np.float64)
    t_logits = np.asarray(teacher(*args), np.float64)
    logq, logq_t, logp_t = logsoftmax64(s_logits), logsoftmax64(s_logits / 2), logsoftmax64(t_logits / 2)
    ce = -np.take_along_axis(logq, batch["targets"][..., None], -1)[..., 0]
    kd = (np.exp(logp_t) * (logp_t - logq_t)).sum(-1)
    m = batch["loss_mask"]
    np.testing.assert_allclose(float(loss), ((m * ce).sum() + 3.0 * (m * kd).sum()) / m.sum(), rtol=1e-5)
    grads = jax.grad(lambda ts: loss_fn(student, batch, ts)[0])(teacher_state)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        distill.make_loss_fn(loss_cfg(alpha=-1.0))
    with pytest.raises(ValueError, match="white_box"):
        distill.make_white_box_loss_fn(loss_cfg(alpha=0.0), nnx.split(tiny(0))[0])
    with pytest.raises(ValueError, match="divergence"):
        distill.make_loss_fn(loss_cfg(divergence="kl"))


def test_output_name_follows_alpha_unless_overridden():
    cfg = distill.default_config()
    assert student_name(cfg) == "student"
    cfg.loss.alpha = 0.0
    assert student_name(cfg) == "student_sft"
    cfg.output = "student_b"
    assert student_name(cfg) == "student_b"
