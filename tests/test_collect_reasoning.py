"""`collect` from a reasoning-model teacher (OpenAI o-series / gpt-5, OpenAI-compatible servers of DeepSeek-R1-like
models): the limit sent as `max_completion_tokens` (`collect.token_limit`), temperature and top_p left out
(`collect.send_sampling`), a field the endpoint refuses stopping the run at its first answer with the setting to
change, hidden reasoning tokens kept in the record's usage and bounded for the spend cap. In-process: a small
FastAPI app that answers as such an endpoint does, on loopback (`ServerThread`)."""

from __future__ import annotations

import json
import random

import fastapi
import httpx2
import openai
import pytest
from fastapi.responses import JSONResponse
from test_teacher_wire import make_cfg as wire_cfg
from test_teacher_wire import read_corpus

from proxykd_jax.teacher import client as client_mod
from proxykd_jax.teacher import collector as collector_mod
from proxykd_jax.teacher import failures
from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.client import CollectError, collect
from proxykd_jax.teacher.journal import read_done_and_billed
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.responses import usage_counts
from proxykd_jax.teacher.server import make_app

MAX_TOKENS_REFUSED = (
    "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."
)


def _refuse(param: str, code: str, message: str) -> JSONResponse:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=400)


def reasoning_app(rng: random.Random, *, bounds_reasoning: bool = True) -> fastapi.FastAPI:
    """An o-series chat endpoint: 400 for `max_tokens`, `top_p`, `logprobs` and a temperature other than 1; each
    answer spends hidden reasoning tokens, billed as completion tokens (`completion_tokens_details`), and carries
    no log-probs. `max_completion_tokens` bounds reasoning and text together; one answer in three reasons until
    the limit and has no content (finish_reason "length"). `bounds_reasoning=False`: a server that takes
    `max_tokens` as the bound of the visible answer only and bills its reasoning on top (up to 5x the limit)."""
    app = fastapi.FastAPI()
    app.state.bodies, app.state.billed = [], []

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request):
        body = json.loads(await request.body())
        app.state.bodies.append(body)
        if bounds_reasoning:
            if "max_tokens" in body:
                return _refuse("max_tokens", "unsupported_parameter", MAX_TOKENS_REFUSED)
            if body.get("temperature", 1) != 1:
                return _refuse(
                    "temperature",
                    "unsupported_value",
                    f"Unsupported value: 'temperature' does not support {body['temperature']} with this model. "
                    "Only the default (1) value is supported.",
                )
            if "top_p" in body:
                return _refuse("top_p", "unsupported_parameter", "Unsupported parameter: 'top_p' is not supported.")
            if body.get("logprobs"):
                return _refuse(
                    "logprobs", "unsupported_parameter", "Unsupported parameter: 'logprobs' is not supported"
                )
            limit = body["max_completion_tokens"]
            reasoning = min(limit, rng.randint(1, 3 * limit // 2))
            shown = rng.randint(1, limit - reasoning) if reasoning < limit else 0
        else:
            limit = body.get("max_tokens") or body["max_completion_tokens"]
            reasoning = rng.randint(limit, 5 * limit) if "max_tokens" in body else rng.randint(1, limit - 1)
            shown = rng.randint(1, limit if "max_tokens" in body else limit - reasoning)
        prompt_tokens = rng.randint(5, 40)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": reasoning + shown,
            "total_tokens": prompt_tokens + reasoning + shown,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "accepted_prediction_tokens": 0},
        }
        app.state.billed.append(usage)
        message = {"role": "assistant", "content": " ".join(["w"] * shown), "refusal": None}
        choice = {"index": 0, "message": message, "finish_reason": "stop" if shown else "length", "logprobs": None}
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [choice],
            "usage": usage,
        }

    return app


def make_cfg(tmp_path, base_url, n_prompts, **kw):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(n_prompts)))
    kw = {"model": "o4-mini", "concurrency": 4, "max_tokens": 64, **kw}
    return wire_cfg(tmp_path, base_url, **kw)


def test_an_endpoint_that_refuses_max_tokens_stops_the_run_at_its_first_answer_naming_the_setting(tmp_path):
    app = reasoning_app(random.Random())
    with ServerThread(app) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, random.randint(8, 20))
        with pytest.raises(CollectError, match=r"collect stopped: .* refuses the request field 'max_tokens'") as info:
            collect(cfg)
    message = str(info.value)
    assert MAX_TOKENS_REFUSED in message and "set collect.token_limit='max_completion_tokens'" in message
    assert len(app.state.bodies) == 1  # the first answer says so: no request more is spent on it
    assert "\n" not in message


