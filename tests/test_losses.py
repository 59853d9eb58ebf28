"""Losses: divergences against float64 numpy and hand-computed values, sparse tail modes, the sampled
estimator's unbiasedness, chunked = dense in value and gradient, sequence log-probs and DPO."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd_jax import losses as L

RTOL, ATOL = 1e-5, 1e-5


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_divergence(kind, logp, logq, beta=0.5, skew=0.1):
    """Float64 reference, written from the definitions (0 log 0 = 0)."""
    p, q = np.exp(logp), np.exp(logq)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0).sum(-1)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_kl":
        return kl(p, skew * p + (1 - skew) * q)
    return 0.5 * np.abs(p - q).sum(-1)


def _random_pair(seed, m, v, zeros=True):
    rng = np.random.default_rng(seed)
    logp = _np_log_softmax(rng.normal(size=(m, v)) * 2.0)
    if zeros:  # a few target zeros (forward/skew/jsd/tvd must handle them; reverse_kl is +inf there)
        logp[:, : v // 4] = -np.inf
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    logq = _np_log_softmax(rng.normal(size=(m, v)) * 1.5)
    return logp, logq


@pytest.mark.parametrize("kind", L.KINDS)
def test_divergence_matches_float64_reference(kind):
    logp, logq = _random_pair(0, 6, 37, zeros=kind != "reverse_kl")
    kw = dict(jsd_beta=0.3, skew_alpha=0.2)
    got = L.divergence(kind, jnp.asarray(logp, jnp.float32), jnp.asarray(logq, jnp.float32), **kw)
    want = _np_divergence(kind, logp, logq, beta=0.3, skew=0.2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)
    grad = jax.grad(lambda lq: L.divergence(kind, jnp.asarray(logp, jnp.float32), lq, **kw).sum())(
        jnp.asarray(logq, jnp.float32)
    )
    assert np.all(np.isfinite(np.asarray(grad)))


def test_divergence_hand_computed_v3():
    # p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4)
    # forward KL = 1/2 ln 2 + 1/4 ln(1/2) + 0 = 1/4 ln 2 = 0.1732868
    # reverse KL = 1/4 ln(1/2) + 1/2 ln 2 + 0 = 1/4 ln 2
    # TVD = 1/2 (1/4 + 1/4 + 0) = 0.25
    # skew a=0.2: m = 0.2 p + 0.8 q = (0.3, 0.45, 0.25);
    #   KL(p||m) = 0.5 ln(0.5/0.3) + 0.25 ln(0.25/0.45) = 0.2554128 - 0.1469467 = 0.1084661
    # jsd beta=0.25: m = 0.25 p + 0.75 q = (0.3125, 0.4375, 0.25);
    #   0.25 KL(p||m) = 0.25 (0.5 ln 1.6 + 0.25 ln(0.25/0.4375)) = 0.25 * 0.0950981 = 0.0237745
    #   0.75 KL(q||m) = 0.75 (0.25 ln 0.8 + 0.5 ln(0.5/0.4375)) = 0.75 * 0.0109798 = 0.0082349
    #   jsd = 0.0320094
    logp = jnp.log(jnp.array([0.5, 0.25, 0.25]))
    logq = jnp.log(jnp.array([0.25, 0.5, 0.25]))
    want = dict(
        forward_kl=0.25 * math.log(2), reverse_kl=0.25 * math.log(2), tvd=0.25, skew_kl=0.1084661, jsd=0.0320094
    )
    for kind, value in want.items():
        got = L.divergence(kind, logp, logq, jsd_beta=0.25, skew_alpha=0.2)
        np.testing.assert_allclose(float(got), value, rtol=0, atol=2e-7, err_msg=kind)


def test_sparse_tail_and_renorm_hand_computed_v3():
    # student q = (1/4, 1/2, 1/4).
    # tail: target top-1 = id 0 with p 1/2, tail 1/2 -> buckets p = (1/2, 1/2), q = (1/4, 3/4)
    #   forward KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.1438410
    # renorm: target top-2 = ids (0, 1) with p (1/2, 1/4) -> (2/3, 1/3); student (1/4, 1/2) -> (1/3, 2/3)
    #   forward KL = 2/3 ln 2 + 1/3 ln(1/2) = 1/3 ln 2 = 0.2310491
    logq = jnp.log(jnp.array([[0.25, 0.5, 0.25]]))
    tail = L.sparse_divergence(
        "forward_kl",
        jnp.array([[0, 2]]),
        jnp.array([[math.log(0.5), -jnp.inf]]),
        jnp.array([0.5]),
        logq,
        tail_mode="tail",
    )
    renorm = L.sparse_divergence(
        "forward_kl",
        jnp.array([[0, 1]]),
        jnp.log(jnp.array([[0.5, 0.25]])),
        jnp.array([0.25]),
        logq,
        tail_mode="renorm",
    )
    np.testing.assert_allclose(float(tail[0]), 0.5 * math.log(4 / 3), atol=2e-7)
    np.testing.assert_allclose(float(renorm[0]), math.log(2) / 3, atol=2e-7)


@pytest.mark.parametrize("kind", L.KINDS)
def test_divergence_properties(kind):
    logp, logq = _random_pair(1, 64, 50, zeros=False)
    logp, logq = jnp.asarray(logp, jnp.float32), jnp.asarray(logq, jnp.float32)
    d = np.asarray(L.divergence(kind, logp, logq, jsd_beta=0.3))
    same = np.asarray(L.divergence(kind, logq, logq, jsd_beta=0.3))
    assert np.all(d > 0) and np.all(np.abs(same) < 1e-6)
    if kind == "jsd":
        assert np.all(d <= L.binary_entropy(0.3) + 1e-6) and L.binary_entropy(0.3) < math.log(2)
        disjoint = L.divergence("jsd", jnp.log(jnp.array([1.0, 0.0])), jnp.log(jnp.array([0.0, 1.0])))
        np.testing.assert_allclose(float(disjoint), math.log(2), rtol=1e-6)  # the bound is attained
    if kind == "tvd":
        assert np.all(d <= 1.0)


def _sparse_target(seed, m, v, k):
    rng = np.random.default_rng(seed)
    logp = _np_log_softmax(rng.normal(size=(m, v)) * 2.0)
    ids = np.argsort(-logp, axis=-1)[:, :k]
    lps = np.take_along_axis(logp, ids, -1)
    tail = np.clip(1.0 - np.exp(lps).sum(-1), 0.0, None) if k < v else np.zeros(m)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(lps, jnp.float32), jnp.asarray(tail, jnp.float32), logp


@pytest.mark.parametrize("kind", L.KINDS)
def test_sparse_tail_full_support_equals_dense(kind):
    ids, lps, tail, logp = _sparse_target(2, 5, 24, 24)
    ids, lps = ids[:, ::-1], lps[:, ::-1]  # order must not matter
    logq = jnp.asarray(_random_pair(3, 5, 24, zeros=False)[1], jnp.float32)
    got = L.sparse_divergence(kind, ids, lps, tail, logq, tail_mode="tail", jsd_beta=0.4)
    want = _np_divergence(kind, logp, np.asarray(logq, np.float64), beta=0.4)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", L.KINDS)
def test_sparse_tail_equals_dense_against_completed_target(kind):
    ids, lps, tail, _ = _sparse_target(4, 5, 30, 6)
    lps = lps.at[:, -1].set(-jnp.inf)  # an absent entry: its student mass joins the tail
    tail = 1.0 - jnp.sum(jnp.exp(lps), -1)
    logq = jnp.asarray(_random_pair(5, 5, 30, zeros=False)[1], jnp.float32)
    got = L.sparse_divergence(kind, ids, lps, tail, logq, tail_mode="tail")
    completed = np.asarray(L.complete_sparse_target(ids, lps, tail, logq), np.float64)
    np.testing.assert_allclose(np.exp(completed).sum(-1), 1.0, rtol=1e-5)
    want = _np_divergence(kind, completed, np.asarray(logq, np.float64))
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", L.KINDS)
def test_sampled_is_unbiased(kind):
    """4000 independent draws per token: the mean estimate is the dense value within 4.5 s.e."""
    draws, m, v = 4000, 3, 16
    ids, lps, tail, _ = _sparse_target(6, m, v, 4)
    logq = jnp.asarray(_random_pair(7, m, v, zeros=False)[1], jnp.float32)
    uniforms = jax.random.uniform(jax.random.key(8), (draws * m, 1))
    rep = lambda x: jnp.tile(x, (draws,) + (1,) * (x.ndim - 1))  # noqa: E731
    logp = jnp.asarray(_random_pair(9, m, v, zeros=False)[0], jnp.float32)

    @jax.jit
    def estimates_and_values():
        sparse_est = L.sparse_divergence(
            kind, rep(ids), rep(lps), rep(tail), rep(logq), tail_mode="sampled", sample_uniforms_MxS=uniforms
        )
        sparse_val = L.sparse_divergence(kind, ids, lps, tail, logq, tail_mode="tail")
        # dense (white-box) targets: the same estimator on the full target distribution
        dense_est = L.sampled_divergence(kind, rep(logp), rep(logq), uniforms)
        return sparse_est, sparse_val, dense_est, L.divergence(kind, logp, logq)

    sparse_est, sparse_val, dense_est, dense_val = estimates_and_values()
    for est, value in ((sparse_est, sparse_val), (dense_est, dense_val)):
        est = np.asarray(est, np.float64).reshape(draws, m)
        stderr = est.std(0, ddof=1) / math.sqrt(draws)
        assert np.all(stderr > 0)
        assert np.all(np.abs(est.mean(0) - np.asarray(value)) < 4.5 * stderr + 1e-6), (est.mean(0), value, stderr)


def _kd_inputs(n=13, d=16, v=40, k=6, seed=0):
    keys = jax.random.split(jax.random.key(seed), 8)
    hidden = jax.random.normal(keys[0], (n, d))
    w = jax.random.normal(keys[1], (d, v)) / math.sqrt(d)
    targets = jax.random.randint(keys[2], (n,), 0, v)
    logp = jax.nn.log_softmax(2.0 * jax.random.normal(keys[3], (n, v)))
    lps, ids = jax.lax.top_k(logp, k)
    lps = lps.at[0, -2:].set(-jnp.inf)  # absent entries
    tail = 1.0 - jnp.sum(jnp.exp(lps), -1)
    mask = (jax.random.uniform(keys[4], (n,)) < 0.8).astype(jnp.float32).at[0].set(1.0)
    # row 3 is a prompt position: no target at all, masked out; it must not poison values or grads
    lps, tail, mask = lps.at[3].set(-jnp.inf), tail.at[3].set(0.0), mask.at[3].set(0.0)
    weight = jax.random.uniform(keys[5], (n,), minval=0.2, maxval=2.0)
    return hidden, w, targets, ids, lps, tail, mask, weight


# Chunking is independent of the divergence (each kind is checked per token above): a few cases
# cover every tail mode, both temperature paths and padding (N = 13, chunk 4).
CASES = [("forward_kl", "tail", 1.0), ("reverse_kl", "tail", 2.0), ("jsd", "renorm", 0.7), ("tvd", "sampled", 1.0)]


@pytest.mark.parametrize("kind,tail_mode,temperature", CASES)
def test_sparse_kd_chunked_equals_dense(kind, tail_mode, temperature):
    hidden, w, targets, ids, lps, tail, mask, weight = _kd_inputs()
    kw = dict(divergence=kind, tail_mode=tail_mode, temperature=temperature, num_samples=3, rng=jax.random.key(1))

    def run(fn):
        def loss(h, W):
            ce, kd, n = fn(h, W, targets, ids, lps, tail, mask, weight, **kw)
            return L.kd_objective(ce, kd, n, alpha=3.0), (ce, kd, n)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hidden, w)

    (val, aux), grads = run(functools.partial(L.sparse_kd_loss, chunk_size=4))  # 13 = 3*4 + 1
    (val_d, aux_d), grads_d = run(L.sparse_kd_loss_dense)
    np.testing.assert_allclose(np.asarray(aux), np.asarray(aux_d), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(val), float(val_d), rtol=RTOL, atol=ATOL)
    assert float(aux[2]) == float(mask.sum()) and float(aux[1]) > 0
    for g, g_d in zip(grads, grads_d):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_d), rtol=RTOL, atol=ATOL)
    # the fused objective (gradient computed in the forward pass): same value, metrics and gradients
    fused = functools.partial(L.sparse_kd_objective, alpha=3.0, chunk_size=4)

    def fused_loss(h, W):
        loss_sum, ce, kd, n = fused(h, W, targets, ids, lps, tail, mask, weight, **kw)
        return loss_sum / jnp.maximum(n, 1.0), (ce, kd, n)

    (val_f, aux_f), grads_f = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1), has_aux=True))(hidden, w)
    np.testing.assert_allclose(float(val_f), float(val_d), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(aux_f), np.asarray(aux_d), rtol=RTOL, atol=ATOL)
    for g, g_d in zip(grads_f, grads_d):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_d), rtol=RTOL, atol=ATOL)


def test_fused_forward_kl_tail_matches_float64_autodiff():
    """The paper's setting (forward_kl, tail bucket, temperature 1) runs a tile gradient written out
    by hand, and CE alone another; both against float64 autodiff of the definitions, on rows the
    formula has to get right: confident students whose mass outside the K ids is 1e-21..3e-8,
    targets without a tail, absent entries, fractional masks and weights, a padded last tile."""
    n, d, v, k, alpha = 22, 16, 64, 8, 7.0
    rng = np.random.default_rng(11)
    hidden = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) / math.sqrt(d)).astype(np.float32)
    hidden[:6] *= rng.uniform(20.0, 40.0, size=(6, 1)).astype(np.float32)  # peaked students
    logits = hidden.astype(np.float64) @ w.astype(np.float64)
    ids = np.argsort(-logits, axis=1)[:, :k].astype(np.int32)  # the student's own top ids: tiny tails
    ids[6:] = np.stack([rng.permutation(v)[:k] for _ in range(n - 6)])  # the rest: random ids
    p = rng.dirichlet(np.ones(k + 1), size=n)
    p[[1, 7], -1] = 0.0  # no tail
    p = p / p.sum(1, keepdims=True)
    lps = np.log(p[:, :k]).astype(np.float32)
    lps[[2, 9], -3:] = -np.inf  # absent entries (their mass moves to the tail)
    tail = (1.0 - np.exp(lps.astype(np.float64)).sum(1)).clip(0.0).astype(np.float32)
    tail[[1, 7]] = 0.0
    targets = rng.integers(0, v, size=n).astype(np.int32)
    mask = (rng.uniform(size=n) < 0.85).astype(np.float32) * rng.choice([1.0, 0.5], size=n).astype(np.float32)
    mask[:3] = 1.0
    weight = rng.uniform(0.2, 2.0, size=n).astype(np.float32)
    q = np.exp(_np_log_softmax(logits))
    q_tail = np.array([np.delete(q[r], ids[r]).sum() for r in range(6)])
    assert q_tail.max() < 1e-7 and q_tail.min() < 1e-15, q_tail  # the hard rows are there

    def fused(h, W):
        loss_sum, ce, kd, n_tok = L.sparse_kd_objective(
            h, W, targets, ids, lps, tail, mask, weight, alpha=alpha, chunk_size=8
        )
        ce_sum, _ = L.cross_entropy_chunked(h, W, targets, mask, chunk_size=8)
        return loss_sum, (ce, kd, ce_sum)

    (val, (ce, kd, ce_only)), grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(hidden, w)
    (_, ce_grads) = jax.jit(
        jax.value_and_grad(lambda h, W: L.cross_entropy_chunked(h, W, targets, mask, chunk_size=8)[0], argnums=(0, 1))
    )(hidden, w)

    with jax.enable_x64(True):

        def reference(h, W, alpha):
            logq = jax.nn.log_softmax(h @ W)
            nll = -jnp.take_along_axis(logq, jnp.asarray(targets)[:, None], 1)[:, 0]
            kd_n = L.sparse_divergence(
                "forward_kl", jnp.asarray(ids), jnp.asarray(lps, jnp.float64), jnp.asarray(tail, jnp.float64), logq
            )
            m, wt = jnp.asarray(mask, jnp.float64), jnp.asarray(weight, jnp.float64)
            return jnp.sum(m * nll) + alpha * jnp.sum(m * wt * kd_n), (jnp.sum(m * nll), jnp.sum(m * wt * kd_n))

        h64, w64 = jnp.asarray(hidden, jnp.float64), jnp.asarray(w, jnp.float64)
        (val_r, (ce_r, kd_r)), grads_r = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(h64, w64, alpha)
        _, ce_grads_r = jax.value_and_grad(lambda h, W: reference(h, W, 0.0)[0], argnums=(0, 1))(h64, w64)
        val_r, ce_r, kd_r = float(val_r), float(ce_r), float(kd_r)
        grads_r = [np.asarray(g) for g in grads_r]
        ce_grads_r = [np.asarray(g) for g in ce_grads_r]

    np.testing.assert_allclose([float(val), float(ce), float(kd), float(ce_only)], [val_r, ce_r, kd_r, ce_r], rtol=2e-5)
    for got, want in [*zip(grads, grads_r), *zip(ce_grads, ce_grads_r)]:
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * scale)


def test_sparse_kd_sums_match_per_token_reference():
    hidden, w, targets, ids, lps, tail, mask, weight = _kd_inputs()
    loss = jax.jit(functools.partial(L.sparse_kd_loss, chunk_size=5))
    ce, kd, n = loss(hidden, w, targets, ids, lps, tail, mask, weight)
    logq = np.asarray(jax.nn.log_softmax(hidden @ w), np.float64)
    nll = -logq[np.arange(13), np.asarray(targets)]
    completed = np.asarray(L.complete_sparse_target(ids, lps, tail, jnp.asarray(logq, jnp.float32)))
    d = _np_divergence("forward_kl", completed.astype(np.float64), logq)
    m, wt = np.asarray(mask, np.float64), np.asarray(weight, np.float64)
    np.testing.assert_allclose(float(ce), (m * nll).sum(), rtol=RTOL)
    np.testing.assert_allclose(float(kd), (m * wt * d).sum(), rtol=RTOL)
    np.testing.assert_allclose(float(n), m.sum())


def test_all_absent_target_rows_are_nan_free():
    """A row with no target (all -inf, tail 0) gives finite-or-inf values and finite gradients in
    every kind and tail mode, so masking it afterwards is safe."""
    ids = jnp.array([[1, 4, 2], [0, 3, 3]])
    lps = jnp.array([[-jnp.inf] * 3, [math.log(0.6), math.log(0.3), -jnp.inf]])
    tail = jnp.array([0.0, 0.1])
    logits = jax.random.normal(jax.random.key(0), (2, 6))

    @jax.jit
    def all_grads(z):
        out = []
        for kind in L.KINDS:
            for mode in L.TAIL_MODES:
                f = lambda z, kind=kind, mode=mode: jnp.sum(
                    jnp.where(
                        jnp.array([False, True]),
                        L.sparse_divergence(
                            kind,
                            ids,
                            lps,
                            tail,
                            jax.nn.log_softmax(z),
                            tail_mode=mode,
                            sample_uniforms_MxS=jnp.full((2, 2), 0.5),
                        ),
                        0.0,
                    )
                )
                out.append(jax.value_and_grad(f)(z))
        return out

    for (val, grad), combo in zip(all_grads(logits), [(k, m) for k in L.KINDS for m in L.TAIL_MODES]):
        assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad))), combo


@pytest.mark.parametrize(
    "kind,sampled,temperature", [("jsd", False, 1.5), ("reverse_kl", True, 1.5), ("forward_kl", False, 1.0)]
)
def test_dense_kd_chunked_equals_dense(kind, sampled, temperature):
    hidden, w, targets, _, _, _, mask, weight = _kd_inputs()
    t_hidden = jax.random.normal(jax.random.key(5), (13, 24))
    t_w = jax.random.normal(jax.random.key(6), (24, 40)) / 3.0
    kw = dict(divergence=kind, sampled=sampled, temperature=temperature, num_samples=2, rng=jax.random.key(2))

    def run(fn):
        def loss(h, W):
            return L.kd_objective(*fn(h, W, targets, t_hidden, t_w, mask, weight, **kw), 2.0)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, w)

    val, grads = run(functools.partial(L.dense_kd_loss, chunk_size=6))
    val_d, grads_d = run(L.dense_kd_loss_dense)
    np.testing.assert_allclose(float(val), float(val_d), rtol=RTOL, atol=ATOL)
    for g, g_d in zip(grads, grads_d):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_d), rtol=RTOL, atol=ATOL)

    def fused_loss(h, W):
        loss_sum, _, _, n = L.dense_kd_objective(
            h, W, targets, t_hidden, t_w, mask, weight, alpha=2.0, chunk_size=6, **kw
        )
        return loss_sum / n

    val_f, grads_f = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1)))(hidden, w)
    np.testing.assert_allclose(float(val_f), float(val_d), rtol=RTOL, atol=ATOL)
    for g, g_d in zip(grads_f, grads_d):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_d), rtol=RTOL, atol=ATOL)
    # the student as its own teacher: the KD term vanishes
    self_kd = jax.jit(functools.partial(L.dense_kd_loss, divergence=kind, chunk_size=6))
    _, kd_self, _ = self_kd(hidden, w, targets, hidden, w, mask, weight)
    assert abs(float(kd_self)) < 1e-5


def test_cross_entropy_matches_numpy_and_chunked():
    hidden, w, targets, _, _, _, mask, _ = _kd_inputs()
    logits = np.asarray(hidden @ w, np.float64)
    nll = -_np_log_softmax(logits)[np.arange(13), np.asarray(targets)]
    ce, n = L.cross_entropy(hidden @ w, targets, mask)
    np.testing.assert_allclose(float(ce), (nll * np.asarray(mask)).sum(), rtol=RTOL)
    assert float(n) == float(mask.sum())

    def fn(f):
        return jax.jit(jax.value_and_grad(lambda h, W: f(h, W)[0], argnums=(0, 1)))(hidden, w)

    val_c, g_c = fn(lambda h, W: L.cross_entropy_chunked(h, W, targets, mask, chunk_size=5))
    val_d, g_d = fn(lambda h, W: L.cross_entropy(h @ W, targets, mask))
    np.testing.assert_allclose(float(val_c), float(val_d), rtol=RTOL)
    for a, b in zip(g_c, g_d):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)


def test_fused_cross_entropy_gradients_scale_with_the_cotangent():
    """The fused CE computes its gradient in the forward pass; the backward only scales it by the
    cotangent of ce_sum. Check a cotangent that depends on the inputs, a tile size that does not
    divide N, and that jit without differentiation gives the same value."""
    hidden, w, targets, _, _, _, mask, _ = _kd_inputs()

    def objective(f, h, W, m):
        ce, n = f(h, W, targets, m)
        return 3.7 * ce / n + jnp.sum(ce * h[:2])  # cotangent of ce_sum depends on h: not a constant

    fused = functools.partial(L.cross_entropy_chunked, chunk_size=4)
    grads_f = jax.jit(jax.grad(functools.partial(objective, fused), argnums=(0, 1)))(hidden, w, mask)
    grads_d = jax.jit(
        jax.grad(lambda h, W, m: objective(lambda *a: L.cross_entropy(a[0] @ a[1], *a[2:]), h, W, m), argnums=(0, 1))
    )(hidden, w, mask)
    for a, b in zip(grads_f, grads_d):
        assert float(jnp.abs(b).max()) > 1e-3
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)
    ce_jit, _ = jax.jit(fused)(hidden, w, targets, mask)
    ce_ref, _ = L.cross_entropy(hidden @ w, targets, mask)
    np.testing.assert_allclose(float(ce_jit), float(ce_ref), rtol=RTOL)


def test_fused_cross_entropy_bfloat16_inputs():
    hidden, w, targets, _, _, _, mask, _ = _kd_inputs()
    h16, w16 = hidden.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    fn = jax.jit(
        jax.value_and_grad(lambda h, W: L.cross_entropy_chunked(h, W, targets, mask, chunk_size=5)[0], argnums=(0, 1))
    )
    val, (gh, gw) = fn(h16, w16)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    ref_val, (rh, rw) = jax.value_and_grad(
        lambda h, W: L.cross_entropy(jnp.dot(h, W, preferred_element_type=jnp.float32), targets, mask)[0],
        argnums=(0, 1),
    )(h16.astype(jnp.float32), w16.astype(jnp.float32))
    np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(gh, np.float32), np.asarray(rh), rtol=0.05, atol=0.02)
    np.testing.assert_allclose(np.asarray(gw, np.float32), np.asarray(rw), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("normalize", [False, True])
def test_sequence_logprobs_chunked_equals_dense(normalize):
    keys = jax.random.split(jax.random.key(3), 4)
    hidden = jax.random.normal(keys[0], (3, 7, 16))
    w = jax.random.normal(keys[1], (16, 40)) / 4.0
    targets = jax.random.randint(keys[2], (3, 7), 0, 40)
    mask = (jax.random.uniform(keys[3], (3, 7)) < 0.7).astype(jnp.float32)
    kw = dict(length_normalize=normalize)
    fn = lambda f: jax.jit(
        jax.value_and_grad(  # noqa: E731
            lambda h, W: jnp.sum(f(h, W, targets, mask, **kw) * jnp.array([1.0, -2.0, 0.5])), argnums=(0, 1)
        )
    )
    val, grads = fn(functools.partial(L.sequence_logprobs, chunk_size=4))(hidden, w)  # 21 = 5*4 + 1
    val_d, grads_d = fn(L.sequence_logprobs_dense)(hidden, w)
    np.testing.assert_allclose(float(val), float(val_d), rtol=RTOL, atol=ATOL)
    for a, b in zip(grads, grads_d):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)
    logq = _np_log_softmax(np.asarray(hidden @ w, np.float64))
    per_tok = np.take_along_axis(logq, np.asarray(targets)[..., None], -1)[..., 0] * np.asarray(mask)
    want = per_tok.sum(-1) / (np.maximum(np.asarray(mask).sum(-1), 1) if normalize else 1)
    got = jax.jit(functools.partial(L.sequence_logprobs, chunk_size=4, **kw))(hidden, w, targets, mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


def test_dpo_hand_computed():
    # beta 0.1. Pair 1: r_c = 0.1 (-10 - -11) = 0.1, r_r = 0.1 (-12 - -11) = -0.1, margin 0.2,
    #   loss = log(1 + e^-0.2) = 0.5981389. Pair 2: r_c = 0.1 (-5 - -4) = -0.1, r_r = 0.1 (-6 - -7) = 0.1,
    #   margin -0.2, loss = log(1 + e^0.2) = 0.7981389. Mean loss 0.6981389, accuracy 0.5.
    loss, metrics = L.dpo_loss(
        jnp.array([-10.0, -5.0]), jnp.array([-12.0, -6.0]), jnp.array([-11.0, -4.0]), jnp.array([-11.0, -7.0]), beta=0.1
    )
    np.testing.assert_allclose(float(loss), 0.6981389, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards_chosen"]), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards_rejected"]), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(metrics["margin"]), 0.0, atol=1e-6)
    assert float(metrics["accuracy"]) == 0.5
    # gradient reaches only the policy: d loss / d pol_chosen_1 = -beta * sigmoid(-0.2) / 2
    g = jax.grad(
        lambda pc, rc: L.dpo_loss(pc, jnp.array([-12.0, -6.0]), rc, jnp.array([-11.0, -7.0]), beta=0.1)[0],
        argnums=(0, 1),
    )(jnp.array([-10.0, -5.0]), jnp.array([-11.0, -4.0]))
    np.testing.assert_allclose(float(g[0][0]), -0.1 / (1 + math.exp(0.2)) / 2, rtol=1e-5)
    assert np.all(np.asarray(g[1]) == 0)


def test_config_and_bad_input_errors():
    cfg = L.default_config()
    kw = L.loss_kwargs(cfg)
    assert kw["divergence"] == "forward_kl" and kw["tail_mode"] == "tail"
    hidden, w, targets, ids, lps, tail, mask, weight = _kd_inputs()
    args = (hidden, w, targets, ids, lps, tail, mask, weight)
    with pytest.raises(ValueError, match="loss.divergence"):
        L.sparse_kd_loss(*args, divergence="kl")
    with pytest.raises(ValueError, match="loss.tail_mode"):
        L.sparse_kd_loss(*args, tail_mode="drop")
    with pytest.raises(ValueError, match="rng"):
        L.sparse_kd_loss(*args, tail_mode="sampled")
    with pytest.raises(ValueError, match="loss.jsd_beta"):
        L.divergence("jsd", lps, lps, jsd_beta=1.0)
    with pytest.raises(ValueError, match="mask_N has 12 rows"):
        L.sparse_kd_loss(hidden, w, targets, ids, lps, tail, mask[:12], weight)
    with pytest.raises(ValueError, match=r"^align\.beta is 0\.0; "):
        L.dpo_loss(targets, targets, targets, targets, beta=0.0)


def test_fused_forward_kl_tail_with_the_students_tail_below_float32_range():
    """A student whose logits outside the K ids all lie 90..110 below its max: q_t ~ e^-100 is below
    float32's range relative to the row max, but its log is finite. The fused tile once summed the tail
    relative to the row max, which underflowed to 0: the KD term was inf and the tail's gradient 0."""
    v, k = 12, 3
    gaps = np.array([90.0, 100.0, 110.0])
    logits = np.full((3, v), 0.0)
    logits[:, k:] = -gaps[:, None] - np.linspace(0.0, 2.0, v - k)[None, :]
    logits[:, :k] = np.array([0.0, -1.0, -2.5])
    hidden, w = np.eye(3, dtype=np.float32), logits.astype(np.float32)  # hidden @ w = logits, exactly
    ids = np.tile(np.arange(k, dtype=np.int32), (3, 1))
    p = np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1], [0.7, 0.1, 0.1]])
    lps, tail = np.log(p).astype(np.float32), (1.0 - p.sum(1)).astype(np.float32)
    targets, mask, weight = np.array([0, 5, 1], np.int32), np.ones(3, np.float32), np.array([1.0, 0.5, 2.0], np.float32)

    def fused(W):
        loss_sum, _, kd, _ = L.sparse_kd_objective(hidden, W, targets, ids, lps, tail, mask, weight, alpha=3.0)
        return loss_sum, kd

    (val, kd), grad = jax.jit(jax.value_and_grad(fused, has_aux=True))(w)
    with jax.enable_x64(True):

        def reference(W):
            logq = jax.nn.log_softmax(jnp.asarray(hidden, jnp.float64) @ W)
            nll = -jnp.take_along_axis(logq, jnp.asarray(targets)[:, None], 1)[:, 0]
            logq_tail = jax.nn.logsumexp(logq[:, k:], axis=-1)
            p64, t64 = np.exp(lps.astype(np.float64)), tail.astype(np.float64)
            kd_n = jnp.sum(p64 * (np.log(p64) - logq[:, :k]), -1) + t64 * (np.log(t64) - logq_tail)
            return jnp.sum(nll) + 3.0 * jnp.sum(weight * kd_n), jnp.sum(weight * kd_n)

        (val_r, kd_r), grad_r = jax.value_and_grad(reference, has_aux=True)(jnp.asarray(w, jnp.float64))
        val_r, kd_r, grad_r = float(val_r), float(kd_r), np.asarray(grad_r)
    assert np.isfinite(float(kd)) and kd_r > 30.0
    np.testing.assert_allclose([float(val), float(kd)], [val_r, kd_r], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), grad_r, rtol=1e-4, atol=1e-6)
    assert np.abs(grad_r[:, k:]).max() > 1e-3  # the tail's gradient, lost when the sum underflowed


