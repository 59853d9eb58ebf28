"""Empirical Bayes scored after the teacher head: `score` against the dense float64 posterior, projected."""

import numpy as np
import pytest
from test_xtok_posterior import EOS, random_case, random_head, random_vocab

from proxykd_jax.bayes import empirical
from proxykd_jax.data.byte_head import symbols_from_bytes
from proxykd_jax.eval.per_byte import dense_projection


def dense_q(logits, prior, base, w, kappa, n_max):
    """(exact + kappa * ngram + N_max w p) / total, dense float64 (an external prior query)."""
    lg = logits.astype(np.float64)
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n = lg.shape[0]
    a = kappa * np.asarray(prior.floor_N, np.float64)[:, None] * np.asarray(base, np.float64)[None]
    rows = np.arange(n)[:, None]
    np.add.at(a, (np.broadcast_to(rows, prior.ids_NxS.shape), prior.ids_NxS), prior.counts_NxS)
    ng = kappa * prior.ngram_probs_NxS2.astype(np.float64)
    np.add.at(a, (np.broadcast_to(rows, prior.ngram_ids_NxS2.shape), prior.ngram_ids_NxS2), ng)
    post = a + n_max * w[:, None] * p
    return post / post.sum(1, keepdims=True), p


@pytest.mark.parametrize("kind", ["bytes", "exact"])
def test_score_with_head_matches_dense_projection(kind):
    rng = np.random.default_rng(3)
    n, v = 40, 300
    sym = symbols_from_bytes(random_vocab(rng, v), eos_ids=(EOS,), special_ids=(0, 1, 3))
    logits, prior, base, _ = random_case(8, n, v)
    w = rng.uniform(0.2, 1.0, n)
    y = rng.integers(4, v, n)
    if kind == "bytes":
        head_ids, head_lp = random_head(rng, n, 5, sym)
        head_ids[::3, 0] = sym[y[::3]]  # often the target's own group
    else:
        head_ids = np.stack([rng.choice(np.arange(4, v), 5, replace=False) for _ in range(n)]).astype(np.int32)
        head_ids[::3, 0] = y[::3]  # often the target itself
        head_lp = np.log(rng.dirichlet(np.ones(7), n)[:, :5]).astype(np.float32)
        head_lp[::5] = -np.inf
    _, p = dense_q(logits, prior, base, w, 1.0, 1.0)
    stats = empirical.heldout_stats_from_probs(p[np.arange(n), y], y, prior, base, w)
    if kind == "bytes":
        groups = np.zeros((n, 258))
        for i in range(n):
            np.add.at(groups[i], sym, p[i])
        proxy_g = groups[np.arange(n), sym[y]]
    else:
        ok = np.isfinite(head_lp)
        proxy_g = np.sum(np.where(ok, np.take_along_axis(p, head_ids.astype(np.int64), 1), 0.0), 1)
    head = empirical.head_stats(head_ids, head_lp, y, prior, base, proxy_g, sym if kind == "bytes" else None)
    for kappa, n_max in [(0.5, 3.0), (4.0, 0.0), (0.0, 20.0), (2.0, np.inf)]:
        if np.isinf(n_max):
            q = p
        else:
            q, _ = dense_q(logits, prior, base, w, kappa, n_max)
        qp = dense_projection(q, head_ids, head_lp, sym if kind == "bytes" else None)
        want = np.mean(np.log(qp[np.arange(n), y]))
        assert empirical.score(stats, kappa, n_max, head, kind) == pytest.approx(want, abs=1e-9)
    res = empirical.fit_empirical_bayes(stats, head=head, head_kind=kind, refine_steps=4)
    assert res.score_posterior >= max(res.score_prior, res.score_proxy)
