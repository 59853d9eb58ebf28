"""Empirical Bayes on a simulated teacher, held-out scores vs the kernel, and sample weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd_jax.bayes import (
    PriorTables,
    fit_empirical_bayes,
    heldout_stats,
    posterior_topk,
    sample_weights,
    score,
    sequence_loglik,
    weight_stats,
)

V, C, R = 128, 300, 6


def simulate(seed, noise):
    """A teacher per prompt, R one-token responses from it, and a proxy = teacher logits + noise."""
    rng = np.random.default_rng(seed)
    teacher_logits = 2.5 * rng.normal(size=(C, V))
    q = np.exp(teacher_logits - teacher_logits.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    draws = np.array([rng.choice(V, R, p=row) for row in q])  # [C, R]
    proxy = (teacher_logits + noise * rng.normal(size=(C, V))).astype(np.float32)
    keys = np.repeat(np.arange(C, dtype=np.int64), R)
    seqs = list(draws.reshape(-1, 1))
    tables = PriorTables.build(keys, seqs, vocab_size=V, order=2, exact_top_s=R)
    return q, proxy, keys, seqs, tables


def kl(q, r):
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.mean(np.sum(np.where(q > 0, q * (np.log(q) - np.log(r)), 0.0), 1)))


def dense_estimate(tables, keys, proxy, kappa, n_max):
    """The posterior over the whole vocabulary (k = V) at each prompt's first position."""
    pr = tables.query(keys[::R], [np.zeros(1, np.int64)] * C, mode="external")
    ids, lp, _ = jax.jit(lambda *a: posterior_topk(*a, k=V))(
        proxy, pr, tables.base_V, np.full(C, n_max, np.float32), kappa
    )
    out = np.zeros((C, V))
    np.put_along_axis(out, np.asarray(ids), np.exp(np.asarray(lp, np.float64)), 1)
    return out


@pytest.mark.parametrize("noise", [2.5, 1.2])
def test_fitted_posterior_beats_prior_and_proxy(noise):
    q, proxy, keys, seqs, tables = simulate(0, noise)
    loo = tables.query(keys, seqs, mode="leave_one_out")
    stats = heldout_stats(np.repeat(proxy, R, 0), keys * 0 + np.concatenate(seqs), loo, tables.base_V)
    res = fit_empirical_bayes(stats, verbose=True)
    assert res.score_posterior >= max(res.score_prior, res.score_proxy)
    assert 0 < res.n_max < np.inf and res.kappa > 0
    p = np.exp(proxy - proxy.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # The prior at its own best kappa (N = 0) and the posterior, both over the full response counts.
    prior = dense_estimate(tables, keys, proxy, max(res.prior_kappa, 1e-3), 0.0)
    post = dense_estimate(tables, keys, proxy, res.kappa, res.n_max)
    kl_proxy, kl_prior, kl_post = kl(q, p), kl(q, prior), kl(q, post)
    print(
        f"noise {noise}: KL proxy {kl_proxy:.3f} prior {kl_prior:.3f} posterior {kl_post:.3f} "
        f"(posterior/proxy {kl_post / kl_proxy:.2f}, posterior/prior {kl_post / kl_prior:.2f})"
    )
    assert kl_post < kl_proxy and kl_post < kl_prior


def test_endpoints_perfect_and_useless_proxy():
    q, proxy, keys, seqs, tables = simulate(1, 0.0)
    loo = tables.query(keys, seqs, mode="leave_one_out")
    y = np.concatenate(seqs)
    good = fit_empirical_bayes(heldout_stats(np.repeat(proxy, R, 0), y, loo, tables.base_V))
    assert good.n_max > 100 and good.score_posterior - good.score_proxy < 0.01
    useless = np.random.default_rng(2).normal(size=proxy.shape).astype(np.float32) * 3
    bad = fit_empirical_bayes(heldout_stats(np.repeat(useless, R, 0), y, loo, tables.base_V))
    assert bad.n_max < 1.0 and bad.score_posterior - bad.score_prior < 0.05
    assert bad.score_proxy < bad.score_prior


def test_score_matches_kernel_log_prob():
    _, proxy, keys, seqs, tables = simulate(3, 1.0)
    logits = np.repeat(proxy, R, 0)
    y = np.concatenate(seqs)
    loo = tables.query(keys, seqs, mode="leave_one_out")
    w = np.random.default_rng(4).uniform(0.1, 1.0, y.shape[0])
    stats = heldout_stats(logits, y, loo, tables.base_V, weight_N=w)
    kappa, n_max = 0.7, 5.0
    ids, lp, _ = jax.jit(lambda *a: posterior_topk(*a, k=V))(
        logits, loo, tables.base_V, (n_max * w).astype(np.float32), kappa
    )
    logq_y = np.asarray(lp)[np.asarray(ids) == y[:, None]]
    assert logq_y.shape == y.shape
    np.testing.assert_allclose(score(stats, kappa, n_max), logq_y.astype(np.float64).mean(), rtol=1e-5)


def test_sample_weights():
    rng = np.random.default_rng(5)
    lp = -rng.exponential(size=(6, 10)).astype(np.float32)
    mask = rng.random((6, 10)) < 0.7
    mask[:, 0] = True
    ll_mean = np.asarray(sequence_loglik(jnp.asarray(lp), jnp.asarray(mask)))
    ll_sum = np.asarray(sequence_loglik(jnp.asarray(lp), jnp.asarray(mask), normalize="sum"))
    np.testing.assert_allclose(ll_sum, (lp * mask).sum(1), rtol=1e-6)
    np.testing.assert_allclose(ll_mean, (lp * mask).sum(1) / mask.sum(1), rtol=1e-6)
    mu, gamma = weight_stats(ll_mean)
    np.testing.assert_allclose([mu, gamma], [ll_mean.mean(), ll_mean.std()], rtol=1e-6)
    w = np.asarray(sample_weights(ll_mean, mu, gamma))
    np.testing.assert_allclose(w, 1 / (1 + np.exp(-(ll_mean - mu) / gamma)), rtol=1e-5)
    assert np.all(np.diff(w[np.argsort(ll_mean)]) >= 0)
    with pytest.raises(ValueError, match="normalize"):
        sequence_loglik(jnp.asarray(lp), jnp.asarray(mask), normalize="max")
    with pytest.raises(ValueError, match="not finite"):
        weight_stats(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="held-out"):
        fit_empirical_bayes(heldout_stats(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), *_empty_prior()))


