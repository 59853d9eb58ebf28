"""Corpus formats, tokenisation, teacher log-prob alignment, the `prepare` stage and bad input."""

import gzip
import json
import random

import numpy as np
import pytest
from test_data_common import make_rows, make_tokenizer, teacher_logprobs, tiny_cfg, write_jsonl

from proxykd_jax.data import DataError, PreparedData, prepare


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _all(out):
    pd = PreparedData(out)
    return pd, [r for s in pd.manifest["splits"] for r in pd.iter_split(s)]


def test_jsonl_prepare_records_and_manifest(tok, tmp_path):
    rows = make_rows(30, responses=3)
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    m = prepare([path], tok, tmp_path / "out", tiny_cfg(), progress=False)
    pd, recs = _all(tmp_path / "out")
    assert m["counts"]["samples"] == 90 and len(recs) == 90 and m["counts"]["skipped_total"] == 0
    assert sum(s["samples"] for s in m["splits"].values()) == 90
    assert sum(s["prompts"] for s in m["splits"].values()) == 30
    assert pd.tokenizer_hash == m["tokenizer"]["hash"] and m["tokenizer"]["eos_id"] == tok.eos_token_id
    by_id = {(r["record_id"], r["response_index"]): r for r in recs}
    for row in rows:
        for i, resp in enumerate(row["responses"]):
            r = by_id[(row["id"], i)]
            p_ids = tok(row["prompt"])["input_ids"]
            r_ids = tok(resp, add_special_tokens=False)["input_ids"]
            np.testing.assert_array_equal(r["tokens"], p_ids + r_ids + [tok.eos_token_id])
            assert r["prompt_len"] == len(p_ids)
            np.testing.assert_array_equal(r["loss_mask"], np.arange(len(r["tokens"])) >= len(p_ids))
            assert r["meta"]["teacher_model"] == "tiny"
    assert len({r["sample_id"] for r in recs}) == 90
    assert len({r["prompt_key"] for r in recs}) == 30
    # records roll over into several files at records_per_file=40
    assert sum(len(s["files"]) for s in m["splits"].values()) >= 3


def test_parquet_gzip_and_datasets_folder_match_jsonl(tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_rows(12, responses=2, seed=3)
    flat = [dict(r, meta=json.dumps(r["meta"])) for r in rows]
    for r in flat:
        r.pop("meta")
    ref = prepare([write_jsonl(tmp_path / "c.jsonl", flat)], tok, tmp_path / "a", tiny_cfg(), progress=False)
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "c.parquet")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in flat)
    datasets.Dataset.from_list(flat).save_to_disk(str(tmp_path / "hf"))
    ref_recs = sorted((r["sample_id"], r["tokens"].tolist()) for r in _all(tmp_path / "a")[1])
    for i, src in enumerate([tmp_path / "c.parquet", tmp_path / "c.jsonl.gz", tmp_path / "hf"]):
        m = prepare([src], tok, tmp_path / f"o{i}", tiny_cfg(), progress=False)
        recs = sorted((r["sample_id"], r["tokens"].tolist()) for r in _all(tmp_path / f"o{i}")[1])
        assert recs == ref_recs, src
        assert {k: v["samples"] for k, v in m["splits"].items()} == {k: v["samples"] for k, v in ref["splits"].items()}


