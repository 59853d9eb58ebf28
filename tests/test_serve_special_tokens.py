"""`serve` returns an answer's text without special tokens (as vLLM and the OpenAI API do): an end-of-turn
token that is neither the eos nor a generation_config.json stop token stays out of `text` / `content`,
while its log-prob entry still names it; `text_offset` counts the characters of the returned text.
Byte-fallback `<0xNN>` tokens that a tokenizer lists as special are bytes of the text and stay in it."""

import json
import types

import numpy as np
import pytest
from test_teacher_serve import post
from test_xtok_token_bytes import byte_fallback_tokenizer
from tokenizers import AddedToken

from proxykd_jax.models.tokenizer import build_bpe_tokenizer
from proxykd_jax.teacher.backends import LlamaBackend
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.server import Completion, make_app

WORDS = "the cat sat on a mat and dog ran far".split()


class FixedLlama(LlamaBackend):
    """A LlamaBackend whose `complete` answers the given ids (each with its top alternatives)."""

    def __init__(self, tok, ids, top):
        model = types.SimpleNamespace(cfg=types.SimpleNamespace(max_seq_len=256, vocab_size=len(tok)))
        super().__init__(model, tok, model_name="m")
        self.ids, self.top = ids, top

    def complete(self, prompts, *, n, logprobs, **kw):
        lps = [lp for lp, _ in self.top]
        top = [[(i, lp), *alts] for i, (lp, alts) in zip(self.ids, self.top)]
        c = Completion(list(self.ids), "length", lps if logprobs else None, top if logprobs else None)
        return [[c] * n for _ in prompts]


def answers(backend, prompt="hi", **extra):
    """(completions choice, chat choice) of one request each, with log-probs and two alternatives."""
    with ServerThread(make_app(backend)) as srv:
        body = {"model": "m", "prompt": prompt, "logprobs": 2, **extra}
        status, completion = post(srv.port, "/v1/completions", json.dumps(body))
        assert status == 200
        chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2}
        status, answer = post(srv.port, "/v1/chat/completions", json.dumps({**chat, **extra}))
        assert status == 200
    return completion["choices"][0], answer["choices"][0]


def random_answer(rng, tok, specials, length=12):
    """Ids of random words with special tokens at random places, and random log-probs, the special
    tokens among each position's alternatives."""
    ids = tok(" ".join(rng.choice(WORDS, size=length)), add_special_tokens=False)["input_ids"]
    for s in rng.choice(specials, size=3):
        ids.insert(int(rng.integers(1, len(ids))), int(s))
    lps = np.sort(-rng.exponential(size=(len(ids), 2)), axis=1)[:, ::-1]
    top = [(float(a), [(int(rng.choice(specials)), float(b))]) for a, b in lps]
    return ids, top


def test_special_tokens_stay_out_of_the_text_and_keep_their_logprob_entries():
    rng = np.random.default_rng()
    tok = build_bpe_tokenizer([" ".join(rng.choice(WORDS, size=8)) for _ in range(50)], 300)
    tok.add_tokens([AddedToken("<|im_end|>", special=True), AddedToken("<tool>", special=False)])
    end, tool = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<tool>")
    specials = [end, tok.convert_tokens_to_ids("<bos>"), tok.convert_tokens_to_ids("<pad>")]
    ids, top = random_answer(rng, tok, specials)
    ids.insert(2, tool)  # an added token that is not special is text
    top.insert(2, (-0.5, [(end, -1.5)]))
    backend = FixedLlama(tok, ids, top)
    want = tok.decode(ids, skip_special_tokens=True)  # transformers' own rule
    assert "<tool>" in want and "<|im_end|>" not in want and "<bos>" not in want
    completion, chat = answers(backend, prompt="hi there")
    assert completion["text"] == chat["message"]["content"] == want
    # every generated token keeps its entry, a special one named by its own text
    names = [tok.convert_ids_to_tokens(i) if i in specials or i == tool else None for i in ids]
    for tokens in (completion["logprobs"]["tokens"], [e["token"] for e in chat["logprobs"]["content"]]):
        assert len(tokens) == len(ids)
        assert [t for t, name in zip(tokens, names) if name] == [name for name in names if name]
    # ... with no bytes: the entries' bytes concatenate to the text (tests/test_teacher_special_tokens_mid_answer.py)
    assert [e["bytes"] for e in chat["logprobs"]["content"] if e["token"] == "<|im_end|>"] == [[]] * ids.count(end)
    for j, (_, alts) in enumerate(top):  # the alternatives name special tokens too
        alt = chat["logprobs"]["content"][j]["top_logprobs"][1]
        assert alt["token"] == tok.convert_ids_to_tokens(alts[0][0]) and alt["logprob"] == pytest.approx(alts[0][1])
    assert completion["logprobs"]["token_logprobs"] == pytest.approx([lp for lp, _ in top])
    # offsets: characters of prompt + text before each token (a special token adds none)
    want_offsets = [len("hi there") + len(tok.decode(ids[:j], skip_special_tokens=True)) for j in range(len(ids))]
    assert completion["logprobs"]["text_offset"] == want_offsets
    # a stop string is found in the returned text, and the tokens up to it are kept
    stop = " " + want.split()[4]
    completion, chat = answers(backend, stop=[stop])
    text = want[: want.index(stop)]
    assert completion["text"] == chat["message"]["content"] == text
    kept = len(completion["logprobs"]["tokens"])  # the fewest tokens whose text runs to the cut
    assert tok.decode(ids[:kept], skip_special_tokens=True).startswith(text)
    assert kept == 0 or not tok.decode(ids[: kept - 1], skip_special_tokens=True).startswith(text)


def test_byte_fallback_tokens_listed_as_special_stay_in_the_text():
    """A SentencePiece-style tokenizer trained with its `<0xNN>` tokens as special tokens: those spell
    bytes of the text (transformers' skip_special_tokens would drop them); `<s>` is left out."""
    tok = byte_fallback_tokenizer()
    text = "the end\nhello \u4e2d\u6587 \u00e9"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    byte_ids = [i for i in ids if tok.convert_ids_to_tokens(i).startswith("<0x")]
    assert len(byte_ids) >= 6 and tok.decode(ids, skip_special_tokens=True) != text
    bos = tok.convert_tokens_to_ids("<s>")
    rng = np.random.default_rng()
    answer = list(ids)
    answer.insert(int(rng.integers(1, len(ids))), bos)
    top = [(float(-rng.exponential()), [(bos, -9.0)]) for _ in answer]
    completion, chat = answers(FixedLlama(tok, answer, top))
    # (the answer continues the prompt: its first word's `▁` is the space after it, as vLLM spells it)
    assert completion["text"] == chat["message"]["content"] == " " + tok.decode(ids) == " " + text
    entries = chat["logprobs"]["content"]
    assert [e["token"] for e in entries].count("<s>") == 1
    assert b"".join(bytes(e["bytes"]) for e in entries if e["token"] != "<s>") == (" " + text).encode()
