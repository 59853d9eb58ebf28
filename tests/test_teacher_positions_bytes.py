"""Teacher tokens whose bytes are not UTF-8 (a lead byte never completed, a stray continuation byte): the text
holds replacement characters (U+FFFD) for them, one per maximal invalid subpart (byte-level BPE, Python's
errors="replace") or one per byte of a run of byte tokens (SentencePiece's byte fallback, Gemma's), and
data/teacher_positions.py's span chain goes on after them: the tokens after keep their places and heads (both
heads), the first replaced token keeps its start, the others in the replaced bytes get none. A special
alternative (`<bos>`, `<start_of_turn>`) counts toward no byte of the first-byte head: an end-of-text one is end of
text, another is left in the unseen remainder."""

import json
import math

import numpy as np
import pytest
from test_serve_special_tokens import WORDS, FixedLlama
from test_teacher_serve import post
from test_xtok_token_bytes import byte_fallback_tokenizer

from proxykd_jax.data import align, byte_head, teacher_positions
from proxykd_jax.data.corpus import Sample, samples_of_row
from proxykd_jax.models.tokenizer import build_bpe_tokenizer
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.server import make_app

FFFD = "\ufffd".encode()
POOL = [0xE2, 0xE4, 0xF0, 0xC3, 0x80, 0x82, 0x9F, 0xBF, 0xFF, 0xC0]  # lead bytes, continuation bytes, never UTF-8


@pytest.fixture(scope="module")
def byte_level():
    rng = np.random.default_rng()
    return build_bpe_tokenizer([" ".join(rng.choice(WORDS, size=8)) for _ in range(50)], 300)


def _byte_id(tok, b: int) -> int:
    """The token of the one byte `b`: `<0xNN>` (byte fallback), else the byte-level alphabet's."""
    fallback = tok.convert_tokens_to_ids(f"<0x{b:02X}>")
    return fallback if fallback not in (None, tok.unk_token_id) else byte_head.token_bytes(tok).index(bytes([b]))


def _answer(rng, tok, runs: int):
    """Ids of random words; the same with `runs` runs of 1 to 3 byte tokens that no decoder reads as any character,
    before random words (other than the first; not after a byte-fallback token, whose decoder would read the two
    runs as one), as (index of its first token, its bytes) in order; and random alternatives (teacher-vocabulary
    ids, log-probs) for each token id."""
    clean = tok(" ".join(rng.choice(WORDS, size=14)), add_special_tokens=False)["input_ids"]
    table, pieces = byte_head.token_bytes(tok), tok.convert_ids_to_tokens(clean)
    words = [i for i, t in enumerate(clean) if i > 0 and table[t].startswith(b" ") and "<0x" not in pieces[i - 1]]
    dirty, groups = list(clean), {}
    for at in sorted(rng.choice(words, size=min(runs, len(words)), replace=False).tolist(), reverse=True):
        while True:
            group = bytes(rng.choice(POOL, size=int(rng.integers(1, 4))).tolist())
            if set(group.decode("utf-8", errors="replace")) == {"\ufffd"}:
                break
        dirty[at:at] = [_byte_id(tok, b) for b in group]
        groups = {k + len(group): g for k, g in groups.items()} | {at: group}
    vocab = [i for i in range(len(tok)) if table[i]]
    top = {}
    for t in set(dirty):
        p = rng.dirichlet(np.ones(4))
        top[t] = (math.log(p[0]), [(int(a), math.log(x)) for a, x in zip(rng.choice(vocab, 3), p[1:])])
    return clean, dirty, sorted(groups.items()), top


def _served(tok, ids, top) -> Sample:
    """The corpus sample of `serve`'s chat answer of `ids` with their alternatives `top` (the text written by
    the tokenizer's own decoder, each token's `bytes` its true bytes)."""
    with ServerThread(make_app(FixedLlama(tok, ids, [top[t] for t in ids]))) as srv:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 4}
        status, answer = post(srv.port, "/v1/chat/completions", json.dumps(body))
    assert status == 200
    choice = answer["choices"][0]
    row = {"id": "p", "prompt": "x", "response": choice["message"]["content"], "logprobs": choice["logprobs"]}
    return samples_of_row({**row, "finish_reason": "length"}, "t.jsonl:1")[0]


