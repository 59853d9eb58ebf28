"""`serve` with `stream: true`, through the official `openai` client: the streamed pieces of each choice
concatenate to the non-streamed answer of the same seed (n=2, stop strings, echo), `include_usage` ends the
stream with the non-streamed usage, every chunk of a response shares its `id`, `created` and `model`, a
token that ends mid-character is merged with the next, the raw wire is `data:` events ending with
`data: [DONE]`, and a bad `stream_options` is a plain JSON 400 naming it. With log-probs each chunk carries the
entries of the tokens whose text it sends (a merged chunk all of them, a special token's in a chunk beside
it), and the stream's entries concatenate to the non-streamed answer's of the same seed."""

import http.client
import json
import random

import numpy as np
import openai
import pytest
from test_serve_special_tokens import WORDS, FixedLlama, random_answer
from test_teacher_serve import post
from test_xtok_token_bytes import byte_fallback_tokenizer
from tokenizers import AddedToken

from proxykd_jax.models.tokenizer import build_bpe_tokenizer
from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.server import Completion, make_app


@pytest.fixture(scope="module")
def client():
    with ServerThread(make_app(ToyBackend(max_context=256))) as srv:
        yield openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0), srv


def _same_envelope(chunks, obj):
    assert chunks and all(c.object == obj for c in chunks)
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1


def _seed():
    return random.randrange(1 << 40)  # fresh answers on every run


@pytest.mark.parametrize("stop", [None, ["e", "q"]])
def test_chat_stream_concatenates_to_the_plain_answer_with_its_usage(client, stop):
    c, _ = client
    kw = dict(model="toy", messages=[{"role": "user", "content": "tell me"}], max_tokens=40, n=2, seed=_seed())
    kw.update(temperature=1.0, stop=stop)
    plain = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    _same_envelope(chunks, "chat.completion.chunk")
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(ch.usage is None for ch in chunks[:-1])
    for choice in plain.choices:
        deltas = [x for ch in chunks for x in ch.choices if x.index == choice.index]
        assert deltas[0].delta.role == "assistant" and all(d.delta.role is None for d in deltas[1:])
        assert "".join(d.delta.content or "" for d in deltas) == choice.message.content
        assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + [choice.finish_reason]
        pieces = [d.delta.content for d in deltas if d.delta.content]
        assert len(pieces) == len(choice.message.content)  # one byte-token per character in the toy
    if stop:
        assert any(ch.finish_reason == "stop" for ch in plain.choices)


@pytest.mark.parametrize("echo", [False, True])
def test_completions_stream_concatenates_to_the_plain_answers(client, echo):
    c, _ = client
    kw = dict(model="toy", prompt=["one", "two"], max_tokens=30, n=2, seed=_seed(), stop=" ", echo=echo)
    plain = c.completions.create(**kw)
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    _same_envelope(chunks, "text_completion")
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert len(plain.choices) == 4
    for choice in plain.choices:
        parts = [x for ch in chunks for x in ch.choices if x.index == choice.index]
        assert "".join(p.text for p in parts) == choice.text
        assert [p.finish_reason for p in parts] == [None] * (len(parts) - 1) + [choice.finish_reason]
    without_usage = list(c.completions.create(**kw, stream=True))
    assert all(ch.choices and ch.usage is None for ch in without_usage)


class Utf8Backend(ToyBackend):
    """Answers every sequence with the bytes of `TEXT`, one byte per token: characters split across tokens."""

    TEXT = "naïve € 😀 ok"

    def complete(self, prompts, *, n, **kw):
        return [[Completion(list(self.TEXT.encode()), "stop") for _ in range(n)] for _ in prompts]


def test_a_token_ending_mid_character_is_merged_with_the_next():
    with ServerThread(make_app(Utf8Backend())) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        chunks = c.completions.create(model="toy", prompt="hi", max_tokens=40, stream=True)
        assert [x.text for ch in chunks for x in ch.choices if x.text] == list(Utf8Backend.TEXT)
        chunks = c.chat.completions.create(
            model="toy", messages=[{"role": "user", "content": "hi"}], max_tokens=40, stream=True, stop="€"
        )
        assert [x.delta.content for ch in chunks for x in ch.choices if x.delta.content] == list("naïve ")


