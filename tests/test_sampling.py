"""KV-cache decoding and sampling against repeated full forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.sampling import generate, sample_logits

CFG = ModelConfig(
    vocab_size=37,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    d_ff=48,
    qkv_bias=True,
    max_seq_len=64,
)


@pytest.fixture(scope="module")
def model():
    @nnx.jit  # (one compiled program: op by op, the init and the draws cost a compile per op and shape)
    def build():
        m = Llama(CFG, rngs=nnx.Rngs(0))
        state = nnx.state(m, nnx.Param)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(11), len(leaves))
        fresh = [0.4 * jax.random.normal(k, x.shape) + (1.0 if x.ndim == 1 else 0.0) for k, x in zip(keys, leaves)]
        nnx.update(m, jax.tree.unflatten(treedef, fresh))
        return m

    return build()


@nnx.jit
def _full_logits(model, tokens_1xW):
    return model(tokens_1xW)


@nnx.jit
def _decode(model, tokens_BxT, positions_BxT, segment_ids_BxT, cache):
    return model.decode(tokens_BxT, positions_BxT, segment_ids_BxT, cache)


def full_logits(model, seq, width=24):
    """Full-forward logits of `seq` (right-padded to a fixed width: causal, so padding is harmless)."""
    padded = np.zeros((1, width), np.int32)
    padded[0, : len(seq)] = seq
    return np.asarray(_full_logits(model, jnp.asarray(padded)))[0, : len(seq)]


def greedy_reference(model, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(np.argmax(full_logits(model, seq)[-1])))
    return seq[len(prompt) :]


def left_aligned(prompts, pad=0):
    p = max(len(x) for x in prompts)
    arr = np.full((len(prompts), p), pad, np.int32)
    for i, x in enumerate(prompts):
        arr[i, : len(x)] = x
    return arr, np.array([len(x) for x in prompts], np.int32)


PROMPTS = [[3, 9, 4, 22, 7, 1, 30], [5, 2], [17, 8, 8, 12]]


def test_kv_cache_logits_equal_full_forward(model):
    tokens = np.random.default_rng(0).integers(1, CFG.vocab_size, (2, 12))
    full = np.stack([full_logits(model, row) for row in tokens])
    cache = model.init_cache(2, 16)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    logits_pre, cache = _decode(model, jnp.asarray(tokens[:, :5]), pos[:, :5], jnp.ones((2, 5), jnp.int32), cache)
    steps = [logits_pre]
    for t in range(5, 12):
        lg, cache = _decode(
            model, jnp.asarray(tokens[:, t : t + 1]), pos[:, t : t + 1], jnp.ones((2, 1), jnp.int32), cache
        )
        steps.append(lg)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], 1), full, rtol=1e-5, atol=1e-5)
    assert int(cache.index) == 12


def test_greedy_equals_repeated_argmax_and_lengths_independent(model):
    prompts, lengths = left_aligned(PROMPTS)
    out = generate(model, prompts, lengths, jax.random.key(0), max_new_tokens=6, temperature=0.0)
    assert out.tokens_BxT.shape == (3, 6)
    np.testing.assert_array_equal(np.asarray(out.lengths_B), [6, 6, 6])
    for i, prompt in enumerate(PROMPTS):
        ref = greedy_reference(model, prompt, 6)
        assert np.asarray(out.tokens_BxT[i]).tolist() == ref
        alone = generate(
            model,
            np.array([prompt], np.int32),
            np.array([len(prompt)]),
            jax.random.key(5),
            max_new_tokens=6,
            temperature=0.0,
        )
        assert np.asarray(alone.tokens_BxT[0]).tolist() == ref
    # a batch with a different padded width gives the same answer
    wide, wide_len = left_aligned(PROMPTS + [[1] * 11])
    out_wide = generate(model, wide, wide_len, jax.random.key(0), max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out_wide.tokens_BxT[:3]), np.asarray(out.tokens_BxT))


def test_stop_tokens_and_lengths(model):
    prompts, lengths = left_aligned(PROMPTS)
    ref = [greedy_reference(model, p, 8) for p in PROMPTS]
    stop = ref[0][2]  # row 0 emits this at step 2 (maybe earlier too)
    out = generate(
        model,
        prompts,
        lengths,
        jax.random.key(0),
        max_new_tokens=8,
        temperature=0.0,
        stop_tokens=(stop,),
        pad_id=-1,
        return_logprobs=True,
    )
    tokens, lens = np.asarray(out.tokens_BxT), np.asarray(out.lengths_B)
    for i in range(3):
        n = ref[i].index(stop) + 1 if stop in ref[i] else 8
        assert lens[i] == n
        assert tokens[i, :n].tolist() == ref[i][:n]
        assert np.all(tokens[i, n:] == -1)
        assert np.all(np.asarray(out.logprobs_BxT)[i, n:] == 0.0)
    assert lens[0] <= 3


def test_logprobs_match_full_forward(model):
    prompts, lengths = left_aligned(PROMPTS)
    out = generate(
        model,
        prompts,
        lengths,
        jax.random.key(3),
        max_new_tokens=5,
        temperature=1.0,
        return_logprobs=True,
        top_logprobs=4,
    )
    for i, prompt in enumerate(PROMPTS):
        seq = prompt + np.asarray(out.tokens_BxT[i]).tolist()
        logp = np.asarray(jax.nn.log_softmax(full_logits(model, seq)))
        for t in range(5):
            row = logp[len(prompt) - 1 + t]
            np.testing.assert_allclose(out.logprobs_BxT[i, t], row[seq[len(prompt) + t]], atol=1e-4)
            np.testing.assert_array_equal(np.asarray(out.top_ids_BxTxN[i, t]), np.argsort(-row)[:4])
            np.testing.assert_allclose(np.asarray(out.top_logprobs_BxTxN[i, t]), np.sort(row)[::-1][:4], atol=1e-4)


def test_sampling_is_seeded(model):
    prompts, lengths = left_aligned(PROMPTS)
    a = generate(model, prompts, lengths, jax.random.key(1), max_new_tokens=6)
    b = generate(model, prompts, lengths, jax.random.key(1), max_new_tokens=6)
    c = generate(model, prompts, lengths, jax.random.key(2), max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(a.tokens_BxT), np.asarray(b.tokens_BxT))
    assert not np.array_equal(np.asarray(a.tokens_BxT), np.asarray(c.tokens_BxT))


def test_suppressed_tokens_are_never_sampled(model):
    prompts, lengths = left_aligned(PROMPTS)
    free = generate(model, prompts, lengths, jax.random.key(5), max_new_tokens=12, temperature=3.0)
    drawn = set(np.asarray(free.tokens_BxT).ravel().tolist())
    banned = sorted(drawn)[:4]  # ids the unrestricted sampler does draw
    out = generate(
        model,
        prompts,
        lengths,
        jax.random.key(5),
        max_new_tokens=12,
        temperature=3.0,
        suppress_tokens=banned,
        return_logprobs=True,
        pad_id=36,
    )
    toks = np.asarray(out.tokens_BxT)
    for i, n in enumerate(np.asarray(out.lengths_B)):
        assert not set(toks[i, :n].tolist()) & set(banned)
    # the reported log-probs stay those of the model's own (unsuppressed) distribution
    seq = PROMPTS[0] + toks[0, :3].tolist()
    logp = np.asarray(jax.nn.log_softmax(full_logits(model, seq)))
    for t in range(3):
        np.testing.assert_allclose(
            out.logprobs_BxT[0, t], logp[len(PROMPTS[0]) - 1 + t][seq[len(PROMPTS[0]) + t]], atol=1e-4
        )


def test_a_padded_embedding_never_samples_nor_lists_its_extra_ids(model):
    """`vocab`: the model's rows past the tokenizer's size (a padded embedding, as Qwen's) get no probability:
    never drawn, never among the top log-probs, which are the model's distribution over the first `vocab`
    ids (a float64 reference from full forwards)."""
    vocab = 29  # of the model's 37 rows
    prompts, lengths = left_aligned(PROMPTS)
    free = generate(model, prompts, lengths, jax.random.key(5), max_new_tokens=12, temperature=3.0)
    assert np.asarray(free.tokens_BxT).max() >= vocab  # the unrestricted sampler does draw padded ids
    out = generate(
        model,
        prompts,
        lengths,
        jax.random.key(5),
        max_new_tokens=12,
        temperature=3.0,
        return_logprobs=True,
        top_logprobs=5,
        vocab=vocab,
    )
    toks, top = np.asarray(out.tokens_BxT), np.asarray(out.top_ids_BxTxN)
    for i, prompt in enumerate(PROMPTS):
        n = int(out.lengths_B[i])
        assert toks[i, :n].max() < vocab and top[i, :n].max() < vocab
        seq = prompt + toks[i, :n].tolist()
        logits = full_logits(model, seq).astype(np.float64)[:, :vocab]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        logp -= logits.max(-1, keepdims=True)
        for t in range(n):
            row = logp[len(prompt) - 1 + t]
            np.testing.assert_allclose(out.logprobs_BxT[i, t], row[seq[len(prompt) + t]], atol=1e-4)
            np.testing.assert_array_equal(top[i, t], np.argsort(-row)[:5])
    with pytest.raises(ValueError, match="vocab=38 must be in"):
        generate(model, prompts, lengths, jax.random.key(5), max_new_tokens=2, vocab=38)


def test_per_row_keys_make_rows_independent_of_their_batch(model):
    keys = jax.random.split(jax.random.key(8), 4)
    prompts, lengths = left_aligned(PROMPTS + [[11, 4, 6, 2, 9, 9, 13]])  # all rows padded to width 7
    out = generate(model, prompts, lengths, keys, max_new_tokens=8, temperature=1.5)
    order = [2, 0, 3, 1]  # the same rows with their keys, in another order
    shuffled = generate(
        model, prompts[order], lengths[order], keys[np.asarray(order)], max_new_tokens=8, temperature=1.5
    )
    other = generate(
        model,
        prompts[[0, 0, 0, 0]],
        lengths[[0, 0, 0, 0]],  # row 0 among new neighbours
        jax.random.split(jax.random.key(9), 4).at[2].set(keys[0]),
        max_new_tokens=8,
        temperature=1.5,
    )
    for j, i in enumerate(order):
        n = int(out.lengths_B[i])
        assert int(shuffled.lengths_B[j]) == n
        np.testing.assert_array_equal(np.asarray(shuffled.tokens_BxT[j, :n]), np.asarray(out.tokens_BxT[i, :n]))
    n = int(out.lengths_B[0])
    np.testing.assert_array_equal(np.asarray(other.tokens_BxT[2, :n]), np.asarray(out.tokens_BxT[0, :n]))
    assert len({tuple(np.asarray(other.tokens_BxT[r]).tolist()) for r in range(4)}) > 1  # keys matter
    with pytest.raises(ValueError, match="typed key"):
        generate(model, prompts, lengths, keys[:2], max_new_tokens=2)


# one compiled program per shape and top_k (as `generate` runs it): op by op, the 20,000-row draws cost seconds
_sample_logits = jax.jit(sample_logits, static_argnames="top_k")


def _draws(logits_V, n, **kw):
    logits = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
    temperature = jnp.full((n,), kw.pop("temperature", 1.0))
    top_p = jnp.full((n,), kw.pop("top_p", 1.0))
    return np.asarray(_sample_logits(logits, jax.random.key(42), temperature, top_p, **kw))


def test_top_k_and_top_p_restrict_support():
    logits = np.log(np.array([0.05, 0.3, 0.02, 0.25, 0.2, 0.08, 0.1]))
    n = 20000
    free = np.bincount(_draws(logits, n), minlength=7) / n
    np.testing.assert_allclose(free, np.exp(logits), atol=0.015)
    topk = np.bincount(_draws(logits, n, top_k=3), minlength=7) / n
    assert set(np.nonzero(topk)[0]) == {1, 3, 4}
    # k at or past the vocabulary keeps every token (lax.top_k raised for k > V)
    np.testing.assert_allclose(np.bincount(_draws(logits, n, top_k=9), minlength=7) / n, np.exp(logits), atol=0.015)
    np.testing.assert_allclose(topk[[1, 3, 4]], np.array([0.3, 0.25, 0.2]) / 0.75, atol=0.015)
    # nucleus 0.6: 0.3 + 0.25 = 0.55 < 0.6, so token 4 (0.2) is the last one kept
    topp = np.bincount(_draws(logits, n, top_p=0.6), minlength=7) / n
    assert set(np.nonzero(topp)[0]) == {1, 3, 4}
    cold = np.bincount(_draws(logits, n, temperature=0.25), minlength=7) / n
    assert cold[1] > 0.55  # sharper at low temperature
    assert set(_draws(logits, 50, temperature=0.0)) == {1}


def test_bad_arguments(model):
    prompts, lengths = left_aligned(PROMPTS)
    with pytest.raises(ValueError, match="prompt_lengths_B"):
        generate(model, prompts, np.array([0, 2, 4]), jax.random.key(0), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompts, lengths, jax.random.key(0), max_new_tokens=100)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompts, lengths, jax.random.key(0), max_new_tokens=2, top_p=0.0)


def test_sharded_cache_on_a_mesh_samples_as_one_device(model):
    """fsdp=4 x tensor=2: weights split, the KV cache split over rows (batch) and kv heads; the same
    tokens and log-probs as on one device, and a fraction of the per-device cache memory."""
    from jax.sharding import AxisType, PartitionSpec

    from proxykd_jax.models import sampling
    from proxykd_jax.parallel import LOGICAL_RULES, MESH_AXES, place_model

    rules = tuple((name, None if name == "vocab" else axes) for name, axes in LOGICAL_RULES)  # vocab 37 is odd
    mesh = jax.make_mesh((1, 4, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:8])
    sharded = nnx.merge(*place_model(model, mesh, rules))
    prompts = [PROMPTS[i % 3][: 2 + i % 4] for i in range(8)]
    tokens, lengths = left_aligned(prompts)
    kw = dict(max_new_tokens=40, temperature=0.8, top_p=0.95, return_logprobs=True, stop_tokens=(5,))
    keys = jax.random.split(jax.random.key(3), 8)
    a = generate(sharded, tokens, lengths, keys, rules=rules, **kw)
    b = generate(model, tokens, lengths, keys, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens_BxT), np.asarray(b.tokens_BxT))
    np.testing.assert_array_equal(np.asarray(a.lengths_B), np.asarray(b.lengths_B))
    np.testing.assert_allclose(np.asarray(a.logprobs_BxT), np.asarray(b.logprobs_BxT), rtol=1e-4, atol=1e-4)
    shardings = sampling.cache_shardings(sharded, 8, tokens.shape[1] + 40, rules)
    assert shardings.kv.spec == PartitionSpec(("data", "fsdp"), None, "tensor", None)
    assert shardings.rows.spec == PartitionSpec(("data", "fsdp"), None)
    assert sampling.cache_shardings(sharded, 2, 16, rules).kv.spec == PartitionSpec("data", None, "tensor", None)
    assert sampling.cache_shardings(model, 8, 16) is None  # one device: nothing to split

    # per-device temporaries of the compiled loop, with the cache split and with it whole
    graphdef, state = nnx.split(sharded)
    args = (graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), keys, jnp.ones(8), jnp.ones(8))
    static = dict(max_new_tokens=56, top_k=0, stop_tokens=(), pad_id=0, return_logprobs=False, top_logprobs=0)

    def temp_bytes(rules_):
        cache = sampling.cache_shardings(sharded, 8, tokens.shape[1] + 56, rules_)
        compiled = sampling._generate.lower(*args, **static, cache_sharding=cache).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole_rules = tuple((n, None if n in ("batch", "kv_heads") else axes) for n, axes in rules)
    cache_bytes = 2 * CFG.num_layers * 8 * (tokens.shape[1] + 56) * CFG.num_kv_heads * CFG.head_dim * 4
    split, whole = temp_bytes(rules), temp_bytes(whole_rules)
    assert whole - split >= cache_bytes * 3 // 4, (whole, split, cache_bytes)  # each device holds 1/8 of it


def _nucleus_reference(logits_V, top_p):
    """float64 nucleus: the fewest likeliest tokens (equal logits in id order) whose mass reaches top_p, renormalised."""
    logits_V = np.asarray(logits_V, np.float64)
    probs_V = np.exp(logits_V - logits_V.max())
    probs_V /= probs_V.sum()
    kept, mass = [], 0.0
    for i in sorted(range(len(logits_V)), key=lambda i: (-logits_V[i], i)):
        if kept and mass >= top_p:
            break
        kept.append(i)
        mass += probs_V[i]
    out = np.zeros_like(probs_V)
    out[kept] = probs_V[kept] / probs_V[kept].sum()
    return out


def test_nucleus_boundary_ties_are_taken_in_id_order():
    """Tokens tied at the nucleus boundary are not all kept: the nucleus is the fewest tokens whose mass
    reaches top_p (ties in id order), so uniform logits keep about top_p of the vocabulary."""
    rng = np.random.default_rng(4)
    logits = rng.normal(size=12) * 1.5
    order = np.argsort(-logits, kind="stable")
    logits[order[3]] = logits[order[2]]  # the 3rd and 4th likeliest tokens tie
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    top_p = probs[order[:2]].sum() + 0.5 * probs[order[2]]  # reached inside the tie
    n = 20000
    want = _nucleus_reference(logits, top_p)
    assert np.count_nonzero(want) == 3
    got = np.bincount(_draws(logits, n, top_p=float(top_p)), minlength=12) / n
    assert set(np.nonzero(got)[0]) == set(np.nonzero(want)[0])
    np.testing.assert_allclose(got, want, atol=0.015)
    flat = np.full(10, rng.normal())  # every logit equal (not zero)
    want = _nucleus_reference(flat, 0.35)
    got = np.bincount(_draws(flat, n, top_p=0.35), minlength=10) / n
    assert set(np.nonzero(got)[0]) == {0, 1, 2, 3}
    np.testing.assert_allclose(got, want, atol=0.015)
    # per-row settings: a row at top_p = 1 keeps every token, a greedy row takes the lowest-id maximum
    rows = jnp.broadcast_to(jnp.asarray(flat, jnp.float32), (3, 10))
    keys = jax.random.split(jax.random.key(1), 3)
    drawn = _sample_logits(rows, keys, jnp.asarray([1.0, 1.0, 0.0]), jnp.asarray([0.35, 1.0, 0.35]))
    assert int(drawn[2]) == 0 and 0 <= int(drawn[0]) <= 3