@pytest.mark.parametrize(
    "settings, field, advice",
    [
        (dict(), "top_p", "collect.send_sampling=False"),
        (dict(temperature=0.7), "temperature", "collect.send_sampling=False"),
        (dict(send_sampling=False, temperature=1.0, top_logprobs=5), "logprobs", "collect.top_logprobs=0"),
    ],
)
def test_refused_sampling_fields_name_the_setting_that_sends_them(tmp_path, settings, field, advice):
    app = reasoning_app(random.Random())
    with ServerThread(app) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, 6, token_limit="max_completion_tokens", **settings)
        with pytest.raises(CollectError, match=rf"refuses the request field '{field}' \(400: .*; set {advice}"):
            collect(cfg)
    assert len(app.state.bodies) == 1


def test_a_reasoning_endpoint_is_collected_with_its_usage_as_billed(tmp_path):
    """`max_completion_tokens` instead of `max_tokens`, no temperature or top_p; each record's usage keeps its
    reasoning tokens and its meta says what was sent; answers the reasoning ran out of the limit on are final,
    with a message naming the limit; the journal reads the stored usage back as billed."""
    rng = random.Random()
    n, limit = rng.randint(12, 24), rng.randint(16, 64)
    app = reasoning_app(random.Random(rng.random()))
    with ServerThread(app) as srv:
        cfg = make_cfg(
            tmp_path,
            srv.base_url,
            n,
            token_limit="max_completion_tokens",
            send_sampling=False,
            max_tokens=limit,
            price_input_per_mtok=1e6,
            price_output_per_mtok=1e6,
            max_cost=1e9,
        )
        stats = collect(cfg)
    assert all("max_tokens" not in b and "temperature" not in b and "top_p" not in b for b in app.state.bodies)
    assert all(b["max_completion_tokens"] == limit for b in app.state.bodies) and len(app.state.bodies) == n
    rows = read_corpus(cfg.out)
    empty = sum(u["completion_tokens_details"]["reasoning_tokens"] == limit for u in app.state.billed)
    assert len(rows) == stats["done"] == n - empty and stats["declined"] == ({"no_content": empty} if empty else {})
    for row in rows:
        meta = row["meta"]
        assert meta["temperature"] is None and meta["top_p"] is None and meta["max_completion_tokens"] == limit
        assert "max_tokens" not in meta
        usage = meta["usage"]
        assert set(usage) == {"prompt_tokens", "completion_tokens", "completion_tokens_details"}
        assert usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"] <= limit
    counts = lambda u: (u["prompt_tokens"], u["completion_tokens"], u["completion_tokens_details"]["reasoning_tokens"])  # noqa: E731
    stored = sorted(counts(row["meta"]["usage"]) for row in rows)
    assert stored == sorted(counts(u) for u in app.state.billed if counts(u)[2] < limit)  # each as it was billed
    if empty:
        fails = read_corpus(cfg.out + ".failures.jsonl")
        assert all("collect.max_tokens" in f["message"] and "reasoning" in f["message"] for f in fails)
    assert stats["tokens_out"] == sum(u["completion_tokens"] for u in app.state.billed)
    assert stats["reasoning_tokens"] == sum(
        u["completion_tokens_details"]["reasoning_tokens"] for u in app.state.billed
    )
    assert f"({stats['reasoning_tokens']} of them reasoning)" in collector_mod.format_summary(stats)
    _, (tokens_in, tokens_out, unbilled, _, _) = read_done_and_billed(tmp_path / "corpus.jsonl")
    assert unbilled == 0 and tokens_out == sum(r["meta"]["usage"]["completion_tokens"] for r in rows)
    assert tokens_in == sum(r["meta"]["usage"]["prompt_tokens"] for r in rows)


def test_a_cap_stops_where_the_limit_does_not_bound_the_reasoning_and_continues_with_one_that_does(tmp_path):
    """An endpoint that bills reasoning on top of `max_tokens` would take a capped run past its cap (each request
    reserves `max_tokens` of output): the first answer billed above its limit stops the run, a re-run with that
    limit is refused before any request, and `max_completion_tokens` (a limit that bounds the reasoning) finishes
    the corpus under the cap."""
    rng = random.Random()
    n = rng.randint(10, 20)
    app = reasoning_app(random.Random(rng.random()), bounds_reasoning=False)
    with ServerThread(app) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, n, price_input_per_mtok=1e6, price_output_per_mtok=1e6)
        cfg.max_cost = float(n * (64 + 40 + 64) * 3)
        with pytest.raises(CollectError, match=r"billed \d+ completion tokens .* more than collect.max_tokens=64"):
            collect(cfg)
        assert len(app.state.bodies) == 1  # the first answer is asked for alone
        with pytest.raises(CollectError, match=r"collect.max_cost is set but 1 answers in .* more completion tokens"):
            collect(cfg)
        assert len(app.state.bodies) == 1
        cfg.token_limit = "max_completion_tokens"
        stats = collect(cfg)
    # the answer made under the other limit is another sample (its content key names the limit): asked again
    assert stats["done"] == n and stats["already_done"] == 0 and stats["corpus_cost"] <= cfg.max_cost
    assert all(u["completion_tokens"] <= 64 for u in app.state.billed[1:])


