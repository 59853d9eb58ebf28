"""Prior tables against brute-force Python references, streaming == one-shot, convergence."""

import collections

import numpy as np
import pytest

from proxykd_jax.bayes import PriorBuilder, PriorTables

V = 7


def random_corpus(seed, n_prompts=6, per_prompt=5, vocab=V):
    """Responses over a tiny vocabulary, so prefixes and n-gram contexts are shared often."""
    rng = np.random.default_rng(seed)
    keys, seqs = [], []
    for p in range(n_prompts):
        for _ in range(per_prompt):
            keys.append(1000 + 17 * p)
            seqs.append(rng.integers(0, 3 if rng.random() < 0.5 else vocab, rng.integers(1, 9)))
    return np.array(keys, np.int64), seqs


def exact_reference(keys, seqs):
    table = collections.defaultdict(collections.Counter)
    for k, s in zip(keys, seqs):
        for t, y in enumerate(s):
            table[(int(k), tuple(int(x) for x in s[:t]))][int(y)] += 1
    return table


def to_dense(ids, vals, n, v=V):
    out = np.zeros((n, v))
    np.add.at(out, (np.repeat(np.arange(n), ids.shape[1]), ids.reshape(-1)), vals.reshape(-1))
    return out


@pytest.mark.parametrize("mode", ["include_self", "leave_one_out", "external"])
def test_exact_counts_match_bruteforce(mode):
    keys, seqs = random_corpus(0)
    tables = PriorTables.build(keys, seqs, vocab_size=V, order=3, exact_top_s=V)
    qkeys, qseqs = (keys, seqs) if mode != "external" else random_corpus(1)
    pr = tables.query(qkeys, qseqs, mode=mode)
    ref = exact_reference(keys, seqs)
    want = []
    for k, s in zip(qkeys, qseqs):
        for t, y in enumerate(s):
            c = collections.Counter(ref.get((int(k), tuple(int(x) for x in s[:t])), {}))
            if mode == "leave_one_out":
                c[int(y)] -= 1
            want.append([c[v] for v in range(V)])
    got = to_dense(pr.ids_NxS, pr.counts_NxS, len(want))
    np.testing.assert_array_equal(got, np.array(want, np.float64))


@pytest.mark.parametrize("own_weight", [0.0, 0.3, 0.5, 1.0])
def test_the_own_token_counts_its_weight(own_weight):
    """`posterior.own_token` as a weight: include_self with own_weight w counts each position's own token w
    times (the other responses' counts whole), so w = 1 is include_self and w = 0 is leave_one_out."""
    keys, seqs = random_corpus(2)
    tables = PriorTables.build(keys, seqs, vocab_size=V, order=3, exact_top_s=V)
    pr = tables.query(keys, seqs, mode="include_self", own_weight=own_weight)
    ref = exact_reference(keys, seqs)
    want = []
    for k, s in zip(keys, seqs):
        for t, y in enumerate(s):
            c = collections.Counter(ref.get((int(k), tuple(int(x) for x in s[:t])), {}))
            row = np.array([c[v] for v in range(V)], np.float64)
            row[int(y)] -= 1.0 - own_weight
            want.append(row)
    got = to_dense(pr.ids_NxS, pr.counts_NxS, len(want))
    np.testing.assert_allclose(got, np.array(want), atol=1e-6)
    for mode, w in (("include_self", 1.0), ("leave_one_out", 0.0)):
        if w == own_weight:
            np.testing.assert_array_equal(got, to_dense(*tables.query(keys, seqs, mode=mode)[:2], len(want)))
    with pytest.raises(ValueError, match="own_weight"):
        tables.query(keys, seqs, mode="leave_one_out", own_weight=0.5)


def witten_bell_reference(keys, seqs, order, queries):
    """Interpolated Witten–Bell from Python dicts, base = WB unigram vs uniform."""
    ctx = [collections.defaultdict(collections.Counter) for _ in range(order)]
    uni = collections.Counter()
    for s in seqs:
        padded = [-1] * (order - 1) + [int(x) for x in s]
        for t, y in enumerate(s):
            uni[int(y)] += 1
            for j in range(1, order):
                ctx[j][tuple(padded[t + order - 1 - j : t + order - 1])][int(y)] += 1
    total, distinct = sum(uni.values()), len(uni)
    p = np.array([(uni[v] + distinct / V) / (total + distinct) for v in range(V)])
    out = []
    for s in queries:
        padded = [-1] * (order - 1) + [int(x) for x in s]
        for t in range(len(s)):
            q = p.copy()
            for j in range(1, order):
                c = ctx[j].get(tuple(padded[t + order - 1 - j : t + order - 1]))
                if c:
                    tot, d = sum(c.values()), len(c)
                    q = (np.array([c[v] for v in range(V)]) + d * q) / (tot + d)
            out.append(q)
    return np.array(out)


