"""`collect` against `serve` over real loopback HTTP: faults, dedup, resume, rate limits, bad input."""

import collections
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import openai
import pytest

from proxykd_jax.progress import bar
from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.client import CollectError, RateLimiter, collect
from proxykd_jax.teacher.config import collect_config
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.responses import MalformedResponse, parse_answer
from proxykd_jax.teacher.server import Faults, make_app

ROOT = pathlib.Path(__file__).resolve().parent.parent


def write_prompts(path, n, chat=False):
    lines = []
    for i in range(n):
        row = {"id": f"p{i}"}
        if chat:
            row["messages"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {i}"}]
        else:
            row["prompt"] = f"prompt number {i}"
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_cfg(tmp_path, base_url, **kw):
    cfg = collect_config()
    cfg.prompts = str(tmp_path / "prompts.jsonl")
    cfg.out = str(tmp_path / "corpus.jsonl")
    cfg.base_url, cfg.model = base_url, "toy"
    cfg.max_tokens, cfg.backoff_initial_s, cfg.progress = 8, 0.01, False
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def read_corpus(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def ok_counts(app):
    return collections.Counter(e["key"] for e in app.state.requests if e["outcome"] == "ok")


def test_complete_and_unique_under_faults(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 15, chat=True)
    faults = Faults(
        fail_429_rate=0.15,
        retry_after_s=0.05,
        fail_500_rate=0.1,
        slow_rate=0.1,
        slow_delay_s=0.05,
        drop_rate=0.1,
        malformed_rate=0.1,
        seed=3,
    )
    app = make_app(ToyBackend(), faults)
    with ServerThread(app) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, samples_per_prompt=3, top_logprobs=4, concurrency=8)
        stats = collect(cfg)
    rows = read_corpus(cfg.out)
    keys = [r["key"] for r in rows]
    assert len(rows) == 45 and len(set(keys)) == 45
    assert {(r["id"], r["sample_index"]) for r in rows} == {(f"p{i}", s) for i in range(15) for s in range(3)}
    outcomes = collections.Counter(e["outcome"] for e in app.state.requests)
    assert all(outcomes[k] > 0 for k in ("429", "500", "503", "drop", "malformed"))
    # every sample was answered in full exactly once: nothing was paid for twice
    assert ok_counts(app) == collections.Counter(keys)
    assert (
        stats["done"] == 45
        and stats["failed"] == {}
        and stats["retries"] >= sum(outcomes[k] for k in ("429", "500", "503", "drop", "malformed"))
    )
    assert not pathlib.Path(cfg.out + ".failures.jsonl").exists()
    for r in rows:  # top_logprobs round-trip: one entry per teacher token, the tokens spell the text
        assert r["messages"][1]["content"] == f"question {r['id'][1:]}"
        assert "".join(r["tokens"]) == r["response"]
        assert r["token_bytes"] == [list(t.encode()) for t in r["tokens"]]
        assert len(r["top_logprobs"]) == len(r["tokens"]) and all(len(t) == 4 for t in r["top_logprobs"])
        for alts in r["top_logprobs"]:
            lps = [a["logprob"] for a in alts]
            assert lps == sorted(lps, reverse=True) and lps[0] <= 0
        assert r["meta"]["usage"]["completion_tokens"] == len(r["tokens"])
        assert "api_key" not in json.dumps(r)


def test_rerun_skips_done_and_key_never_stored(tmp_path, monkeypatch):
    write_prompts(tmp_path / "prompts.jsonl", 6)
    monkeypatch.setenv("TOY_KEY", "sk-secret-123")
    app = make_app(ToyBackend(), api_key="sk-secret-123")
    with ServerThread(app) as srv:
        cfg = make_cfg(
            tmp_path, srv.base_url, api="completions", samples_per_prompt=2, api_key_env="TOY_KEY", top_logprobs=2
        )
        first = collect(cfg)
        n_requests = len(app.state.requests)
        second = collect(cfg)
        assert len(app.state.requests) == n_requests  # nothing requested again
        cfg.samples_per_prompt = 3  # one more sample per prompt: only the new ones are requested
        third = collect(cfg)
    assert (first["done"], second["done"], second["already_done"], third["done"]) == (12, 0, 12, 6)
    assert len(app.state.requests) == n_requests + 6
    text = pathlib.Path(cfg.out).read_text()
    assert "sk-secret-123" not in text and len(read_corpus(cfg.out)) == 18
    row = read_corpus(cfg.out)[0]
    assert row["prompt"] == "prompt number 0" and len(row["tokens"]) == len(row["top_logprobs"])


def test_rate_limit_holds_on_the_wire(tmp_path, monkeypatch):
    """The bucket holds exactly on the client's grants; the wire sees every request and the long-run rate.

    A request granted by the bucket reaches the server after the client's event loop sends it; on a
    busy machine several granted requests can arrive together (CI saw 21 inside 61 ms), so the exact
    bound is checked where the client controls it, on the grant times, and the wire check allows the
    loop's delay only once, for the whole run's span.
    """
    grants = []
    take = RateLimiter._take

    def recording_take(self, amount):
        grants.append(time.monotonic())
        return take(self, amount)

    monkeypatch.setattr(RateLimiter, "_take", recording_take)
    write_prompts(tmp_path / "prompts.jsonl", 40)
    app = make_app(ToyBackend())
    with ServerThread(app) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, requests_per_minute=900, concurrency=16)
        collect(cfg)
    limiter = RateLimiter(900)  # capacity 15 requests, refill 14.75/s
    assert len(grants) == 40 and len(app.state.requests) == 40
    for i in range(len(grants)):
        for j in range(i + 1, len(grants)):  # no window holds more than the bucket lets through
            assert j - i + 1 <= limiter.capacity + limiter.rate * (grants[j] - grants[i]) + 1e-6
    times = sorted(e["t"] for e in app.state.requests)
    slack = 1.0  # seconds the first request may wait in the client's loop before it reaches the server
    assert times[-1] - times[0] >= (40 - limiter.capacity) / limiter.rate - slack
    assert times[-1] >= grants[-1]  # the server saw the last request after the bucket let it through


