"""`collect` against teachers that misbehave in quieter ways: no log-probs, tokens past a stop string,
a restart that outlasts a short breaker, error bodies whose message matters. In-process: `serve`'s app
on loopback (`ServerThread`), a fake clock for the breaker."""

import contextlib
import io
import json
import random
import types

import httpx2
import openai
import pytest
from test_teacher_wire import make_cfg as wire_cfg
from test_teacher_wire import read_corpus

from proxykd_jax.teacher import client as client_mod
from proxykd_jax.teacher import collector as collector_mod
from proxykd_jax.teacher import failures
from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.client import CollectError, collect
from proxykd_jax.teacher.config import collect_config
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.responses import parse_answer
from proxykd_jax.teacher.server import make_app


def make_cfg(tmp_path, base_url, n_prompts=4, **kw):
    """test_teacher_wire's collect config over `n_prompts` prompts written here."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(n_prompts)))
    return wire_cfg(tmp_path, base_url, **kw)


def strip_logprobs(monkeypatch, which=lambda key: True):
    """The teacher answers, and a proxy in between drops `logprobs` from the answers to `which` keys."""
    request = collector_mod.Collector._request

    async def stripped(self, prompt, key, client):
        body = json.loads(await request(self, prompt, key, client))
        if which(key):
            for choice in body["choices"]:
                choice["logprobs"] = None
        return json.dumps(body).encode()

    monkeypatch.setattr(collector_mod.Collector, "_request", stripped)


def test_a_teacher_that_ignores_logprobs_stops_the_run_early_and_keeps_what_it_paid_for(tmp_path, monkeypatch):
    strip_logprobs(monkeypatch)
    with ServerThread(make_app(ToyBackend())) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, n_prompts=10, top_logprobs=5, concurrency=1)
        with pytest.raises(CollectError, match=r"returned no log-probs .*collect\.top_logprobs=5") as info:
            collect(cfg)
    message = str(info.value)
    assert "collect.top_logprobs=0" in message and cfg.base_url in message
    rows = read_corpus(cfg.out)
    assert len(rows) == collector_mod.LOGPROBS_CHECK < 10  # stopped after the first answers, which are kept
    assert all(row["response"] and "tokens" not in row for row in rows)
    assert info.value.stats["without_logprobs"] == len(rows)


def test_answers_missing_some_logprobs_are_counted_in_the_summary(tmp_path, monkeypatch):
    strip_logprobs(monkeypatch, lambda key: key in lacking)
    with ServerThread(make_app(ToyBackend())) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, n_prompts=6, top_logprobs=3, concurrency=1)
        params = client_mod.sampling_params(cfg)
        prompts = client_mod.read_prompts(cfg.prompts, cfg.api)
        lacking = {client_mod.request_key(cfg.model, prompts[i], params, 0) for i in (2, 5)}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            stats = collect(cfg)
    assert stats["without_logprobs"] == 2 and stats["done"] == 6
    assert "2 answers came without the log-probs" in out.getvalue()
    rows = read_corpus(cfg.out)
    assert sorted(row["key"] in lacking for row in rows if "tokens" not in row) == [True, True]


def chat_body(text, tokens, k=2, rng=None):
    rng = rng or random.Random(0)
    content = [
        {
            "token": t,
            "logprob": -rng.random(),
            "bytes": list(t.encode()),
            "top_logprobs": [
                {"token": f"a{j}", "logprob": -rng.random() - j, "bytes": list(b"a%d" % j)} for j in range(k)
            ],
        }
        for t in tokens
    ]
    choice = {
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
        "logprobs": {"content": content},
    }
    return json.dumps({"choices": [choice]}).encode()


def completion_body(text, tokens, rng):
    lp = {"tokens": tokens, "top_logprobs": [{t: -rng.random(), "zz": -5.0} for t in tokens]}
    return json.dumps({"choices": [{"text": text, "finish_reason": "stop", "logprobs": lp}]}).encode()


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_tokens_that_run_past_a_stop_cut_are_dropped_so_the_rest_spell_the_response(api):
    """The server keeps the token that straddles the stop string ('w12' answered with tokens ['w124']):
    the record keeps the tokens that spell a prefix of the response and drops that one and what follows."""
    rng = random.Random(1234)
    for _ in range(200):
        tokens = ["".join(rng.choice("w1234 é") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 8))]
        whole = "".join(tokens)
        text = whole[: rng.randint(1, len(whole))]
        body = chat_body(text, tokens, rng=rng) if api == "chat" else completion_body(text, tokens, rng)
        got = parse_answer(body, api, True).logprobs
        ends = [len("".join(tokens[:i]).encode()) for i in range(len(tokens) + 1)]
        keep = max(i for i, end in enumerate(ends) if end <= len(text.encode()))  # the reference: the longest prefix
        assert got["tokens"] == tokens[:keep]
        assert b"".join(bytes(b) for b in got["token_bytes"]) == text.encode()[: ends[keep]]
        assert len(got["top_logprobs"]) == keep
        body = chat_body(whole, tokens) if api == "chat" else completion_body(whole, tokens, rng)
        full = parse_answer(body, api, True)
        assert full.logprobs["tokens"] == tokens  # a response the tokens spell exactly keeps them all
    other = parse_answer(chat_body("xyz", ["ab", "c"]), "chat", True).logprobs  # tokens that spell other text
    assert other["tokens"] == ["ab", "c"]  # left as they are: prepare's byte head decides about those


def fake_clock(monkeypatch):
    """A clock only the collector's waits move: `Collector._sleep` advances it instead of sleeping."""
    now = [0.0]
    monkeypatch.setattr(
        collector_mod, "time", types.SimpleNamespace(monotonic=lambda: now[0], time=lambda: 1e9 + now[0])
    )

    async def sleep(self, seconds):
        now[0] += max(seconds, 0.0)

    monkeypatch.setattr(collector_mod.Collector, "_sleep", sleep)
    return now


