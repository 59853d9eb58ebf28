"""The n-gram of responses held in the tables is read without their own (context, y_t) occurrence.

The empirical-Bayes fit scores held-out responses against n-grams that never counted them; the store and
the eval query responses that are in the tables, and their p_ngram counted each y_t once more at every order
(one response per prompt: mean p_ngram(y_t) 0.58 in the store against 0.02 in the fit). The reference below
is plain Python dicts written from docs/METHOD.md ("The prior": interpolated Witten–Bell, highest order
first, share count / (N + T), T / (N + T) passed down, a context never seen passes all of it, each order's
top s continuations with ties to the lower id, the rest's mass on floor * base) and REBUILDS each position's
tables without its own occurrence; the shared base keeps it (METHOD.md), so the reference's base is the whole
corpus's, and the base rebuilt without the token is checked to stay within the stated bound.
"""

import collections

import numpy as np
import pytest
from test_bayes_reference import witten_bell_row

from proxykd_jax.bayes import PriorTables

BOS = -1


def _context(s, t, j):
    return tuple(int(s[t - i]) if t - i >= 0 else BOS for i in range(1, j + 1))


def _top(counter, top_s):
    return sorted(((v, m) for v, m in counter.items() if m > 0), key=lambda kv: (-kv[1], kv[0]))[:top_s]


class Ref:
    """Context counts of every order and the smoothed unigram, from the corpus."""

    def __init__(self, seqs, vocab, order):
        self.vocab, self.order = vocab, order
        self.ctx = [None] + [collections.defaultdict(collections.Counter) for _ in range(1, order)]
        self.uni = collections.Counter()
        for s in seqs:
            for t, y in enumerate(int(x) for x in s):
                for j in range(1, order):
                    self.ctx[j][_context(s, t, j)][y] += 1
                self.uni[y] += 1

    def base(self, uni=None):
        uni = self.uni if uni is None else uni
        n, d = sum(uni.values()), sum(1 for m in uni.values() if m > 0)
        return np.array([(uni[v] + d / self.vocab) / (n + d) for v in range(self.vocab)])

    def counters(self, s, t, without_own):
        """The counts of position t's contexts, highest order first, rebuilt without its own pair if asked."""
        out = []
        for j in range(self.order - 1, 0, -1):
            c = collections.Counter(self.ctx[j].get(_context(s, t, j), {}))
            if without_own:
                c[int(s[t])] -= 1
            out.append(+c)  # drops the zero counts: the pair is gone from the rebuilt table
        return out

    def row(self, s, t, top_s, without_own, base=None):
        base = self.base() if base is None else base
        return witten_bell_row(self.counters(s, t, without_own), self.vocab, top_s, base)

    def approximated(self, s, t, top_s):
        """Whether the library's top-s tables cannot know position t's rebuilt tables: a pruned continuation
        would enter the top s, or the own token was pruned among continuations not all seen once."""
        y = int(s[t])
        for full, rebuilt in zip(self.counters(s, t, False), self.counters(s, t, True)):
            kept = {v for v, _ in _top(full, top_s)}
            if {v for v, _ in _top(rebuilt, top_s)} != kept - ({y} if rebuilt[y] == 0 else set()):
                return True
            if y not in kept and any(m > 1 for v, m in full.items() if v not in kept):
                return True
        return False


def corpus(rng, vocab):
    """Responses over a small vocabulary from a few low-entropy sources, some repeated whole, some prompts with
    one response: contexts seen once and many times, own pairs with count 1 and more, pruned and kept."""
    keys, seqs = [], []
    for p in range(int(rng.integers(8, 14))):
        hot = rng.choice(vocab, 4, replace=False)
        for _ in range(int(rng.integers(1, 5))):
            n = int(rng.integers(1, 12))
            s = np.where(rng.random(n) < 0.7, rng.choice(hot, n), rng.integers(0, vocab, n))
            keys.append(31 * p + 5)
            seqs.append(s if rng.random() > 0.15 or not seqs else seqs[-1].copy())
    return np.array(keys, np.int64), seqs


