"""A special token among the teacher's alternatives given with empty bytes (`<|im_end|>` with `bytes: []`: what
vLLM with skip_special_tokens and our `serve` report for a token they leave out of the text) in the `exact` head
(data/align.py): it maps to our token of that name, its probability in the head row, not counted as unmapped;
a name that is none of our tokens (or the empty string) stays unmapped, and the `bytes` head is unchanged (an
end-of-text name goes to the end symbol, another special token to no byte)."""

import math

import numpy as np
import pytest
from test_serve_special_tokens import WORDS
from test_xtok_align_heads import _assert_heads, _heads
from tokenizers import AddedToken

from proxykd_jax.data import align, byte_head
from proxykd_jax.data.corpus import Sample
from proxykd_jax.models.tokenizer import build_bpe_tokenizer

UNKNOWN = ["<|nope|>", "<|endoftext|>", "<unused3>", "the", ""]  # with empty bytes: none of our tokens' names


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng()
    tok = build_bpe_tokenizer([" ".join(rng.choice(WORDS, size=8)) for _ in range(50)], 300)
    tok.add_tokens([AddedToken("<|im_end|>", special=True), AddedToken("<end_of_turn>", special=True)])
    return tok


def _answer(rng, tok):
    """A random response and our tokens' ids and bytes (the teacher's tokens: its tokenizer is ours)."""
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 12))))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    table = byte_head.token_bytes(tok)
    assert b"".join(table[i] for i in ids) == text.encode()
    return text, ids, [table[i] for i in ids]


def _sample(text, pieces, alts, alt_bytes) -> Sample:
    tokens = [p.decode() for p in pieces]
    return Sample("t.jsonl:1", "x", 0, "p", None, text, tokens, alts, {"finish_reason": "stop"}, pieces, alt_bytes)


@pytest.mark.parametrize("name", ["<|im_end|>", "<end_of_turn>", "<eos>", "<bos>"])
@pytest.mark.parametrize("layout", ["empty_bytes", "bytes_omitted", "name_bytes"])
def test_special_alternative_lands_on_its_id(tok, name, layout):
    """Each position: the sampled token, another of the answer's tokens, the special token `name`, an unknown
    name and the empty string (both with empty bytes). The head holds the first three at their ids, whatever the
    special token's bytes (empty, as servers give them; omitted; its name's, as the text would hold it)."""
    rng = np.random.default_rng()
    text, ids, pieces = _answer(rng, tok)
    special = tok.convert_tokens_to_ids(name)
    raw = {"empty_bytes": b"", "bytes_omitted": None, "name_bytes": name.encode()}[layout]
    p = rng.dirichlet(np.ones(5), size=len(ids))
    alts, alt_bytes, want = [], [], {}
    enc = align.SampleEncoder(tok, seq_len=64, head="exact")
    for j, (i, piece) in enumerate(zip(ids, pieces)):
        o = int(rng.choice([k for k in range(len(ids)) if ids[k] != i]))
        unknown = str(rng.choice(UNKNOWN))
        names = [piece.decode(), pieces[o].decode(), name, unknown, ""]
        alts.append([(t, math.log(q)) for t, q in zip(names, p[j])])
        alt_bytes.append([piece, pieces[o], raw, b"", b""])
        want[1 + j] = {i: p[j][0], ids[o]: p[j][1], special: p[j][2]}  # the prompt "p" is one token
    e = enc.encode_batch([_sample(text, pieces, alts, alt_bytes)])[0]
    assert e.prompt_len == 1 and e.tokens_L[1 : 1 + len(ids)].tolist() == ids
    _assert_heads(_heads(e), want)
    assert e.stats.positions_kept == e.stats.positions_total == len(ids)
    np.testing.assert_allclose(e.stats.mass_kept, p[:, :3].sum(), rtol=1e-9)
    np.testing.assert_allclose(e.stats.mass_total - e.stats.mass_kept, p[:, 3:].sum(), rtol=1e-9)


def test_unknown_name_with_empty_bytes_stays_unmapped(tok):
    """Names that are none of our tokens (an end-of-text name of another vocabulary, a text token's string, the
    empty string) with empty bytes map to nothing, also where our `<|im_end|>` with empty bytes comes first in
    the same position or in an earlier one (what an encoder remembers of one does not stand for another)."""
    rng = np.random.default_rng()
    text, ids, pieces = _answer(rng, tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    names = ["<|im_end|>"] + UNKNOWN
    p = rng.dirichlet(np.ones(len(names) + 1), size=len(ids))
    alts, alt_bytes, want = [], [], {}
    for j, piece in enumerate(pieces):
        order = rng.permutation(len(names)) if j else np.arange(len(names))  # `<|im_end|>` first at the first
        alts.append([(piece.decode(), math.log(p[j][0]))] + [(names[k], math.log(p[j][1 + k])) for k in order])
        alt_bytes.append([piece] + [b""] * len(names))
        want[1 + j] = {ids[j]: p[j][0], end: p[j][1]}
    e = align.SampleEncoder(tok, seq_len=64, head="exact").encode_batch([_sample(text, pieces, alts, alt_bytes)])[0]
    _assert_heads(_heads(e), want)
    np.testing.assert_allclose(e.stats.mass_total - e.stats.mass_kept, p[:, 2:].sum(), rtol=1e-9)


def test_bytes_head_is_unchanged(tok):
    """The same alternatives in the `bytes` head: an end-of-text name with empty bytes (ours or not) is the end
    symbol, another special token (`<bos>`, an unknown name) counts toward no byte, the empty string is the end."""
    rng = np.random.default_rng()
    text, ids, pieces = _answer(rng, tok)
    names = ["<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<bos>", "<|nope|>", ""]
    ends = [True, True, True, False, False, True]
    p = rng.dirichlet(np.ones(len(names) + 1), size=len(ids))
    alts = [
        [(pc.decode(), math.log(q[0]))] + [(t, math.log(x)) for t, x in zip(names, q[1:])] for pc, q in zip(pieces, p)
    ]
    alt_bytes = [[pc] + [b""] * len(names) for pc in pieces]
    want = {1 + j: {pc[0]: q[0], byte_head.END_SYMBOL: q[1:][ends].sum()} for j, (pc, q) in enumerate(zip(pieces, p))}
    e = align.SampleEncoder(tok, seq_len=64, head="bytes").encode_batch([_sample(text, pieces, alts, alt_bytes)])[0]
    _assert_heads(_heads(e), want)
    np.testing.assert_allclose(e.stats.mass_total - e.stats.mass_kept, p[:, 1:][:, ~np.array(ends)].sum(), rtol=1e-9)
