"""Final-logit soft-capping (Gemma 2's `final_logit_softcapping`) in the tiled losses: every loss
that forms logits from hidden states and W, with `softcap` (and dense KD's `teacher_softcap`), against
float64 references that form the full logits, cap them and compute the loss from the definitions, in
value and in gradient (fused and rematerialised); the dense twins; None = no cap; the refusal of a
cap that is not positive.

The raw logits reach about 4x the cap (|z| up to ~20 against a cap of 5), so the cap changes every
loss, which each test also asserts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd_jax import losses as L
from tests.test_losses import _kd_inputs

CAP, TEACHER_CAP = 5.0, 4.0
N, D, V, K, CHUNK, ALPHA = 37, 16, 64, 6, 8, 3.0  # 37 = 4 * 8 + 5: a padded last tile


def _inputs(seed=0):
    """`_kd_inputs` with hidden states scaled so the raw logits reach several times CAP, fractional
    mask entries and a masked prompt row (row 3), plus a white-box teacher's hidden states and W."""
    hidden, w, targets, ids, lps, tail, mask, weight = _kd_inputs(n=N, d=D, v=V, k=K, seed=seed)
    hidden = 6.0 * hidden
    mask = mask * jnp.where(jnp.arange(N) % 3 == 1, 0.5, 1.0)
    keys = jax.random.split(jax.random.key(seed + 100), 2)
    t_hidden = 5.0 * jax.random.normal(keys[0], (N, 24))
    t_w = jax.random.normal(keys[1], (24, V)) / np.sqrt(24.0)
    z = np.abs(np.asarray(hidden @ w))
    assert z.max() > 3 * CAP and (z > CAP).mean() > 0.2, z.max()  # the cap matters
    assert np.abs(np.asarray(t_hidden @ t_w)).max() > 3 * TEACHER_CAP
    assert float(mask.min()) == 0.0 and 0.5 in np.asarray(mask)
    return hidden, w, targets, ids, lps, tail, mask, weight, t_hidden, t_w


# ----------------------------------------------------------------------------- float64 references
# (called inside `jax.enable_x64`; every input converted to float64 first)


def _f64(*arrays):
    return [jnp.asarray(np.asarray(a, np.float64)) for a in arrays]


def _capped(h, W, cap):
    z = h @ W
    return z if cap is None else cap * jnp.tanh(z / cap)


def _ref_nll(logits, targets):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(targets)[:, None], 1)[:, 0]


def _ref_ce(h, W, targets, mask, cap):
    return jnp.sum(mask * _ref_nll(_capped(h, W, cap), targets))


def _ref_forward_kl_tail(logq, ids, lps, tail):
    """sum_k p_k (log p_k - log q_k) + p_t (log p_t - log q_t), q_t the student's mass outside the ids."""
    rows = jnp.arange(logq.shape[0])[:, None]
    valid = lps > -jnp.inf
    logp = jnp.where(valid, lps, 0.0)
    head = jnp.sum(jnp.where(valid, jnp.exp(logp) * (logp - logq[rows, ids]), 0.0), -1)
    member = jnp.zeros(logq.shape, bool).at[rows, jnp.where(valid, ids, logq.shape[1])].set(True, mode="drop")
    logq_tail = jax.nn.logsumexp(jnp.where(member, -jnp.inf, logq), -1)
    tail_term = jnp.where(tail > 0, tail * (jnp.log(jnp.where(tail > 0, tail, 1.0)) - logq_tail), 0.0)
    return head + tail_term


def _value_and_grads_64(ref, h, W):
    """(value, aux) and (d/dh, d/dW) of a float64 reference as numpy."""
    (val, aux), grads = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(*_f64(h, W))
    return float(val), [np.asarray(a) for a in aux], [np.asarray(g) for g in grads]


def _assert_grads(got, want):
    for g, w in zip(got, want):
        g = np.asarray(g)
        assert g.shape == w.shape and np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())


