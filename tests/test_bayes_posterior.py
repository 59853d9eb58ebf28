"""The posterior kernel against a dense float64 numpy reference of the same formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from proxykd_jax.bayes import SparsePrior, make_sharded_posterior, posterior_topk
from proxykd_jax.bayes.posterior_union import blocked_top_k

V, N, S, S2, K = 256, 24, 6, 12, 16


def random_case(seed, n=N, v=V, exact=True):
    """Random logits, prior (with duplicate ids across orders) and base; n-gram part sums to one."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, v)) * 2.0).astype(np.float32)
    ids = rng.integers(0, v, (n, S)).astype(np.int32)
    counts = (rng.integers(0, 4, (n, S)) * exact).astype(np.float32)
    ng_ids = rng.integers(0, v // 4, (n, S2)).astype(np.int32)  # many duplicates
    ng_raw = rng.random((n, S2))
    floor = rng.uniform(0.05, 0.5, n)
    ng_probs = (ng_raw / ng_raw.sum(1, keepdims=True) * (1 - floor)[:, None]).astype(np.float32)
    base = rng.random(v) + 0.1
    base = (base / base.sum()).astype(np.float32)
    prior = SparsePrior(ids, counts, ng_ids, ng_probs, floor.astype(np.float32))
    n_pseudo = rng.uniform(0.5, 30.0, n).astype(np.float32)
    return logits, prior, base, n_pseudo


def dense_prior(prior, base, kappa):
    """a_t as a dense float64 array."""
    n = prior.floor_N.shape[0]
    a = kappa * np.asarray(prior.floor_N, np.float64)[:, None] * np.asarray(base, np.float64)[None]
    rows = np.arange(n)[:, None]
    np.add.at(a, (np.broadcast_to(rows, prior.ids_NxS.shape), prior.ids_NxS), prior.counts_NxS)
    np.add.at(
        a,
        (np.broadcast_to(rows, prior.ngram_ids_NxS2.shape), prior.ngram_ids_NxS2),
        kappa * prior.ngram_probs_NxS2.astype(np.float64),
    )
    return a


def dense_posterior(logits, prior, base, n_pseudo, kappa, mode="expected", beta=1.0):
    lg = logits.astype(np.float64)
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    a = dense_prior(prior, base, kappa)
    if mode == "expected":
        post = a + n_pseudo[:, None].astype(np.float64) * p
        return post / post.sum(1, keepdims=True)
    with np.errstate(divide="ignore"):
        s = np.log(p) + beta * np.log(a / a.sum(1, keepdims=True))
    s = np.exp(s - s.max(1, keepdims=True))
    return s / s.sum(1, keepdims=True)


def dense_with_head(q, head_ids, head_lp):
    """The head fixed to the teacher's probabilities, the rest renormalised to the remaining mass."""
    out = q.copy()
    for i in range(q.shape[0]):
        valid = np.isfinite(head_lp[i])
        hid = head_ids[i][valid]
        m = np.exp(head_lp[i][valid]).sum()
        rest = np.ones(q.shape[1], bool)
        rest[hid] = False
        out[i, rest] = q[i, rest] / q[i, rest].sum() * (1 - m)
        out[i, hid] = np.exp(head_lp[i][valid])
    return out


def check_topk(q_ref, ids, logprobs, tail, k=K, atol=2e-6, rank_bonus=None):
    """Compares with the reference's top-k (ranked by q_ref + rank_bonus: head entries come first)."""
    ids, logprobs, tail = np.asarray(ids), np.asarray(logprobs, np.float64), np.asarray(tail)
    rank = q_ref if rank_bonus is None else q_ref + rank_bonus
    ref_ids = np.argsort(-rank, axis=1)[:, :k]
    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(ref_ids, 1))
    np.testing.assert_allclose(np.exp(logprobs), np.take_along_axis(q_ref, ids, 1), rtol=2e-5, atol=atol)
    np.testing.assert_allclose(np.exp(logprobs).sum(1) + tail, 1.0, atol=1e-5)
    np.testing.assert_allclose(tail, 1 - np.take_along_axis(q_ref, ref_ids, 1).sum(1), atol=1e-5)


