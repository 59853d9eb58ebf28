"""Seeded fuzz of every public loss entry point against float64 references written here from docs/METHOD.md
("The student's loss") and the `losses.divergences` docstring, not from the library: values, and gradients
wrt the hidden states and the unembedding, float32 (or bfloat16) against float64.

Cases are drawn as the store and the pipeline write them: N not a multiple of the tile, V not a multiple of
8, K from 1 to 64 (K >= V too), embeddings padded past the tokenizer's ids (no target names them), rows with
fewer than K candidates (-inf at id 0, as `posterior` stores a padded id, or at any id), stored tails of 0,
near 1 and of 1e-12..1e-6, rows read back from a bfloat16 store (top-k + tail then sum to 1 only within the
encoding), prompt rows (id 0, -inf, tail 0, masked), fractional masks, zero weights, confident students
(their mass outside the K ids far below float32's unit), bfloat16 students, temperatures != 1, alpha 0 and
> 0, and an all-masked batch. No loss takes a cross-tokenizer (first-byte) head: that head only shapes the
stored rows, which reach the losses as any other top-k + tail.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from proxykd_jax import losses as L

# reverse_kl reads a stored tail below 2^-24 as 2^-24 (float32 rounding of 1 - sum topk; divergences docstring)
TAIL_FLOOR = {"reverse_kl": 2.0**-24}


# ----------------------------------------------------------------------------- cases


def _case(seed, *, k=None, pad=None, bf16=False, store_bf16=False, all_masked=False):
    """A batch of N token rows: the student's hidden states and unembedding, CE targets (real ids), a store's
    sparse rows, mask, weight, and a white-box teacher's hidden states and unembedding over the same V ids."""
    rng = np.random.default_rng(seed)
    n, d, v_real, chunk = int(rng.integers(9, 40)), int(rng.integers(2, 20)), int(rng.integers(3, 70)), 0
    while chunk == 0 or n % chunk == 0:
        chunk = int(rng.integers(2, 17))
    pad = int(rng.integers(1, 14)) if pad is None else pad
    v = v_real + pad + int((v_real + pad) % 8 == 0)  # never a multiple of 8
    k = int(rng.integers(1, 65)) if k is None else k
    hidden = rng.normal(size=(n, d))
    w = rng.normal(size=(d, v)) / math.sqrt(d) * rng.uniform(0.5, 3.0)
    hidden[rng.uniform(size=n) < 0.25] *= rng.uniform(5.0, 25.0)  # confident students
    dtype = ml_dtypes.bfloat16 if bf16 else np.float32
    hidden, w = hidden.astype(dtype), w.astype(dtype)
    logits = hidden.astype(np.float64) @ w.astype(np.float64)
    ids, lps, tail = np.zeros((n, k), np.int32), np.full((n, k), -np.inf, np.float32), np.zeros(n, np.float32)
    for r in range(n):
        n_valid = int(rng.integers(0 if rng.uniform() < 0.1 else 1, min(k, v_real) + 1))
        order = np.argsort(-logits[r, :v_real]) if rng.uniform() < 0.3 else rng.permutation(v_real)
        regime = rng.integers(5)
        if n_valid == 0:
            p, t = np.zeros(0), 1.0
        elif regime == 0:  # a tail of 0
            p, t = rng.dirichlet(np.ones(n_valid)), 0.0
        elif regime == 1:  # a tail near 1
            p = rng.dirichlet(np.ones(n_valid)) * 10.0 ** rng.uniform(-7, -2)
            t = 1.0 - p.sum()
        elif regime == 2:  # a tiny tail
            t = 10.0 ** rng.uniform(-12, -6)
            p = rng.dirichlet(np.ones(n_valid)) * (1 - t)
        else:  # a posterior's top n_valid, the tail 1 - sum in float32 (as `posterior` writes it)
            full = np.exp(rng.normal(size=v_real) * rng.uniform(0.5, 6.0))
            full /= full.sum()
            order = np.argsort(-full)
            p, t = full[order[:n_valid]], None
        lp = np.log(p).astype(np.float32)
        t = max(1.0 - float(np.exp(lp).sum(dtype=np.float32)), 0.0) if t is None else t
        slots = np.arange(k) if rng.uniform() < 0.7 else rng.permutation(k)
        ids[r, slots[:n_valid]], lps[r, slots[:n_valid]], tail[r] = order[:n_valid], lp, t
        ids[r, slots[n_valid:]] = 0 if rng.uniform() < 0.6 else rng.integers(0, v_real, size=k - n_valid)
    if store_bf16:  # log-probs and tail as a bfloat16 / float16 store gives them back
        lps, tail = lps.astype(ml_dtypes.bfloat16).astype(np.float32), tail.astype(np.float16).astype(np.float32)
    targets = rng.integers(0, v_real, size=n).astype(np.int32)
    mask = (rng.uniform(size=n) < 0.75) * rng.choice([1.0, 1.0, 0.5, 2.0], size=n)
    mask = np.zeros(n) if all_masked else mask
    prompt = (mask == 0) & (rng.uniform(size=n) < 0.5)  # the pipeline's rows before the response
    ids[prompt], lps[prompt], tail[prompt], targets[prompt] = 0, -np.inf, 0.0, 0
    weight = np.where(rng.uniform(size=n) < 0.1, 0.0, rng.uniform(0.0, 2.0, size=n))
    e = int(rng.integers(2, 12))
    t_hidden = rng.normal(size=(n, e)).astype(dtype)
    t_w = rng.normal(size=(e, v)) * rng.uniform(0.3, 2.0)
    return dict(
        hidden=hidden,
        w=w,
        targets=targets,
        ids=ids,
        lps=lps,
        tail=tail,
        mask=mask.astype(np.float32),
        weight=weight.astype(np.float32),
        t_hidden=t_hidden,
        t_w=t_w.astype(np.float32),
        chunk=chunk,
        desc=f"n={n} d={d} v={v} (tokens {v_real}) k={k} chunk={chunk}",
    )