def _expected_spans(s: Sample, groups, per_byte: bool) -> list[tuple[int, int] | None]:
    """Each teacher token's span, from the text each token became: its own bytes; for the first token of a run
    of invalid bytes all its replacement characters (one per byte under byte fallback, else as many as Python's
    decoder writes), for the run's other tokens nothing (None)."""
    pieces = [bytes(b) for b in s.teacher_token_bytes]
    for at, group in groups:
        count = len(group) if per_byte else len(group.decode("utf-8", errors="replace"))
        pieces[at : at + len(group)] = [FFFD * count] + [None] * (len(group) - 1)
    assert b"".join(p for p in pieces if p) == s.response.encode()  # the reference spells the served text
    out, c = [], 0
    for piece in pieces:
        out.append(None if piece is None else (c, c + len(piece)))
        c += len(piece or b"")
    return out


@pytest.mark.parametrize("decoder", ["byte_level", "byte_fallback"])
def test_spans_go_on_after_bytes_the_text_replaced(byte_level, decoder):
    """`serve`'s answers with runs of invalid bytes before random words: every token keeps the span of the text
    its bytes became (the chain stopped at the first run: a random Gemma teacher lost 57 of 68 answers)."""
    tok = byte_level if decoder == "byte_level" else byte_fallback_tokenizer()
    rng = np.random.default_rng()
    for _ in range(3):
        _, dirty, groups, top = _answer(rng, tok, runs=3)
        s = _served(tok, dirty, top)
        want = _expected_spans(s, groups, per_byte=decoder == "byte_fallback")
        assert teacher_positions._teacher_byte_spans(s) == want


def _head_rows(e) -> list[tuple[int, list[int], list[float]]]:
    """(target token, head ids, head log-probs) of each row of `e` that holds a head, in order."""
    ok = np.isfinite(e.teacher_topk_logprobs_LxK)
    return [
        (int(e.tokens_L[r]), e.teacher_topk_ids_LxK[r][ok[r]].tolist(), e.teacher_topk_logprobs_LxK[r][ok[r]].tolist())
        for r in np.flatnonzero(ok.any(1))
    ]


@pytest.mark.parametrize("teacher,head", [("byte_level", "exact"), ("byte_level", "bytes"), ("byte_fallback", "bytes")])
def test_heads_after_bytes_the_text_replaced_are_those_of_the_answer_without_them(byte_level, teacher, head):
    """Our byte-level BPE student, the teacher's answer with and without runs of invalid bytes: the rows after
    them hold the same heads at the same tokens. The first token of each run keeps its start, at our token of the
    replacement character's first byte: a first-byte head there (the teacher's alternatives, read after the text
    before it); the exact head drops it (the replacement character is three of our tokens)."""
    tok = byte_level if teacher == "byte_level" else byte_fallback_tokenizer()
    rng = np.random.default_rng()
    enc = align.SampleEncoder(byte_level, seq_len=256, head=head)
    clean, dirty, groups, top = _answer(rng, tok, runs=2)
    want, got = enc.encode_batch([_served(tok, clean, top), _served(tok, dirty, top)])
    ef = byte_head.token_bytes(byte_level).index(b"\xef")
    rows = _head_rows(got)
    assert [r for r in rows if r[0] != ef] == _head_rows(want)
    assert want.stats.positions_kept == len(clean) or teacher == "byte_fallback"  # the same tokenizer: all of them
    assert got.stats.positions_kept == want.stats.positions_kept + (len(groups) if head == "bytes" else 0)
    assert got.stats.positions_total == len(dirty)
    replaced = [r for r in rows if r[0] == ef]
    assert len(replaced) == (len(groups) if head == "bytes" else 0)
    for (_, ids, lps), (at, _) in zip(replaced, groups):
        lp, alts = top[dirty[at]]
        want_head = {}
        for t, x in [(dirty[at], lp)] + alts:
            sym = byte_head.token_bytes(tok)[t][0]
            want_head[sym] = want_head.get(sym, 0.0) + math.exp(x)
        assert dict(zip(ids, np.exp(lps).tolist())) == pytest.approx(want_head, rel=1e-6)


def _sample(text: str, raws: list[bytes], tokens: bool = True) -> Sample:
    alts = [[("a", -0.5), ("b", -1.5)] for _ in raws]
    names = [r.decode("utf-8", errors="replace") if r else "<eos>" for r in raws]
    return Sample("x:1", "p", 0, "q", None, text, names if tokens else None, alts, {}, raws)


