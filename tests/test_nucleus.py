"""The nucleus (top_p) found among each row's likeliest tokens (`sampling._nucleus_among`) against a float64 numpy
reference that sorts the whole row (equal logits in id order), and `_nucleus`'s fall-back to the sort where the
candidates cannot hold it. Fresh random rows: peaked ones (the fast path), flat ones (the fall-back), rows with ties
at the nucleus's edge and with -inf logits, each row its own top_p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd_jax.models import sampling

V, K = 600, 24  # vocabulary, candidates


def _reference(scaled_BxV: np.ndarray, top_p_B: np.ndarray) -> np.ndarray:
    """Which tokens each row keeps: all where top_p >= 1, else the fewest likeliest (ties in id order) whose mass
    before the last reaches top_p (float64)."""
    keep = np.ones(scaled_BxV.shape, bool)
    for row, (x, p) in enumerate(zip(scaled_BxV.astype(np.float64), top_p_B)):
        if p >= 1.0:
            continue
        order = np.lexsort((np.arange(V), -x))  # logit descending, then id
        probs = np.exp(x[order] - np.max(x))
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        keep[row] = False
        keep[row, order[(before < p) | (np.arange(V) == 0)]] = True
    return keep


def _rows(rng, n: int, std: float) -> np.ndarray:
    x = rng.normal(0.0, std, (n, V))
    x[1] = np.round(x[1] / 2.0) * 2.0  # ties everywhere, among the likeliest too
    x[2, rng.choice(V, V // 3, replace=False)] = -np.inf  # tokens a top_k or a suppression removed
    x[3, :] = np.round(x[3] * 4.0) / 4.0
    top = np.argsort(-x[3])[:6]
    x[3, top] = x[3, top[0]]  # six tokens tied at the top: a nucleus of 0.3 ends among them, in id order
    return x.astype(np.float32)


TOP_P = np.array([0.9, 0.5, 0.95, 0.3, 1.0, 0.7, 0.99, 0.6], np.float32)


def _kept(out) -> np.ndarray:
    return np.isfinite(np.asarray(out))


def test_the_nucleus_among_the_likeliest_is_the_reference_nucleus_where_they_hold_it():
    rng = np.random.default_rng(0)
    for std in (6.0, 8.0):  # the 24 likeliest of 600 hold 99-100% of each row's mass
        x = _rows(rng, len(TOP_P), std)
        top_p = TOP_P
        got, exact = jax.jit(sampling._nucleus_among, static_argnums=2)(jnp.asarray(x), jnp.asarray(top_p), K)
        assert bool(exact), std
        want = _reference(x, top_p) & np.isfinite(x)
        np.testing.assert_array_equal(_kept(got), want, err_msg=str(std))
        np.testing.assert_array_equal(np.asarray(got)[want], x[want])  # kept logits as they were
        assert 1 < want[3].sum() < 6  # the tie at the top is split in id order
        assert want[4].all() == np.isfinite(x[4]).all()  # top_p 1: every token


def test_flat_rows_are_not_held_by_the_candidates_and_nucleus_sorts_them(monkeypatch):
    rng = np.random.default_rng(1)
    flat = _rows(rng, len(TOP_P), 0.5)
    _, exact = jax.jit(sampling._nucleus_among, static_argnums=2)(jnp.asarray(flat), jnp.asarray(TOP_P), K)
    assert not bool(exact)
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", K)
    for x in (flat, _rows(rng, len(TOP_P), 8.0)):  # the fall-back, and the candidates' path
        got = jax.jit(sampling._nucleus)(jnp.asarray(x), jnp.asarray(TOP_P))
        np.testing.assert_array_equal(_kept(got), _reference(x, TOP_P) & np.isfinite(x))


def test_a_call_where_no_row_asks_for_the_nucleus_keeps_every_logit():
    x = _rows(np.random.default_rng(2), 4, 6.0)
    ones = jnp.ones((4,), jnp.float32)
    scaled = np.asarray(jax.jit(sampling._nucleus)(jnp.asarray(x), ones))
    np.testing.assert_array_equal(scaled, x)


@pytest.mark.parametrize("top_p", [0.3, 0.8])
def test_sample_logits_draws_only_from_the_nucleus_of_a_large_vocabulary(top_p):
    """Through `sample_logits` (V = 600: the nucleus among its 256 likeliest tokens):
    many draws of one peaked row land only on its nucleus, and cover it."""
    x = _rows(np.random.default_rng(3), 4, 6.0)[0]
    want = _reference(x[None], np.array([top_p]))[0]
    n = 4000
    logits = jnp.broadcast_to(jnp.asarray(x), (n, V))
    draws = jax.jit(sampling.sample_logits)(
        logits, jax.random.key(0), jnp.ones((n,)), jnp.full((n,), top_p, jnp.float32)
    )
    drawn = np.zeros(V, bool)
    drawn[np.asarray(draws)] = True
    assert not (drawn & ~want).any()
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    assert drawn[want & (probs > 0.01)].all()
