"""The posterior's two passes form the proxy's logits a tile of positions at a time (`estimate.over_tiles`,
about `posterior.chunk_tokens` tokens per tile): the same scores and the same store step as from the whole
batch's logits, in every mode and head, on one device and on 8, and no [B*L, V] array in the compiled step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_bayes_posterior import random_case
from test_xtok_posterior import EOS, random_head, random_vocab

from proxykd_jax import parallel
from proxykd_jax.bayes import estimate
from proxykd_jax.bayes.posterior import posterior_topk
from proxykd_jax.bayes.prior import SparsePrior
from proxykd_jax.data.byte_head import symbols_from_bytes
from proxykd_jax.models.llama import Llama, ModelConfig

B, L, V = 8, 13, 300  # 13 positions: tiles of 2, 4 or 8 leave a padded last tile


def _model(seed: int, vocab_size: int = V, length: int = L) -> Llama:
    cfg = ModelConfig(
        vocab_size=vocab_size, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
        max_seq_len=length,
    )  # fmt: skip
    return Llama(cfg, rngs=nnx.Rngs(seed))


def _batch(rng, rows: int = B, length: int = L, vocab: int = V) -> dict:
    return {
        "tokens": rng.integers(0, vocab, (rows, length), dtype=np.int32),
        "targets": rng.integers(0, vocab, (rows, length), dtype=np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
        "segment_ids": np.ones((rows, length), np.int32),
    }


@pytest.mark.parametrize("chunk_tokens", [8, 16, 32, 64])  # tiles of 1, 2, 4, 8 positions
@pytest.mark.parametrize("vocab", [V, 280])  # 280: a padded embedding
def test_pass_one_scores_in_tiles_equal_the_whole_batch(chunk_tokens, vocab):
    rng = np.random.default_rng()
    model = _model(int(rng.integers(1 << 30)))
    graphdef, state = nnx.split(model)
    batch = _batch(rng, vocab=vocab)
    sym = rng.integers(0, 12, V).astype(np.int32)
    whole = jax.jit(estimate.target_scores, static_argnums=(0, 4, 5))(graphdef, state, batch, sym, vocab, 0)
    tiled = jax.jit(estimate.target_scores, static_argnums=(0, 4, 5))(graphdef, state, batch, sym, vocab, chunk_tokens)
    for a, b in zip(tiled, whole):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    alone = jax.jit(estimate.target_logprobs, static_argnums=(0, 3, 4))(graphdef, state, batch, vocab, chunk_tokens)
    np.testing.assert_allclose(np.asarray(alone), np.asarray(whole[0]), rtol=1e-5, atol=1e-6)


def _one_device_mesh():
    return parallel.make_mesh(
        ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": 1, "tensor": 1}}), jax.devices()[:1]
    )


def _eight_device_mesh():
    return parallel.make_mesh(ml_collections.ConfigDict({"shape": {"data": 2, "fsdp": 4, "tensor": 1}}))


@pytest.mark.parametrize("mesh_of", [_one_device_mesh, _eight_device_mesh], ids=["1-device", "8-devices"])
@pytest.mark.parametrize(
    "mode, head",
    [("expected", None), ("expected", "exact"), ("expected", "bytes"), ("sampled", None), ("geometric", "bytes")],
)
def test_store_step_in_tiles_equals_the_kernel_on_the_whole_batch(mesh_of, mode, head):
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 30))
    n, k = B * L, 12
    _, prior, base, n_pseudo = random_case(seed, n=n, v=V)
    head_ids = head_lps = sym = None
    if head == "exact":
        head_ids = rng.integers(0, V, (n, 5)).astype(np.int32)
        head_lps = np.sort(np.log(rng.dirichlet(np.ones(6), n)[:, :5]), 1)[:, ::-1].astype(np.float32)
        head_lps[rng.random(n) < 0.4] = -np.inf  # positions without the teacher's log-probs
    elif head == "bytes":
        sym = symbols_from_bytes(random_vocab(rng, V), eos_ids=(EOS,), special_ids=(0, 1, 3))
        head_ids, head_lps = random_head(rng, n, 5, sym)
    mesh, rules = mesh_of(), parallel.LOGICAL_RULES
    model = parallel.create_sharded_model(Llama, mesh, rules, _model(seed).cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    batch = parallel.global_batch(_batch(rng), mesh, rules)
    tok = parallel.batch_sharding(mesh, rules)
    put = lambda x: None if x is None else jax.device_put(np.asarray(x), tok)  # noqa: E731
    key = jax.random.key(seed)

    host = nnx.merge(*jax.device_get(nnx.split(model)))
    logits = host(*(np.asarray(batch[f]) for f in ("tokens", "positions", "segment_ids"))).reshape(n, V)
    want = posterior_topk(
        logits, prior, base, n_pseudo, 1.5, k=k, mode=mode, beta=0.7, num_samples=16, rng=key, head_ids_NxH=head_ids,
        head_logprobs_NxH=head_lps, head_sym_V=sym,
    )  # fmt: skip
    for chunk_tokens in (16, 40, 1 << 20):  # tiles of 2 and 5 positions, and the whole row
        pcfg = ml_collections.ConfigDict(
            {"mode": mode, "num_samples": 16, "beta": 0.7, "chunk_tokens": chunk_tokens, "kernel": "xla"}
        )
        step = estimate.make_posterior_step(graphdef, pcfg, k=k, mesh=mesh, rules=rules)
        got = step(
            state, batch, SparsePrior(*map(put, prior)), base, put(n_pseudo), np.float32(1.5), key, put(head_ids),
            put(head_lps), None if sym is None else jnp.asarray(sym),
        )  # fmt: skip
        ids, lps, tail = (np.asarray(x) for x in got)
        np.testing.assert_allclose(lps, np.asarray(want[1]), rtol=1e-4, atol=1e-5, err_msg=str(chunk_tokens))
        np.testing.assert_allclose(tail, np.asarray(want[2]), rtol=1e-4, atol=1e-5, err_msg=str(chunk_tokens))
        assert np.mean(ids == np.asarray(want[0])) > 0.99  # (a near tie may swap two ids between the forwards)


def test_the_compiled_step_holds_a_tile_of_logits_not_the_batch():
    rows, length, vocab = 8, 64, 4096
    model = _model(0, vocab, length)
    graphdef, state = nnx.split(model)
    mesh, rules = _one_device_mesh(), parallel.LOGICAL_RULES
    n = rows * length
    _, prior, base, n_pseudo = random_case(1, n=n, v=vocab)
    batch = _batch(np.random.default_rng(2), rows, length, vocab)
    logits_bytes = n * vocab * 4
    temps = {}
    for chunk_tokens in (0, 64):  # the whole batch, then tiles of 8 positions
        pcfg = ml_collections.ConfigDict(
            {"mode": "expected", "num_samples": 4, "beta": 1.0, "chunk_tokens": chunk_tokens, "kernel": "xla"}
        )
        step = estimate.make_posterior_step(graphdef, pcfg, k=8, mesh=mesh, rules=rules)
        args = (state, batch, prior, base, n_pseudo, np.float32(1.5), None, None, None)
        temps[chunk_tokens] = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
        score = jax.jit(estimate.target_logprobs, static_argnums=(0, 3, 4)).lower(
            graphdef, state, batch, 0, chunk_tokens
        )
        temps["pass 1", chunk_tokens] = score.compile().memory_analysis().temp_size_in_bytes
    assert temps[0] >= logits_bytes and temps["pass 1", 0] >= logits_bytes, temps  # the check sees whole logits
    assert temps[64] < logits_bytes / 4 and temps["pass 1", 64] < logits_bytes / 4, temps