# ----------------------------------------------------------------------------- float64 references


def _xlogratio(a, b):
    """a log(a / b), 0 where a == 0."""
    on = a > 0
    return jnp.where(on, a * (jnp.log(jnp.where(on, a, 1.0)) - jnp.log(jnp.where(on, b, 1.0))), 0.0)


def _terms(kind, p, q, beta, skew):
    """Per-id terms of D(p || q) from the definitions (divergences docstring)."""
    if kind == "forward_kl":
        return _xlogratio(p, q)
    if kind == "reverse_kl":
        return _xlogratio(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _xlogratio(p, m) + (1 - beta) * _xlogratio(q, m)
    if kind == "skew_kl":
        return _xlogratio(p, skew * p + (1 - skew) * q)
    return 0.5 * jnp.abs(p - q)


def _log_softmax(x):
    top = jax.lax.stop_gradient(jnp.max(x, -1, keepdims=True))
    return x - top - jnp.log(jnp.sum(jnp.exp(x - top), -1, keepdims=True))


def _sampled(kind, p, q, uniforms, beta, skew):
    """(Z/S) sum_s d(p_x, q_x) / r_x over draws x ~ r / Z by inverse CDF of `uniforms`: r = p for
    forward_kl and skew_kl, (p + q) / 2 otherwise, held constant; its expectation is sum_v d(p_v, q_v)."""
    r = jax.lax.stop_gradient(p if kind in ("forward_kl", "skew_kl") else 0.5 * (p + q))
    cdf = jnp.cumsum(r, -1)
    z = cdf[:, -1:]
    draws = jax.vmap(lambda c, u: jnp.searchsorted(c, u, side="right"))(cdf, jnp.asarray(uniforms, jnp.float64) * z)
    draws = jnp.minimum(draws, r.shape[-1] - 1)
    d = _terms(kind, jnp.take_along_axis(p, draws, -1), jnp.take_along_axis(q, draws, -1), beta, skew)
    r_x = jnp.take_along_axis(r, draws, -1)
    return jnp.mean(jnp.where(r_x > 0, d / jnp.where(r_x > 0, r_x, 1.0), 0.0), -1) * z[:, 0]


def _sparse_kd(kind, tail_mode, c, logq, beta, skew, uniforms):
    """D(target || q) per row for a sparse target (top-K + tail), in the three tail modes."""
    n, v = logq.shape
    q = jnp.exp(logq)
    ids, valid = c["ids"], np.isfinite(c["lps"])
    p_k = np.where(valid, np.exp(np.where(valid, c["lps"], 0.0).astype(np.float64)), 0.0)
    rows = np.repeat(np.arange(n)[:, None], ids.shape[1], 1)
    member = np.zeros((n, v), bool)
    member[rows[valid], ids[valid]] = True
    q_k = jnp.where(valid, jnp.take_along_axis(q, jnp.asarray(ids), -1), 0.0)
    q_tail = jnp.sum(jnp.where(member, 0.0, q), -1)  # the student's mass outside the K ids
    p_tail = np.where(member.all(-1), 0.0, np.maximum(c["tail"].astype(np.float64), TAIL_FLOOR.get(kind, 0.0)))
    if tail_mode == "tail":  # K + one tail bucket
        p_b, q_b = jnp.concatenate([p_k, p_tail[:, None]], 1), jnp.concatenate([q_k, q_tail[:, None]], 1)
        return jnp.sum(_terms(kind, p_b, q_b, beta, skew), -1)
    if tail_mode == "renorm":  # both renormalised over the K ids
        sp, sq = p_k.sum(-1, keepdims=True), jnp.sum(q_k, -1, keepdims=True)
        p_n = np.where(sp > 0, p_k / np.where(sp > 0, sp, 1.0), 0.0)
        return jnp.sum(_terms(kind, p_n, jnp.where(sq > 0, q_k / jnp.where(sq > 0, sq, 1.0), 0.0), beta, skew), -1)
    p_dense = np.zeros((n, v))  # sampled: the target completed by its tail spread like the student
    p_dense[rows[valid], ids[valid]] = p_k[valid]
    p_full = jnp.where(member, p_dense, p_tail[:, None] * q / jnp.where(q_tail > 0, q_tail, 1.0)[:, None])
    return _sampled(kind, p_full, q, uniforms, beta, skew)


def _reference(c, kd_fn, temperature, alpha):
    """value_and_grad of (sum mask CE + alpha sum mask weight KD) / max(sum mask, 1) wrt (hidden, W)."""
    with jax.enable_x64(True):

        def objective(h, w):
            logits = h @ w
            ce_t = -jnp.take_along_axis(_log_softmax(logits), jnp.asarray(c["targets"])[:, None], -1)[:, 0]
            kd_t = kd_fn(_log_softmax(logits / temperature))
            m, on = c["mask"].astype(np.float64), c["mask"] != 0
            ce = jnp.sum(jnp.where(on, m * ce_t, 0.0))
            kd = jnp.sum(jnp.where(on, m * c["weight"] * kd_t, 0.0))
            return (ce + alpha * kd) / max(m.sum(), 1.0), (ce, kd)

        h64, w64 = (jnp.asarray(c[x].astype(np.float64)) for x in ("hidden", "w"))
        (val, (ce, kd)), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(h64, w64)
        return [float(val), float(ce), float(kd)], [np.asarray(g) for g in grads]


# ----------------------------------------------------------------------------- comparisons


def _check(c, got_sums, got_grads, want_sums, want_grads, n_tokens, name=""):
    """Values to 2e-5 relative (+1e-5 per token), gradients to 1e-4 relative + 2e-5 of their largest entry;
    bfloat16 students to 2e-2. Everything finite; an all-masked batch gives exact zeros."""
    bf16, where = c["hidden"].dtype != np.float32, f"{name} {c['desc']}"
    got_sums = [float(x) for x in got_sums]
    assert np.all(np.isfinite(got_sums)), (where, got_sums)
    rtol = 2e-2 if bf16 else 2e-5
    np.testing.assert_allclose(got_sums, want_sums, rtol=rtol, atol=1e-5 * (n_tokens + 1), err_msg=where)
    for got, want in zip(got_grads, want_grads):
        got = np.asarray(got, np.float64)
        assert np.all(np.isfinite(got)), where
        scale = np.abs(want).max()
        rtol, atol = (2e-2, 2e-2 * scale) if bf16 else (1e-4, 2e-5 * scale)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=where)
        assert n_tokens > 0 or np.all(got == 0), where
    assert n_tokens > 0 or got_sums == [0.0] * len(got_sums), where