def test_chat_messages_use_the_chat_template(tok, tmp_path):
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}]
        rows = [
            {"id": "a", "messages": msgs, "response": "the dog sat"},
            {"id": "b", "messages": msgs + [{"role": "assistant", "content": "a cat ran"}]},
        ]
        prepare([write_jsonl(tmp_path / "c.jsonl", rows)], tok, tmp_path / "o", tiny_cfg(), progress=False)
        recs = {r["record_id"]: r for r in _all(tmp_path / "o")[1]}
        prompt = tok("<system>be brief<user>the fox<assistant>", add_special_tokens=False)["input_ids"]
        for rid, resp in (("a", "the dog sat"), ("b", "a cat ran")):
            want = prompt + tok(resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            np.testing.assert_array_equal(recs[rid]["tokens"], want)
            assert recs[rid]["prompt_len"] == len(prompt)
    finally:
        tok.chat_template = None


def test_teacher_logprobs_aligned_by_character_span(tok, tmp_path):
    rng = random.Random(1)
    rows = make_rows(20, responses=2, seed=1, logprobs=True, tokenizer=tok)
    # one response also given in the OpenAI `logprobs.content` layout, without `tokens`
    text = rows[0]["responses"][0]
    pieces, top = teacher_logprobs(tok, text, rng)
    rows.append(
        {
            "id": "openai",
            "prompt": "the fox",
            "response": text,
            "logprobs": {
                "content": [{"token": p, "logprob": t[0]["logprob"], "top_logprobs": t} for p, t in zip(pieces, top)]
            },
        }
    )
    # The teacher's word chunks are not our BPE tokens: `auto` picks the first-byte rule
    # (tests/test_xtok_prepare.py); the span rule is asked for by name.
    m = prepare(
        [write_jsonl(tmp_path / "c.jsonl", rows)],
        tok,
        tmp_path / "o",
        tiny_cfg(teacher_topk=4, teacher_head="exact"),
        progress=False,
    )
    assert m["teacher_head"] == "exact" and m["teacher_head_decision"] == {"source": "config"}
    recs = _all(tmp_path / "o")[1]
    total = kept = 0
    mass_total = mass_kept = 0.0
    for r in recs:
        lp = r["teacher_topk_logprobs"]
        assert lp.shape == (len(r["tokens"]), 4)
        assert np.all(np.isneginf(lp[: r["prompt_len"]]))  # prompt rows never carry teacher values
        assert np.all(np.isneginf(lp[-1]))  # the eos row: no teacher token there
    # independent recount: a teacher word-piece is kept iff our BPE makes it exactly one token
    for row in rows[:-1]:
        for resp, toks, top in zip(row["responses"], row["tokens"], row["top_logprobs"]):
            ours = tok(resp, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            spans, c = [], 0
            for t in toks:
                spans.append((c, c + len(t)))
                c += len(t)
            for span, alts in zip(spans, top):
                total += 1
                mass_total += sum(np.exp(a["logprob"]) for a in alts)
                if [tuple(o) for o in ours].count(span) == 1:
                    kept += 1
                    mass_kept += sum(
                        np.exp(a["logprob"])
                        for a in alts
                        if len(tok(a["token"], add_special_tokens=False)["input_ids"]) == 1
                    )
    tl = m["teacher_logprobs"]
    extra = len(pieces)
    assert tl["positions_total"] == total + extra
    assert 0 < tl["positions_kept"] - kept <= extra
    assert 0.2 < tl["position_fraction"] < 1.0 and 0.0 < tl["mass_fraction"] < 1.0
    assert mass_kept / mass_total == pytest.approx(tl["mass_fraction"], abs=0.05)
    # a kept row's top id is our token at that position whenever the sampled word was the best guess
    r = next(r for r in recs if r["record_id"] == rows[1]["id"] and r["response_index"] == 0)
    row_ids = np.flatnonzero(np.isfinite(r["teacher_topk_logprobs"][:, 0]))
    assert len(row_ids) > 0 and np.all(row_ids >= r["prompt_len"])
    for i in row_ids:  # every kept row lists our token at i among its alternatives (it was sampled)
        assert r["tokens"][i] in r["teacher_topk_ids"][i][np.isfinite(r["teacher_topk_logprobs"][i])]
        assert np.all(np.diff(r["teacher_topk_logprobs"][i][np.isfinite(r["teacher_topk_logprobs"][i])]) <= 0)


@pytest.mark.parametrize(
    "line,reason,needle",
    [
        ("{not json", "malformed_json", ":3: malformed JSON"),
        ('{"id": "", "prompt": "x", "response": "the dog"}', "bad_field", "field 'id' is empty"),
        ('{"id": "z", "response": "the dog"}', "missing_field", "missing field 'prompt'"),
        ('{"id": "z", "prompt": "x"}', "missing_field", "missing field 'response'"),
        ('{"id": "z", "prompt": "x", "response": "  "}', "empty_response", "empty response"),
        ('{"id": "z", "prompt": "x", "response": "' + "the dog " * 60 + '"}', "too_long", "seq_len"),
        ('{"id": "p0-0", "prompt": "x", "response": "the dog"}', "duplicate_id", "duplicate sample"),
    ],
)
def test_bad_rows_error_or_skip(tok, tmp_path, line, reason, needle):
    path = write_jsonl(tmp_path / "c.jsonl", make_rows(2, responses=1), extra_lines=[line])
    with pytest.raises(DataError, match=needle) as e:
        prepare([path], tok, tmp_path / "o", tiny_cfg(), progress=False)
    assert str(path) in str(e.value)
    assert not (tmp_path / "o").exists() and len(list(tmp_path.iterdir())) == 1  # nothing left behind
    m = prepare([path], tok, tmp_path / "o", tiny_cfg(on_error="skip"), progress=False)
    assert m["counts"]["skipped"] == {reason: 1} and m["counts"]["samples"] == 2
    assert needle.split(":")[-1].strip() in m["counts"]["errors"][0]


def test_truncation_is_counted_and_ends_without_an_eos(tok, tmp_path):
    """A response cut to fit data.seq_len gets no eos target: its teacher went on writing."""
    rows = [{"id": "long", "prompt": "the fox", "response": "the dog sat " * 40}]
    m = prepare([write_jsonl(tmp_path / "c.jsonl", rows)], tok, tmp_path / "o", tiny_cfg(truncate=True), progress=False)
    rec = _all(tmp_path / "o")[1][0]
    assert m["counts"]["truncated"] == 1 and len(rec["tokens"]) == 65
    assert tok.eos_token_id not in rec["tokens"].tolist()


def test_eos_only_where_the_teacher_stopped(tok, tmp_path):
    """A response the API cut at max_tokens (finish_reason "length", as collect records it) ends
    without an eos; one the teacher stopped (or that says nothing) ends with one."""
    rows = [
        {"id": f"p{i}", "prompt": "the fox", "response": "the dog sat", "meta": meta}
        for i, meta in enumerate([{"finish_reason": "length"}, {"finish_reason": "stop"}, {}])
    ]
    prepare([write_jsonl(tmp_path / "c.jsonl", rows)], tok, tmp_path / "o", tiny_cfg(), progress=False)
    recs = _all(tmp_path / "o")[1]
    assert sorted(r["tokens"][-1] == tok.eos_token_id for r in recs) == [False, True, True]
    assert sorted(len(r["tokens"]) for r in recs)[0] == sorted(len(r["tokens"]) for r in recs)[1] - 1


def test_existing_output_is_refused_then_overwritten(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_rows(4))
    prepare([path], tok, tmp_path / "o", tiny_cfg(), progress=False)
    before = (tmp_path / "o" / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare([path], tok, tmp_path / "o", tiny_cfg(), progress=False)
    assert (tmp_path / "o" / "manifest.json").read_text() == before
    write_jsonl(tmp_path / "c.jsonl", make_rows(6))
    m = prepare([path], tok, tmp_path / "o", tiny_cfg(), overwrite=True, progress=False)
    assert m["counts"]["samples"] == 12 and len(_all(tmp_path / "o")[1]) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "o"]


def test_prepare_memory_is_bounded_by_the_buffer(tok, tmp_path):
    """Peak Python memory is set by data.prepare_buffer_mb; only 8-byte id lists grow with the corpus."""
    import tracemalloc

    rows = make_rows(1800, responses=2, seed=5, words=(20, 30))
    prepare(
        [write_jsonl(tmp_path / "w.jsonl", rows[:20])], tok, tmp_path / "w", tiny_cfg(seq_len=128), progress=False
    )  # imports and caches out of the way
    peaks, sizes = [], []
    for n in (600, 1800):
        path = write_jsonl(tmp_path / f"c{n}.jsonl", rows[:n])
        sizes.append(path.stat().st_size)
        tracemalloc.start()
        prepare([path], tok, tmp_path / f"o{n}", tiny_cfg(prepare_buffer_mb=0.02, seq_len=128), progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    added_samples = 2 * (1800 - 600)
    assert peaks[1] - peaks[0] < 40 * added_samples, (sizes, peaks)  # ids only, not text or tokens
    assert peaks[1] < 6e5 + 2 * 0.02 * 2**20, (sizes, peaks)  # fixed overhead + about the buffer


def test_word_tokenizer_keeps_teacher_head_with_leading_space_pieces(tmp_path):
    """OpenAI-style pieces carry their separator (" dog"); a word-level tokenizer's offsets do not."""
    from proxykd_jax.models.tokenizer import build_word_tokenizer

    words = [f"w{i}" for i in range(40)]
    wtok = build_word_tokenizer(words, tmp_path / "wtok")
    rng = np.random.default_rng(3)
    rows = []
    for i in range(6):
        resp = [words[j] for j in rng.integers(0, 40, 5)]
        pieces = [resp[0]] + [" " + w for w in resp[1:]]
        top = []
        for p in pieces:
            others = [w for w in rng.permutation(words)[:4] if w != p.strip()][:3]
            alts = [p] + [(" " if p.startswith(" ") else "") + w for w in others]
            lps = np.log(rng.dirichlet(np.ones(len(alts))) * 0.9)
            top.append([{"token": t, "logprob": float(lp)} for t, lp in zip(alts, lps)])
        rows.append(
            {"id": f"q{i}", "prompt": "w1 w2", "response": " ".join(resp), "tokens": pieces, "top_logprobs": top}
        )
    m = prepare([write_jsonl(tmp_path / "c.jsonl", rows)], wtok, tmp_path / "out", tiny_cfg(), progress=False)
    assert m["teacher_logprobs"]["position_fraction"] == 1.0
    _, recs = _all(tmp_path / "out")
    for rec in recs:
        row = rows[int(rec["record_id"][1:])]
        p = int(rec["prompt_len"])
        for t, alts in enumerate(row["top_logprobs"]):
            want = {wtok.convert_tokens_to_ids(a["token"].strip()): a["logprob"] for a in alts}
            got = {
                int(i): float(lp)
                for i, lp in zip(rec["teacher_topk_ids"][p + t], rec["teacher_topk_logprobs"][p + t])
                if np.isfinite(lp)
            }
            assert set(got) == set(want)
            for i, lp in got.items():
                assert abs(lp - want[i]) < 1e-5


def _cafe_row(spell):
    """'café au lait' as a byte-level teacher sends it: é split over two tokens of one byte each."""
    pieces = [b"caf", b"\xc3", b"\xa9", b" au", b" lait"]
    top = [
        [{"token": spell(p), "logprob": -0.1, "bytes": list(p)}, {"token": spell(b"\xc3\xa8"), "logprob": -3.0}]
        for p in pieces
    ]
    top[1][1] = {"token": "\ufffd", "logprob": -3.0, "bytes": [0xC3]}  # a partial alternative: only its bytes say
    return {
        "id": "p0",
        "prompt": "the fox",
        "response": "café au lait",
        "tokens": [spell(p) for p in pieces],
        "token_bytes": [list(p) for p in pieces],
        "top_logprobs": top,
    }


def _replacement(raw: bytes) -> str:  # vLLM: U+FFFD for a token that is not whole UTF-8
    return raw.decode("utf-8", errors="replace")


def _bytes_spelled(raw: bytes) -> str:  # OpenAI: `bytes:\xNN` for a token that is not whole UTF-8
    from proxykd_jax.teacher.responses import bytes_token

    return bytes_token(raw)


@pytest.mark.parametrize("drop", [(), ("tokens",), ("tokens", "token_bytes")])  # the last: alternatives' bytes
def test_token_bytes_place_replacement_character_tokens(tok, tmp_path, drop):
    """`token_bytes` and per-alternative `bytes` are used: a row whose partial-UTF-8 tokens are spelled
    as U+FFFD keeps the same teacher positions and heads as the same row spelled `bytes:\\xNN`."""
    heads = {}
    for name, spell in (("repl", _replacement), ("spelled", _bytes_spelled)):
        row = _cafe_row(spell)
        for key in drop:
            del row[key]
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
        m = prepare([path], tok, tmp_path / name, tiny_cfg(teacher_head="bytes"), progress=False)
        assert m["teacher_logprobs"]["positions_total"] == 5
        rec = _all(tmp_path / name)[1][0]
        heads[name] = (m["teacher_logprobs"], rec["teacher_topk_ids"], rec["teacher_topk_logprobs"])
    assert heads["repl"][0]["positions_kept"] == heads["spelled"][0]["positions_kept"] == 5
    np.testing.assert_array_equal(heads["repl"][1], heads["spelled"][1])
    np.testing.assert_array_equal(heads["repl"][2], heads["spelled"][2])


def _euro_row(tok, spell):
    """'the dog 5€ sat' from a teacher that tokenises like us, (row, our ids, [(sampled, runner-up)]
    per position): € is three one-byte tokens, each spelled by `spell` (vLLM: U+FFFD); the runner-up
    is another of our tokens, a partial one (also U+FFFD) where the sampled token is partial."""
    from proxykd_jax.data import byte_head

    table = byte_head.token_bytes(tok)
    ids = tok("the dog 5€ sat", add_special_tokens=False)["input_ids"]
    heads = [(t, table.index(b"\xc3") if table[t][0] >= 0x80 else table.index(b" mat")) for t in ids]
    row = {
        "id": "p0",
        "prompt": "the fox",
        "response": "the dog 5€ sat",
        "tokens": [spell(table[t]) for t in ids],
        "token_bytes": [list(table[t]) for t in ids],
        "top_logprobs": [
            [{"token": spell(table[t]), "logprob": lp, "bytes": list(table[t])} for t, lp in zip(pair, (-0.1, -3.0))]
            for pair in heads
        ],
    }
    return row, ids, heads


@pytest.mark.parametrize("spell", [_replacement, _bytes_spelled])
@pytest.mark.parametrize("drop", [(), ("tokens",), ("tokens", "token_bytes")])  # the last: alternatives' bytes
def test_token_bytes_place_replacement_character_tokens_exact_head(tok, tmp_path, spell, drop):
    """The span rule places teacher tokens and maps their alternatives by their bytes: a same-tokenizer
    row whose one-byte tokens of € are spelled U+FFFD (or `bytes:\\xNN`) keeps all 10 positions, each
    with our token and its runner-up as the head (by their strings: 5, stopping at the first)."""
    row, ids, heads = _euro_row(tok, spell)
    assert len(ids) == 10 and [_replacement(bytes(b)) for b in row["token_bytes"]].count("\ufffd") == 3
    for key in drop:
        del row[key]
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    m = prepare([path], tok, tmp_path / "out", tiny_cfg(teacher_head="exact"), progress=False)
    tl = m["teacher_logprobs"]
    assert tl["positions_total"] == tl["positions_kept"] == 10 and tl["student_position_fraction"] == 1.0
    assert tl["mass_fraction"] == pytest.approx(1.0)
    rec = _all(tmp_path / "out")[1][0]
    p = int(rec["prompt_len"])
    np.testing.assert_array_equal(rec["tokens"][p : p + 10], ids)
    for j, pair in enumerate(heads):
        assert rec["teacher_topk_ids"][p + j][:2].tolist() == list(pair), j
        np.testing.assert_allclose(rec["teacher_topk_logprobs"][p + j][:2], [-0.1, -3.0], rtol=1e-6)
        assert np.all(np.isneginf(rec["teacher_topk_logprobs"][p + j][2:]))
