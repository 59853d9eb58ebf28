"""The posterior's first pass scores each batch with one forward pass: the targets' log-probabilities
and, for a `bytes` teacher head, the proxy's mass of each target's first-byte group, checked against a
float64 reference from the same logits (also with a padded embedding, whose extra ids are no token)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from proxykd_jax.bayes import estimate, posterior_bytes
from proxykd_jax.models.llama import Llama, ModelConfig

B, L, V = 3, 16, 300


@pytest.mark.parametrize("vocab", [V, 280])
def test_target_scores_match_a_float64_reference(vocab):
    rng = np.random.default_rng()
    cfg = ModelConfig(
        vocab_size=V, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=L
    )
    model = Llama(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    batch = {
        "tokens": rng.integers(0, vocab, (B, L), dtype=np.int32),
        "targets": rng.integers(0, vocab, (B, L), dtype=np.int32),
        "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
        "segment_ids": np.ones((B, L), np.int32),
    }
    sym = rng.integers(0, 12, V).astype(np.int32)  # few symbols: groups of ~25 tokens
    sym[vocab:] = posterior_bytes.OTHER_SYMBOL
    graphdef, state = nnx.split(model)
    fn = jax.jit(estimate.target_scores, static_argnums=(0, 4))
    lp, g = (np.asarray(x) for x in fn(graphdef, state, batch, sym, vocab))

    logits = np.asarray(model(batch["tokens"], batch["positions"], batch["segment_ids"]), np.float64)[..., :vocab]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    p = np.exp(logp)
    t = batch["targets"]
    want_lp = np.take_along_axis(logp, t[..., None], -1)[..., 0]
    want_g = (p * (sym[:vocab] == sym[t][..., None])).sum(-1)
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6)
    assert 0.01 < want_g.mean() < 0.5  # groups of several tokens, not the target alone nor everything
    lp_alone = jax.jit(estimate.target_logprobs, static_argnums=(0, 3))(graphdef, state, batch, vocab)
    np.testing.assert_allclose(np.asarray(lp_alone), lp, rtol=1e-6, atol=1e-6)