def _run_entry_points(c, call, alpha, twin):
    """[(name, (value, ce, kd), grads)] of the fused objective, the rematerialised loss and (with `twin`) its
    dense twin, itself a test reference: on every other case only, to keep the file's first run (nothing in the
    compilation cache) under a minute."""

    def fused(h, w):
        loss_sum, ce, kd, n = call("objective")(h, w, alpha=alpha, chunk_size=c["chunk"])
        return loss_sum / jnp.maximum(n, 1.0), (ce, kd, n)

    def loss(h, w, name):
        ce, kd, n = call(name)(h, w, chunk_size=c["chunk"])
        return L.kd_objective(ce, kd, n, alpha), (ce, kd, n)

    fns = dict(objective=fused, chunked=functools.partial(loss, name="chunked"))
    if twin:
        fns["dense"] = functools.partial(loss, name="dense")

    @jax.jit
    def run_all(h, w):
        return {name: jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(h, w) for name, fn in fns.items()}

    out = []
    for name, ((val, (ce, kd, n)), grads) in run_all(jnp.asarray(c["hidden"]), jnp.asarray(c["w"])).items():
        assert float(n) == float(c["mask"].sum()), name
        out.append((name, (val, ce, kd), grads))
    return out


SPARSE_CASES = [
    # seed, divergence, tail_mode, temperature, alpha, case options
    (0, "forward_kl", "tail", 1.0, 100.0, {}),  # the paper's setting: the written-out gradient
    (1, "forward_kl", "tail", 1.0, 0.0, dict(store_bf16=True, k=1)),
    (2, "forward_kl", "tail", 1.0, 3.0, dict(bf16=True, pad=0, k=5)),
    (3, "forward_kl", "tail", 1.0, 0.5, dict(k=64)),  # K >= V: the generic path, empty tails
    (4, "reverse_kl", "tail", 2.0, 0.3, {}),
    (5, "jsd", "renorm", 0.5, 100.0, dict(store_bf16=True)),
    (6, "skew_kl", "sampled", 1.0, 0.3, dict(store_bf16=True)),
    (7, "tvd", "sampled", 1.7, 1.0, {}),
    (8, "reverse_kl", "sampled", 1.0, 1.0, dict(store_bf16=True, k=3)),
    (9, "forward_kl", "renorm", 2.0, 100.0, dict(bf16=True)),
    (10, "jsd", "tail", 0.5, 0.3, dict(all_masked=True, k=7)),
]