def test_serve_takes_max_completion_tokens_and_a_body_without_sampling_fields(tmp_path):
    with ServerThread(make_app(ToyBackend())) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, 5, model="toy", token_limit="max_completion_tokens", send_sampling=False)
        assert collect(cfg)["done"] == 5
    metas = [row["meta"] for row in read_corpus(cfg.out)]
    assert all(m["max_completion_tokens"] == 64 and m["usage"]["completion_tokens"] <= 64 for m in metas)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(token_limit="max_output_tokens"), "collect.token_limit must be 'max_tokens' or 'max_completion_tokens'"),
        (dict(token_limit="max_completion_tokens", api="completions"), "needs collect.api='chat'"),
        (dict(send_sampling=False, temperature=0.6), r"collect.temperature=0.6 is not sent .*send_sampling=False"),
        (dict(send_sampling=False, top_p=0.9), r"collect.top_p=0.9 is not sent .*send_sampling=False"),
    ],
)
def test_reasoning_settings_that_cannot_be_kept_are_one_sentence_before_any_request(tmp_path, settings, message):
    cfg = make_cfg(tmp_path, "http://127.0.0.1:9/v1", 2, **settings)
    with pytest.raises(CollectError, match=message):
        client_mod.check(cfg)


def test_usage_counts_keep_the_reasoning_tokens_billed_and_nothing_else():
    rng = random.Random()
    for _ in range(100):
        p, c = rng.randint(0, 10**6), rng.randint(0, 10**6)
        r = rng.randint(0, c)
        usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        usage["completion_tokens_details"] = {"reasoning_tokens": r, "audio_tokens": 0}
        assert usage_counts(usage) == {
            "prompt_tokens": p,
            "completion_tokens": c,
            "completion_tokens_details": {"reasoning_tokens": r},
        }
        for bad in (c + 1, -1, True, float(r), None):  # not a count within the completion tokens: left out
            usage["completion_tokens_details"] = {"reasoning_tokens": bad}
            assert usage_counts(usage) == {"prompt_tokens": p, "completion_tokens": c}


def test_a_refusal_without_param_is_read_from_its_message_and_other_400s_stay_per_sample():
    def error(body):
        response = httpx2.Response(400, request=httpx2.Request("POST", "http://x/v1/chat/completions"), json=body)
        return openai.APIStatusError("Error code: 400", response=response, body=body["error"])

    failure = failures.classify(error({"error": {"message": MAX_TOKENS_REFUSED}}))  # no param, no code
    assert failure.fatal and "set collect.token_limit='max_completion_tokens'" in str(failure)
    failure = failures.classify(error({"error": {"message": "Unsupported value: 'top_p' must be 1", "param": None}}))
    assert failure.fatal and "collect.send_sampling=False" in str(failure)
    too_long = {"message": "This model's maximum context length is 128000 tokens.", "param": "messages"}
    failure = failures.classify(error({"error": {**too_long, "code": "context_length_exceeded"}}))
    assert not failure.fatal and not failure.retryable and failure.reason == "http_400"
    failure = failures.classify(error({"error": {"message": "Unsupported parameter: 'tools'", "param": "tools"}}))
    assert not failure.fatal  # not a field collect sends


def test_content_keys_tell_the_reasoning_settings_apart_and_the_default_keys_stay_what_they_were(tmp_path):
    """A redo (`run.overwrite`) carries over only the answers its own settings ask for: one sampled at the
    endpoint's own temperature (not sent) or under another limit is another sample."""
    from proxykd_jax.teacher.prompts import Prompt, canonical, request_key, sampling_params

    cfg = wire_cfg(tmp_path, "http://127.0.0.1:9")
    prompt = Prompt(id="p1", prompt="why is the sky blue?", line=1, messages=None)
    old = {"api": cfg.api, "temperature": float(cfg.temperature), "top_p": float(cfg.top_p)}
    old |= {"max_tokens": int(cfg.max_tokens), "stop": list(cfg.stop), "top_logprobs": int(cfg.top_logprobs)}
    assert canonical(sampling_params(cfg)) == canonical(old)  # the keys of every corpus made before
    keys = {request_key(cfg.model, prompt, sampling_params(cfg), 0)}
    for field, value in (("send_sampling", False), ("token_limit", "max_completion_tokens")):
        other = cfg.copy_and_resolve_references()
        with other.unlocked():
            other[field] = value
        keys.add(request_key(other.model, prompt, sampling_params(other), 0))
    assert len(keys) == 3