def test_token_bucket_debt_keeps_long_run_rate():
    import asyncio

    async def run():
        limiter = RateLimiter(6000)  # 100/s: capacity 100, refill 98.33/s
        start = time.monotonic()
        for _ in range(4):
            await limiter.acquire(150)  # larger than the capacity: waits for a full bucket, then debt
        return time.monotonic() - start, limiter

    elapsed, limiter = asyncio.run(run())
    # 600 units: 100 from the initial bucket, the rest refilled at limiter.rate (the last 150 as debt)
    assert elapsed >= (600 - 150 - limiter.capacity) / limiter.rate * 0.95


def test_no_minute_holds_more_than_the_limit_with_requests_above_the_capacity(monkeypatch):
    """On a virtual clock: 300-token requests against 1000 tokens/min (a bucket of 16.7) once got a grant
    every 18.3 s, 4 of them (1200 tokens) inside one minute; refunds count at their refunded size."""
    import asyncio
    import types

    from proxykd_jax.teacher import rate

    now = [0.0]

    async def sleep(seconds):
        now[0] += max(seconds, 0.0) + 1e-7  # the clock moves by what was asked (and never stalls)

    monkeypatch.setattr(rate, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(rate, "asyncio", types.SimpleNamespace(sleep=sleep, Lock=asyncio.Lock))

    async def run(limiter, amounts, refund=0.0):
        grants = []
        for amount in amounts:
            grant = await limiter.acquire(amount)
            grants.append((now[0], amount - refund))
            if refund:
                limiter.refund(refund, grant)
        return grants

    def busiest_minute(grants):
        return max(sum(a for u, a in grants if t <= u < t + 60.0) for t, _ in grants)

    grants = asyncio.run(run(RateLimiter(1000), [300] * 12))
    assert busiest_minute(grants) <= 1000 and grants[-1][0] < 12 * 60.0 / 3  # and no slower than 3 a minute
    now[0] = 0.0
    grants = asyncio.run(run(RateLimiter(1000), [300] * 12, refund=200))  # each used 100 of its 300
    assert busiest_minute(grants) <= 1000 and grants[-1][0] < 90.0  # at their refunded size: about 10 a minute
    now[0] = 0.0
    grants = asyncio.run(run(RateLimiter(1000), [1500, 10, 1500]))  # larger than the limit: alone in its minute
    assert busiest_minute(grants) == 1500


def test_both_limits_hold_where_requests_are_sent(tmp_path, monkeypatch):
    """Under a request and a token limit, no minute of sends holds more than either allows.

    On a virtual clock (the collector's `time` and `asyncio.sleep`; sleepers wake in order of their
    wake time once the loop is idle): a 4,000-byte prompt holds a 6,000 tokens-a-minute limiter back
    for most of a minute. The requests limiter used to grant requests while they waited for tokens, so they
    were counted in one minute and sent in the next, together: 17 sends in a minute at 10 a minute.
    """
    import asyncio
    import heapq
    import itertools
    import types

    from proxykd_jax.teacher import collector as collector_mod
    from proxykd_jax.teacher import rate

    now, wakes, order, driver = [0.0], [], itertools.count(), []

    async def drive():  # advances the clock to the next wake once every task is waiting
        while True:
            for _ in range(50):
                await asyncio.sleep(0)
            if wakes:
                when, _, future = heapq.heappop(wakes)
                now[0] = max(now[0], when)
                future.set_result(None)

    async def sleep(seconds):
        if not driver:
            driver.append(asyncio.ensure_future(drive()))
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(wakes, (now[0] + max(seconds, 0.0) + 1e-7, next(order), future))
        await future

    names = {name: getattr(asyncio, name) for name in dir(asyncio) if not name.startswith("_")}
    for module in (collector_mod, rate):  # the collector's clock and its rate limiters'
        monkeypatch.setattr(module, "asyncio", types.SimpleNamespace(**{**names, "sleep": sleep}))
        monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=lambda: now[0], time=time.time))
    sends = []
    request = collector_mod.Collector._request

    async def recording_request(self, prompt, key, client):
        sends.append(now[0])
        return await request(self, prompt, key, client)

    monkeypatch.setattr(collector_mod.Collector, "_request", recording_request)
    rows = [{"id": "big", "prompt": "x " * 2_000}] + [{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(24)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with ServerThread(make_app(ToyBackend())) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, requests_per_minute=10, tokens_per_minute=6_000, concurrency=8)
        collect(cfg)
    assert len(sends) == 25 and len(read_corpus(cfg.out)) == 25
    busiest = max(sum(t <= u < t + 60.0 for u in sends) for t in sends)
    assert busiest <= 10, f"{busiest} requests sent within one minute at 10 requests a minute"


def test_kill_mid_run_and_resume(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 40)
    app = make_app(ToyBackend(latency_s=0.02), Faults(fail_429_rate=0.1, retry_after_s=0.02, seed=5))
    with ServerThread(app) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, concurrency=2)
        script = textwrap.dedent(f"""
            import json, ml_collections
            from proxykd_jax.teacher.client import collect
            collect(ml_collections.ConfigDict(json.loads({cfg.to_json()!r})))
        """)
        proc = subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        out = pathlib.Path(cfg.out)
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text().count("\n") >= 8):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "collect wrote nothing within 60 s"
            time.sleep(0.02)  # polling a file another process writes
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        finished = {json.loads(line)["key"] for line in out.read_text().split("\n")[:-1]}
        assert 8 <= len(finished) < 40, "the kill should land mid-run"
        restart = time.monotonic()
        stats = collect(cfg)
    rows = read_corpus(out)
    assert len(rows) == 40 and len({r["key"] for r in rows}) == 40
    assert stats["already_done"] == len(finished)
    after = [e["key"] for e in app.state.requests if e["t"] >= restart]
    assert not finished & set(after), "a finished sample was requested again after the restart"


