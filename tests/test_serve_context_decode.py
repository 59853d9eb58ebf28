"""`serve` spells an answer as the text it adds after the prompt (as vLLM does): with a SentencePiece-style
tokenizer (`▁` word starts, whose decoder drops the space of the text's first word) the first answer token
`▁the` is " the", in the text, its `token`/`bytes`, its alternatives, `text_offset` and stop strings, and the
tokens' bytes still concatenate to the text. Byte-level BPE and the word tokenizer answer as before."""

import json
import types

import numpy as np
import pytest
from test_teacher_serve import post
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from proxykd_jax.models.tokenizer import build_bpe_tokenizer, build_word_tokenizer, load_tokenizer
from proxykd_jax.teacher.backends import LlamaBackend
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.server import Completion, make_app

WORDS = "the cat sat on a mat and dog ran far here there".split()
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def sentencepiece_tokenizer(style, folder):
    """A tiny SentencePiece-style BPE with byte fallback, saved and loaded as a model folder holds it:
    `metaspace` (Metaspace pre-tokenizer and decoder, as Mistral's) or `llama2` (a `▁` normalizer and a
    decoder that strips the leading space, as Llama 2's tokenizer.json)."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<unk>", "<s>", "</s>", *BYTES], show_progress=False)
    tok.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return load_tokenizer(folder)


class FixedLlama(LlamaBackend):
    """A LlamaBackend whose `complete` answers the given ids, each step with the given alternatives."""

    def __init__(self, tok, ids, alts):
        model = types.SimpleNamespace(cfg=types.SimpleNamespace(max_seq_len=256, vocab_size=len(tok)))
        super().__init__(model, tok, model_name="m")
        self.ids, self.alts = ids, alts

    def complete(self, prompts, *, n, logprobs, **kw):
        top = [[(i, -0.1)] + [(a, -1.0 - k) for k, a in enumerate(alts)] for i, alts in zip(self.ids, self.alts)]
        c = Completion(list(self.ids), "length", [-0.1] * len(self.ids), top) if logprobs else None
        return [[c or Completion(list(self.ids), "length")] * n for _ in prompts]


def answers(backend, prompt, **extra):
    """(completions choice, chat choice) of one request each, with log-probs and alternatives."""
    k = len(backend.alts[0])
    with ServerThread(make_app(backend)) as srv:
        status, completion = post(
            srv.port, "/v1/completions", json.dumps({"model": "m", "prompt": prompt, "logprobs": k + 1, **extra})
        )
        assert status == 200, completion
        chat = {"model": "m", "messages": [{"role": "user", "content": prompt}], "logprobs": True}
        status, answer = post(srv.port, "/v1/chat/completions", json.dumps({**chat, "top_logprobs": k + 1, **extra}))
        assert status == 200, answer
    return completion["choices"][0], answer["choices"][0]


def random_case(rng, tok):
    """A prompt of random words; an answer of distinct random `▁word` tokens with a CJK character spelled
    by byte-fallback tokens (partial UTF-8 each) after its first; per step the bare `▁`, a random word
    start other than the first token and a random other token as alternatives."""
    vocab = tok.get_vocab()
    words = [vocab["\u2581" + w] for w in WORDS if "\u2581" + w in vocab]
    assert len(words) >= 8
    ids = [int(i) for i in rng.choice(words, size=5, replace=False)]
    cjk = [vocab["\u2581"]] + [vocab[f"<0x{b:02X}>"] for b in "\u4e2d".encode()]
    at = int(rng.integers(1, len(ids) + 1))
    ids[at:at] = cjk
    starts = [i for t, i in vocab.items() if t.startswith("\u2581") and len(t) > 1 and i != ids[0]]
    others = [i for t, i in vocab.items() if not t.startswith(("\u2581", "<"))]
    alts = [[vocab["\u2581"], int(rng.choice(starts)), int(rng.choice(others))] for _ in ids]
    prompt = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
    return prompt, ids, alts


def in_context(tok, context, ids):
    """What `ids` add to the text of `context` (vLLM's spelling of an answer)."""
    return tok.decode(context + ids)[len(tok.decode(context)) :]


@pytest.mark.parametrize("style", ["metaspace", "llama2"])
def test_a_sentencepiece_answer_continues_the_prompt(style, tmp_path):
    rng = np.random.default_rng()
    tok = sentencepiece_tokenizer(style, tmp_path / "tok")
    prompt, ids, alts = random_case(rng, tok)
    backend = FixedLlama(tok, ids, alts)
    assert tok.convert_ids_to_tokens(ids[0]).startswith("\u2581") and not tok.decode(ids).startswith(" ")
    completion, chat = answers(backend, prompt)
    for choice, context in (
        (completion, tok.encode(prompt)),
        (chat, backend.chat_ids([{"role": "user", "content": prompt}])),
    ):
        text = choice.get("text", choice.get("message", {}).get("content"))
        assert text == in_context(tok, context, ids) == " " + tok.decode(ids)
    entries = chat["logprobs"]["content"]
    assert b"".join(bytes(e["bytes"]) for e in entries) == chat["message"]["content"].encode()
    assert [e["token"] for e in entries] == completion["logprobs"]["tokens"]
    first = tok.convert_ids_to_tokens(ids[0]).replace("\u2581", " ")
    assert entries[0]["token"] == first and bytes(entries[0]["bytes"]) == first.encode()
    # the first step's alternatives: the bare ▁ is a space, a word start has its space
    got = [(a["token"], bytes(a["bytes"])) for a in entries[0]["top_logprobs"]]
    want = [tok.convert_ids_to_tokens(i).replace("\u2581", " ") for i in [ids[0], *alts[0]]]
    assert got[:3] == [(w, w.encode()) for w in want[:3]] and got[1] == (" ", b" ")
    assert list(completion["logprobs"]["top_logprobs"][0])[:3] == want[:3]
    # offsets: characters of prompt + text complete before each token (a byte of 中 starts no character)
    before = [in_context(tok, tok.encode(prompt), ids[:j]).rstrip("\ufffd") for j in range(len(ids))]
    offsets = [len(prompt) + len(b) for b in before]
    assert completion["logprobs"]["text_offset"] == offsets and offsets[1] > offsets[0] == len(prompt)
    # a stop string is found in the text that continues the prompt: one starting with the first word's space
    # cuts before it, one later keeps the tokens up to the cut
    first_word = " " + text.split()[0]
    completion, chat = answers(backend, prompt, stop=[first_word])
    assert completion["text"] == chat["message"]["content"] == "" and completion["logprobs"]["tokens"] == []
    stop = next(" " + w for w in text.split()[1:] if text.index(" " + w) > 0)  # (" the" is in " there")
    completion, chat = answers(backend, prompt, stop=[stop])
    cut = text[: text.index(stop)]
    assert completion["text"] == chat["message"]["content"] == cut and cut.startswith(" ")
    kept = len(chat["logprobs"]["content"])
    assert in_context(tok, tok.encode(prompt), ids[:kept]).startswith(cut)
    assert not in_context(tok, tok.encode(prompt), ids[: kept - 1]).startswith(cut)


def test_a_prompt_of_special_tokens_only_leaves_the_first_word_as_decoded(tmp_path):
    """No text before the answer (a prompt of `<s>` alone): nothing to continue, the first word's space is
    dropped as the tokenizer decodes it, and the bytes still spell the text."""
    rng = np.random.default_rng()
    tok = sentencepiece_tokenizer("metaspace", tmp_path / "tok")
    _, ids, alts = random_case(rng, tok)
    backend = FixedLlama(tok, ids, alts)
    backend.encode = lambda text: [tok.bos_token_id]
    completion, chat = answers(backend, "x")
    assert completion["text"] == tok.decode(ids)
    assert b"".join(bytes(e["bytes"]) for e in chat["logprobs"]["content"]) == chat["message"]["content"].encode()


@pytest.mark.parametrize("kind", ["bpe", "word"])
def test_byte_level_and_word_answers_are_spelled_alone(kind, tmp_path):
    """Byte-level BPE (its spaces are bytes of the tokens) and the word tokenizer (its decoder puts a space
    between words) answer as before: the text is the answer's ids decoded alone."""
    rng = np.random.default_rng()
    if kind == "bpe":
        tok = build_bpe_tokenizer([" ".join(rng.choice(WORDS, size=8)) for _ in range(50)], 300, tmp_path / "tok")
    else:
        tok = build_word_tokenizer(WORDS, tmp_path / "tok")
    prompt = " ".join(rng.choice(WORDS, size=3))
    ids = tok.encode(" ".join(rng.choice(WORDS, size=5)))
    alts = [[int(rng.choice(ids))] for _ in ids]
    completion, chat = answers(FixedLlama(tok, ids, alts), prompt)
    assert completion["text"] == chat["message"]["content"] == tok.decode(ids)
    assert completion["logprobs"]["tokens"][0] == tok.decode(ids[:1])
    entries = chat["logprobs"]["content"]
    assert b"".join(bytes(e["bytes"]) for e in entries) == tok.decode(ids).encode()
    assert completion["logprobs"]["text_offset"][0] == len(prompt)