@pytest.mark.parametrize("seed", range(10))
def test_in_table_modes_read_the_ngram_without_the_own_occurrence(seed):
    """include_self and leave_one_out against tables rebuilt without each position's own pair (orders 1-5,
    truncated or not): equal wherever the top-s tables determine the rebuilt ones, always where there is no
    truncation; a distribution everywhere."""
    rng = np.random.default_rng(1000 + seed)
    vocab, order = int(rng.integers(8, 40)), 1 + seed % 5
    top_s = [vocab, int(rng.integers(1, 4))][(seed // 5) % 2]
    keys, seqs = corpus(rng, vocab)
    tables = PriorTables.build(keys, seqs, vocab_size=vocab, order=order, ngram_top_s=top_s)
    ref = Ref(seqs, vocab, order)
    rows = [(s, t) for s in seqs for t in range(len(s))]
    want = np.array([ref.row(s, t, top_s, without_own=True) for s, t in rows])
    exact = np.array([not ref.approximated(s, t, top_s) for s, t in rows])
    got = {}
    for mode in ("include_self", "leave_one_out"):
        pr = tables.query(keys, seqs, mode=mode)
        got[mode] = tables.dense_ngram(pr)
        assert np.all(np.asarray(pr.ngram_probs_NxS2) >= 0) and np.all(np.asarray(pr.floor_N) > 0)
        np.testing.assert_allclose(got[mode].sum(1), 1.0, atol=1e-6, err_msg=mode)
        np.testing.assert_allclose(got[mode][exact], want[exact], rtol=2e-6, atol=1e-8, err_msg=mode)
    np.testing.assert_array_equal(got["include_self"], got["leave_one_out"])
    if top_s == vocab:
        assert exact.all()
    assert exact.sum() >= 20, exact.sum()
    if order > 1:  # the own occurrence mattered: the rows moved away from the tables that hold it
        full = np.array([ref.row(s, t, top_s, without_own=False) for s, t in rows])
        assert np.abs(got["leave_one_out"] - full).sum(1).max() > 0.1


@pytest.mark.parametrize("order", [3, 4, 5])
def test_truncated_cases_the_rebuild_decides_exactly(order):
    """Top 2 per context over a tiny vocabulary: the own token kept with count 1 (its slot emptied) and with
    more, and pruned among continuations seen once (distinct - 1 exactly), all equal to the rebuilt tables."""
    rng = np.random.default_rng(77 + order)
    vocab, top_s = 8, 2
    seqs = [rng.integers(0, vocab, int(rng.integers(3, 15))) for _ in range(40)]
    keys = np.arange(len(seqs), dtype=np.int64)
    tables = PriorTables.build(keys, seqs, vocab_size=vocab, order=order, ngram_top_s=top_s)
    ref = Ref(seqs, vocab, order)
    rows = [(s, t) for s in seqs for t in range(len(s))]
    got = tables.dense_ngram(tables.query(keys, seqs, mode="leave_one_out"))
    cases = collections.Counter()
    for i, (s, t) in enumerate(rows):
        if ref.approximated(s, t, top_s):
            continue
        np.testing.assert_allclose(got[i], ref.row(s, t, top_s, without_own=True), rtol=2e-6, atol=1e-8)
        y = int(s[t])
        for c in ref.counters(s, t, False):
            kept = dict(_top(c, top_s))
            cases["kept, count 1" if kept.get(y) == 1 else "kept" if y in kept else "pruned"] += 1
    assert min(cases[k] for k in ("kept, count 1", "kept", "pruned")) >= 5, cases


def test_whole_response_rebuilt_without_it():
    """A response whose contexts do not repeat within it (at any order): leave-one-out on the full tables equals
    the library's own tables built without the response (given the full base), queried as held out."""
    rng = np.random.default_rng(5)
    vocab, order = 30, 4
    keys, seqs = corpus(rng, vocab)
    tables = PriorTables.build(keys, seqs, vocab_size=vocab, order=order, ngram_top_s=vocab)
    checked = 0
    for r, s in enumerate(seqs):
        if len(set(s[:-1].tolist())) < len(s) - 1:  # a context repeated within it (at order 2, so at all)
            continue
        rest = [i for i in range(len(seqs)) if i != r]
        without = PriorTables.build(
            keys[rest], [seqs[i] for i in rest], vocab_size=vocab, order=order, ngram_top_s=vocab
        )
        without.base_V = tables.base_V
        want = without.dense_ngram(without.query(keys[r : r + 1], [s], mode="external"))
        got = tables.dense_ngram(tables.query(keys[r : r + 1], [s], mode="leave_one_out"))
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-8)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("seed", range(3))
def test_base_keeps_the_own_token_within_the_stated_bound(seed):
    """The shared base is not rebuilt: against a reference that rebuilds it too, p_ngram moves by at most
    2 / (num_tokens + distinct - 2) in total variation (docs/METHOD.md)."""
    rng = np.random.default_rng(50 + seed)
    vocab, order = int(rng.integers(8, 40)), 1 + seed
    keys, seqs = corpus(rng, vocab)
    tables = PriorTables.build(keys, seqs, vocab_size=vocab, order=order, ngram_top_s=vocab)
    ref = Ref(seqs, vocab, order)
    got = tables.dense_ngram(tables.query(keys, seqs, mode="leave_one_out"))
    bound = 2.0 / (sum(ref.uni.values()) + len(ref.uni) - 2)
    worst = 0.0
    for i, (s, t) in enumerate((seq, t) for seq in seqs for t in range(len(seq))):
        uni = collections.Counter(ref.uni)
        uni[int(s[t])] -= 1
        rebuilt = ref.row(s, t, vocab, without_own=True, base=ref.base(uni))
        worst = max(worst, 0.5 * np.abs(got[i] - rebuilt).sum())
    assert 0 < worst <= bound * (1 + 1e-4) + 1e-7


@pytest.mark.parametrize("top_s", [1, 3, 64])
def test_external_mode_reads_the_full_tables(top_s):
    """Held-out queries are unchanged: the n-gram as built, against the reference without any leave-one-out."""
    rng = np.random.default_rng(9 + top_s)
    vocab, order = 24, 4
    keys, seqs = corpus(rng, vocab)
    hkeys, hseqs = corpus(rng, vocab)
    tables = PriorTables.build(keys, seqs, vocab_size=vocab, order=order, ngram_top_s=top_s)
    ref = Ref(seqs, vocab, order)
    got = tables.dense_ngram(tables.query(hkeys, hseqs, mode="external"))
    want = np.array([ref.row(s, t, top_s, without_own=False) for s in hseqs for t in range(len(s))])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-8)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