def test_unreachable_endpoint_is_one_clear_error(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    cfg = make_cfg(tmp_path, f"http://127.0.0.1:{port}/v1", max_attempts=2)
    with pytest.raises(CollectError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1"):
        collect(cfg)


def test_wrong_key_stops_and_keeps_collected(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 4)
    app = make_app(ToyBackend(), api_key="right")
    with ServerThread(app) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, api_key="right")
        collect(cfg)
        before = pathlib.Path(cfg.out).read_text()
        write_prompts(tmp_path / "prompts.jsonl", 8)
        cfg.api_key = "sk-bad-7f3a"
        n = len(app.state.requests)
        with pytest.raises(CollectError, match="API key was rejected") as info:
            collect(cfg)
    assert "sk-bad-7f3a" not in str(info.value)
    # until the endpoint has answered once, one request at a time: the rejected key cost one request
    assert [e["outcome"] for e in app.state.requests[n:]] == ["401"]
    assert pathlib.Path(cfg.out).read_text() == before


def test_malformed_prompt_line_fails_before_any_request(tmp_path):
    path = write_prompts(tmp_path / "prompts.jsonl", 3)
    path.write_text(path.read_text() + '{"id": "x", "prompt": \n')
    app = make_app(ToyBackend())
    with ServerThread(app) as srv:
        with pytest.raises(CollectError, match=r"prompts\.jsonl line 4: not valid JSON .*fix or remove"):
            collect(make_cfg(tmp_path, srv.base_url))
        path.write_text('{"id": "a", "messages": [{"role": "user"}]}\n')
        with pytest.raises(CollectError, match=r"line 1: 'messages' must be"):
            collect(make_cfg(tmp_path, srv.base_url))
    assert app.state.requests == []


class _EmptyForSome(ToyBackend):
    """Answers prompts that contain 'EMPTY' with no content at all."""

    def complete(self, prompts, **kw):
        out = super().complete(prompts, **kw)
        for p, row in zip(prompts, out):
            if b"EMPTY" in bytes(x for x in p if x < 256):
                for c in row:
                    c.token_ids, c.logprobs, c.top = [], None, None
        return out


def test_response_without_content_is_final_not_failed(tmp_path):
    path = write_prompts(tmp_path / "prompts.jsonl", 5)
    path.write_text(path.read_text() + json.dumps({"id": "e", "prompt": "EMPTY please"}) + "\n")
    app = make_app(_EmptyForSome())
    with ServerThread(app) as srv:
        cfg = make_cfg(tmp_path, srv.base_url)
        stats = collect(cfg)  # an empty answer is the teacher's answer: recorded, the run succeeds
        # a torn last line (a crash mid-write) is cut off and that sample fetched again
        out = pathlib.Path(cfg.out)
        rows = read_corpus(out)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]) + json.dumps(rows[-1])[:20])
        again = collect(cfg)
        asked = collections.Counter(e["key"] for e in app.state.requests)
        path.write_text(json.dumps({"id": "e", "prompt": "EMPTY please"}) + "\n")
        with pytest.raises(CollectError, match=r"stored nothing: every answer was empty or refused"):
            collect(make_cfg(tmp_path, srv.base_url, out=str(tmp_path / "other.jsonl")))
    assert stats["done"] == 5 and stats["declined"] == {"no_content": 1} and stats["failed"] == {}
    fails = read_corpus(cfg.out + ".failures.jsonl")
    assert fails[0]["id"] == "e" and fails[0]["reason"] == "no_content" and fails[0]["final"] is True
    # asked once: the re-run skipped it (asking again would pay again for the same answer)
    assert asked[fails[0]["key"]] == 1
    assert again["done"] == 1 and again["already_declined"] == 1 and len(read_corpus(cfg.out)) == 5


