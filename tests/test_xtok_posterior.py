"""The first-byte head in the posterior kernel against a dense float64 I-projection."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from proxykd_jax.bayes import SparsePrior, make_sharded_posterior, posterior_topk
from proxykd_jax.data.byte_head import END_SYMBOL, N_SYMBOLS, OTHER_SYMBOL, symbols_from_bytes, token_symbols
from proxykd_jax.models.tokenizer import build_bpe_tokenizer

SPECIALS = 4  # <pad> <bos> <eos> <unk>
EOS = 2
POOL = ["a", "b", "e", " ", "\n", "é", "ü", "中", "文", "😀", "x"]


def random_vocab(rng, v):
    """Byte strings: specials, every single byte of the pool (so partial UTF-8 tokens exist), then
    random strings, many of them prefixes or extensions of one another."""
    table = [None] * SPECIALS
    singles = sorted({bytes([b]) for c in POOL for b in c.encode()})
    table += singles
    seen = set(table[SPECIALS:])
    while len(table) < v:
        if rng.random() < 0.4 and len(table) > SPECIALS + len(singles):
            base = table[rng.integers(SPECIALS, len(table))]
            cand = base + "".join(rng.choice(POOL, rng.integers(1, 3))).encode()
        else:
            cand = "".join(rng.choice(POOL, rng.integers(1, 5))).encode()
            if rng.random() < 0.2:
                cand = cand[1:] or cand  # starts inside a UTF-8 sequence
        if cand not in seen:
            seen.add(cand)
            table.append(cand)
    return table


def random_case(seed, n, v, s=6, s2=10):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, v)) * 2.0).astype(np.float32)
    ids = rng.integers(0, v, (n, s)).astype(np.int32)
    counts = rng.integers(0, 4, (n, s)).astype(np.float32)
    ng_ids = rng.integers(0, v, (n, s2)).astype(np.int32)
    floor = rng.uniform(0.05, 0.5, n)
    ng_raw = rng.random((n, s2))
    ng_probs = (ng_raw / ng_raw.sum(1, keepdims=True) * (1 - floor)[:, None]).astype(np.float32)
    base = rng.random(v) + 0.1
    base = (base / base.sum()).astype(np.float32)
    prior = SparsePrior(ids, counts, ng_ids, ng_probs, floor.astype(np.float32))
    return logits, prior, base, rng.uniform(0.5, 30.0, n).astype(np.float32)


def random_head(rng, n, h, sym):
    """Teacher first-byte heads: symbols our tokens start with (and END), some rows empty or short,
    one symbol no token of ours starts with, repeated symbols (their masses add up)."""
    present = np.unique(sym[sym != OTHER_SYMBOL])
    absent = next(b for b in range(256) if b not in present)
    syms = np.stack([rng.choice(present, h, replace=False) for _ in range(n)]).astype(np.int32)
    lp = np.log(rng.dirichlet(np.ones(h + 2), n)[:, :h]).astype(np.float32)
    syms[1::4, 0] = absent
    syms[2::4, 1] = syms[2::4, 0]
    syms[3::5, 0] = END_SYMBOL
    lp[::5] = -np.inf
    lp[4::6, 2:] = -np.inf
    return syms, lp


def dense_prior(prior, base, kappa):
    n = prior.floor_N.shape[0]
    a = kappa * np.asarray(prior.floor_N, np.float64)[:, None] * np.asarray(base, np.float64)[None]
    rows = np.arange(n)[:, None]
    np.add.at(a, (np.broadcast_to(rows, prior.ids_NxS.shape), prior.ids_NxS), prior.counts_NxS)
    np.add.at(
        a, (np.broadcast_to(rows, prior.ngram_ids_NxS2.shape), prior.ngram_ids_NxS2), kappa * prior.ngram_probs_NxS2
    )
    return a


def dense_posterior(logits, prior, base, n_pseudo, kappa, mode, beta):
    lg = logits.astype(np.float64)
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    a = dense_prior(prior, base, kappa)
    if mode == "expected":
        post = a + n_pseudo[:, None].astype(np.float64) * p
        return post / post.sum(1, keepdims=True)
    s = np.log(p) + beta * np.log(a / a.sum(1, keepdims=True))
    s = np.exp(s - s.max(1, keepdims=True))
    return s / s.sum(1, keepdims=True)


def dense_projection(q, sym, syms, lp):
    """q'(t) = q(t) m(b(t)) / Q(b(t)), m(b) = a(b) + r Q(b); a(b) on groups with Q(b) = 0 is dropped
    and m renormalised. Written per row with explicit loops over symbols, in float64."""
    out = np.empty_like(q)
    for i in range(q.shape[0]):
        groups = np.zeros(N_SYMBOLS)
        np.add.at(groups, sym, q[i])
        a = np.zeros(N_SYMBOLS)
        for b, x in zip(syms[i], lp[i]):
            if np.isfinite(x):
                a[b] += np.exp(np.float64(x))
        r = max(1.0 - a.sum(), 0.0)
        a[groups <= 0] = 0.0
        m = a + r * groups
        m /= m.sum()
        ratio = np.where(groups > 0, m / np.where(groups > 0, groups, 1.0), 0.0)
        out[i] = q[i] * ratio[sym]
    return out


def check(q_ref, ids, logprobs, tail, k):
    ids, probs, tail = np.asarray(ids), np.exp(np.asarray(logprobs, np.float64)), np.asarray(tail, np.float64)
    ref_top = -np.sort(-q_ref, 1)[:, :k]
    np.testing.assert_allclose(probs, ref_top, rtol=2e-5, atol=2e-7)
    np.testing.assert_allclose(probs, np.take_along_axis(q_ref, ids, 1), rtol=2e-5, atol=2e-7)
    np.testing.assert_allclose(tail, 1 - ref_top.sum(1), atol=2e-5)
    assert all(len(set(r)) == k for r in ids.tolist())


def test_symbols_of_a_real_byte_level_bpe():
    texts = ["héllo wörld 中文 😀 end", "the theme there then", "ab abc abcd é é"] * 20
    tok = build_bpe_tokenizer(texts, vocab_size=300)
    sym = token_symbols(tok)
    assert sym.shape == (len(tok),) and sym[tok.eos_token_id] == END_SYMBOL
    assert all(sym[tok.convert_tokens_to_ids(t)] == OTHER_SYMBOL for t in ("<pad>", "<bos>", "<unk>"))
    for text in texts[:3]:
        for tid in tok(text, add_special_tokens=False)["input_ids"]:
            raw = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(tid)])
            if "\ufffd" not in raw:  # whole characters: the symbol is the first UTF-8 byte
                assert sym[tid] == raw.encode()[0]
    # Partial UTF-8 tokens (the BPE alphabet holds every byte) get their own first byte.
    assert sym[tok.convert_tokens_to_ids("Ã")] == 0xC3


@pytest.mark.parametrize(
    "mode,n,v,k",
    [("expected", 24, 300, 16), ("geometric", 24, 300, 16), ("expected", 8, 2003, 12), ("sampled", 8, 2003, 12)],
)
def test_byte_head_matches_dense_projection(mode, n, v, k):
    rng = np.random.default_rng(v + len(mode))
    sym = symbols_from_bytes(random_vocab(rng, v), eos_ids=(EOS,), special_ids=(0, 1, 3))
    logits, prior, base, n_pseudo = random_case(v, n, v)
    syms, lp = random_head(rng, n, 5, sym)
    fn = jax.jit(lambda *a, **kw: posterior_topk(*a, k=k, mode=mode, beta=0.7, **kw))
    kw = dict(head_ids_NxH=syms, head_logprobs_NxH=lp, head_sym_V=sym)
    if mode == "sampled":
        # The proxy's draws are sparse pseudo-counts: the dense reference takes them from the kernel's rng.
        kw["rng"] = jax.random.key(0)
        q = sampled_reference(logits, prior, base, n_pseudo, 2.0, jax.random.key(0), 64)
    else:
        q = dense_posterior(logits, prior, base, n_pseudo, 2.0, mode, 0.7)
    check(dense_projection(q, sym, syms, lp), *fn(logits, prior, base, n_pseudo, 2.0, **kw), k)
    # Rows without a head are the plain posterior.
    plain = fn(logits, prior, base, n_pseudo, 2.0, **({"rng": kw["rng"]} if mode == "sampled" else {}))
    rows = ~np.isfinite(lp).any(1)
    np.testing.assert_allclose(
        np.asarray(plain[1])[rows], np.asarray(fn(logits, prior, base, n_pseudo, 2.0, **kw)[1])[rows], atol=1e-5
    )


def sampled_reference(logits, prior, base, n_pseudo, kappa, key, m):
    """The `sampled` posterior with the kernel's own draws (the same uniforms and cdf search)."""
    n, v = logits.shape
    u = np.asarray(jax.random.uniform(key, (n, m), np.float32), np.float64)
    lg = logits.astype(np.float64)
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    cdf = np.cumsum(p, 1)
    a = dense_prior(prior, base, kappa)
    for i in range(n):
        draws = np.minimum(np.searchsorted(cdf[i], u[i] * cdf[i, -1], side="right"), v - 1)
        np.add.at(a[i], draws, n_pseudo[i] / m)
    return a / a.sum(1, keepdims=True)


