"""The fast paths of `prepare` for corpora with teacher top log-probs give what the per-field and
per-position code gives: the same alternatives or the same error message, the same probabilities and
masses, the same records; and the garbage collector is left as it was."""

import collections
import gc
import math
import random

import numpy as np
import pytest
from test_data_common import make_rows, make_tokenizer, tiny_cfg, write_jsonl

from proxykd_jax.data import align, corpus, corpus_logprobs, prepare, teacher_positions

_BAD_ENTRIES = ["a", None, 3, ["token", "logprob"]]
_BAD_TOKENS = [3, None, b"x", ["a"]]
_LOGPROBS = [True, 0, -1, "x", None, math.nan, 0.5, 1e-4, 1.5e-4, -math.inf, math.inf, -0.0]
_BYTES = [
    None,
    [],
    [104, 105],
    [True],
    [0],
    [1],
    [0, True, 104],
    [False],
    [256],
    [-1],
    "hi",
    (104,),
    [1.0],
    [104, None],
]


def _random_entries(rng: random.Random) -> list:
    """1-5 alternatives, mostly well formed, some with one field spoiled (or of a dict subclass)."""
    entries = []
    for _ in range(rng.randint(1, 5)):
        text = rng.choice(["a", " dog", "é", "", "bytes:\\xe2"])
        e = {"token": text, "logprob": -rng.random() * 5}
        if rng.random() < 0.5:
            e["bytes"] = list(text.encode())
        what = rng.random()
        if what < 0.05:
            e = rng.choice(_BAD_ENTRIES)
        elif what < 0.1:
            del e[rng.choice(["token", "logprob"])]
        elif what < 0.15:
            e["token"] = rng.choice(_BAD_TOKENS)
        elif what < 0.25:
            e["logprob"] = rng.choice(_LOGPROBS)
        elif what < 0.4:
            e["bytes"] = rng.choice(_BYTES)
        elif what < 0.42:
            e = collections.OrderedDict(e)
        entries.append(e)
    return entries


def _outcome(entries):
    try:
        return corpus_logprobs._alts_of(entries, "c.jsonl:3", "top_logprobs[7]")
    except corpus.DataError as e:
        return type(e), str(e), e.reason


def test_alternatives_and_errors_match_the_per_field_checks(monkeypatch):
    rng = random.Random(0)
    cases = [_random_entries(rng) for _ in range(4000)] + [[], [{"token": "a", "logprob": -1}] * 20]
    fast = [_outcome(c) for c in cases]
    monkeypatch.setattr(corpus_logprobs, "_well_formed_alts", lambda entries: None)
    slow = [_outcome(c) for c in cases]
    assert fast == slow
    assert sum(isinstance(o[0], list) for o in slow) > 500  # both kinds were met
    assert sum(o[0] is corpus.DataError for o in slow) > 500


def test_probabilities_and_masses_match_per_position_numpy():
    rng = np.random.default_rng(0)
    counts = [20] * 30 + list(range(0, 32)) + [127, 128, 129, 300]
    rng.shuffle(counts)
    alts = []
    for k in counts:
        lps = -np.abs(rng.normal(-4, 3, k)) * rng.uniform(0, 3)
        lps[rng.random(k) < 0.05] = -np.inf
        alts.append([(f"t{j}", float(lp)) for j, lp in enumerate(lps)])
    probs, masses = teacher_positions._position_probs(alts)
    for pos, p, mass in zip(alts, probs, masses):
        want = np.exp(np.asarray([lp for _, lp in pos], np.float64))
        assert p == [float(x) for x in want]
        assert mass == float(want.sum())  # numpy's pairwise order, bit for bit


def test_top_keeps_the_first_seen_among_equal_probabilities():
    rng = random.Random(1)
    for _ in range(500):
        merged = {rng.randrange(1000): rng.choice([0.5, 0.25, 0.0, rng.random()]) for _ in range(rng.randint(0, 30))}
        k = rng.randint(1, 25)
        assert align._top(merged, k) == sorted(merged.items(), key=lambda kv: -kv[1])[:k]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_alt_ids_remembered_by_bytes_or_text(tok, monkeypatch):
    monkeypatch.setattr(align, "_ALT_CACHE_MAX", 5)
    enc = align.SampleEncoder(tok, seq_len=64)
    calls = []
    alt_id = enc._alt_id
    monkeypatch.setattr(enc, "_alt_id", lambda text, raw: calls.append((text, raw)) or alt_id(text, raw))
    alts = [(" the", -1.0), (" the", -2.0), ("x", -3.0), ("bytes:\\xe2", -4.0), ("\ufffd", -5.0)]
    raws = [[None, b" the", None, None, b"\xe2"], [None, b"zz", b" the", None, b"\xe2"]]
    for r in raws:
        assert enc._alt_ids(alts, r) == [alt_id(text, raw) for (text, _), raw in zip(alts, r)]
    assert calls == [
        (" the", None),
        (" the", b" the"),
        ("x", None),
        ("bytes:\\xe2", None),
        ("\ufffd", b"\xe2"),
        (" the", b"zz"),
    ]
    assert enc._alt_ids(alts[:1], [None]) == [alt_id(" the", None)] and len(enc._alt_ids_seen) == 1  # forgotten


def _with_bytes(rows, rng):
    """The alternatives with their `bytes` (most of them), as an OpenAI-style API gives them."""
    for row in rows:
        for top in row["top_logprobs"]:
            for pos in top:
                for e in pos:
                    if rng.random() < 0.9:
                        e["bytes"] = list(e["token"].encode())
    return rows


def _files(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("head", ["exact", "bytes"])
def test_records_match_the_per_field_checks(tok, tmp_path, monkeypatch, head):
    rows = _with_bytes(make_rows(20, responses=2, logprobs=True, tokenizer=tok, seed=5), random.Random(2))
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = tiny_cfg(teacher_head=head)
    fast = prepare([path], tok, tmp_path / "fast", cfg, progress=False)
    monkeypatch.setattr(corpus_logprobs, "_well_formed_alts", lambda entries: None)
    slow = prepare([path], tok, tmp_path / "slow", cfg, progress=False)
    assert fast["teacher_logprobs"]["positions_kept"] > 0
    for m in (fast, slow):
        del m["created"], m["seconds"]
    assert fast == slow
    a, b = _files(tmp_path / "fast"), _files(tmp_path / "slow")
    a.pop(next(k for k in a if k.name == "manifest.json"))
    b.pop(next(k for k in b if k.name == "manifest.json"))
    assert a == b


@pytest.mark.parametrize("enabled", [True, False])
def test_prepare_leaves_the_garbage_collector_as_it_was(tok, tmp_path, enabled):
    path = write_jsonl(tmp_path / "c.jsonl", make_rows(6, logprobs=True, tokenizer=tok))
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        prepare([path], tok, tmp_path / "out", tiny_cfg(), progress=False)
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()