def test_answers_without_text_count_in_tokens_and_cost(tmp_path):
    """The endpoint bills an empty answer like any other: its usage goes into the tokens and the cost."""
    path = write_prompts(tmp_path / "prompts.jsonl", 3)
    path.write_text(path.read_text() + json.dumps({"id": "e", "prompt": "EMPTY please"}) + "\n")
    app = make_app(_EmptyForSome())
    with ServerThread(app) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, price_input_per_mtok=1e6, price_output_per_mtok=2e6)
        stats = collect(cfg)
    assert stats["done"] == 3 and stats["declined"] == {"no_content": 1}
    usage = [r["meta"]["usage"] for r in read_corpus(cfg.out)]
    empty_prompt = len(_EmptyForSome().chat_ids([{"role": "user", "content": "EMPTY please"}]))
    assert stats["tokens_in"] == sum(u["prompt_tokens"] for u in usage) + empty_prompt
    assert stats["tokens_out"] == sum(u["completion_tokens"] for u in usage)
    assert stats["cost"] == stats["tokens_in"] + 2 * stats["tokens_out"]


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"prompt": "a cut emoji \\ud83d"}', "prompt"),
        ('{"id": "x\\udc00", "prompt": "fine"}', "id"),
        ('{"id": 3, "messages": [{"role": "user", "content": "\\udc00 then text"}]}', "messages"),
    ],
)
def test_a_prompt_with_half_a_surrogate_pair_is_one_clear_error(tmp_path, line, field):
    path = write_prompts(tmp_path / "prompts.jsonl", 2)
    path.write_text(path.read_text() + line + "\n")
    cfg = make_cfg(tmp_path, "http://127.0.0.1:9/v1")
    with pytest.raises(CollectError, match=rf"prompts\.jsonl line 3: '{field}' holds .*surrogate.*fix or remove"):
        collect(cfg)
    assert not pathlib.Path(cfg.out).exists()