def outage(monkeypatch, now, start, end):
    """Connections are refused from the first request after `start` s of the fake clock until `end`."""
    request = collector_mod.Collector._request

    async def flaky(self, prompt, key, client):
        if self.stats["done"] >= 1 and now[0] < start:
            now[0] = start  # the server goes down after the first stored sample
        if start <= now[0] < end:
            raise openai.APIConnectionError(request=httpx2.Request("POST", "http://127.0.0.1/v1"))
        return await request(self, prompt, key, client)

    monkeypatch.setattr(collector_mod.Collector, "_request", flaky)


def test_the_default_breaker_waits_out_a_server_restart_and_says_what_it_does(tmp_path, monkeypatch):
    now = fake_clock(monkeypatch)
    outage(monkeypatch, now, 10.0, 100.0)  # a restart with compilation: 90 s without an answer
    with ServerThread(make_app(ToyBackend())) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, concurrency=1)
        cfg.backoff_initial_s = collect_config().backoff_initial_s
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            stats = collect(cfg)
    assert stats["done"] == 4 and not stats["failed"]
    lines = out.getvalue().splitlines()
    assert sum("stopped answering" in line for line in lines) == 1, lines
    probes = [line for line in lines if "next try in" in line]
    assert len(probes) >= 5 and all(cfg.base_url in line for line in probes), lines


def test_a_server_gone_for_good_stops_after_the_configured_probes(tmp_path, monkeypatch):
    now = fake_clock(monkeypatch)
    outage(monkeypatch, now, 10.0, float("inf"))
    with ServerThread(make_app(ToyBackend())) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, concurrency=2, breaker_failures=5, backoff_max_s=4.0)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(CollectError, match="stopped answering: 5 attempts"):
            collect(cfg)
    probes = [line for line in out.getvalue().splitlines() if "next try in" in line]
    assert [f"probe {k} of 5" in line for k, line in enumerate(probes, 1)] == [True] * 4, probes
    assert len(read_corpus(cfg.out)) >= 1


def test_an_endpoint_that_never_answered_is_given_up_after_the_short_count(tmp_path, monkeypatch):
    """A wrong port or URL: the default breaker's two minutes are for a server that went quiet; one that
    never answered is given up after UNREACHED_PROBES probes (about 16 s), as before the longer default."""
    now = fake_clock(monkeypatch)
    outage(monkeypatch, now, 0.0, float("inf"))
    with ServerThread(make_app(ToyBackend())) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, concurrency=2)
        cfg.backoff_initial_s, cfg.breaker_failures = collect_config().backoff_initial_s, 9
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(CollectError, match="cannot reach .*: 6 attempts"):
            collect(cfg)
    probes = [line for line in out.getvalue().splitlines() if "next try in" in line]
    assert len(probes) == collector_mod.UNREACHED_PROBES - 1 and "probe 1 of 6" in probes[0], probes
    assert now[0] < 20.0


def test_a_wrong_model_names_the_servers_own_message(tmp_path):
    with ServerThread(make_app(ToyBackend())) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, model="gpt-4o")
        with pytest.raises(
            CollectError, match=r"not found \(404: The model 'gpt-4o' does not exist; this server serves 'toy'"
        ):
            collect(cfg)


def status_error(status, body):
    response = httpx2.Response(status, request=httpx2.Request("POST", "http://x/v1/chat/completions"), json=body)
    return openai.APIStatusError(f"Error code: {status}", response=response, body=body.get("error", body))


def test_failure_rows_and_fatal_errors_carry_the_error_message_truncated_and_without_the_key():
    failure = failures.classify(status_error(429, {"error": {"message": "Rate limit reached for gpt-4o"}}))
    assert failure.retryable and str(failure) == "HTTP 429: Rate limit reached for gpt-4o"
    long = "x" * 500
    failure = failures.classify(status_error(400, {"error": {"message": long}}))
    assert 200 <= len(str(failure)) < 240 and str(failure).endswith("...")
    failure = failures.classify(
        status_error(401, {"error": {"message": "Incorrect API key provided: sk-secret-123."}}), secret="sk-secret-123"
    )
    assert failure.fatal and "Incorrect API key provided" in str(failure) and "sk-secret-123" not in str(failure)
