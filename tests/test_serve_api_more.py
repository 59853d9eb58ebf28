"""`serve` against the OpenAI API's contract, part two: a request larger than `serve.max_batch` runs as several
backend calls and gets its answers back in order (a seed's answers unchanged); OpenAI fields the server does not
implement are refused with a 400 naming them unless left at their default; completions take token-id prompts;
`GET /v1/models/{id}`; SIGINT and SIGTERM end `serve` like any stage, after the request in flight."""

import asyncio
import json
import os
import signal
import socket
import threading
import time

import openai
import pytest
from fastapi.testclient import TestClient
from test_teacher_serve import _tiny_llama_backend, post

from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.config import serve_config
from proxykd_jax.teacher.listen import ServerThread, serve
from proxykd_jax.teacher.server import Batcher, Completion, make_app


class EchoBackend(ToyBackend):
    """Answers each sequence with its prompt's ids and its sample index within the call, and records the
    sequences of every call."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def complete(self, prompts, *, n, seeds=None, **kw):
        self.sizes.append(len(prompts) * n)
        return [[Completion([*p, j], "stop") for j in range(n)] for p in prompts]


def _params(n, temperature=1.0):
    return dict(
        n=n, temperature=temperature, top_p=1.0, max_tokens=6, logprobs=True, top_logprobs=2, to_context=False
    )  # fmt: skip


def _submit_all(backend, max_batch, requests):
    """Each (prompts, params, seed) submitted at once to one Batcher; their answers and the call sizes."""

    async def run():
        batcher = Batcher(backend, 0.001, max_batch)
        return await asyncio.gather(*(batcher.submit(p, params, seed) for p, params, seed in requests)), batcher.calls

    return asyncio.run(run())


def test_a_large_request_runs_in_calls_of_at_most_max_batch_sequences():
    """n=10 of one prompt, 9 prompts, and 5 prompts x n=3 with max_batch=4: every call holds at most 4 sequences
    (it took the whole request: 10, 9, 15), and each prompt gets its own n answers back, in order."""
    prompts9 = [[100 + i] for i in range(9)]
    prompts5 = [[200 + i, 1] for i in range(5)]
    (one, nine, five), calls = _submit_all(
        EchoBackend(), 4, [([[7, 8]], _params(10), None), (prompts9, _params(1), None), (prompts5, _params(3), None)]
    )
    assert max(calls) <= 4 and sum(calls) == 10 + 9 + 15, calls
    assert len(one) == 1 and len(one[0]) == 10 and all(c.token_ids[:2] == [7, 8] for c in one[0])
    assert [[c.token_ids for c in row] for row in nine] == [[[100 + i, 0]] for i in range(9)]
    assert [[c.token_ids for c in row] for row in five] == [[[200 + i, 1, j] for j in range(3)] for i in range(5)]


def test_a_split_request_gets_the_answers_of_the_unsplit_one_for_its_seed():
    """Seeded answers do not depend on how `max_batch` cuts a request: sampled answers (and their log-probs) of
    7 prompts x n=3 with a seed equal those of one call, as do those of a seeded prompt whose n exceeds max_batch, run in parts."""
    prompts = [list(f"prompt {i}".encode()) for i in range(7)]
    requests = [(prompts, _params(3), 11), ([list(b"solo")], _params(6), 5)]
    split, calls = _submit_all(ToyBackend(), 4, requests)
    whole, whole_calls = _submit_all(ToyBackend(), 64, requests)
    assert whole_calls == [21, 6] and sorted(calls) == [2] + [3] * 7 + [4]  # the seeded n=6 in parts of 4 and 2
    for got, want in zip(split, whole):
        assert [[(c.token_ids, c.logprobs, c.top) for c in row] for row in got] == [
            [(c.token_ids, c.logprobs, c.top) for c in row] for row in want
        ]


def test_seeded_answers_of_a_real_model_survive_the_split(tmp_path):
    """The same with `LlamaBackend`, whose seeded rows take their key from the seed and the sample's index."""
    backend, words = _tiny_llama_backend(tmp_path, 64)
    prompts = [backend.encode(" ".join(words[i : i + 3])) for i in range(3)]
    params = dict(_params(2), logprobs=False, top_logprobs=0)
    (split,), calls = _submit_all(backend, 2, [(prompts, params, 123)])
    (whole,), _ = _submit_all(backend, 64, [(prompts, params, 123)])
    assert calls == [2, 2, 2]
    assert [[c.token_ids for c in row] for row in split] == [[c.token_ids for c in row] for row in whole]
    assert len({tuple(c.token_ids) for row in whole for c in row}) > 1  # sampled, not one answer repeated