@pytest.mark.parametrize("seed,kind,tail_mode,temperature,alpha,options", SPARSE_CASES)
def test_sparse_kd_matches_float64_reference(seed, kind, tail_mode, temperature, alpha, options):
    c = _case(seed, **options)
    beta, skew, draws = [0.5, 0.2, 0.9][seed % 3], [0.0, 0.1, 0.6][seed % 3], 1 + seed % 8
    key = jax.random.key(seed)
    # the uniforms `sparse_kd_loss` draws from its key (one [N, S] array, before tiling)
    uniforms = np.asarray(jax.random.uniform(key, (len(c["targets"]), draws), jnp.float32))
    kw = dict(divergence=kind, tail_mode=tail_mode, temperature=temperature, jsd_beta=beta, skew_alpha=skew)
    kw.update(num_samples=draws, rng=key if tail_mode == "sampled" else None)
    fns = dict(objective=L.sparse_kd_objective, chunked=L.sparse_kd_loss, dense=L.sparse_kd_loss_dense)
    data = (c["targets"], c["ids"], c["lps"], c["tail"], c["mask"], c["weight"])

    def call(name):
        return lambda h, w, **extra: fns[name](h, w, *data, **kw, **extra)

    kd_fn = functools.partial(_sparse_kd, kind, tail_mode, c, beta=beta, skew=skew, uniforms=uniforms)
    want, want_grads = _reference(c, kd_fn, temperature, alpha)
    for name, got, grads in _run_entry_points(c, call, alpha, twin=seed % 2 == 0):
        _check(c, got, grads, want, want_grads, c["mask"].sum(), name)


DENSE_CASES = [
    # seed, divergence, sampled, temperature, alpha, case options
    (20, "forward_kl", False, 1.0, 2.0, {}),  # the written-out gradient
    (21, "jsd", False, 2.0, 0.5, dict(bf16=True)),
    (22, "reverse_kl", True, 1.5, 1.0, {}),
    (23, "tvd", True, 1.0, 3.0, dict(all_masked=True)),
    (24, "skew_kl", False, 0.7, 1.0, dict(pad=0)),
]