@pytest.mark.parametrize("tokens", [True, False])
def test_a_token_straddling_the_end_of_the_replaced_bytes(tokens):
    """b"\\xe2" then b"\\xad\\xe6\\x96\\x87" (its first byte ends the invalid run, the rest is 文) then "a": Python's
    and byte-level BPE's decoders write "\\ufffd文a". The straddling token has no start in the text (None), the
    first keeps its own, "a" follows 文; a genuine U+FFFD after the invalid byte is a token of its own."""
    raws = [b"x", b"\xe2", b"\xad\xe6\x96\x87", b"a"]
    text = b"".join(raws).decode("utf-8", errors="replace")
    assert text == "x\ufffd文a"
    s = _sample(text, raws, tokens)
    assert teacher_positions._teacher_byte_spans(s) == [(0, 1), (1, 4), None, (7, 8)]
    raws = [b"x", b"\xe2\x82", FFFD, b"a", b""]  # the end of text last: its bytes none
    text = b"".join(raws).decode("utf-8", errors="replace")
    assert text == "x\ufffd\ufffda"
    s = _sample(text, raws, tokens)
    assert teacher_positions._teacher_byte_spans(s) == [(0, 1), (1, 4), (4, 7), (7, 8), (8, 8)]


def test_bytes_the_text_replaced_at_the_end_of_the_answer():
    """An answer whose last bytes are not UTF-8 (`serve` writes the text of all its tokens: it ends in U+FFFD),
    with or without its end of text after them: the first of them keeps its start, the end token still has the
    empty span at the end."""
    for tokens, raws, end in (
        (["ab", "\ufffd", "\ufffd", "<eos>"], [b"ab", b"\xf0", b"\x9f", b"<eos>"], True),
        (["ab", "\ufffd", "<end_of_turn>"], [b"ab", b"\xe2", b""], True),
        (["ab", "\ufffd", "\ufffd"], [b"ab", b"\xc3", b"\xff"], False),
    ):
        text = b"".join(raws[: len(raws) - end]).decode("utf-8", errors="replace")
        n = len(text.encode())
        assert n == 2 + 3 * (1 + (not end))
        s = Sample("x:1", "p", 0, "q", None, text, tokens, [[("a", -0.5)] for _ in raws], {}, raws)
        want = [(0, 2), (2, n)] + [None] * (len(raws) - 2 - end) + [(n, n)] * end
        assert teacher_positions._teacher_byte_spans(s) == want


@pytest.mark.parametrize("layout", ["name_bytes", "no_bytes", "empty_bytes"])
def test_a_special_alternative_counts_toward_no_byte(layout):
    """Random alternatives of one position with special tokens among them (as vLLM and `serve` list them: their
    name, its bytes or none; `serve` gives the special token it samples empty bytes): an end-of-text one is end
    of text, another counts toward no byte and its mass stays in the unseen remainder (the rest as it is, as for
    the alternatives below the teacher's top-k). A `<...>` that is a text token of some teachers is text."""
    rng = np.random.default_rng()
    tok = build_bpe_tokenizer(["ab ab cd the end"] * 20, vocab_size=280)
    enc = align.SampleEncoder(tok, seq_len=64, head="bytes")
    texts = ["ab", "<bos>", "<start_of_turn>", "<|im_start|>", "<pad>", "<end_of_turn>", "<eos>", "<table>", "x"]
    specials = {"<bos>", "<start_of_turn>", "<|im_start|>", "<pad>"}
    p = rng.dirichlet(np.ones(len(texts)))
    raws = {
        "name_bytes": [t.encode() for t in texts],
        "no_bytes": [None] * len(texts),
        "empty_bytes": [b"" if t.startswith("<") and t != "<table>" else t.encode() for t in texts],
    }[layout]
    alts = [[(t, math.log(x)) for t, x in zip(texts, p)]]
    s = Sample("x:1", "p", 0, "q", None, "ab", ["ab"], alts, {"finish_reason": "length"}, [b"ab"], [raws])
    e = enc.encode_batch([s])[0]
    want = {}
    for t, x in zip(texts, p):
        if t not in specials:
            sym = 256 if t in ("<end_of_turn>", "<eos>") else t.encode()[0]
            want[sym] = want.get(sym, 0.0) + x
    row = e.prompt_len
    ok = np.isfinite(e.teacher_topk_logprobs_LxK[row])
    got = dict(zip(e.teacher_topk_ids_LxK[row][ok].tolist(), np.exp(e.teacher_topk_logprobs_LxK[row][ok]).tolist()))
    assert got == pytest.approx(want, rel=1e-6)
    assert e.stats.mass_kept == pytest.approx(sum(want.values()), rel=1e-9)
    assert e.stats.mass_matched == pytest.approx(1.0, rel=1e-9)
