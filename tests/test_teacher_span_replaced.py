"""Teacher tokens spelled with replacement characters (U+FFFD) for part of a character that the text holds whole,
their bytes not given (vLLM's legacy completions layout writes "\\ufffd" for a byte-level token of an emoji's first
bytes and sends no `bytes`; `collect` then stores the string's UTF-8 as `token_bytes`): data/teacher_positions.py
reads each such token as the text's bytes that give its string decoded on their own, and the span chain goes on
after them (it stopped at the first one: every later position of the answer lost its log-probs).

The reference: every reading of the whole answer in which each teacher token is a stretch of the text whose bytes,
decoded on their own, are its string; a token's span is the one all of them give it, else none (docs/DATA_FORMATS.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_xtok_fuzz import random_text, tokenizers_pair

from proxykd_jax.data import align, byte_head, teacher_positions
from proxykd_jax.data.corpus import Sample, samples_of_row
from proxykd_jax.teacher.responses import parse_answer

LAYOUTS = ["tokens", "collected", "no_tokens"]  # flat `tokens`; as `collect` stores a legacy answer; alternatives only


def _spell(raw: bytes) -> str:
    """vLLM's string of a token: its bytes decoded on their own, U+FFFD for each maximal invalid subpart."""
    return raw.decode("utf-8", errors="replace")


def _answer(rng: np.random.Generator, teacher) -> tuple[str, list[bytes]]:
    """A random answer (words, CJK, emoji, ...) that the teacher's tokens split inside a character: (text, the
    true bytes of each of its tokens)."""
    table = byte_head.token_bytes(teacher)
    while True:
        text = random_text(rng, int(rng.integers(4, 16)))
        raws = [table[i] for i in teacher(text, add_special_tokens=False)["input_ids"]]
        if any("\ufffd" in _spell(r) for r in raws):
            return text, raws


def _row(rng: np.random.Generator, teacher, text: str, raws: list[bytes], layout: str) -> dict:
    """The corpus row of the answer: each position's alternatives the sampled token's string and up to 3 teacher
    tokens found nowhere in the text (so that only the sampled one may be read there), random log-probs."""
    table, resp = byte_head.token_bytes(teacher), text.encode()
    others = sorted({_spell(b) for b in table if b and "\ufffd" not in _spell(b) and b not in resp})
    names, tops = [_spell(r) for r in raws], []
    for name in names:
        alts = [name] + rng.choice(others, size=int(rng.integers(0, 4)), replace=False).tolist()
        tops.append(dict(zip(alts, np.log(rng.dirichlet(np.ones(len(alts) + 1))[:-1]).tolist())))
    row = {"id": "p", "prompt": "q", "response": text, "finish_reason": "length"}
    if layout == "collected":  # a legacy completions body through `collect`'s parser
        body = {
            "choices": [{"text": text, "finish_reason": "length", "logprobs": {"tokens": names, "top_logprobs": tops}}]
        }
        answer = parse_answer(json.dumps(body).encode(), "completions", True)
        assert answer.logprobs["token_bytes"] == [list(n.encode()) for n in names]  # the strings' bytes, not the true
        return row | answer.logprobs
    return row | {"top_logprobs": tops} | ({"tokens": names} if layout == "tokens" else {})