def _empty_prior():
    tables = PriorTables.build([0], [np.array([1, 2])], vocab_size=4, order=2)
    return tables.query([], [], mode="external"), tables.base_V


def three_way_stats(scale: float, n: int = 300):
    """Held-out tokens in three equal groups where the exact counts, the n-gram and the proxy each
    predict one group well (0.8) and the others poorly (0.1): the best posterior weighs the three
    alike, so kappa = N_max = the exact total `scale`, far outside the default grids."""
    from proxykd_jax.bayes import HeldoutStats

    good, bad = 0.8, 0.1
    group = np.arange(n) % 3
    exact = np.where(group == 0, good, bad) * scale
    ngram = np.where(group == 1, good, bad)
    proxy = np.where(group == 2, good, bad)
    return HeldoutStats(exact, np.full(n, scale), ngram, np.ones(n), proxy, np.ones(n))


def test_search_expands_past_the_grid_to_an_outside_optimum(capsys):
    from proxykd_jax.bayes.empirical import DEFAULT_KAPPA_GRID, DEFAULT_N_MAX_GRID

    scale = 3e6  # kappa grid ends at 1e3, N_max grid at 1e4
    assert scale > 100 * max(DEFAULT_KAPPA_GRID) and scale > 100 * max(x for x in DEFAULT_N_MAX_GRID if x < np.inf)
    stats = three_way_stats(scale)
    res = fit_empirical_bayes(stats, verbose=True)
    printed = capsys.readouterr().out
    assert "kappa expanded up" in printed and "N_max expanded up" in printed
    assert scale / 3 < res.kappa < 3 * scale and scale / 3 < res.n_max < 3 * scale, res.summary()
    # the analytic optimum, kappa = N_max = scale: q = (0.8 + 0.1 + 0.1) / 3 on every token
    np.testing.assert_allclose(res.score_posterior, np.log(1.0 / 3.0), atol=2e-3)
    grid_best = np.max(res.grid_scores)
    assert res.score_posterior > grid_best + 0.01


def test_search_reports_the_numeric_bound(capsys):
    """The n-gram alone is best (exact counts useless): kappa runs to the bound, which is said."""
    from proxykd_jax.bayes import HeldoutStats

    n = 50
    stats = HeldoutStats(np.zeros(n), np.full(n, 10.0), np.full(n, 0.5), np.ones(n), np.full(n, 1e-3), np.ones(n))
    res = fit_empirical_bayes(stats, n_max_grid=(0.0, 1.0), verbose=True)
    assert "kappa hit the search bound" in capsys.readouterr().out
    assert res.kappa >= 1e14 and any("bound" in line for line in res.search)
    assert res.score_posterior >= res.score_prior - 1e-9


def test_weight_stats_bad_input_is_an_expected_failure():
    """The CLI prints a ProxyKDError as one sentence; a plain ValueError (a NaN proxy) came out as a traceback."""
    from proxykd_jax.errors import ProxyKDError

    with pytest.raises(ProxyKDError, match="1 of 3 teacher responses is not finite.*posterior.proxy"):
        weight_stats(np.array([-1.0, np.nan, -2.0]))
    with pytest.raises(ProxyKDError, match="distillation split is empty"):
        weight_stats(np.zeros(0))
