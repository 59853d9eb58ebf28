"""`serve` with `stream: true`, through the official `openai` client: the streamed pieces of each choice
concatenate to the non-streamed answer of the same seed (n=2, stop strings, echo), `include_usage` ends the
stream with the non-streamed usage, every chunk of a response shares its `id`, `created` and `model`, a
token that ends mid-character is merged with the next, the raw wire is `data:` events ending with
`data: [DONE]`, and `stream` with log-probs is a plain JSON 400 naming `stream`."""

import http.client
import json
import random

import openai
import pytest
from test_teacher_serve import post

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


@pytest.mark.parametrize(
    "path, extra",
    [
        ("/v1/chat/completions", {"logprobs": True}),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 3}),
        ("/v1/completions", {"logprobs": 0}),
        ("/v1/chat/completions", {"stream_options": "yes"}),
    ],
)
def test_stream_with_logprobs_is_a_plain_400_naming_stream(client, path, extra):
    _, srv = client
    body = {"model": "toy", "max_tokens": 4, "stream": True, **extra}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    status, answer = post(srv.port, path, json.dumps(body))
    field = "stream_options" if "stream_options" in extra else "stream"
    assert status == 400 and answer["error"]["param"] == field and f"'{field}'" in answer["error"]["message"]