@pytest.mark.parametrize("order", [1, 2, 4])
def test_ngram_matches_witten_bell_reference(order):
    keys, seqs = random_corpus(2)
    tables = PriorTables.build(keys, seqs, vocab_size=V, order=order, ngram_top_s=V)
    _, queries = random_corpus(3)
    pr = tables.query(np.zeros(len(queries), np.int64), queries, mode="external")
    dense = tables.dense_ngram(pr)
    np.testing.assert_allclose(dense, witten_bell_reference(keys, seqs, order, queries), atol=1e-6)
    np.testing.assert_allclose(dense.sum(1), 1.0, atol=1e-6)


def test_truncation_keeps_a_distribution_and_the_top_entries():
    keys, seqs = random_corpus(4, n_prompts=20)
    full = PriorTables.build(keys, seqs, vocab_size=V, order=3, ngram_top_s=V)
    cut = PriorTables.build(keys, seqs, vocab_size=V, order=3, ngram_top_s=2)
    pf, pc = full.query(keys, seqs, mode="external"), cut.query(keys, seqs, mode="external")  # the tables as built
    assert pc.ngram_ids_NxS2.shape[1] == 2 * 2
    np.testing.assert_allclose(cut.dense_ngram(pc).sum(1), 1.0, atol=1e-6)
    assert np.all(pc.floor_N >= pf.floor_N - 1e-7)
    # The n-gram's largest sparse entry survives truncation at every position.
    np.testing.assert_allclose(pc.ngram_probs_NxS2.max(1), pf.ngram_probs_NxS2.max(1), rtol=1e-6)


def test_streaming_build_equals_one_shot():
    keys, seqs = random_corpus(5, n_prompts=12)
    one = PriorTables.build(keys, seqs, vocab_size=V, order=3)
    b = PriorBuilder(vocab_size=V, order=3, buffer_pairs=7)
    for i in range(0, len(seqs), 4):
        b.add(keys[i : i + 4], seqs[i : i + 4])
    streamed = b.finalize()
    for mode in ("include_self", "leave_one_out"):
        a, c = one.query(keys, seqs, mode=mode), streamed.query(keys, seqs, mode=mode)
        for x, y in zip(a, c):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(one.base_V, streamed.base_V)


def test_trie_converges_to_known_distribution():
    """Many responses to one prompt from a known 2-step process: counts -> the true conditionals."""
    rng = np.random.default_rng(6)
    first = rng.dirichlet(np.ones(V))
    second = rng.dirichlet(np.ones(V), size=V)
    n = 20_000
    y0 = rng.choice(V, n, p=first)
    y1 = np.array([rng.choice(V, p=second[a]) for a in y0])
    seqs = list(np.stack([y0, y1], 1))
    tables = PriorTables.build(np.zeros(n, np.int64), seqs, vocab_size=V, order=2, exact_top_s=V)
    probe = [np.array([a, 0]) for a in range(V)]
    pr = tables.query(np.zeros(V, np.int64), probe, mode="external")
    dense = to_dense(pr.ids_NxS, pr.counts_NxS, 2 * V)
    est_first = dense[0] / dense[0].sum()
    assert 0.5 * np.abs(est_first - first).sum() < 0.02
    for a in range(V):
        row = dense[2 * a + 1]
        assert 0.5 * np.abs(row / row.sum() - second[a]).sum() < 0.06


def test_pruned_singletons_give_the_same_self_counts():
    keys, seqs = random_corpus(7)
    full = PriorTables.build(keys, seqs, vocab_size=V, order=2, exact_top_s=V)
    pruned = PriorTables.build(keys, seqs, vocab_size=V, order=2, exact_top_s=V, exact_min_count=2)
    assert pruned.exact.ctx_keys_C.shape[0] < full.exact.ctx_keys_C.shape[0]
    for mode in ("include_self", "leave_one_out"):
        a, b = full.query(keys, seqs, mode=mode), pruned.query(keys, seqs, mode=mode)
        n = a.floor_N.shape[0]
        np.testing.assert_array_equal(to_dense(a.ids_NxS, a.counts_NxS, n), to_dense(b.ids_NxS, b.counts_NxS, n))
    with pytest.raises(ValueError, match="exact_min_count"):
        pruned.query(keys, seqs, mode="external")