@pytest.mark.parametrize("seed,kind,sampled,temperature,alpha,options", DENSE_CASES)
def test_dense_kd_matches_float64_reference(seed, kind, sampled, temperature, alpha, options):
    c = _case(seed, **options)
    beta, skew, draws = 0.3, 0.4, 1 + seed % 5
    key = jax.random.key(seed)
    uniforms = np.asarray(jax.random.uniform(key, (len(c["targets"]), draws), jnp.float32))
    kw = dict(divergence=kind, sampled=sampled, temperature=temperature, jsd_beta=beta, skew_alpha=skew)
    kw.update(num_samples=draws, rng=key if sampled else None)
    fns = dict(objective=L.dense_kd_objective, chunked=L.dense_kd_loss, dense=L.dense_kd_loss_dense)
    data = (c["targets"], c["t_hidden"], c["t_w"], c["mask"], c["weight"])

    def call(name):
        return lambda h, w, **extra: fns[name](h, w, *data, **kw, **extra)

    def kd_fn(logq):  # the teacher's logits divided by the temperature too
        t_logits = np.asarray(c["t_hidden"], np.float64) @ c["t_w"].astype(np.float64)
        p, q = jnp.exp(_log_softmax(jnp.asarray(t_logits) / temperature)), jnp.exp(logq)
        return _sampled(kind, p, q, uniforms, beta, skew) if sampled else jnp.sum(_terms(kind, p, q, beta, skew), -1)

    want, want_grads = _reference(c, kd_fn, temperature, alpha)
    for name, got, grads in _run_entry_points(c, call, alpha, twin=seed % 2 == 0):
        _check(c, got, grads, want, want_grads, c["mask"].sum(), name)


def _sequence_logprobs64(h_BxLxD, w, targets_BxL, mask_BxL, length_normalize):
    """sum_t mask * log q(target_t) per row (divided by the row's mask sum, at least 1, when normalising)."""
    logq = _log_softmax(h_BxLxD @ w)
    logp = jnp.take_along_axis(logq, jnp.asarray(targets_BxL)[..., None], -1)[..., 0]
    mask_BxL = mask_BxL.astype(np.float64)
    per_row = jnp.sum(jnp.where(mask_BxL != 0, mask_BxL * logp, 0.0), -1)
    return per_row / np.maximum(mask_BxL.sum(-1), 1.0) if length_normalize else per_row