@pytest.mark.parametrize(
    "api, choice",
    [
        ("completions", {"index": 0, "finish_reason": "stop"}),  # the server's own injected malformed body
        ("completions", {"index": 0, "text": None, "finish_reason": "stop"}),
        ("completions", {"index": 0, "text": 7, "finish_reason": "stop"}),
        ("chat", {"index": 0, "finish_reason": "stop"}),
        ("chat", {"index": 0, "message": {"role": "assistant"}, "finish_reason": "stop"}),
        ("chat", {"index": 0, "message": {"role": "assistant", "content": ["x"]}, "finish_reason": "stop"}),
    ],
)
def test_a_choice_without_its_text_field_is_malformed_not_an_empty_answer(api, choice):
    with pytest.raises(MalformedResponse):
        parse_answer(json.dumps({"choices": [choice]}).encode(), api, with_logprobs=False)


def test_empty_text_and_a_refusal_with_null_content_are_real_answers():
    body = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
    assert parse_answer(json.dumps(body).encode(), "completions", False).text == ""
    message = {"role": "assistant", "content": None, "refusal": "I cannot help with that."}
    answer = parse_answer(json.dumps({"choices": [{"index": 0, "message": message}]}).encode(), "chat", False)
    assert answer.text == "" and answer.refusal == "I cannot help with that."


class RecordedFaults(Faults):
    """Faults that remember what they drew (the request log says only 'malformed', not which body)."""

    def draw(self):
        fault, slow = super().draw()
        self.__dict__.setdefault("drawn", []).append(fault)
        return fault, slow


def test_completions_collect_retries_malformed_bodies_until_every_sample_is_done(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 12)
    faults = RecordedFaults(malformed_rate=0.5, seed=4)
    app = make_app(ToyBackend(), faults, batch_window_ms=1)
    with ServerThread(app) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, api="completions", samples_per_prompt=2, max_attempts=30)
        stats = collect(cfg)
    assert "malformed:1" in faults.drawn  # the body whose choice has no "text"
    assert stats["done"] == 24 and stats["failed"] == {} and stats["declined"] == {}
    assert not pathlib.Path(cfg.out + ".failures.jsonl").exists()
    assert len(read_corpus(cfg.out)) == 24


def test_server_api_n_stop_usage_and_batching(tmp_path):
    app = make_app(ToyBackend(latency_s=0.01), batch_window_ms=20)
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["toy"]
        r = client.completions.create(
            model="toy", prompt=["ab", "cde"], n=3, max_tokens=12, logprobs=2, temperature=0.7
        )
        assert len(r.choices) == 6 and r.usage.prompt_tokens == 5
        assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
        full = client.completions.create(model="toy", prompt="stop test", max_tokens=20, temperature=0)
        cut = full.choices[0].text[3:5]
        r = client.completions.create(
            model="toy", prompt="stop test", max_tokens=20, temperature=0, stop=[cut], logprobs=1
        )
        text = r.choices[0].text
        assert text == full.choices[0].text[: full.choices[0].text.find(cut)]
        assert "".join(r.choices[0].logprobs.tokens) == text and r.choices[0].finish_reason == "stop"
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="toy", prompt="x", max_tokens=2, temperature=-1)
        write_prompts(tmp_path / "prompts.jsonl", 16)
        app.state.batcher.calls.clear()
        collect(make_cfg(tmp_path, srv.base_url, concurrency=16))
        assert max(app.state.batcher.calls) > 1 and sum(app.state.batcher.calls) == 16


