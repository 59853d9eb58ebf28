"""First-byte heads in corner cases of the alignment (data/align.py, docs/TOKENIZERS.md): an alternative
spelled as a replacement character without bytes has no known first byte, a SentencePiece token whose
dummy-prefix space is not in the text gets no head, and without `tokens` the teacher's tokens are read
as the likeliest chain of alternatives that spells the text, not the likeliest alternative alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_xtok_token_bytes import byte_fallback_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from proxykd_jax.data import align, byte_head, teacher_positions
from proxykd_jax.data.corpus import Sample
from proxykd_jax.models.tokenizer import build_bpe_tokenizer


def _heads(e) -> dict[int, dict[int, float]]:
    """{row: {symbol: probability}} of the rows of `e` that hold a head."""
    out = {}
    for row in range(len(e.tokens_L)):
        ok = np.isfinite(e.teacher_topk_logprobs_LxK[row])
        if ok.any():
            ids, lps = e.teacher_topk_ids_LxK[row][ok].tolist(), e.teacher_topk_logprobs_LxK[row][ok]
            out[row] = dict(zip(ids, np.exp(lps.astype(np.float64)).tolist()))
    return out


def _assert_heads(got: dict, want: dict):
    assert got.keys() == want.keys(), (got, want)
    for row, w in want.items():
        assert got[row].keys() == w.keys(), (row, got[row], w)
        np.testing.assert_allclose([got[row][s] for s in w], list(w.values()), rtol=1e-6)


def _byte_starts(tok, ids) -> list[int]:
    """Byte offset of each of our (byte-level) tokens in the text they spell."""
    table = byte_head.token_bytes(tok)
    return np.concatenate([[0], np.cumsum([len(table[i]) for i in ids])])[:-1].tolist()


@pytest.mark.parametrize("layout", ["bytes_tokens", "fffd_tokens_with_token_bytes", "no_tokens"])
def test_replacement_char_alternative_without_bytes_has_no_first_byte(layout):
    """Response "中a" in three byte-level teacher tokens e4b8 | ad | a. An alternative spelled "\\ufffd"
    without bytes (vLLM's legacy layout) may start with any byte: its mass stays in the remainder instead
    of going to byte 0xef (U+FFFD's first byte). With its bytes given it goes to their first byte."""
    tok = build_bpe_tokenizer(["ab ab cd the end"] * 20, vocab_size=270)
    enc = align.SampleEncoder(tok, seq_len=64, head="bytes")
    rng = np.random.default_rng(4)
    p, q, r = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(3)), rng.dirichlet(np.ones(3))
    alts = [
        [("bytes:\\xe4\\xb8", p[0]), ("\ufffd", p[1]), ("b", p[2]), ("\ufffd\ufffd", p[3]), ("\ufffd", p[4])],
        [("bytes:\\xad", q[0]), ("\ufffd", q[1])],
        [("a", r[0]), ("\ufffd", r[1])],
    ]
    alts = [[(t, math.log(x)) for t, x in pos] for pos in alts]
    alt_bytes = [[None, None, None, None, b"\xe5\x9b"], [None, None], [None, None]]
    tokens, token_bytes = {
        "bytes_tokens": (["bytes:\\xe4\\xb8", "bytes:\\xad", "a"], None),
        "fffd_tokens_with_token_bytes": (["\ufffd", "\ufffd", "a"], [b"\xe4\xb8", b"\xad", b"a"]),
        "no_tokens": (None, None),
    }[layout]
    s = Sample("x:1", "p", 0, "q", None, "中a", tokens, alts, {}, token_bytes, alt_bytes)
    e = enc.encode_batch([s])[0]
    ids = e.tokens_L[e.prompt_len : e.prompt_len + 4].tolist()
    assert b"".join(byte_head.token_bytes(tok)[i] for i in ids) == "中a".encode()
    row = {b: e.prompt_len + j for j, b in enumerate(_byte_starts(tok, ids))}
    want = {
        row[0]: {0xE4: p[0], ord("b"): p[2], 0xE5: p[4]},
        row[2]: {0xAD: q[0]},
        row[3]: {ord("a"): r[0]},
    }
    _assert_heads(_heads(e), want)
    np.testing.assert_allclose(e.stats.mass_kept, p[0] + p[2] + p[4] + q[0] + r[0], rtol=1e-9)


def test_dummy_prefix_token_gets_no_head():
    """SentencePiece tokenises the response "the end" as `▁the ▁en d`: its first token holds a space the
    text does not have there, so the teacher's first byte "t" is not its first byte and it gets no head;
    `▁en` starts where the teacher's " end" does and gets the teacher's head, the eos its end of text."""
    tok = byte_fallback_tokenizer()
    enc = align.SampleEncoder(tok, seq_len=64, head="bytes")
    rng = np.random.default_rng(5)
    p, q, r = rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(3)), rng.dirichlet(np.ones(3))
    alts = [
        [("the", p[0]), ("there", p[1]), ("a", p[2])],
        [(" end", q[0]), ("x", q[1])],
        [("</s>", r[0]), ("!", r[1])],
    ]
    alts = [[(t, math.log(x)) for t, x in pos] for pos in alts]
    e = enc.encode_batch([Sample("x:1", "p", 0, "q", None, "the end", ["the", " end", "</s>"], alts, {})])[0]
    pieces = tok.convert_ids_to_tokens(e.tokens_L[e.prompt_len :].tolist())
    assert pieces[0].startswith("\u2581the") and pieces[-1] == "</s>"
    # Where each of our tokens starts in the text: after the dummy space that the first one spells.
    spelled = np.cumsum([0] + [len(x.replace("\u2581", " ")) for x in pieces[:-1]]) - 1
    row_of_end = e.prompt_len + spelled.tolist().index(3)
    want = {row_of_end: {32: q[0], ord("x"): q[1]}, len(e.tokens_L) - 1: {256: r[0], ord("!"): r[1]}}
    _assert_heads(_heads(e), want)