@pytest.mark.parametrize("mode", ["expected", "geometric"])
def test_topk_matches_dense_reference(mode):
    logits, prior, base, n_pseudo = random_case(1)
    kappa = 3.0
    fn = jax.jit(lambda *a: posterior_topk(*a, k=K, mode=mode, beta=0.7))
    out = fn(logits, prior, base, n_pseudo, kappa)
    check_topk(dense_posterior(logits, prior, base, n_pseudo, kappa, mode, beta=0.7), *out)


@pytest.mark.parametrize("mode", ["expected", "geometric"])
def test_topk_matches_dense_reference_on_the_blocked_path(mode):
    # V = 4001 is not a multiple of the 32-id blocks and has 126 of them > 2k: the blocked top-k runs.
    logits, prior, base, n_pseudo = random_case(7, n=8, v=4001)
    fn = jax.jit(lambda *a: posterior_topk(*a, k=24, mode=mode, beta=0.7))
    check_topk(
        dense_posterior(logits, prior, base, n_pseudo, 2.0, mode, beta=0.7),
        *fn(logits, prior, base, n_pseudo, 2.0),
        k=24,
    )


@pytest.mark.parametrize("v,head", [(4001, False), (256, True)])
def test_pallas_kernel_matches_dense_reference(v, head):
    """kernel='pallas' (the one-pass GPU kernel, here in Pallas' interpreter) against the float64
    posterior, with and without an exact teacher head; the one device and the sharded call agree."""
    logits, prior, base, n_pseudo = random_case(11, n=8, v=v)
    kappa, k = 2.0, 24
    q = dense_posterior(logits, prior, base, n_pseudo, kappa)
    extra, bonus = {}, None
    if head:
        rng = np.random.default_rng(12)
        head_ids = np.stack([rng.choice(v, 5, replace=False) for _ in range(8)]).astype(np.int32)
        head_lp = np.log(rng.dirichlet(np.ones(6), 8)[:, :5]).astype(np.float32)
        head_lp[0, 3:] = -np.inf  # absent entries
        extra = {"head_ids_NxH": head_ids, "head_logprobs_NxH": head_lp}
        q = dense_with_head(q, head_ids, head_lp)
        bonus = np.zeros_like(q)
        np.put_along_axis(bonus, head_ids, np.where(np.isfinite(head_lp), 10.0, 0.0), 1)
    fn = jax.jit(lambda *a, **kw: posterior_topk(*a, k=k, kernel="pallas", **kw))
    out = fn(logits, prior, base, n_pseudo, kappa, **extra)
    check_topk(q, *out, k=k, rank_bonus=bonus)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded = make_sharded_posterior(mesh, axes=("data",), k=k, kernel="pallas")(
        logits, prior, base, n_pseudo, kappa, **extra
    )
    for a, b in zip(out, sharded, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="kernel='triton' is not one of"):
        posterior_topk(logits, prior, base, n_pseudo, kappa, k=k, kernel="triton")


def test_posterior_top_k_block_zero_takes_the_dense_path_with_the_same_result():
    logits, prior, base, n_pseudo = random_case(4)
    blocked = posterior_topk(logits, prior, base, n_pseudo, 2.0, k=K, top_k_block=4)
    dense = posterior_topk(logits, prior, base, n_pseudo, 2.0, k=K, top_k_block=0)
    for a, b in zip(blocked, dense, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_blocked_top_k_equals_lax_top_k_with_ties():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(16, 1000)).astype(np.float32))
    base = jnp.asarray(rng.integers(0, 3, 1000).astype(np.float32))  # many exact ties
    score = lambda lg, b: jnp.floor(lg) + b  # noqa: E731
    want = jax.lax.top_k(score(logits, base[None]), 20)
    got = jax.jit(lambda lg, b: blocked_top_k(score, lg, b, 20, block=10))(logits, base)
    np.testing.assert_array_equal(got[0], want[0])  # the values exactly; tied ids may differ
    full = np.asarray(score(logits, base[None]))
    np.testing.assert_array_equal(np.take_along_axis(full, np.asarray(got[1]), 1), want[0])
    assert all(len(set(row)) == 20 for row in np.asarray(got[1]).tolist())