def reference_spans(text: str, names: list[str]) -> list[tuple[int, int] | None]:
    """Each token's span on every reading of the whole text (token k: any stretch whose bytes decoded on their
    own are `names[k]`), where all readings agree; else None. (Forward and backward sets of where a token may
    start, then the spans on both.)"""
    resp, n = text.encode(), len(names)
    fits = [{} for _ in names]  # fits[k][a]: the ends of token k read from byte a
    starts = [{0}]
    for k, name in enumerate(names):
        for a in starts[k]:
            fits[k][a] = [e for e in range(a + 1, len(resp) + 1) if _spell(resp[a:e]) == name]
        starts.append({e for ends in fits[k].values() for e in ends})
    assert len(resp) in starts[n], "the tokens do not spell the text"
    good = {len(resp)}
    out = []
    for k in range(n - 1, -1, -1):
        pairs = {(a, e) for a, ends in fits[k].items() for e in ends if e in good}
        out.append(next(iter(pairs)) if len(pairs) == 1 else None)
        good = {a for a, _ in pairs}
    return out[::-1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tokens_spelled_as_replacement_characters_keep_their_places(layout):
    """Random answers of a byte-level teacher whose vocabulary splits emoji and CJK: every span is the reference's,
    and the positions after the first split character are placed (the chain used to stop there)."""
    _, teacher = tokenizers_pair()
    rng = np.random.default_rng()
    for _ in range(12):
        text, raws = _answer(rng, teacher)
        (s,) = samples_of_row(_row(rng, teacher, text, raws, layout), "t.jsonl:1")
        names = [_spell(r) for r in raws]
        want = reference_spans(text, names)
        first = next(k for k, name in enumerate(names) if "\ufffd" in name)
        assert any(span is not None for span in want[first + 1 :]) or first == len(names) - 1
        assert teacher_positions._teacher_byte_spans(s) == want, (text, raws)


@pytest.mark.parametrize("head", align.HEADS)
def test_heads_are_those_of_the_same_answer_with_its_token_bytes(head):
    """Where the reference places every token, the rows `prepare` writes for an answer with only its tokens' strings
    (`collect`'s row of a legacy answer) are those of the same answer with its tokens' true bytes (the chat layout),
    heads and counts: the teacher's tokenizer is ours, so the `exact` head keeps every position of both."""
    _, teacher = tokenizers_pair()
    enc = align.SampleEncoder(teacher, seq_len=512, head=head, add_eos=False)
    rng = np.random.default_rng()
    compared = 0
    while compared < 4:
        text, raws = _answer(rng, teacher)
        row = _row(rng, teacher, text, raws, "collected")
        if None in reference_spans(text, row["tokens"]):
            continue  # readings that differ: those tokens get no head (the next test)
        exact = row | {"token_bytes": [list(r) for r in raws]}
        got, want = enc.encode_batch([samples_of_row(r, "t.jsonl:1")[0] for r in (row, exact)])
        np.testing.assert_array_equal(got.tokens_L, want.tokens_L)
        np.testing.assert_array_equal(got.teacher_topk_ids_LxK, want.teacher_topk_ids_LxK)
        np.testing.assert_array_equal(got.teacher_topk_logprobs_LxK, want.teacher_topk_logprobs_LxK)
        assert got.stats == want.stats
        assert head == "bytes" or got.stats.positions_kept == len(raws)
        compared += 1


def _sample(text: str, alts: list[list[str]], tokens: bool) -> Sample:
    """A sample whose positions list the strings `alts` (the first the sampled one), random log-probs."""
    rng = np.random.default_rng()
    lps = [np.log(rng.dirichlet(np.ones(len(a) + 1))[:-1]).tolist() for a in alts]
    pos = [list(zip(a, lp)) for a, lp in zip(alts, lps)]
    return Sample("t:1", "p", 0, "q", None, text, [a[0] for a in alts] if tokens else None, pos, {})


@pytest.mark.parametrize("tokens", [True, False])
def test_tokens_that_readings_place_two_ways_get_no_span_and_the_chain_goes_on(tokens):
    """ "中😀 ok then" as e4b8 | adf09f | 98 | 80 | " ok" | " then": e4 | b8adf0 | 9f98 | 80 spells the same strings,
    so the first three tokens have no span, the fourth and those after keep theirs."""
    raws = [b"\xe4\xb8", b"\xad\xf0\x9f", b"\x98", b"\x80", b" ok", b" then"]
    text = b"".join(raws).decode()
    assert text == "中😀 ok then"
    s = _sample(text, [[_spell(r), " zz"] for r in raws], tokens)
    want = [None, None, None, (6, 7), (7, 10), (10, 15)]
    assert reference_spans(text, [_spell(r) for r in raws]) == want
    assert teacher_positions._teacher_byte_spans(s) == want


def test_without_tokens_a_chain_that_stops_short_keeps_no_reading_inside_a_character():
    """Without `tokens` the sampled "é" is not among its position's alternatives, "\\ufffd" ones are: they read its
    two bytes, but the chain stops at the next token, so nothing proves them; only "ab" keeps its span."""
    s = _sample("abé cd", [["ab", "x"], ["\ufffd", "x"], ["\ufffd", "zz"], [" ef", "q"]], tokens=False)
    assert teacher_positions._teacher_byte_spans(s) == [(0, 2), None, None, None]
