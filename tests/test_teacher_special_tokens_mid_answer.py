"""A special token the teacher samples mid-answer (`<start_of_turn>`, `<bos>`, `<pad>`, ...) is in its log-prob
entries but not in its text (vLLM with skip_special_tokens, `serve`): data/teacher_positions.py reads it as occupying no
bytes, so the teacher positions after it keep their heads, the same as those of the answer without it (both
heads, with the token's bytes given as its string's, not given, or empty); an end token at the end of the answer
is still the end. `serve` gives such a token empty `bytes`, so that the entries' bytes concatenate to the text."""

import json

import numpy as np
import pytest
from test_serve_special_tokens import WORDS, FixedLlama, random_answer
from test_teacher_serve import post
from tokenizers import AddedToken

from proxykd_jax.data import align, byte_head, teacher_positions
from proxykd_jax.data.corpus import Sample
from proxykd_jax.models.tokenizer import build_bpe_tokenizer
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.server import make_app

SPECIALS = ["<start_of_turn>", "<bos>", "<pad>", "<|im_start|>", "<end_of_turn>"]  # the last one is also an end
LAYOUTS = ["token_bytes", "tokens_only", "empty_bytes", "empty_bytes_without_tokens"]


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng()
    return build_bpe_tokenizer([" ".join(rng.choice(WORDS, size=8)) for _ in range(50)], 300)


def _positions(rng, tok, text: str):
    """The teacher's positions for `text` (its tokenizer is ours): (token, bytes, alternatives with random
    log-probs, the sampled token among them), then an end-of-text position."""
    table = byte_head.token_bytes(tok)
    pieces = [table[i] for i in tok(text, add_special_tokens=False)["input_ids"]]
    vocab = sorted({p.decode() for p in pieces})
    out = []
    for raw in pieces + [b"<end_of_turn>"]:
        others = [t for t in rng.choice(vocab, size=3, replace=False).tolist() if t != raw.decode()]
        lps = np.log(rng.dirichlet(np.ones(len(others) + 2)))
        out.append((raw.decode(), raw, [(raw.decode(), float(lps[0]))] + list(zip(others, lps[1:].tolist()))))
    return out


def _sample(positions, layout: str, text: str) -> Sample:
    tokens, raws, alts = zip(*positions)
    if layout.startswith("empty_bytes"):  # a special token that the text leaves out has no bytes (`serve`)
        raws = [b"" if t in SPECIALS and i < len(raws) - 1 else r for i, (t, r) in enumerate(zip(tokens, raws))]
    return Sample(
        "t.jsonl:1",
        "x",
        0,
        "p",
        None,
        text,
        None if layout == "empty_bytes_without_tokens" else list(tokens),
        list(alts),
        {"finish_reason": "stop"},
        None if layout == "tokens_only" else list(raws),
    )


@pytest.mark.parametrize("head", ["exact", "bytes"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_positions_after_a_special_token_keep_the_heads_of_the_answer_without_it(tok, head, layout):
    rng = np.random.default_rng()
    text = " ".join(rng.choice(WORDS, size=12))
    plain = _positions(rng, tok, text)
    with_special = list(plain)
    for at in sorted(rng.choice(np.arange(1, len(plain) - 1), size=3, replace=False).tolist(), reverse=True):
        special = str(rng.choice(SPECIALS))
        lps = np.log(rng.dirichlet(np.ones(3)))
        alts = [(special, float(lps[0])), (plain[at][0], float(lps[1])), ("<bos>", float(lps[2]))]
        with_special.insert(at, (special, special.encode(), alts))
    enc = align.SampleEncoder(tok, seq_len=128, head=head)
    want, got = enc.encode_batch([_sample(plain, layout, text), _sample(with_special, layout, text)])
    assert want.stats.positions_kept == len(plain)  # both heads: the final end token on our end row
    np.testing.assert_array_equal(got.tokens_L, want.tokens_L)
    np.testing.assert_array_equal(got.teacher_topk_ids_LxK, want.teacher_topk_ids_LxK)
    np.testing.assert_array_equal(got.teacher_topk_logprobs_LxK, want.teacher_topk_logprobs_LxK)
    assert got.stats.positions_kept == want.stats.positions_kept
    assert got.stats.positions_total == len(with_special)
    spans = teacher_positions._teacher_byte_spans(_sample(with_special, layout, text))
    assert [s is None for s in spans] == [t in SPECIALS for t, _, _ in with_special[:-1]] + [False]
    assert spans[-1] == (len(text.encode()),) * 2  # the end token at the end of the answer is still the end


def test_a_special_token_whose_bytes_continue_the_text_is_text():
    """A `<b>` that the text holds is an ordinary token: it takes its bytes."""
    alts = [[("a", -0.1)], [("<b>", -0.2)], [("c", -0.3)]]
    s = Sample("t.jsonl:1", "x", 0, "p", None, "a<b>c", ["a", "<b>", "c"], alts, {})
    assert teacher_positions._teacher_byte_spans(s) == [(0, 1), (1, 4), (4, 5)]
    s = Sample("t.jsonl:1", "x", 0, "p", None, "ac", ["a", "<b>", "c"], alts, {})
    assert teacher_positions._teacher_byte_spans(s) == [(0, 1), None, (1, 2)]


def test_serve_gives_a_special_token_left_out_of_the_text_empty_bytes():
    rng = np.random.default_rng()
    tok = build_bpe_tokenizer([" ".join(rng.choice(WORDS, size=8)) for _ in range(50)], 300)
    tok.add_tokens([AddedToken("<|im_end|>", special=True)])
    specials = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<bos>", "<pad>")]
    ids, top = random_answer(rng, tok, specials)
    with ServerThread(make_app(FixedLlama(tok, ids, top))) as srv:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2}
        status, answer = post(srv.port, "/v1/chat/completions", json.dumps(body))
    assert status == 200
    text, entries = answer["choices"][0]["message"]["content"], answer["choices"][0]["logprobs"]["content"]
    assert text == tok.decode(ids, skip_special_tokens=True)
    named = [e["token"] for e, i in zip(entries, ids) if i in specials]
    assert len(entries) == len(ids) and named == [tok.convert_ids_to_tokens(i) for i in ids if i in specials]
    assert [e["bytes"] == [] for e in entries] == [i in specials for i in ids]
    assert b"".join(bytes(e["bytes"]) for e in entries) == text.encode()
    for e, (_, alts) in zip(entries, top):  # an alternative keeps its own bytes: it is not in the text either way
        assert e["top_logprobs"][1]["bytes"] == list(tok.convert_ids_to_tokens(alts[0][0]).encode())