def test_teacher_head_fixed_and_tail_from_posterior():
    logits, prior, base, n_pseudo = random_case(2)
    rng = np.random.default_rng(3)
    h = 5
    head_ids = np.stack([rng.choice(V, h, replace=False) for _ in range(N)]).astype(np.int32)
    head_lp = np.log(rng.dirichlet(np.ones(h + 3), N)[:, :h]).astype(np.float32)
    head_lp[::3] = -np.inf  # positions without teacher log-probs
    head_lp[1::3, 3:] = -np.inf  # positions with a shorter head
    out = posterior_topk(logits, prior, base, n_pseudo, 2.0, k=K, head_ids_NxH=head_ids, head_logprobs_NxH=head_lp)
    q = dense_posterior(logits, prior, base, n_pseudo, 2.0)
    bonus = np.zeros_like(q)
    for i in range(N):
        bonus[i, head_ids[i][np.isfinite(head_lp[i])]] = 4.0
    check_topk(dense_with_head(q, head_ids, head_lp), *out, rank_bonus=bonus)
    # Every valid head entry is in the output with the teacher's own probability.
    ids, lp = np.asarray(out[0]), np.asarray(out[1])
    for i in range(N):
        for hid, hl in zip(head_ids[i], head_lp[i]):
            if np.isfinite(hl):
                assert np.isclose(lp[i][ids[i] == hid][0], hl, atol=1e-5)


def test_teacher_head_summing_past_one_is_the_whole_distribution():
    """Rounded API log-probs may sum past 1 (the parser allows each up to +1e-4): the head is then
    renormalised and is all of the posterior, with finite values and nothing left for the rest (before,
    the head was kept unnormalised, and the rest's -inf * 0 made NaN keys, which a GPU ranks first)."""
    logits, prior, base, n_pseudo = random_case(5)
    rng = np.random.default_rng(6)
    h = 6
    head_ids = np.stack([rng.choice(V, h, replace=False) for _ in range(N)]).astype(np.int32)
    head_p = rng.dirichlet(np.ones(h), N)
    head_lp = (np.log(head_p) + 5e-5).astype(np.float32)  # sums to ~1.0003
    ids, lp, tail = posterior_topk(
        logits, prior, base, n_pseudo, 2.0, k=K, head_ids_NxH=head_ids, head_logprobs_NxH=head_lp
    )
    ids, lp, tail = np.asarray(ids), np.asarray(lp, np.float64), np.asarray(tail, np.float64)
    assert not np.isnan(lp).any() and not np.isnan(tail).any()
    np.testing.assert_allclose(np.exp(lp).sum(1) + tail, 1.0, atol=2e-6)
    want = np.exp(head_lp.astype(np.float64))
    want /= want.sum(1, keepdims=True)
    for i in range(N):
        for hid, p_i in zip(head_ids[i], want[i]):
            assert np.isclose(np.exp(lp[i][ids[i] == hid][0]), p_i, rtol=1e-5)


def test_endpoints_prior_and_proxy():
    logits, prior, base, n_pseudo = random_case(4)
    zero = np.zeros_like(n_pseudo)
    out = posterior_topk(logits, prior, base, zero, 1.5, k=K)
    a = dense_prior(prior, base, 1.5)
    check_topk(a / a.sum(1, keepdims=True), *out)
    _, prior0, _, _ = random_case(4, exact=False)
    ids, lp, tail = posterior_topk(logits, prior0, base, n_pseudo, 0.0, k=K)
    p = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    check_topk(p / p.sum(1, keepdims=True), ids, lp, tail)


def test_sampled_mean_matches_expected():
    v, n, reps, m = 32, 4, 300, 16
    logits, prior, base, n_pseudo = random_case(5, n=n, v=v)
    prior = SparsePrior(prior.ids_NxS % v, *prior[1:2], prior.ngram_ids_NxS2 % v, *prior[3:])
    fn = jax.jit(
        jax.vmap(
            lambda key: posterior_topk(logits, prior, base, n_pseudo, 2.0, k=v, mode="sampled", num_samples=m, rng=key)
        )
    )
    ids, lp, tail = fn(jax.random.split(jax.random.key(0), reps))
    dense = np.zeros((reps, n, v))
    np.put_along_axis(dense, np.asarray(ids), np.exp(np.asarray(lp, np.float64)), axis=2)
    np.testing.assert_allclose(dense.sum(2), 1.0, atol=1e-5)
    ref = dense_posterior(logits, prior, base, n_pseudo, 2.0)
    # Analytic standard error: (N / total) * multinomial frequency of M draws, averaged over reps.
    p = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    total = dense_prior(prior, base, 2.0).sum(1) + n_pseudo
    se = (n_pseudo / total)[:, None] * np.sqrt(p * (1 - p) / m / reps)
    z = np.abs(dense.mean(0) - ref) / np.maximum(se, 1e-9)
    assert np.max(z) < 5.0, np.max(z)
    assert np.mean(z) < 1.2, np.mean(z)