def test_word_level_tokens_that_are_the_text_keep_their_heads():
    """A word-level tokenizer's tokens are their text (the separator is not in them): both words get the
    head of the character-level teacher position where they start."""
    vocab = {"[UNK]": 0, "the": 1, "dog": 2, "</s>": 3}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", eos_token="</s>")
    enc = align.SampleEncoder(tok, seq_len=64, head="bytes")
    rng = np.random.default_rng(6)
    text = "the dog"
    ps = rng.dirichlet(np.ones(3), len(text))
    alts = [[(ch, math.log(p[0])), ("z", math.log(p[1]))] for ch, p in zip(text, ps)]
    e = enc.encode_batch([Sample("x:1", "p", 0, "q", None, text, list(text), alts, {})])[0]
    assert e.tokens_L[e.prompt_len :].tolist() == [1, 2, 3]
    want = {e.prompt_len + j: {ord(text[b]): ps[b][0], ord("z"): ps[b][1]} for j, b in enumerate((0, 4))}
    _assert_heads(_heads(e), want)


def test_without_tokens_a_likelier_prefix_of_the_sampled_token_does_not_end_the_chain():
    """Response " there is it" without `tokens`: " the" (likelier) and " there" both continue the text at
    the first position, but only " there" lets the next positions (" is", " it") continue it."""
    rng = np.random.default_rng(7)
    a = np.sort(rng.dirichlet(np.ones(4)))[::-1]  # " the" likelier than " there"
    b, c = rng.dirichlet(np.ones(3)), rng.dirichlet(np.ones(3))
    alts = [
        [(" the", a[0]), (" there", a[1]), ("x", a[2])],
        [(" is", b[0]), ("!", b[1])],
        [(" it", c[0]), ("?", c[1])],
    ]
    alts = [[(t, math.log(x)) for t, x in pos] for pos in alts]
    text = " there is it"
    s = Sample("x:1", "p", 0, "q", None, text, None, alts, {})
    assert teacher_positions._teacher_byte_spans(s) == [(0, 6), (6, 9), (9, 12)]
    tok = build_bpe_tokenizer(["the there is it"] * 20, vocab_size=270)
    e = align.SampleEncoder(tok, seq_len=64, head="bytes").encode_batch([s])[0]
    ids = e.tokens_L[e.prompt_len : -1].tolist()
    assert b"".join(byte_head.token_bytes(tok)[i] for i in ids) == text.encode()
    row = {x: e.prompt_len + j for j, x in enumerate(_byte_starts(tok, ids))}
    want = {
        row[0]: {32: a[0] + a[1], ord("x"): a[2]},
        row[6]: {32: b[0], ord("!"): b[1]},
        row[9]: {32: c[0], ord("?"): c[1]},
    }
    _assert_heads(_heads(e), want)
    assert e.stats.positions_kept == 3


def test_without_tokens_the_likeliest_of_the_longest_chains_is_taken():
    """Text "abcd": "abc" (likeliest) is a dead end; "ab" then "cd" and "a" then "bcd" both reach the end
    (the last position, at the end of the text, is the end-of-text token); "ab" is likelier than "a"."""
    alts = [
        [("abc", -0.5), ("ab", -1.0), ("a", -2.0)],
        [("cd", -0.6), ("bcd", -0.9), ("c", -1.5)],
        [("d", -0.1)],
    ]
    s = Sample("x:1", "p", 0, "q", None, "abcd", None, alts, {})
    assert teacher_positions._teacher_byte_spans(s) == [(0, 2), (2, 4), (4, 4)]
    s = Sample("x:1", "p", 0, "q", None, "abcd", None, alts[:2], {})
    assert teacher_positions._teacher_byte_spans(s) == [(0, 2), (2, 4)]