@pytest.mark.parametrize("seed,options", [(30, {}), (31, dict(bf16=True)), (32, dict(all_masked=True))])
def test_cross_entropy_and_sequence_logprobs_match_float64_reference(seed, options):
    c = _case(seed, **options)
    n = len(c["targets"])
    want, want_grads = _reference(c, lambda logq: jnp.zeros(n), 1.0, 0.0)  # alpha 0: CE / max(n_tokens, 1)
    ce_fn = functools.partial(L.cross_entropy_chunked, chunk_size=c["chunk"])
    ce_and_grad = jax.jit(jax.value_and_grad(ce_fn, argnums=(0, 1), has_aux=True))
    (ce_sum, n_tokens), grads = ce_and_grad(jnp.asarray(c["hidden"]), jnp.asarray(c["w"]), c["targets"], c["mask"])
    assert float(n_tokens) == float(c["mask"].sum())
    tokens = max(float(c["mask"].sum()), 1.0)
    _check(c, [ce_sum], grads, [want[1]], [g * tokens for g in want_grads], c["mask"].sum(), "cross_entropy_chunked")
    # sequence log-probs of [B, L] rows (length-normalised but for seed 30), through a random combination of the rows
    rows, normalize = max(b for b in range(1, 5) if n % b == 0), seed != 30
    coef_B = np.random.default_rng(seed).normal(size=rows)
    h, t, m = (c[x].reshape((rows, n // rows) + c[x].shape[1:]) for x in ("hidden", "targets", "mask"))

    def combined(fn, h, w):
        per_row = fn(h, w, t, m, length_normalize=normalize)
        return per_row @ coef_B, per_row

    with jax.enable_x64(True):
        reference = functools.partial(combined, _sequence_logprobs64)
        h64, w64 = jnp.asarray(h.astype(np.float64)), jnp.asarray(c["w"].astype(np.float64))
        (_, want_rows), want_grads = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(h64, w64)
        want_rows, want_grads = np.asarray(want_rows), [np.asarray(g) for g in want_grads]
    for fn in (functools.partial(L.sequence_logprobs, chunk_size=c["chunk"]), L.sequence_logprobs_dense):
        got = jax.jit(jax.value_and_grad(functools.partial(combined, fn), argnums=(0, 1), has_aux=True))
        (_, got_rows), grads = got(jnp.asarray(h), jnp.asarray(c["w"]))
        _check(c, np.asarray(got_rows), grads, want_rows, want_grads, c["mask"].sum(), str(fn))


@pytest.mark.parametrize("kind", L.KINDS)
def test_divergence_functions_match_float64_reference(kind):
    """`divergence` and `sampled_divergence` on full distributions, the target with zeros (-inf log-probs;
    not for reverse_kl, infinite there), in value and in gradient through the student's log-softmax;
    `divergence_terms` sums to `divergence`."""
    rng = np.random.default_rng(40 + L.KINDS.index(kind))
    m, v, beta, skew = 6, 37, float(rng.uniform(0.05, 0.95)), float(rng.uniform(0.0, 0.95))
    z_student = (rng.normal(size=(m, v)) * rng.uniform(0.5, 8.0, size=(m, 1))).astype(np.float32)
    logp = rng.normal(size=(m, v)) * rng.uniform(0.5, 8.0, size=(m, 1))
    logp[(rng.uniform(size=(m, v)) < 0.3) & (np.arange(v) > 0) & (kind != "reverse_kl")] = -np.inf
    logp = (logp - np.logaddexp.reduce(logp, -1, keepdims=True)).astype(np.float32)
    uniforms = rng.uniform(size=(m, 5)).astype(np.float32)
    kw = dict(jsd_beta=beta, skew_alpha=skew)

    def rows_and_grad(divergence_M):  # jit(value_and_grad) of z -> (sum_m m * D_m, D_M)
        return jax.jit(
            jax.value_and_grad(lambda z: (lambda d: (d @ np.arange(1.0, m + 1), d))(divergence_M(z)), has_aux=True)
        )

    library = dict(
        dense=lambda z: L.divergence(kind, logp, jax.nn.log_softmax(z), **kw),
        sampled=lambda z: L.sampled_divergence(kind, logp, jax.nn.log_softmax(z), uniforms, **kw),
    )
    with jax.enable_x64(True):
        p = jnp.asarray(np.exp(logp.astype(np.float64)))
        reference = dict(
            dense=lambda z: jnp.sum(_terms(kind, p, jnp.exp(_log_softmax(z)), beta, skew), -1),
            sampled=lambda z: _sampled(kind, p, jnp.exp(_log_softmax(z)), uniforms, beta, skew),
        )
        want = {k: rows_and_grad(f)(jnp.asarray(z_student, jnp.float64)) for k, f in reference.items()}
    for name, f in library.items():
        (_, want_v), want_g = want[name]
        (_, got_v), got_g = rows_and_grad(f)(jnp.asarray(z_student))
        np.testing.assert_allclose(got_v, want_v, rtol=2e-5, atol=1e-6, err_msg=name)
        # tvd's |p - q| has a kink at p = q, where float32 may lie on the other side
        atol = (1e-4 if kind == "tvd" else 2e-5) * np.abs(want_g).max()
        np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=atol, err_msg=name)
    terms = L.divergence_terms(kind, logp, jax.nn.log_softmax(z_student), **kw)
    np.testing.assert_allclose(np.asarray(terms).sum(-1), want["dense"][0][1], rtol=2e-5, atol=1e-6)


def test_helpers_match_float64_reference():
    """The completed sparse target (the K values, the tail spread over the other ids like the student, at
    least reverse_kl's floor), masked logsumexp (-inf with finite gradients where nothing is kept), CE from
    logits with fractional masks, DPO, the jsd bound and the default normalisation."""
    rng = np.random.default_rng(60)
    c = _case(61, k=9)
    logq = jax.nn.log_softmax(jnp.asarray(c["hidden"]) @ jnp.asarray(c["w"]))
    q = np.exp(np.asarray(logq, np.float64))
    for floor in (0.0, 2.0**-24):
        got = np.exp(np.asarray(L.complete_sparse_target(c["ids"], c["lps"], c["tail"], logq, floor), np.float64))
        for r in range(len(q)):
            valid = np.isfinite(c["lps"][r])
            member = np.isin(np.arange(q.shape[1]), c["ids"][r][valid])
            want = np.where(member, 0.0, max(float(c["tail"][r]), floor) * q[r] / q[r][~member].sum())
            want[c["ids"][r][valid]] = np.exp(c["lps"][r][valid].astype(np.float64))
            np.testing.assert_allclose(got[r], want, rtol=2e-5, atol=1e-30, err_msg=f"row {r} {c['desc']}")
    x = (rng.normal(size=(6, 23)) * 30).astype(np.float32)
    keep = (rng.uniform(size=x.shape) < 0.5) & (np.arange(6) > 0)[:, None]
    want = [np.logaddexp.reduce(row[k].astype(np.float64)) if k.any() else -np.inf for row, k in zip(x, keep)]
    np.testing.assert_allclose(L.masked_logsumexp(x, keep), want, rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(jnp.where(keep.any(1), L.masked_logsumexp(x, keep), 0.0)))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(grad)))
    targets, mask = rng.integers(0, 23, 6), rng.choice([0.0, 0.5, 1.0], 6).astype(np.float32)
    logq64 = x - np.logaddexp.reduce(x.astype(np.float64), -1, keepdims=True)
    ce, n = L.cross_entropy(x, targets, mask)
    np.testing.assert_allclose(float(ce), -(mask * logq64[np.arange(6), targets]).sum(), rtol=2e-6)
    assert float(n) == mask.sum()
    chosen, rejected, ref_chosen, ref_rejected = (rng.normal(size=5) * 30 for _ in range(4))
    beta = 0.37
    loss, metrics = L.dpo_loss(
        *(jnp.asarray(a, jnp.float32) for a in (chosen, rejected, ref_chosen, ref_rejected)), beta=beta
    )
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    np.testing.assert_allclose(float(loss), np.mean(np.logaddexp(0.0, -margin)), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["margin"]), margin.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(margin > 0), rtol=1e-6)
    np.testing.assert_allclose(L.binary_entropy(0.3), -0.3 * math.log(0.3) - 0.7 * math.log(0.7), rtol=1e-12)
    assert float(L.kd_objective(3.0, 2.0, 0.5, 7.0)) == 17.0  # (ce + alpha kd) / max(n_tokens, 1)