@pytest.mark.parametrize("tail_mode", ["tail", "sampled"])
def test_reverse_kl_reads_a_stored_zero_tail_as_float32_rounding(tail_mode):
    """A peaked posterior's stored tail 1 - sum topk rounds to 0 in float32. Against 0, reverse KL's tail
    term q_t log(q_t / 0) was +inf for any student and training stopped; it now reads 2^-24 (the rounding
    unit near 1), in the fused objective and the rematerialised loss alike, equal to the float64 dense
    reverse KL against the target completed with that tail."""
    rng = np.random.default_rng(3)
    n, d, v, k = 6, 8, 20, 4
    hidden = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) / 2).astype(np.float32)
    ids = np.stack([rng.permutation(v)[:k] for _ in range(n)]).astype(np.int32)
    p = rng.dirichlet(np.ones(k), n)
    lps, tail = np.log(p).astype(np.float32), np.zeros(n, np.float32)  # every stored tail rounded to 0
    targets, mask, weight = rng.integers(0, v, n).astype(np.int32), np.ones(n, np.float32), np.ones(n, np.float32)
    kw = dict(divergence="reverse_kl", tail_mode=tail_mode)
    if tail_mode == "sampled":
        kw.update(num_samples=8, rng=jax.random.key(0))
    _, _, kd_fused, _ = L.sparse_kd_objective(hidden, w, targets, ids, lps, tail, mask, weight, alpha=1.0, **kw)
    grad = jax.grad(
        lambda W: L.sparse_kd_objective(hidden, W, targets, ids, lps, tail, mask, weight, alpha=1.0, **kw)[0]
    )(w)
    assert np.isfinite(float(kd_fused)) and np.all(np.isfinite(np.asarray(grad)))
    if tail_mode == "sampled":
        return
    _, kd_remat = L.sparse_kd_loss(hidden, w, targets, ids, lps, tail, mask, weight, **kw)[:2]
    with jax.enable_x64(True):
        logq = np.asarray(jax.nn.log_softmax(jnp.asarray(hidden, jnp.float64) @ jnp.asarray(w, jnp.float64)))
    q = np.exp(logq)
    want = 0.0
    for i in range(n):
        outside = np.setdiff1d(np.arange(v), ids[i])
        logp = np.full(v, -np.inf)
        logp[ids[i]] = lps[i].astype(np.float64)
        q_tail = q[i, outside].sum()
        logp[outside] = np.log(2.0**-24) + logq[i, outside] - np.log(q_tail)  # the tail spread like the student
        want += np.sum(q[i] * (logq[i] - logp))
    np.testing.assert_allclose([float(kd_fused), float(kd_remat)], [want, want], rtol=1e-4)