def _assert_equal_tree(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- likelihood


def test_cross_entropy_chunked_softcap_matches_float64_reference():
    hidden, w, targets, _, _, _, mask, *_ = _inputs()

    def fused(h, W, softcap):
        ce_sum, n_tokens = L.cross_entropy_chunked(h, W, targets, mask, chunk_size=CHUNK, softcap=softcap)
        return ce_sum, n_tokens

    (val, n_tok), grads = jax.jit(
        jax.value_and_grad(functools.partial(fused, softcap=CAP), argnums=(0, 1), has_aux=True)
    )(hidden, w)
    uncapped, _ = jax.jit(functools.partial(fused, softcap=None))(hidden, w)
    with jax.enable_x64(True):
        (m64,) = _f64(mask)
        val_r, _, grads_r = _value_and_grads_64(lambda h, W: (_ref_ce(h, W, targets, m64, CAP), ()), hidden, w)
        val_raw = float(_ref_ce(*_f64(hidden, w), targets, m64, None))
    np.testing.assert_allclose(float(val), val_r, rtol=1e-5)
    np.testing.assert_allclose(float(uncapped), val_raw, rtol=1e-5)
    assert abs(val_r - val_raw) > 0.05 * abs(val_r)  # the cap matters
    assert float(n_tok) == float(mask.sum())
    _assert_grads(grads, grads_r)


@pytest.mark.parametrize("normalize", [False, True])
def test_sequence_logprobs_softcap_matches_float64_reference(normalize):
    hidden, w, targets, _, _, _, mask, *_ = _inputs(1)
    b, length = 1, N  # one row of 37: 4 tiles of 8 and a padded one
    h3, t2, m2 = hidden.reshape(b, length, D), targets.reshape(b, length), mask.reshape(b, length)
    kw = dict(length_normalize=normalize, softcap=CAP)

    def loss(f, h, W):
        logp_B = f(h.reshape(b, length, D), W, t2, m2, **kw)
        return jnp.sum(logp_B), logp_B

    run = lambda f: jax.jit(jax.value_and_grad(functools.partial(loss, f), argnums=(0, 1), has_aux=True))  # noqa: E731
    (val, rows), grads = run(functools.partial(L.sequence_logprobs, chunk_size=CHUNK))(hidden, w)
    (val_d, rows_d), grads_d = run(L.sequence_logprobs_dense)(hidden, w)
    uncapped = L.sequence_logprobs(h3, w, t2, m2, chunk_size=CHUNK, length_normalize=normalize)
    with jax.enable_x64(True):
        (m64,) = _f64(mask)

        def ref(h, W, cap=CAP):
            total = jnp.sum(-m64 * _ref_nll(_capped(h, W, cap), targets))
            total = total / jnp.sum(m64) if normalize else total
            return total, ()

        val_r, _, grads_r = _value_and_grads_64(ref, hidden, w)
        val_raw = float(ref(*_f64(hidden, w), None)[0])
    np.testing.assert_allclose(float(val), val_r, rtol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(uncapped)), val_raw, rtol=1e-5)
    assert abs(val_r - val_raw) > 0.05 * abs(val_r)
    _assert_grads(grads, grads_r)
    # the dense twin computes the same
    np.testing.assert_allclose(np.asarray(rows), np.asarray(rows_d), rtol=1e-5)
    for g, g_d in zip(grads, grads_d):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_d), rtol=1e-5, atol=1e-6 * float(jnp.abs(g_d).max()))


# ----------------------------------------------------------------------------- sparse KD

# forward KL with the tail bucket at temperature 1 runs the tile gradient written out by hand; jsd
# with renormalised targets at temperature 0.7 the autodiff one (`_objective_tile`)
SPARSE_CASES = [("forward_kl", "tail", 1.0), ("jsd", "renorm", 0.7)]


def _three_ways(objective_fn, loss_fn, dense_fn, hidden, w, data, kw):
    """((value, aux), grads) wrt hidden and W of the fused objective, the tiled loss and its dense twin (the latter
    two as ce + ALPHA * kd), each under jit; aux = (ce, kd, n_tokens)."""

    def objective(h, W):
        loss_sum, ce, kd, n = objective_fn(h, W, *data, alpha=ALPHA, chunk_size=CHUNK, **kw)
        return loss_sum, (ce, kd, n)

    def split(f):
        def loss(h, W):
            ce, kd, n = f(h, W, *data, **kw)
            return ce + ALPHA * kd, (ce, kd, n)

        return loss

    def run(f):
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hidden, w)

    return (*run(objective), *run(split(functools.partial(loss_fn, chunk_size=CHUNK))), *run(split(dense_fn)))