def test_the_wire_is_server_sent_events_ending_with_done(client):
    _, srv = client
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    body = {"model": "toy", "prompt": "hi", "max_tokens": 5, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = resp.read().decode().split("\n\n")
    conn.close()
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    assert all(json.loads(e.removeprefix("data: "))["object"] == "text_completion" for e in events[:-2])


def test_a_bad_stream_options_is_a_plain_400_naming_it(client):
    _, srv = client
    body = {"model": "toy", "max_tokens": 4, "stream": True, "stream_options": "yes"}
    status, answer = post(
        srv.port, "/v1/chat/completions", json.dumps({**body, "messages": [{"role": "user", "content": "hi"}]})
    )
    assert (
        status == 400
        and answer["error"]["param"] == "stream_options"
        and "'stream_options'" in answer["error"]["message"]
    )


@pytest.mark.parametrize("stop", [None, ["e", "q"]])
def test_chat_stream_logprobs_concatenate_to_the_plain_entries(client, stop):
    c, _ = client
    kw = dict(model="toy", messages=[{"role": "user", "content": "say"}], max_tokens=30, n=2, seed=_seed(), stop=stop)
    plain = c.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    chunks = list(c.chat.completions.create(**kw, logprobs=True, top_logprobs=3, stream=True))
    if stop is None:  # (with a stop string a choice may be empty)
        assert isinstance(chunks[1].choices[0].logprobs.content[0].logprob, float)
    for choice in plain.choices:
        deltas = [x for ch in chunks for x in ch.choices if x.index == choice.index]
        entries = [e for d in deltas if d.logprobs for e in d.logprobs.content]
        assert [e.model_dump() for e in entries] == [e.model_dump() for e in choice.logprobs.content]
        assert all(len(e.top_logprobs) == 3 for e in entries)
        for d in deltas:  # each chunk's entries spell its text (the toy's tokens are single bytes)
            spelled = bytes(b for e in (d.logprobs.content if d.logprobs else []) for b in e.bytes)
            assert spelled == (d.delta.content or "").encode()


def test_completions_stream_logprobs_concatenate_to_the_plain_lists(client):
    c, _ = client
    kw = dict(model="toy", prompt=["one", "two"], max_tokens=20, n=2, seed=_seed(), logprobs=2)
    plain = c.completions.create(**kw)
    chunks = list(c.completions.create(**kw, stream=True))
    assert isinstance(chunks[0].choices[0].logprobs.token_logprobs[0], float)
    for choice in plain.choices:
        parts = [x for ch in chunks for x in ch.choices if x.index == choice.index]
        keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        got = {k: [v for p in parts if p.logprobs for v in getattr(p.logprobs, k)] for k in keys}
        assert got == {k: getattr(choice.logprobs, k) for k in got}
        assert all(len(top) == 2 for top in got["top_logprobs"])
        assert all("".join(p.logprobs.tokens) == p.text for p in parts if p.logprobs)


class SpecialBackend(ToyBackend):
    """Answers random text with multi-byte characters (one byte per token) and the special token at random
    places, each with random log-probs and two alternatives."""

    def complete(self, prompts, *, n, logprobs, **kw):
        rng = random.Random(prompts[0][-1])
        ids = list(("".join(rng.choice("ab ïé€😀") for _ in range(12)) + "€").encode())
        for _ in range(3):
            ids.insert(rng.randrange(len(ids) + 1), self.EOS)
        top = [[(t, -rng.random()), (rng.randrange(256), -1 - rng.random()), (self.EOS, -2.0)] for t in ids]
        c = Completion(ids, "length", [row[0][1] for row in top], top) if logprobs else Completion(ids, "length")
        return [[c] * n for _ in prompts]


def test_a_merged_chunk_carries_all_its_tokens_and_special_tokens_are_not_lost():
    with ServerThread(make_app(SpecialBackend())) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        prompt = "hi" + chr(97 + random.randrange(26))
        msgs = [{"role": "user", "content": prompt}]
        plain = c.chat.completions.create(model="toy", messages=msgs, max_tokens=40, logprobs=True, top_logprobs=2)
        chunks = list(
            c.chat.completions.create(
                model="toy", messages=msgs, max_tokens=40, logprobs=True, stream=True, top_logprobs=2
            )
        )
        entries = [[e.model_dump() for e in x.logprobs.content] for ch in chunks for x in ch.choices if x.logprobs]
        assert sum(entries, []) == [e.model_dump() for e in plain.choices[0].logprobs.content]
        assert len(sum(entries, [])) >= 16 and [len(e) for e in entries] != [1] * len(entries)
        assert "".join(x.delta.content or "" for ch in chunks for x in ch.choices) == plain.choices[0].message.content
        plain = c.completions.create(model="toy", prompt=prompt, max_tokens=40, logprobs=2)
        parts = [
            x
            for ch in c.completions.create(model="toy", prompt=prompt, max_tokens=40, logprobs=2, stream=True)
            for x in ch.choices
        ]
        assert [t for p in parts if p.logprobs for t in p.logprobs.text_offset] == plain.choices[0].logprobs.text_offset
        assert [t for p in parts if p.logprobs for t in p.logprobs.tokens] == plain.choices[0].logprobs.tokens


def _tokenizer_answer(kind, rng):
    """(backend, stop) answering fixed ids of a real tokenizer: BPE words with special tokens and a stop
    string inside a word (the token straddling it kept), or SentencePiece byte-fallback tokens of
    multi-byte characters spelled after the prompt (`▁` the space before the answer)."""
    if kind == "bpe":
        tok = build_bpe_tokenizer([" ".join(rng.choice(WORDS, size=8)) for _ in range(50)], 300)
        tok.add_tokens([AddedToken("<|im_end|>", special=True)])
        specials = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<bos>")]
        ids, top = random_answer(rng, tok, specials)
        word = tok.decode(ids, skip_special_tokens=True).split()[4]
        return FixedLlama(tok, ids, top), [" " + word[: max(1, len(word) - 1)]]
    tok = byte_fallback_tokenizer()
    ids = tok("the end\nhello \u4e2d\u6587 \u00e9", add_special_tokens=False)["input_ids"]
    ids.insert(int(rng.integers(1, len(ids))), tok.convert_tokens_to_ids("<s>"))
    return FixedLlama(tok, ids, [(float(-rng.exponential()), [(ids[0], -9.0)]) for _ in ids]), None


@pytest.mark.parametrize("kind", ["bpe", "byte_fallback"])
def test_stream_logprobs_of_a_real_tokenizer_concatenate_to_the_plain_answer(kind):
    backend, stop = _tokenizer_answer(kind, np.random.default_rng())
    with ServerThread(make_app(backend)) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        kw = dict(model="m", messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=2, stop=stop)
        plain = c.chat.completions.create(**kw).choices[0]
        deltas = [x for ch in c.chat.completions.create(**kw, stream=True) for x in ch.choices]
        assert "".join(d.delta.content or "" for d in deltas) == plain.message.content
        entries = [e.model_dump() for d in deltas if d.logprobs for e in d.logprobs.content]
        assert entries == [e.model_dump() for e in plain.logprobs.content] and entries
        kw = dict(model="m", prompt="hi there", logprobs=2, stop=stop)
        plain = c.completions.create(**kw).choices[0]
        parts = [x for ch in c.completions.create(**kw, stream=True) for x in ch.choices]
        assert "".join(p.text for p in parts) == plain.text
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [v for p in parts if p.logprobs for v in getattr(p.logprobs, key)] == getattr(plain.logprobs, key)