def test_bad_input_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        PriorTables.build([0], [np.array([1, V])], vocab_size=V)
    with pytest.raises(ValueError, match="one prompt key"):
        PriorTables.build([0, 1], [np.array([1, 2])], vocab_size=V)
    tables = PriorTables.build([0], [np.array([1, 2])], vocab_size=V)
    with pytest.raises(ValueError, match="mode"):
        tables.query([0], [np.array([1])], mode="loo")


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 30, 300)
    seqs = [rng.integers(0, 64, rng.integers(2, 12)).astype(np.int32) for _ in range(300)]
    tables = PriorTables.build(keys, seqs, vocab_size=64, order=3, exact_top_s=8, ngram_top_s=8)
    tables.save(tmp_path / "prior")
    loaded = PriorTables.load(tmp_path / "prior")
    for mode in ("include_self", "leave_one_out"):
        for a, b in zip(tables.query(keys[:40], seqs[:40], mode=mode), loaded.query(keys[:40], seqs[:40], mode=mode)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(tables.base_V, loaded.base_V)
    with pytest.raises(FileNotFoundError, match="run the `prior` stage"):
        PriorTables.load(tmp_path / "missing")


@pytest.mark.parametrize("field", ["exact_top_s", "ngram_top_s"])
@pytest.mark.parametrize("value", [0, -2])
def test_table_width_below_one_is_refused_by_name(field, value):
    """A width of 0 built tables whose queries crashed the posterior (IndexError / ZeroDivisionError)."""
    with pytest.raises(ValueError, match=r"exact_top_s and ngram_top_s must be >= 1"):
        PriorTables.build([0], [np.array([1, 2])], vocab_size=V, **{field: value})


def test_tables_count_the_store_rows_after_an_empty_prompt(tmp_path):
    """prompt_len 0: the first token is no target, the store's rows (iter_samples' prompt_lengths) start at the
    second token, and the tables must count those rows (before, they counted tokens[0:], so every exact count
    at an empty prompt's rows was one position off: the first row saw the first token, the others nothing)."""
    from test_data_common import make_tokenizer, tiny_cfg, write_jsonl

    from proxykd_jax.bayes.config import prior_config
    from proxykd_jax.bayes.tables import build_prior
    from proxykd_jax.data import PreparedData, iter_samples, prepare

    tok = make_tokenizer(tmp_path / "tok")
    rows = [
        {
            "id": "empty",
            "prompt": "",
            "responses": ["the quick brown fox", "the quick lazy dog", "the quick brown cat"],
        },
        {"id": "words", "prompt": "a blue sky", "responses": ["the quick brown fox", "birds sang"]},
    ]
    cfg = tiny_cfg(**{"split.warmup": 0.0, "split.align": 0.0, "split.distill": 1.0, "split.heldout": 0.0})
    prepare([write_jsonl(tmp_path / "c.jsonl", rows)], tok, tmp_path / "prep", cfg, progress=False)
    pd = PreparedData(tmp_path / "prep")
    assert sorted(int(r["prompt_len"]) for r in pd.iter_split("distill"))[0] == 0
    key_of = {int(r["sample_id"]): int(r["prompt_key"]) for r in pd.iter_split("distill")}
    keys, seqs = [], []
    for b in iter_samples(pd, "distill", cfg, batch_size=4):
        for i in np.flatnonzero(b["lengths"]):
            start, t = b["prompt_lengths"][i] - 1, b["lengths"][i] - b["prompt_lengths"][i] + 1
            keys.append(key_of[int(b["sample_ids"][i, 0])])
            seqs.append(b["targets"][i, start : start + t].astype(np.int64))
    tables = build_prior(pd, prior_config(), progress=False)
    q = tables.query(np.asarray(keys, np.int64), seqs, mode="external")
    ref = exact_reference(keys, seqs)
    n = sum(len(s) for s in seqs)
    want = np.zeros((n, tables.vocab_size))
    row = 0
    for k, s in zip(keys, seqs):
        for t in range(len(s)):
            for y, c in ref[(int(k), tuple(int(x) for x in s[:t]))].items():
                want[row, y] = c
            row += 1
    np.testing.assert_array_equal(to_dense(q.ids_NxS, q.counts_NxS, n, tables.vocab_size), want)


@pytest.mark.parametrize("buffer_pairs", [1, 7, 50, 10**9])
def test_pair_accumulator_equals_one_reduction_whatever_its_buffer(buffer_pairs):
    """Runs of buffered pairs merged as they fill (geometric sizes) give exactly the one-shot reduction, also when
    `flush` is called midway and pairs are added after it."""
    from proxykd_jax.bayes.counts import PairAccumulator, reduce_pairs

    rng = np.random.default_rng()
    chunks = [
        (rng.integers(0, 40, n).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15), rng.integers(0, 5, n))
        for n in rng.integers(0, 30, 40)
    ]
    acc = PairAccumulator(buffer_pairs)
    for i, (k, nx) in enumerate(chunks):
        acc.add(k, nx)
        if i == 20:
            acc.flush()
            want = reduce_pairs(
                np.concatenate([c[0] for c in chunks[:21]]), np.concatenate([c[1] for c in chunks[:21]])
            )
            assert all(np.array_equal(a, b) for a, b in zip((acc.keys, acc.nexts, acc.counts), want))
    acc.flush()
    want = reduce_pairs(np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))
    assert len(want[0]) > 40 and want[2].max() > 1
    for got, expected in zip((acc.keys, acc.nexts, acc.counts), want):
        np.testing.assert_array_equal(got, expected)