@pytest.mark.parametrize("kind,tail_mode,temperature", SPARSE_CASES)
def test_sparse_kd_softcap_matches_float64_reference(kind, tail_mode, temperature):
    hidden, w, targets, ids, lps, tail, mask, weight, *_ = _inputs(2)
    data = (targets, ids, lps, tail, mask, weight)
    kw = dict(divergence=kind, tail_mode=tail_mode, temperature=temperature, jsd_beta=0.3, softcap=CAP)

    (val_f, aux_f), grads_f, (val_c, aux_c), grads_c, (val_d, aux_d), grads_d = _three_ways(
        L.sparse_kd_objective, L.sparse_kd_loss, L.sparse_kd_loss_dense, hidden, w, data, kw
    )
    uncapped = L.sparse_kd_objective(hidden, w, *data, alpha=ALPHA, chunk_size=CHUNK, **{**kw, "softcap": None})

    with jax.enable_x64(True):
        ids64, (lps64, tail64, m64, w64) = jnp.asarray(ids), _f64(lps, tail, mask, weight)

        def ref(h, W, cap=CAP):
            logits = _capped(h, W, cap)
            logq_kd = jax.nn.log_softmax(logits / temperature)
            if (kind, tail_mode) == ("forward_kl", "tail"):
                kd_n = _ref_forward_kl_tail(logq_kd, ids64, lps64, tail64)
            else:  # the per-token divergence itself is checked against numpy in test_losses
                kd_n = L.sparse_divergence(kind, ids64, lps64, tail64, logq_kd, tail_mode=tail_mode, jsd_beta=0.3)
            ce = jnp.sum(m64 * _ref_nll(logits, targets))
            kd = jnp.sum(jnp.where(m64 != 0, m64 * w64 * kd_n, 0.0))
            return ce + ALPHA * kd, (ce, kd)

        val_r, aux_r, grads_r = _value_and_grads_64(ref, hidden, w)
        val_raw = float(ref(*_f64(hidden, w), None)[0])

    assert abs(val_r - val_raw) > 0.05 * abs(val_r)
    np.testing.assert_allclose(float(uncapped[0]), val_raw, rtol=1e-5)
    for val, aux, grads in ((val_f, aux_f, grads_f), (val_c, aux_c, grads_c), (val_d, aux_d, grads_d)):
        np.testing.assert_allclose([float(val), float(aux[0]), float(aux[1])], [val_r, *aux_r], rtol=1e-5)
        assert float(aux[2]) == float(mask.sum())
        _assert_grads(grads, grads_r)
    # the dense twin computes what the tiled loss does
    np.testing.assert_allclose(np.asarray(aux_d[:2]), np.asarray(aux_c[:2]), rtol=1e-5)


# ----------------------------------------------------------------------------- dense (white-box) KD

DENSE_CASES = [
    ("forward_kl", 1.0, CAP, None),  # the tile gradient written out by hand
    ("forward_kl", 1.0, None, TEACHER_CAP),
    ("forward_kl", 1.0, CAP, TEACHER_CAP),
    ("jsd", 1.5, CAP, TEACHER_CAP),  # autodiff through the tile
]