def test_one_token_per_symbol_differs_from_the_token_head_by_the_spread_remainder():
    """With one token per symbol the token head fixes q'(t) = a(t) on the head; the projection gives
    a(t) + r q̂(t) (the teacher's unseen remainder may start with any byte, seen ones included)."""
    rng = np.random.default_rng(5)
    v, n, k = 200, 16, 8
    sym = np.arange(v, dtype=np.int32)
    sym[2] = END_SYMBOL
    logits, prior, base, n_pseudo = random_case(11, n, v)
    head = np.stack([rng.choice(np.arange(3, v), 4, replace=False) for _ in range(n)]).astype(np.int32)
    lp = np.log(rng.dirichlet(np.ones(6), n)[:, :4]).astype(np.float32)
    q = dense_posterior(logits, prior, base, n_pseudo, 2.0, "expected", 1.0)
    r = 1 - np.exp(lp.astype(np.float64)).sum(1)
    by_token = jax.jit(lambda *a: posterior_topk(*a, k=k, head_ids_NxH=head, head_logprobs_NxH=lp))(
        logits, prior, base, n_pseudo, 2.0
    )
    by_byte = jax.jit(lambda *a: posterior_topk(*a, k=k, head_ids_NxH=sym[head], head_logprobs_NxH=lp, head_sym_V=sym))(
        logits, prior, base, n_pseudo, 2.0
    )
    tok_of = [dict(zip(i.tolist(), x.tolist())) for i, x in zip(np.asarray(by_token[0]), np.asarray(by_token[1]))]
    byte_of = [dict(zip(i.tolist(), x.tolist())) for i, x in zip(np.asarray(by_byte[0]), np.asarray(by_byte[1]))]
    checked = 0
    for row in range(n):
        for t, a in zip(head[row].tolist(), np.exp(lp[row].astype(np.float64))):
            assert abs(np.exp(tok_of[row][t]) - a) < 2e-6
            if t in byte_of[row]:
                assert abs(np.exp(byte_of[row][t]) - (a + r[row] * q[row, t])) < 2e-6
                checked += 1
    assert checked >= n * 2


def test_byte_head_chunked_and_sharded_equal_single_device():
    rng = np.random.default_rng(9)
    v, n, k = 300, 32, 8
    sym = symbols_from_bytes(random_vocab(rng, v), eos_ids=(EOS,), special_ids=(0, 1, 3))
    logits, prior, base, n_pseudo = random_case(3, n, v)
    syms, lp = random_head(rng, n, 4, sym)
    kw = dict(head_ids_NxH=syms, head_logprobs_NxH=lp)
    want = posterior_topk(logits, prior, base, n_pseudo, 2.0, k=k, head_sym_V=sym, **kw)
    chunked = jax.jit(lambda *a: posterior_topk(*a, k=k, chunk=5, head_sym_V=sym, **kw))(
        logits, prior, base, n_pseudo, 2.0
    )
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    sharded = make_sharded_posterior(mesh, axes=("data",), k=k, chunk=3)(
        logits, prior, base, n_pseudo, 2.0, head_sym_V=sym, **kw
    )
    for got in (chunked, sharded):
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), atol=1e-6)