def test_a_large_request_over_http_is_split_and_numbered_in_order():
    backend = EchoBackend()
    app = make_app(backend, max_batch=4)
    body = {"model": "toy", "prompt": ["ab", "cd"], "n": 5, "max_tokens": 3}
    answer = TestClient(app).post("/v1/completions", json=body).json()
    assert max(backend.sizes) <= 4 and sum(backend.sizes) == 10, backend.sizes
    assert [c["index"] for c in answer["choices"]] == list(range(10))
    assert [c["text"][:2] for c in answer["choices"]] == ["ab"] * 5 + ["cd"] * 5


CHAT_BODY = {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
COMPLETION_BODY = {"model": "toy", "prompt": "hi", "max_tokens": 5, "temperature": 0}
UNSUPPORTED = [  # (endpoint, field, a value that would change the answer)
    ("completions", "logit_bias", {"97": 100}),
    ("completions", "presence_penalty", 1.5),
    ("completions", "frequency_penalty", -0.5),
    ("completions", "best_of", 3),
    ("completions", "suffix", " the end"),
    ("chat/completions", "logit_bias", {"97": -100}),
    ("chat/completions", "presence_penalty", 0.3),
    ("chat/completions", "frequency_penalty", 2),
    ("chat/completions", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("chat/completions", "tool_choice", "required"),
    ("chat/completions", "functions", [{"name": "f", "parameters": {}}]),
    ("chat/completions", "function_call", {"name": "f"}),
    ("chat/completions", "response_format", {"type": "json_object"}),
    ("chat/completions", "modalities", ["text", "audio"]),
    ("chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
    ("chat/completions", "reasoning_effort", "high"),
    ("chat/completions", "web_search_options", {}),
]
HARMLESS = {  # fields accepted at these values, each leaving the answer as it is
    "completions": dict(
        logit_bias={}, presence_penalty=0, frequency_penalty=0.0, best_of=1, echo=False, suffix=None, user="u1",
        stream=False, stream_options={"include_usage": True}, metadata={"a": "b"}, some_new_field=[1],
    ),
    "chat/completions": dict(
        logit_bias=None, presence_penalty=0.0, frequency_penalty=0, tools=[], tool_choice="none", functions=None,
        function_call="auto", response_format={"type": "text"}, modalities=["text"], parallel_tool_calls=True,
        user="u1", store=False, metadata={"a": "b"}, service_tier="auto", stream_options=None, seed=None,
        prediction={"type": "content", "content": "hello"}, prompt_cache_key="k", safety_identifier="s",
    ),
}  # fmt: skip


def test_unsupported_fields_that_would_change_the_answer_are_refused_by_name():
    client = TestClient(make_app(ToyBackend()))
    for endpoint, field, value in UNSUPPORTED:
        body = {**(COMPLETION_BODY if endpoint == "completions" else CHAT_BODY), field: value}
        answer = client.post(f"/v1/{endpoint}", json=body)
        err = answer.json()["error"]
        assert answer.status_code == 400 and err["param"] == field, (endpoint, field, err)
        assert f"'{field}'" in err["message"] and "not supported" in err["message"], err
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request"
    for endpoint, extra in HARMLESS.items():
        body = COMPLETION_BODY if endpoint == "completions" else CHAT_BODY
        plain, same = client.post(f"/v1/{endpoint}", json=body), client.post(f"/v1/{endpoint}", json={**body, **extra})
        assert plain.status_code == same.status_code == 200, same.json()
        assert same.json()["choices"] == plain.json()["choices"]


def test_echo_prepends_the_prompt_and_refuses_prompt_log_probs():
    client = TestClient(make_app(ToyBackend()))
    body = {**COMPLETION_BODY, "prompt": ["the cat", "a dog"], "n": 2, "stop": "t"}
    plain = client.post("/v1/completions", json=body).json()["choices"]
    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"]
    prompts = ["the cat", "the cat", "a dog", "a dog"]  # per choice; the stop string cuts the answer only
    assert [c["text"] for c in echoed] == [p + c["text"] for p, c in zip(prompts, plain)]
    assert [c["finish_reason"] for c in echoed] == [c["finish_reason"] for c in plain]
    answer = client.post("/v1/completions", json={**body, "echo": True, "logprobs": 1})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "echo", answer.json()
    assert "not supported" in answer.json()["error"]["message"]


class VocabToy(ToyBackend):
    vocab = 257  # bytes and the end-of-sequence token


def test_completions_take_token_id_prompts_below_the_vocabulary():
    """A prompt of token ids (OpenAI: a list of ints, or a list of such lists) gets the answer of its text; an
    id outside the vocabulary, a negative or non-integer id, an empty list and a mix of text and ids are 400s."""
    with ServerThread(make_app(VocabToy())) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        kw = dict(model="toy", max_tokens=6, temperature=0, logprobs=2)
        by_text = client.completions.create(prompt=["hi", "a dog"], **kw)
        by_ids = client.completions.create(prompt=[list(b"hi"), list(b"a dog")], **kw)
        one = client.completions.create(prompt=list(b"hi"), **kw)
        assert by_ids.choices == by_text.choices and by_ids.usage == by_text.usage
        assert one.choices == by_text.choices[:1]
        for prompt, says in [
            ([104, 257], "257"),
            ([[104], [3, 99999]], "99999"),
            ([104, -1], "prompt"),
            ([104, 1.5], "prompt"),
            ([104, True], "prompt"),
            ([[]], "prompt"),
            (["hi", [104]], "prompt"),
        ]:
            status, answer = post(srv.port, "/v1/completions", json.dumps({"model": "toy", "prompt": prompt}))
            assert status == 400 and answer["error"]["param"] == "prompt" and says in answer["error"]["message"], (
                prompt,
                answer,
            )
    with ServerThread(make_app(ToyBackend())) as srv:  # a backend that names no vocabulary takes text only
        status, answer = post(srv.port, "/v1/completions", '{"model": "toy", "prompt": [104, 105]}')
        assert status == 400 and answer["error"]["param"] == "prompt"


def test_get_one_model():
    with ServerThread(make_app(ToyBackend(model_name="org/toy-1"))) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        model = client.models.retrieve("org/toy-1")
        assert (model.id, model.object, model.owned_by) == ("org/toy-1", "model", "proxykd_jax")
        assert model.model_dump() == client.models.list().data[0].model_dump()
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve("other")
        err = info.value.body
        assert err["code"] == "model_not_found" and err["param"] == "model" and "'other'" in err["message"]


class HeldBackend(ToyBackend):
    """A toy whose generation waits for `release`, telling `started` it began."""

    def __init__(self):
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def complete(self, prompts, **kw):
        self.started.set()
        assert self.release.wait(30)
        return super().complete(prompts, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_ends_serve_as_an_interrupt_after_the_request_in_flight(signame):
    """SIGINT or SIGTERM during a request: the request still gets its answer, then `serve` raises
    KeyboardInterrupt naming the signal (the CLI prints one line and exits 130 or 143); uvicorn's own `run`
    swallowed it and `serve` returned as if it had been asked to stop (exit 0, no message)."""
    cfg, backend, answers = serve_config(), HeldBackend(), []
    cfg.port = _free_port()

    def client():
        deadline = time.monotonic() + 30
        while True:  # until the server listens
            try:
                socket.create_connection(("127.0.0.1", cfg.port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        request = threading.Thread(
            target=lambda: answers.append(post(cfg.port, "/v1/completions", '{"model": "toy", "prompt": "hi"}')),
        )
        request.start()
        assert backend.started.wait(30)
        os.kill(os.getpid(), getattr(signal, signame))
        backend.release.set()
        request.join(30)

    def as_cli(signum, frame):  # the CLI's SIGTERM handler (proxykd_jax/cli.py: _raise_interrupt)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, as_cli)
    helper = threading.Thread(target=client, daemon=True)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            serve(cfg, lambda: backend)
    finally:
        signal.signal(signal.SIGTERM, previous)
        backend.release.set()
        helper.join(30)
    assert str(info.value) == signame
    assert len(answers) == 1 and answers[0][0] == 200 and answers[0][1]["choices"][0]["text"]