def test_always_failing_server_exits_nonzero_within_the_breaker_time(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 6)
    app = make_app(ToyBackend(), Faults(fail_500_rate=1.0))
    with ServerThread(app) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, max_attempts=3)
        with pytest.raises(CollectError, match=r"finished with failures \(retries_exhausted_http_5\d\d: \d.* 0 done"):
            collect(cfg)  # every sample used its attempts: failed, exit non-zero
        cfg.max_attempts, cfg.breaker_no_success_s, cfg.backoff_max_s = 1000, 0.5, 0.05
        start = time.monotonic()
        with pytest.raises(CollectError, match=r"stopped: no sample finished in the last \d+ s of failures") as info:
            collect(cfg)
        assert time.monotonic() - start < 10
    stats = info.value.stats
    assert stats["done"] == 0 and stats["remaining"] == 6 and "re-running the same command continues" in str(info.value)


class ScriptedFaults(Faults):
    """Answers the first requests with the given faults, then serves normally."""

    def __init__(self, script):
        super().__init__()
        self.script = list(script)

    def draw(self):
        return (self.script.pop(0) if self.script else None), False


def test_first_sample_meeting_500_429_drop_is_not_unreachable(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 4)
    app = make_app(ToyBackend(), ScriptedFaults(["500", "429", "drop"]))
    with ServerThread(app) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, max_attempts=3, concurrency=1)
        with pytest.raises(CollectError) as info:
            collect(cfg)
    message = str(info.value)
    assert "cannot reach" not in message and "retries_exhausted_dropped: 1" in message
    assert info.value.stats["done"] == 3
    # the first sample met all three faults and used its attempts; the others were not held up
    first = [e["key"] for e in app.state.requests[:3]]
    assert len(set(first)) == 1 and [e["outcome"] for e in app.state.requests[:3]] == ["500", "429", "drop"]


class CountingToy(ToyBackend):
    """Signals once it has served `n` calls, so a test can act mid-run without polling."""

    def __init__(self, n, **kw):
        super().__init__(**kw)
        self.n, self.reached = n, threading.Event()

    def complete(self, prompts, **kw):
        out = super().complete(prompts, **kw)
        self.n -= len(prompts)
        if self.n <= 0:
            self.reached.set()
        return out


def test_server_gone_mid_run_stops_soon_and_a_rerun_continues(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 40)
    backend = CountingToy(8, latency_s=0.01)
    first = make_app(backend)
    with ServerThread(first) as srv:
        port = srv.port
        cfg = make_cfg(tmp_path, srv.base_url, concurrency=2, breaker_failures=4)
        result = {}

        def run():
            try:
                collect(cfg)
            except CollectError as err:
                result["error"] = err

        thread = threading.Thread(target=run)
        thread.start()
        assert backend.reached.wait(30)
    gone = time.monotonic()  # the server has shut down: nothing listens on the port now
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - gone < 10
    err = result["error"]
    assert "the endpoint stopped answering: 4 attempts in a row got no answer" in str(err)
    assert "re-running the same command continues" in str(err) and err.stats["remaining"] > 0
    second = make_app(ToyBackend())
    with ServerThread(second, port=port):
        stats = collect(cfg)
    rows = read_corpus(cfg.out)
    assert len(rows) == 40 and len({r["key"] for r in rows}) == 40
    assert stats["already_done"] == err.stats["done"]
    paid = ok_counts(first) + ok_counts(second)
    assert max(paid.values()) == 1 and set(paid) == {r["key"] for r in rows}


def test_prompts_file_that_is_not_utf8_is_one_clear_error(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(CollectError, match=r"prompts.jsonl line 2: byte 0xe9 at column 16 is not UTF-8 text"):
        collect(make_cfg(tmp_path, "http://127.0.0.1:9/v1"))


def test_progress_prints_lines_when_not_a_terminal():
    stream = io.StringIO()  # not a terminal
    b = bar(total=5, desc="collect", unit="sample", interval_s=0.0, file=stream)
    for _ in range(5):
        b.update(1)
    b.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) >= 5
    assert lines[0].startswith("collect:   0%") and "5/5" in lines[-1]