@pytest.mark.parametrize("mode", ["expected", "geometric"])  # geometric runs in blocks; expected whole
def test_chunked_and_sharded_equal_single_device(mode):
    logits, prior, base, n_pseudo = random_case(6, n=64)
    kw = dict(k=K, mode=mode)
    ref = jax.jit(lambda *a: posterior_topk(*a, **kw))(logits, prior, base, n_pseudo, 2.0)
    chunked = jax.jit(lambda *a: posterior_topk(*a, chunk=24, **kw))(logits, prior, base, n_pseudo, 2.0)
    outs = [chunked]
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(axis_type,) * 2)
        outs.append(make_sharded_posterior(mesh, chunk=4, **kw)(logits, prior, base, n_pseudo, 2.0))
        assert len(outs[-1][0].sharding.device_set) == 8
    for got in outs:
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(ref[1]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got[2]), np.asarray(ref[2]), atol=1e-6)


def test_bf16_logits_and_bad_input():
    logits, prior, base, n_pseudo = random_case(7)
    out = posterior_topk(jnp.asarray(logits, jnp.bfloat16), prior, base, n_pseudo, 1.0, k=K)
    lg = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    check_topk(dense_posterior(lg, prior, base, n_pseudo, 1.0), *out)
    with pytest.raises(ValueError, match="mode"):
        posterior_topk(logits, prior, base, n_pseudo, 1.0, k=K, mode="dense")
    with pytest.raises(ValueError, match="rng"):
        posterior_topk(logits, prior, base, n_pseudo, 1.0, k=K, mode="sampled")
    with pytest.raises(ValueError, match="k="):
        posterior_topk(logits, prior, base, n_pseudo, 1.0, k=V + 1)


def test_expected_mode_runs_whole_and_keeps_no_vocab_sized_buffer():
    """`expected` ignores `chunk` (blocks only cost it: `lax.map` copies the logits it is given)."""
    logits, prior, base, n_pseudo = random_case(7, n=512, v=4096)
    args = (logits, prior, base, n_pseudo, 2.0)
    temps = []
    for chunk in (0, 64):
        fn = jax.jit(lambda *a, c=chunk: posterior_topk(*a, k=K, mode="expected", chunk=c))
        temps.append(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    assert temps[0] == temps[1] < logits.nbytes / 4, (temps, logits.nbytes)


@pytest.mark.parametrize("mode", ["expected", "geometric"])
def test_teacher_head_over_a_posterior_almost_all_on_the_head(mode):
    """A sure proxy (one head token 40 nats above the rest) at N_t = 1e9 (how N_max = inf is run): q̂ off the
    head is ~1e-9, below float32's resolution of 1 - q̂(head). The rest still gets the teacher's remaining
    mass in q̂'s proportions (before, 1 - q̂(head) rounded to zero: the rest was scaled by 1e29 and pushed the
    head out of the store, probabilities ~1e17)."""
    logits, prior, base, _ = random_case(8)
    rng = np.random.default_rng(9)
    h = 5
    head_ids = np.stack([rng.choice(V, h, replace=False) for _ in range(N)]).astype(np.int32)
    head_lp = np.log(rng.dirichlet(np.ones(h + 2), N)[:, :h]).astype(np.float32)
    head_lp[1::3, 3:] = -np.inf
    logits[np.arange(N), head_ids[:, 0]] += 40.0
    n_pseudo = np.full(N, 1e9, np.float32)
    kappa = 0.05 if mode == "expected" else 0.5
    out = jax.jit(lambda *a, **kw: posterior_topk(*a, k=K, mode=mode, beta=0.7, **kw))(
        logits, prior, base, n_pseudo, kappa, head_ids_NxH=head_ids, head_logprobs_NxH=head_lp
    )
    q = dense_posterior(logits, prior, base, n_pseudo, kappa, mode, beta=0.7)
    bonus = np.zeros_like(q)
    for i in range(N):
        bonus[i, head_ids[i][np.isfinite(head_lp[i])]] = 4.0
    check_topk(dense_with_head(q, head_ids, head_lp), *out, rank_bonus=bonus)