@pytest.mark.parametrize("kind,temperature,softcap,teacher_softcap", DENSE_CASES)
def test_dense_kd_softcap_matches_float64_reference(kind, temperature, softcap, teacher_softcap):
    hidden, w, targets, _, _, _, mask, weight, t_hidden, t_w = _inputs(3)
    data = (targets, t_hidden, t_w, mask, weight)
    kw = dict(divergence=kind, temperature=temperature, jsd_beta=0.3, softcap=softcap, teacher_softcap=teacher_softcap)

    (val_f, aux_f), grads_f, (val_c, aux_c), grads_c, (val_d, aux_d), grads_d = _three_ways(
        L.dense_kd_objective, L.dense_kd_loss, L.dense_kd_loss_dense, hidden, w, data, kw
    )

    with jax.enable_x64(True):
        m64, w64, th64, tw64 = _f64(mask, weight, t_hidden, t_w)

        def ref(h, W, cap=softcap, teacher_cap=teacher_softcap):
            logits = _capped(h, W, cap)
            logp = jax.nn.log_softmax(_capped(th64, tw64, teacher_cap) / temperature)
            # (the per-token divergence itself is checked against numpy in test_losses)
            kd_n = L.divergence(kind, logp, jax.nn.log_softmax(logits / temperature), jsd_beta=0.3)
            ce, kd = jnp.sum(m64 * _ref_nll(logits, targets)), jnp.sum(m64 * w64 * kd_n)
            return ce + ALPHA * kd, (ce, kd)

        val_r, aux_r, grads_r = _value_and_grads_64(ref, hidden, w)
        kd_raw = float(ref(*_f64(hidden, w), None, None)[1][1])

    assert abs(aux_r[1] - kd_raw) > 0.05 * abs(aux_r[1])  # the cap (student's or teacher's) matters
    for val, aux, grads in ((val_f, aux_f, grads_f), (val_c, aux_c, grads_c), (val_d, aux_d, grads_d)):
        np.testing.assert_allclose([float(val), float(aux[0]), float(aux[1])], [val_r, *aux_r], rtol=1e-5)
        _assert_grads(grads, grads_r)
    np.testing.assert_allclose(np.asarray(aux_d[:2]), np.asarray(aux_c[:2]), rtol=1e-5)


# ----------------------------------------------------------------------------- None and bad caps


def _calls(hidden, w, targets, ids, lps, tail, mask, weight, t_hidden, t_w):
    """f(h, W, **caps) -> outputs of every loss that takes a cap, and which caps it takes."""
    seq = (targets.reshape(1, N), mask.reshape(1, N))
    sparse = (targets, ids, lps, tail, mask, weight)
    dense = (targets, t_hidden, t_w, mask, weight)
    student, both = ("softcap",), ("softcap", "teacher_softcap")
    return [
        (lambda h, W, **c: L.cross_entropy_chunked(h, W, targets, mask, chunk_size=CHUNK, **c)[0], student),
        (lambda h, W, **c: jnp.sum(L.sequence_logprobs(h.reshape(1, N, D), W, *seq, chunk_size=CHUNK, **c)), student),
        (lambda h, W, **c: jnp.sum(L.sequence_logprobs_dense(h.reshape(1, N, D), W, *seq, **c)), student),
        (lambda h, W, **c: sum(L.sparse_kd_loss(h, W, *sparse, chunk_size=CHUNK, **c)[:2]), student),
        (lambda h, W, **c: sum(L.sparse_kd_loss_dense(h, W, *sparse, **c)[:2]), student),
        (lambda h, W, **c: L.sparse_kd_objective(h, W, *sparse, alpha=ALPHA, chunk_size=CHUNK, **c)[0], student),
        (lambda h, W, **c: sum(L.dense_kd_loss(h, W, *dense, chunk_size=CHUNK, **c)[:2]), both),
        (lambda h, W, **c: sum(L.dense_kd_loss_dense(h, W, *dense, **c)[:2]), both),
        (lambda h, W, **c: L.dense_kd_objective(h, W, *dense, alpha=ALPHA, chunk_size=CHUNK, **c)[0], both),
    ]


def test_softcap_none_is_the_uncapped_loss():
    inputs = _inputs(4)
    hidden, w = inputs[:2]
    for f, caps in _calls(*inputs):
        none = dict.fromkeys(caps)
        value_and_grad = lambda f=f, **c: jax.value_and_grad(functools.partial(f, **c), argnums=(0, 1))  # noqa: E731
        _assert_equal_tree(jax.jit(value_and_grad(**none))(hidden, w), jax.jit(value_and_grad())(hidden, w))
        assert str(jax.make_jaxpr(value_and_grad(**none))(hidden, w)) == str(
            jax.make_jaxpr(value_and_grad())(hidden, w)
        )


@pytest.mark.parametrize("bad", [0.0, -5.0, float("inf"), float("nan")])
def test_softcap_must_be_a_positive_cap(bad):
    inputs = _inputs(5)
    hidden, w = inputs[:2]
    for f, caps in _calls(*inputs):
        for name in caps:
            with pytest.raises(ValueError, match=rf"^losses: {name} is {bad}; it must be a positive finite logit cap"):
                f(hidden, w, **{name: bad})
