"""Sparse posterior store: round trip per encoding, split invariants, resume, and bad stores."""

import json

import numpy as np
import pytest
from test_data_common import tiny_cfg

from proxykd_jax.data import SPLITS, StoreReader, StoreWriter, assign_split, kl_to_stored, split_fractions
from proxykd_jax.data.store import decode_ids, encode_ids, shard_name


def _entries(rng, n, k, vocab, max_t=12):
    """Random top-k posteriors: sorted log-probs of a softmax over the vocabulary, plus tail."""
    out = {}
    for i in range(n):
        t = int(rng.integers(1, max_t))
        logits = rng.normal(size=(t, vocab)) * 3.0
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        ids = np.argsort(-logp, 1)[:, :k]
        lps = np.take_along_axis(logp, ids, 1)
        tail = 1.0 - np.exp(lps).sum(1)
        if i == 0:  # a row with fewer than k candidates (e.g. a teacher head)
            lps[0, k // 2 :] = -np.inf
            tail[0] = 1.0 - np.exp(lps[0, : k // 2]).sum()
        out[int(rng.integers(0, 2**62))] = (ids, lps.astype(np.float32), tail, float(rng.uniform()))
    return out


@pytest.mark.parametrize(
    "index_dtype,value_dtype,tail_dtype,max_kl",
    [
        ("uint32", "float32", "float32", 1e-12),
        ("uint16", "bfloat16", "float16", 1e-4),
        ("bits", "float16", "float16", 1e-5),
        ("auto", "uint8", "float16", 1e-3),
    ],
)
def test_round_trip(tmp_path, index_dtype, value_dtype, tail_dtype, max_kl):
    rng = np.random.default_rng(0)
    k, vocab = 8, 300
    data = _entries(rng, 40, k, vocab)
    with StoreWriter(
        tmp_path,
        k=k,
        vocab_size=vocab,
        tokenizer_hash="h",
        index_dtype=index_dtype,
        value_dtype=value_dtype,
        tail_dtype=tail_dtype,
        shard_mb=0.002,
    ) as w:
        for sid, (ids, lps, tail, weight) in data.items():
            w.add(sid, ids, lps, tail, weight)
    assert len(list(tmp_path.glob("shard-00000-*.json"))) > 1  # several shards at this size
    assert not list(tmp_path.glob("*.tmp"))
    reader = StoreReader(tmp_path, tokenizer_hash="h", vocab_size=vocab)
    assert len(reader) == 40
    for sid, (ids, lps, tail, weight) in data.items():
        e = reader.get(sid)
        np.testing.assert_array_equal(e.ids_TxK, ids)  # ids are always exact
        np.testing.assert_array_equal(np.isneginf(e.logprobs_TxK), np.isneginf(lps))
        assert e.weight == pytest.approx(weight, rel=1e-6)
        kl = kl_to_stored(lps, tail, e.logprobs_TxK, e.tail_T)
        assert kl.max() <= max_kl, (value_dtype, kl.max())
        if value_dtype == "float32":
            np.testing.assert_array_equal(e.logprobs_TxK, lps)
            np.testing.assert_array_equal(e.tail_T, tail.astype(np.float32))


def test_kl_to_stored_matches_float64_reference():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(6), size=5)
    q = np.clip(p + rng.normal(scale=0.01, size=p.shape), 1e-6, None)
    q /= q.sum(1, keepdims=True)
    want = (p * np.log(p / q)).sum(1)
    got = kl_to_stored(np.log(p[:, :5]), p[:, 5], np.log(q[:, :5]), q[:, 5])
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert np.all(got > 0)


@pytest.mark.parametrize("vocab", [2, 300, 2**17 + 5, 2**20])
def test_bit_packing_is_exact(vocab):
    rng = np.random.default_rng(vocab)
    ids = rng.integers(0, vocab, size=(7, 5))
    bits = int(np.ceil(np.log2(vocab)))
    raw = encode_ids(ids, "bits", bits)
    assert raw.shape == (7, -(-5 * bits // 8))
    np.testing.assert_array_equal(decode_ids(raw, "bits", bits, 5), ids)


def test_writer_resumes_after_finished_shards(tmp_path):
    rng = np.random.default_rng(2)
    data = _entries(rng, 20, 4, 50)
    items = list(data.items())
    w = StoreWriter(tmp_path, k=4, vocab_size=50, tokenizer_hash="h", host=3, shard_mb=0.0005)
    for sid, (ids, lps, tail, weight) in items[:10]:
        w.add(sid, ids, lps, tail, weight)
    # killed here: the unfinished shard was never written
    done = set(StoreWriter(tmp_path, k=4, vocab_size=50, tokenizer_hash="h", host=3).finished_sample_ids().tolist())
    assert done and done < {sid for sid, _ in items[:10]}
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    w2 = StoreWriter(tmp_path, k=4, vocab_size=50, tokenizer_hash="h", host=3, shard_mb=0.0005)
    for sid, (ids, lps, tail, weight) in items:
        if sid not in done:
            w2.add(sid, ids, lps, tail, weight)
    w2.close()
    assert all((tmp_path / n).read_bytes() == b for n, b in before.items())  # nothing rewritten
    reader = StoreReader(tmp_path)
    assert sorted(reader.sample_ids.tolist()) == sorted(data)
    with pytest.raises(ValueError, match="vocab_size"):
        StoreWriter(tmp_path, k=4, vocab_size=51, tokenizer_hash="h", host=3)


def test_bad_stores_are_refused(tmp_path):
    rng = np.random.default_rng(3)
    data = _entries(rng, 6, 4, 50)
    with StoreWriter(tmp_path, k=4, vocab_size=50, tokenizer_hash="h") as w:
        for sid, (ids, lps, tail, weight) in data.items():
            w.add(sid, ids, lps, tail, weight)
    with pytest.raises(ValueError, match="tokenizer_hash"):
        StoreReader(tmp_path, tokenizer_hash="other")
    with pytest.raises(ValueError, match="vocab_size"):
        StoreReader(tmp_path, vocab_size=64)
    reader = StoreReader(tmp_path)
    with pytest.raises(KeyError, match="no store entry for sample id 7"):
        reader.get(7)
    assert reader.missing([7, next(iter(data))]).tolist() == [7]
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        StoreWriter(tmp_path / "x", k=4, vocab_size=50, tokenizer_hash="h").add(
            1, np.full((2, 4), 50), np.zeros((2, 4)), np.zeros(2)
        )
    shard = next(tmp_path.glob("shard-*.bin"))
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{shard.name}: sha256 checksum"):
        StoreReader(tmp_path)


def test_split_invariants():
    fr = split_fractions(tiny_cfg().split)
    ids = [f"prompt-{i}" for i in range(4000)]
    got = [assign_split(i, fr, "s") for i in ids]
    for name in SPLITS:  # fractions hold within 4 binomial standard deviations
        share = got.count(name) / len(ids)
        assert abs(share - fr[name]) < 4 * np.sqrt(fr[name] * (1 - fr[name]) / len(ids)), name
    more = ids + [f"new-{i}" for i in range(500)]  # adding prompts never moves existing ones
    assert [assign_split(i, fr, "s") for i in more[:4000]] == got
    assert [assign_split(i, fr, "t") for i in ids] != got  # the salt redraws the split
    zero = dict(fr, heldout=0.0, distill=fr["distill"] + fr["heldout"])
    assert "heldout" not in {assign_split(i, zero, "s") for i in ids}
    with pytest.raises(ValueError, match="sum to 1"):
        split_fractions(dict(fr, warmup=0.5))


def test_prepared_splits_keep_prompts_together(tmp_path):
    from test_data_common import make_rows, make_tokenizer, write_jsonl

    from proxykd_jax.data import PreparedData, prepare

    tok = make_tokenizer(tmp_path / "tok")
    rows = make_rows(60, responses=3)
    prepare([write_jsonl(tmp_path / "a.jsonl", rows)], tok, tmp_path / "a", tiny_cfg(), progress=False)
    prepare(
        [write_jsonl(tmp_path / "b.jsonl", rows + make_rows(30, seed=9))],
        tok,
        tmp_path / "b",
        tiny_cfg(),
        progress=False,
    )
    where = {}
    for name in ("a", "b"):
        pd = PreparedData(tmp_path / name)
        json.dumps(pd.manifest)
        for split in SPLITS:
            for r in pd.iter_split(split):
                where.setdefault(name, {}).setdefault(r["record_id"], set()).add(split)
            ids = np.load(tmp_path / name / split / "sample_ids.npy")
            assert len(ids) == pd.num_samples(split)
            np.testing.assert_array_equal(pd.sample_ids(split), ids)  # as the manifest's checksum says
        assert sorted(pd.manifest["checksums"]) == sorted(f"{split}/sample_ids.npy" for split in SPLITS)
    assert all(len(s) == 1 for s in where["a"].values())  # all responses of a prompt together
    assert all(where["b"][rid] == s for rid, s in where["a"].items())  # stable under additions


@pytest.mark.parametrize("deleted", [(".json", ".bin"), (".json",)])  # the whole shard, or only its manifest
def test_resumed_writer_never_reuses_a_shard_name(tmp_path, deleted):
    rng = np.random.default_rng(5)
    data = _entries(rng, 3, 4, 50)
    w = StoreWriter(tmp_path, k=4, vocab_size=50, tokenizer_hash="h")
    for sid, (ids, lps, tail, weight) in data.items():
        w.add(sid, ids, lps, tail, weight)
        w.flush()  # one shard per sample: shard-00000-00000/1/2
    lost = list(data)[1]
    for ext in deleted:  # as "delete the duplicate shard" (or a kill between data file and manifest) leaves it
        (tmp_path / (shard_name(0, 1) + ext)).unlink()
    kept = {p.name: p.read_bytes() for p in tmp_path.glob("shard-*.json")}
    w2 = StoreWriter(tmp_path, k=4, vocab_size=50, tokenizer_hash="h")
    assert set(w2.finished_sample_ids().tolist()) == set(data) - {lost}
    w2.add(lost, *data[lost])
    w2.close()
    assert all((tmp_path / n).read_bytes() == b for n, b in kept.items())  # no finished shard overwritten
    assert sorted(StoreReader(tmp_path).sample_ids.tolist()) == sorted(data)
    assert not (tmp_path / (shard_name(0, 1) + ".bin")).exists()  # the orphan data file is gone


def test_split_fractions_refuse_nan():
    """NaN compares False both ways: it must not pass the checks and send every prompt to the last split."""
    with pytest.raises(ValueError, match="sum to 1"):
        split_fractions(dict(split_fractions(tiny_cfg().split), warmup=float("nan")))