@pytest.mark.parametrize("total", [0.98, 1.0, 1.004])
def test_sampled_tail_mode_expects_the_tail_value_when_a_stored_row_sums_off_one(total):
    """A stored row's top-k probabilities and tail sum to 1 only within its encoding (up to ~4e-3 for a
    bfloat16 or uint8 store). The sampled estimate weighted a draw x ~ r / Z by 1 / r_x, not Z / r_x: its
    expectation was the `tail` value divided by Z (forward_kl, skew_kl) or by (1 + Z) / 2 (the others).
    Here each id is drawn once, by a uniform at the middle of its CDF interval, so the expectation is an
    exact sum over the ids, against the float64 `tail` value."""
    v = 12
    logq = jax.nn.log_softmax(jnp.asarray(np.random.default_rng(7).normal(size=(1, v)), jnp.float32))
    ids = np.array([[3, 7, 11, 0, 0]], np.int32)  # and an absent entry at id 0, as stored
    lps = np.array([[*np.log(np.array([0.4, 0.2, 0.1, 0.05]) * total), -np.inf]], np.float32)
    tail = np.array([0.25 * total], np.float32)
    q = np.exp(np.asarray(logq, np.float64))[0]
    member = np.isin(np.arange(v), ids[0, :4])
    p = np.where(member, 0.0, tail[0] * q / q[~member].sum())  # the target completed like the student
    p[ids[0, :4]] = np.exp(lps[0, :4].astype(np.float64))
    for kind in L.KINDS:
        r = p if kind in ("forward_kl", "skew_kl") else 0.5 * (p + q)  # the documented proposals
        middles = ((np.cumsum(r) - 0.5 * r) / r.sum()).astype(np.float32)
        sampled = jax.jit(functools.partial(L.sparse_divergence, kind, tail_mode="sampled"))
        each_id = sampled(
            *(np.repeat(x, v, 0) for x in (ids, lps, tail)),
            jnp.repeat(logq, v, 0),
            sample_uniforms_MxS=middles[:, None],
        )
        expectation = float(np.sum(r / r.sum() * np.asarray(each_id, np.float64)))
        with jax.enable_x64(True):
            c = dict(ids=ids, lps=lps, tail=tail)
            want = float(_sparse_kd(kind, "tail", c, jnp.asarray(np.log(q))[None], 0.5, 0.1, None)[0])
        np.testing.assert_allclose(expectation, want, rtol=2e-6, err_msg=kind)
