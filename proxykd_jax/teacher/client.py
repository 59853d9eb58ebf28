"""`collect`: prompts JSONL + an OpenAI-compatible endpoint -> teacher corpus JSONL.

Each (prompt, sample_index) is one request with a content key (sha256 of model, prompt, sampling
parameters and sample index). Finished samples are appended to the corpus with flush + fsync, so a
crash loses at most the requests in flight and a re-run skips every key already in the file.
Retryable failures (429, 5xx, timeouts, dropped connections, malformed 200 bodies) back off
exponentially with full jitter, honouring Retry-After; the rest are recorded in
`<out>.failures.jsonl` and counted in the summary. A well-formed answer without usable text (empty,
or stopped by a content filter) is final: recorded there as `"final": true` and not asked again by a
re-run, since asking again would pay again for the same answer. The row of an answer billed but not stored
(final, or one the corpus could not take) keeps its `usage`, which later runs count in the corpus's cost.

A circuit breaker keeps a dead or broken endpoint from holding the run: until the endpoint has
answered once, and again whenever an attempt gets no answer at all, one request at a time probes
it, the probes spaced by doubling waits (`backoff_initial_s` up to `backoff_max_s`, no jitter: one
prober) and each announced on stdout; `breaker_failures` probes in a row without an answer (the
default spans about two minutes: a server restart), or `breaker_no_success_s` seconds of failures
without a single finished sample (refused connections excepted: the probes count those), stop the
run; an endpoint that never answered, `UNREACHED_PROBES` probes (a wrong URL or port). A probe without an answer does not use up its sample's `max_attempts`. A run that stops, or ends
with failed samples, raises `CollectError` after printing its summary; a re-run continues where it
stopped.

A run that asks for log-probs (`top_logprobs` > 0) stops once its first `LOGPROBS_CHECK` stored answers
all came without them (an endpoint that ignores the parameter would otherwise be paid for a whole
corpus without them); those answers stay in the corpus as text-only records. Answers without log-probs
among answers with them are stored and counted in the summary (`without_logprobs`).
The API key is read from config or the environment and never written anywhere (a server's error
message that repeats it is shown with the key masked).

Reasoning models (OpenAI o-series and gpt-5) take the limit as `max_completion_tokens` (`collect.token_limit`),
which bounds their hidden reasoning too, and some refuse temperature and top_p at any value
(`collect.send_sampling=False` leaves both out). A 400 that calls a field the run sends unsupported would
come for every request alike: the first one stops the run with the setting to change. Under a spend cap, an
answer billed more completion tokens than its limit (reasoning the limit does not bound) stops the run too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import json
import math
import os
import pathlib
import random
import re
import time
import urllib.parse

import openai

try:  # the HTTP library under the official client: httpx2 from openai 3, httpx before
    import httpx2 as _http
except ImportError:  # pragma: no cover - older openai
    import httpx as _http

from proxykd_jax import progress
from proxykd_jax.teacher.config import TOKEN_LIMITS
from proxykd_jax.teacher.journal import DurableAppender, read_declined, read_done, read_done_and_billed
from proxykd_jax.teacher.prompts import CollectError, Prompt, canonical, read_prompts, request_key, sampling_params
from proxykd_jax.teacher.responses import Answer, MalformedResponse, parse_answer, reasoning_tokens

__all__ = ["CollectError", "RateLimiter", "carry_over", "check", "collect", "format_summary", "resolve_api_key"]

RETRYABLE_STATUS = (408, 409, 429)
CONNECTIONS_PER_CLIENT = 8
FATAL_STATUS = {
    401: "the API key was rejected",
    403: "access is forbidden",
    404: "the endpoint or model was not found",
}
SERVER_MESSAGE_CHARS = 200  # an error body's message is cut to this many characters in sentences
LOGPROBS_CHECK = 3  # stored answers, all without the log-probs asked for, that stop the run
UNREACHED_PROBES = 6  # probes (about 16 s) after which an endpoint that never answered is given up
_SAMPLING = "collect.send_sampling=False (temperature and top_p left out)"
# The request fields `collect` sends, and the setting to change where the endpoint calls one unsupported (400
# "Unsupported parameter: 'max_tokens' ..." / "Unsupported value: 'temperature' ...", as reasoning models answer).
SETTING_OF_FIELD = {
    "max_tokens": "collect.token_limit='max_completion_tokens'",
    "max_completion_tokens": "collect.token_limit='max_tokens'",
    "temperature": f"{_SAMPLING}, or collect.temperature to a value it takes",
    "top_p": f"{_SAMPLING}, or collect.top_p to a value it takes",
    "logprobs": "collect.top_logprobs=0 (text only: it gives no log-probs)",
    "top_logprobs": "collect.top_logprobs=0 (text only: it gives no log-probs)",
    "stop": "collect.stop=() (no stop strings)",
    "seed": "collect.send_seed=False",
}
_UNSUPPORTED = re.compile(r"unsupported (?:parameter|value)\W*'(\w+)'", re.IGNORECASE)


class RateLimiter:
    """Token bucket that never lets more than `per_minute` units through in any 60 s window.

    Capacity (burst) is one second's worth, at least 1; the refill rate is lowered by the capacity
    so that burst + 60 s of refill equals the limit. A request larger than the capacity waits for a
    full bucket and drives it negative (debt), which keeps the long-run rate exact. The bucket alone
    bounds a window by the limit plus the part of its last request above the capacity, so the grants
    of the last 60 s are kept too (at their refunded size) and a request also waits until they leave
    room for it; one larger than the whole limit waits for an empty window.
    """

    def __init__(self, per_minute: float):
        self.per_minute = float(per_minute)
        self.capacity = max(1.0, per_minute / 60.0)
        self.rate = max(per_minute - self.capacity, 1e-9) / 60.0
        self.level = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()
        self.grants: collections.deque = collections.deque()  # [time, amount, in window] of the last 60 s
        self.granted = 0.0  # their amounts' sum

    def _refill(self):
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def _expire(self):
        while self.grants and self.grants[0][0] <= self.stamp - 60.0:
            grant = self.grants.popleft()
            self.granted -= grant[1]
            grant[2] = False
        if not self.grants:
            self.granted = 0.0  # no rounding left over from the sums

    def _delay(self, amount: float) -> float:
        """Seconds until `amount` units may be granted (0: now)."""
        self._refill()
        self._expire()
        if self.level < min(amount, self.capacity):
            return (min(amount, self.capacity) - self.level) / self.rate
        if self.granted > self.per_minute - min(amount, self.per_minute) + 1e-9:  # no room in the window
            return self.grants[0][0] + 60.0 - self.stamp
        return 0.0

    def _take(self, amount: float) -> list:
        self.level -= amount
        grant = [self.stamp, float(amount), True]
        self.grants.append(grant)
        self.granted += amount
        return grant

    async def acquire(self, amount: float = 1.0) -> list:
        """Waits for `amount` units; returns the grant that `refund` adjusts."""
        return (await acquire_together((self, amount)))[0]

    def refund(self, amount: float, grant: list | None = None):
        """Gives back `amount` units of `grant` (negative: takes more, a request that used more than it reserved)."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)
        if grant is not None:
            grant[1] -= amount
            if grant[2]:
                self.granted -= amount


async def acquire_together(*wants: tuple[RateLimiter, float]) -> list[list]:
    """Grants each `(limiter, amount)` at one instant, once every limiter has room; returns their grants.

    A request under both a request and a token limit takes both grants when it is sent: one taken
    early while it waited for the other would count in a window the request was not sent in, and
    the requests that waited together would then leave together (a 10-requests-a-minute limit let
    17 through in one minute behind a large request that the token limit held back). The locks are
    taken in the order given, so callers name the limiters in one order.
    """
    async with contextlib.AsyncExitStack() as locks:
        for limiter, _ in wants:
            await locks.enter_async_context(limiter.lock)  # FIFO: one waiter at a time
        while delay := max(limiter._delay(amount) for limiter, amount in wants):
            await asyncio.sleep(delay)
        return [limiter._take(amount) for limiter, amount in wants]


class _Failure(Exception):
    """One failed attempt. `answered`: the endpoint sent a response (a status line) to it."""

    def __init__(
        self, reason: str, message: str, retryable: bool, *, answered: bool, retry_after=None, fatal=False, final=False
    ):
        super().__init__(message)
        self.reason, self.retryable, self.answered = reason, retryable, answered
        self.retry_after, self.fatal, self.final = retry_after, fatal, final


def _retry_after(response) -> float | None:
    if response is None:
        return None
    headers = response.headers
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):  # neither seconds nor an HTTP date: no hint
            return None
        return max(0.0, parsed.timestamp() - time.time())


def _server_message(err, secret: str = "") -> str:
    """The error body's own message (OpenAI layout `error.message`, else the body's text), on one line,
    the key masked, cut to SERVER_MESSAGE_CHARS; "" when there is none."""
    body = getattr(err, "body", None)
    message = body.get("message") if isinstance(body, dict) else body
    if not isinstance(message, str):
        return ""
    message = " ".join(message.split())
    if secret:
        message = message.replace(secret, "***")
    if len(message) > SERVER_MESSAGE_CHARS:
        message = message[: SERVER_MESSAGE_CHARS - 3] + "..."
    return message


def _refused_field(err) -> str | None:
    """The request field of SETTING_OF_FIELD an error body calls unsupported (its `param`, else the field its
    message names), or None."""
    named = _UNSUPPORTED.search(_server_message(err))
    if not (named or str(getattr(err, "code", "") or "") in ("unsupported_parameter", "unsupported_value")):
        return None
    field = err.param if isinstance(getattr(err, "param", None), str) else named and named.group(1)
    return field if field in SETTING_OF_FIELD else None


def _classify(err: Exception, secret: str = "") -> _Failure:
    """Maps a client exception to a retryable / per-prompt / fatal failure; the sentence carries the
    server's own error message (`secret`, the API key, masked in it)."""
    if isinstance(err, MalformedResponse):
        return _Failure("malformed_response", f"the 200 response is not usable: {err}", True, answered=True)
    if isinstance(err, openai.APITimeoutError):
        return _Failure("timeout", "the request timed out", True, answered=False)
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__ or err
        # A body cut short means the server did answer (the status line came) and then dropped.
        answered = "message body" in str(cause)
        reason = "dropped" if answered else "connection"
        return _Failure(reason, f"connection failed ({type(cause).__name__}: {cause})", True, answered=answered)
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        code = str(getattr(err, "code", "") or "")
        said = _server_message(err, secret)
        said = f": {said}" if said else ""
        if status == 429 and code == "insufficient_quota":
            return _Failure(
                "quota", "the account is out of quota (429 insufficient_quota)", False, answered=True, fatal=True
            )
        if status in FATAL_STATUS:
            what = f"{FATAL_STATUS[status]} ({status}{said})"
            return _Failure(f"http_{status}", what, False, answered=True, fatal=True)
        field = _refused_field(err) if status in (400, 422) else None
        if field:  # every request carries it: the first answer stops the run rather than each sample failing
            what = f"the endpoint refuses the request field '{field}' ({status}{said}); set {SETTING_OF_FIELD[field]}"
            return _Failure(f"refused_{field}", what, False, answered=True, fatal=True)
        if status >= 500 or status in RETRYABLE_STATUS:
            return _Failure(
                f"http_{status}", f"HTTP {status}{said}", True, answered=True, retry_after=_retry_after(err.response)
            )
        if "content_filter" in code or "content_filter" in str(err.message):
            return _Failure(
                "content_filter", "the endpoint's content filter refused the prompt", False, answered=True, final=True
            )
        return _Failure(f"http_{status}", f"HTTP {status}{said}", False, answered=True)
    raise err


# Prompt tokens beyond the prompt's UTF-8 bytes that a request's worst cost allows for (a chat template's
# role and turn tokens) before the corpus holds an answer: a byte-level tokenizer makes at most one token per
# byte. The endpoint's own tokens (a template's hidden system prompt) are no more than the fewest prompt tokens
# an answer was billed, so from then on that many are allowed for where it is more (`Collector._reserve`).
_PROMPT_OVERHEAD_TOKENS = 64


class Collector:
    """One `collect` run: the work list, the HTTP clients, the limiters, the breaker and the files."""

    def __init__(self, cfg, prompts: list[Prompt], api_key: str):
        self.cfg = cfg
        self.secret = api_key  # only to mask it in the server's error messages
        self.params = sampling_params(cfg)
        self.out = pathlib.Path(cfg.out)
        self.fail_path = self.out.with_name(self.out.name + ".failures.jsonl")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CollectError(
                f"collect.out folder {str(self.out.parent)!r} cannot be created ({err.strerror})"
            ) from None
        # One client per CONNECTIONS_PER_CLIENT workers: the HTTP pool scans all its connections for
        # every request, so one pool of 64 connections costs the client more CPU per sample than the
        # server spends (benchmarks/collect.py prints both).
        n_clients = -(-max(1, cfg.concurrency) // CONNECTIONS_PER_CLIENT)
        self.clients = [
            openai.AsyncOpenAI(
                base_url=cfg.base_url,
                api_key=api_key,
                max_retries=0,
                timeout=cfg.request_timeout_s,
                http_client=openai.DefaultAsyncHttpxClient(
                    limits=_http.Limits(
                        max_connections=CONNECTIONS_PER_CLIENT, max_keepalive_connections=CONNECTIONS_PER_CLIENT
                    )
                ),
            )
            for _ in range(n_clients)
        ]
        self.rpm = RateLimiter(cfg.requests_per_minute) if cfg.requests_per_minute > 0 else None
        self.tpm = RateLimiter(cfg.tokens_per_minute) if cfg.tokens_per_minute > 0 else None
        self.rng = random.Random(cfg.seed)
        self.corpus = DurableAppender(self.out)
        self.failures = DurableAppender(self.fail_path)
        done, billed = read_done_and_billed(self.out, self.fail_path)  # answers billed but not stored count too
        declined = read_declined(self.fail_path)
        work = [
            (p, s, request_key(cfg.model, p, self.params, s)) for p in prompts for s in range(cfg.samples_per_prompt)
        ]
        self.todo = [w for w in work if w[2] not in done and w[2] not in declined]
        unknown = len(done - {w[2] for w in work})
        if unknown:
            print(
                f"[collect] {self.out}: {unknown} existing records do not match the current "
                "prompts/sampling config; they are kept as they are"
            )
        self.stats = {
            "out": str(self.out),
            "requested": len(work),
            "already_done": sum(w[2] in done for w in work),
            "already_declined": sum(w[2] in declined and w[2] not in done for w in work),
            "done": 0,
            "declined": {},
            "failed": {},
            "remaining": len(self.todo),
            "lost": 0,
            "tokens_in": 0,
            "tokens_out": 0,
            "reasoning_tokens": 0,  # of tokens_out: hidden reasoning billed as completion tokens
            "requests": 0,
            "retries": 0,
            "without_logprobs": 0,  # stored answers without the log-probs asked for
        }
        self.with_logprobs = 0  # stored answers of this run that carried them
        # The spend cap: what the corpus's answers were billed before this run, and the most the requests in
        # flight may still cost (each reserves its worst case until its answer's usage is counted).
        self.cap = float(cfg.get("max_cost", 0.0) or 0.0)
        if self.cap and billed[2]:
            raise CollectError(
                f"collect.max_cost is set but {billed[2]} answers in {self.out} or its failures file carry no usage "
                "counts (their endpoint sent none), so what the corpus cost is unknown; unset collect.max_cost or "
                "collect into another collect.out"
            )
        passed = billed[4].get(cfg.token_limit, 0)
        if self.cap and passed:
            raise CollectError(
                f"collect.max_cost is set but {passed} answers in {self.out} or its failures file were billed more "
                f"completion tokens than the collect.max_tokens they were sent with (as {cfg.token_limit}: hidden "
                f"reasoning it does not bound), so what the next answers cost has no bound; {self._unbounded_advice()}"
            )
        self.spent_before = self._cost(*billed[:2])
        self.reserved, self.reservations = 0.0, 0
        self.passed_over: list = []  # (prompt, sample_index, key, prompt bytes) that did not fit: `_over_cap`
        self.fewest_prompt_tokens: int | None = billed[3]  # of the corpus's answers: bounds the endpoint's own
        self.unrecorded = [0, 0, 0]  # answers of this run billed and written nowhere, their prompt, completion tokens
        self.stop_reason: str | None = None  # why the run stopped early (fatal error, breaker, disk)
        # Breaker state: the gate is open once the endpoint has answered; while it is shut, one
        # task (the prober) sends requests and the others wait for it to open.
        self.ever_answered = False
        self.gate_open = False
        self.prober = None
        self.streak = 0  # probes in a row that got no answer at all
        self.streak_mark = -math.inf  # when the last counted one failed
        self.next_probe = -math.inf  # when the prober may send the next probe
        self.last_progress = time.monotonic()
        self.since_progress: collections.Counter = collections.Counter()
        self.last_failure: _Failure | None = None
        self._changed = None  # asyncio.Event pulsed whenever the gate or the stop flag changes
        self._stopped = None  # asyncio.Event set once the run stops

    # -- breaker -----------------------------------------------------------------------------

    def _pulse(self):
        self._changed.set()
        self._changed = asyncio.Event()

    def _halt(self, reason: str):
        if self.stop_reason is None:
            self.stop_reason = reason
            self._stopped.set()
            self._pulse()

    def _answered(self):
        if self.streak and self.ever_answered and self.stop_reason is None:
            print(f"[collect] {self.cfg.base_url} answers again; resuming")
        self.ever_answered = True
        self.streak, self.streak_mark, self.next_probe = 0, -math.inf, -math.inf
        if not self.gate_open:
            self.gate_open, self.prober = True, None
            self._pulse()

    def _progressed(self):
        self.last_progress = time.monotonic()
        self.since_progress.clear()

    def _backoff(self, n: int) -> float:
        """The n-th of the doubling waits (`backoff_initial_s` up to `backoff_max_s`): the wait after the n-th
        probe without an answer, and the ceiling of the jittered wait before the n-th retry."""
        return min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** max(0, n - 1))

    def _failed_attempt(self, failure: _Failure, sent: float):
        """Breaker bookkeeping for one retryable failure; may stop the run. Announces the breaker
        opening and each probe without an answer (with when the next one goes out) on stdout."""
        cfg, now = self.cfg, time.monotonic()
        # an endpoint that never answered (a wrong URL or port) is given up sooner than one that went quiet
        limit = cfg.breaker_failures if self.ever_answered else min(cfg.breaker_failures, UNREACHED_PROBES)
        self.last_failure = failure
        self.since_progress[failure.reason] += 1
        if not failure.answered:
            counted = sent >= self.streak_mark  # sent after the last counted failure: an independent try
            if counted:
                self.streak, self.streak_mark = self.streak + 1, now
            if self.gate_open:
                self.gate_open = False
                self._pulse()
                window = sum(self._backoff(k) for k in range(1, limit))
                print(
                    f"[collect] {cfg.base_url} stopped answering ({failure}); probing it with one request at a "
                    f"time, giving up after {limit} probes in a row without an answer "
                    f"(about {window:.0f} s; collect.breaker_failures)"
                )
            if counted and self.streak < limit:
                wait = self._backoff(self.streak)
                self.next_probe = now + wait
                print(
                    f"[collect] probe {self.streak} of {limit} to {cfg.base_url} got no answer "
                    f"({failure}); next try in {wait:.1f} s"
                )
            if self.streak >= limit:
                if not self.ever_answered:
                    self._halt(
                        f"cannot reach {cfg.base_url}: {self.streak} attempts got no answer (last: {failure}); "
                        "check collect.base_url and that the server is running"
                    )
                else:
                    self._halt(
                        f"the endpoint stopped answering: {self.streak} attempts in a row got no answer "
                        f"(last: {failure})"
                    )
                return
        if failure.reason != "connection" and now - self.last_progress >= cfg.breaker_no_success_s:
            seen = ", ".join(f"{k}: {v}" for k, v in sorted(self.since_progress.items()))
            self._halt(f"no sample finished in the last {now - self.last_progress:.0f} s of failures ({seen})")

    def _cost(self, tokens_in: int, tokens_out: int) -> float:
        """What `tokens_in` prompt and `tokens_out` completion tokens cost at the configured prices."""
        return (tokens_in * self.cfg.price_input_per_mtok + tokens_out * self.cfg.price_output_per_mtok) / 1e6

    def spent(self) -> float:
        """What the corpus's answers cost: those stored before this run and every answer of this run."""
        return self.spent_before + self._cost(self.stats["tokens_in"], self.stats["tokens_out"])

    def _worst(self, prompt_bytes: int) -> float:
        """The most a request for a prompt of `prompt_bytes` UTF-8 bytes may cost: those bytes, the endpoint's own
        tokens, `max_tokens`."""
        own = max(_PROMPT_OVERHEAD_TOKENS, self.fewest_prompt_tokens or 0)
        return self._cost(prompt_bytes + own, self.cfg.max_tokens)

    async def _reserve(self, prompt_bytes: int) -> float | None:
        """Reserves under `collect.max_cost` a request's `_worst` cost; returns it, or None once the run stopped or
        the request does not fit. Waits while requests in flight may still leave room; one that does not fit even
        with none in flight is passed over, and the run goes on with the rest (a shorter prompt may fit), so the
        run stops at the cap only once nothing left fits (`_over_cap`).
        Until the corpus holds an answer, one request at a time: what the endpoint adds to a prompt (a chat
        template's hidden system prompt) is unknown, and only one answer may cost more than its reservation."""
        while self.stop_reason is None:
            worst = self._worst(prompt_bytes)
            first = self.cap and self.fewest_prompt_tokens is None and self.reservations
            if not self.cap or (not first and self.spent() + self.reserved + worst <= self.cap):
                self.reserved, self.reservations = self.reserved + worst, self.reservations + 1
                return worst
            if not self.reservations or self.spent() + worst > self.cap:
                break
            await self._changed.wait()
        return None

    def _over_cap(self, queue: list) -> bool:
        """After the workers ran out of samples: puts the samples the cap passed over that fit now (an answer since
        billed fewer prompt tokens, which lowers `_worst`) back on `queue` and returns True; else, where some were
        passed over, stops the run at the cap with the most the cheapest of them may cost, and returns False."""
        if self.stop_reason is not None or not self.passed_over:
            return False
        fits = [self.spent() + self._worst(left[3]) <= self.cap for left in self.passed_over]
        if any(fits):
            queue.extend(reversed([left[:3] for left, fit in zip(self.passed_over, fits) if fit]))
            self.passed_over = [left for left, fit in zip(self.passed_over, fits) if not fit]
            return True
        self._halt(
            f"collect.max_cost={self.cap:g} is reached: this corpus's answers cost {self.spent():.6g} "
            f"({self.spent_before:.6g} of it before this run) and the next request may cost up to "
            f"{min(self._worst(left[3]) for left in self.passed_over):.6g} more (the cheapest of the "
            f"{len(self.passed_over)} left); raise collect.max_cost to continue"
        )
        return False

    async def _admit(self) -> bool:
        """Waits until this task may send a request; False once the run has stopped."""
        me = asyncio.current_task()
        while self.stop_reason is None:
            if self.gate_open:
                return True
            if self.prober is None or self.prober is me:
                self.prober = me
                delay = self.next_probe - time.monotonic()
                if delay <= 0:
                    return True
                await self._sleep(delay)  # the breaker's wait before the next probe
                continue
            await self._changed.wait()
        return False

    async def _sleep(self, seconds: float):
        """Sleeps, or returns as soon as the run stops."""
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _until_stopped(self, acquire):
        """The grants `acquire` (`acquire_together`) returns, unless the run stops first (then cancels it: None)."""
        task, stop = asyncio.ensure_future(acquire), asyncio.ensure_future(self._stopped.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        return None

    # -- one sample ----------------------------------------------------------------------------

    async def _request(self, prompt: Prompt, key: str, client) -> bytes:
        """One API call through the official client's `post`, with a plain JSON body.

        `chat.completions.create` would first walk the body through the SDK's typed-params transform
        (about 1.5 ms of client CPU per request, the largest single cost at high concurrency); the
        body here is already in wire format, and the answer comes back as raw bytes that
        `responses.parse_answer` checks field by field.
        """
        cfg, p = self.cfg, self.params
        sampling = dict(temperature=p["temperature"], top_p=p["top_p"]) if cfg.send_sampling else {}
        body = dict(model=cfg.model, **sampling, **{cfg.token_limit: p["max_tokens"]}, n=1)
        if p["stop"]:
            body["stop"] = p["stop"]
        if cfg.send_seed:  # the sample's own seed: reproducible whatever else is in flight
            body["seed"] = int(key[:15], 16)
        options = {"headers": {"X-Request-Key": key}}
        if cfg.api == "chat":
            body["messages"] = list(prompt.messages or [{"role": "user", "content": prompt.prompt}])
            if p["top_logprobs"] > 0:
                body.update(logprobs=True, top_logprobs=p["top_logprobs"])
            path = "/chat/completions"
        else:
            body["prompt"] = prompt.prompt
            if p["top_logprobs"] > 0:
                body["logprobs"] = p["top_logprobs"]
            path = "/completions"
        response = await client.post(path, body=body, options=options, cast_to=_http.Response)
        return response.content

    def _paid(self, usage: dict, tokens, estimate: int):
        """Counts the tokens of an answer the endpoint sent (stored or not) and refunds the token bucket to them;
        under a spend cap an answer without usage counts stops the run (the cap could not be kept)."""
        if self.cap and not usage:
            self._halt(
                f"{self.cfg.base_url} sent an answer without usage counts, so collect.max_cost cannot be kept; "
                "unset collect.max_cost for this endpoint (the answers so far are stored)"
            )
        self.stats["tokens_in"] += usage.get("prompt_tokens", 0)
        self.stats["tokens_out"] += usage.get("completion_tokens", 0)
        reasoning = reasoning_tokens(usage)
        self.stats["reasoning_tokens"] += reasoning or 0
        if self.cap and usage and usage["completion_tokens"] > self.cfg.max_tokens:
            of_it = f" ({reasoning} of them reasoning)" if reasoning else ""
            self._halt(
                f"{self.cfg.base_url} billed {usage['completion_tokens']} completion tokens{of_it} for one answer, more "
                f"than collect.max_tokens={self.cfg.max_tokens} sent as {self.cfg.token_limit}, so collect.max_cost "
                f"cannot be kept (the limit does not bound its hidden reasoning); {self._unbounded_advice()} (the "
                "answers so far are stored)"
            )
        if usage and (self.fewest_prompt_tokens is None or usage["prompt_tokens"] < self.fewest_prompt_tokens):
            self.fewest_prompt_tokens = usage["prompt_tokens"]
        if self.tpm and usage:
            self.tpm.refund(estimate - usage["prompt_tokens"] - usage["completion_tokens"], tokens)

    def _unbounded_advice(self) -> str:
        """What to do where the limit does not bound what an answer is billed."""
        if self.cfg.token_limit == "max_tokens" and self.cfg.api == "chat":
            return "set collect.token_limit='max_completion_tokens' if the endpoint takes it, or unset collect.max_cost"
        return "unset collect.max_cost for this endpoint"

    def _record(self, prompt: Prompt, sample_index: int, key: str, answer: Answer) -> dict:
        if answer.finish_reason == "content_filter":
            raise _Failure(
                "content_filter", "the endpoint's content filter stopped the response", False, answered=True, final=True
            )
        if not answer.text:
            why = f" (refusal: {answer.refusal})" if answer.refusal else ""
            if answer.finish_reason == "length":  # a reasoning model that thought until the limit
                reasoning = reasoning_tokens(answer.usage)
                spent = f" ({reasoning} tokens of hidden reasoning)" if reasoning else ""
                why = f": collect.max_tokens={self.cfg.max_tokens} ran out first{spent}; raise it for room to answer"
            raise _Failure("no_content", f"the response has no content{why}", False, answered=True, final=True)
        record = {"id": prompt.id}
        messages = prompt.messages
        if messages is None and self.cfg.api == "chat":  # stored as the teacher got it: prepare then formats it alike
            messages = [{"role": "user", "content": prompt.prompt}]
        record.update({"prompt": prompt.prompt} if messages is None else {"messages": list(messages)})
        record.update(response=answer.text, sample_index=sample_index, key=key)
        record.update(answer.logprobs)
        record["meta"] = {
            "model": self.cfg.model,
            "temperature": self.params["temperature"],  # null: not sent, the endpoint sampled at its own settings
            "top_p": self.params["top_p"],
            self.cfg.token_limit: self.params["max_tokens"],  # the limit under the name it was sent as
            "finish_reason": answer.finish_reason,
            "usage": answer.usage,
        }
        return record

    async def _one(self, prompt: Prompt, sample_index: int, key: str, client) -> bool:
        """Runs one sample: True once it is stored or recorded as failed, False if the run stopped first."""
        cfg = self.cfg
        text = prompt.prompt if prompt.messages is None else canonical(list(prompt.messages))
        estimate = math.ceil(len(text) / 4) + cfg.max_tokens
        used = 0  # attempts used up: all but probes that got no answer (the breaker bounds those)
        prompt_bytes = len(text.encode("utf-8"))
        while True:
            worst = await self._reserve(prompt_bytes) if await self._admit() else None
            if worst is None:
                if self.stop_reason is None:  # it does not fit under the cap: `_over_cap` looks again at the end
                    self.passed_over.append((prompt, sample_index, key, prompt_bytes))
                return False
            try:
                outcome = await self._attempt(prompt, sample_index, key, client, estimate, used)
            finally:
                self.reservations -= 1
                self.reserved = self.reserved - worst if self.reservations else 0.0  # (no float drift when idle)
                if self.cap:
                    self._pulse()  # a task waiting in `_reserve` looks again
            if isinstance(outcome, bool):
                return outcome
            used, wait = outcome  # to be retried, after `wait` seconds (its reservation released meanwhile)
            if wait:
                await self._sleep(wait)

    async def _attempt(self, prompt: Prompt, sample_index: int, key: str, client, estimate: int, used: int):
        """One request for a sample: True once it is stored or recorded as failed, False if the run stopped
        first, else (the attempts used up so far, the seconds to wait before the retry)."""
        cfg = self.cfg
        tokens = None  # the token limiter's grant, which `_paid` and failures refund
        wants = [(limiter, n) for limiter, n in ((self.rpm, 1), (self.tpm, estimate)) if limiter]
        if wants:
            grants = await self._until_stopped(acquire_together(*wants))
            if grants is None:
                return False
            tokens = grants[-1] if self.tpm else None
        sent, probing = time.monotonic(), not self.gate_open
        self.stats["requests"] += 1
        answer = None
        try:
            raw = await self._request(prompt, key, client)
            self._answered()
            answer = parse_answer(raw, cfg.api, cfg.top_logprobs > 0)
            self._paid(answer.usage, tokens, estimate)  # an answer without usable text is paid for too
            record = self._record(prompt, sample_index, key, answer)
        except Exception as err:  # classified below; unknown errors re-raise
            failure = err if isinstance(err, _Failure) else _classify(err, self.secret)
            if self.tpm and answer is None:
                self.tpm.refund(estimate, tokens)
            if failure.answered:
                self._answered()
            if failure.fatal:
                self._halt(str(failure))
                return False
            if not failure.retryable:  # a definite answer for this sample: progress, not an outage
                self._progressed()
                return await self._fail(prompt, sample_index, key, failure, answer)
            self._failed_attempt(failure, sent)
            if self.stop_reason is not None:
                return False
            used += failure.answered or not probing
            if used < cfg.max_attempts:
                self.stats["retries"] += 1
                wait = 0.0  # without an answer `_admit` holds the retry until the breaker's next probe
                if failure.answered:
                    wait = max(self.rng.uniform(0, self._backoff(used)), failure.retry_after or 0)
                return used, wait
            failure.reason = f"retries_exhausted_{failure.reason}"
            return await self._fail(prompt, sample_index, key, failure)
        self._progressed()
        try:
            await self.corpus.append(record)
        except OSError as err:
            self.stats["lost"] += 1
            self._halt(f"cannot write {self.out} ({err.strerror or err})")
            lost = _Failure("not_stored", f"cannot write {self.out} ({err.strerror or err})", False, answered=True)
            await self._note(prompt, sample_index, key, lost, answer)  # its usage, for later runs to count
            return False
        self.stats["done"] += 1
        if cfg.top_logprobs > 0:
            self._logprobs_came(bool(answer.logprobs))
        return True

    def _logprobs_came(self, came: bool):
        """Counts a stored answer with or without the log-probs asked for; stops the run when the first
        LOGPROBS_CHECK all came without (the answers stay stored: they were paid for)."""
        if came:
            self.with_logprobs += 1
            return
        self.stats["without_logprobs"] += 1
        n, cfg = self.stats["without_logprobs"], self.cfg
        if n >= LOGPROBS_CHECK and not self.with_logprobs:
            self._halt(
                f"the teacher at {cfg.base_url} returned no log-probs in its first {n} answers although "
                f"collect.top_logprobs={cfg.top_logprobs} asked for them; set collect.top_logprobs=0 to collect "
                f"text only, or use an endpoint that returns them (the answers so far stay in {self.out} as "
                "text-only records)"
            )

    async def _fail(self, prompt: Prompt, sample_index: int, key: str, failure: _Failure, answer=None) -> bool:
        """Counts a failed or declined sample and records it in the failures file; `answer`: the one it was billed."""
        counts = self.stats["declined" if failure.final else "failed"]
        counts[failure.reason] = counts.get(failure.reason, 0) + 1
        await self._note(prompt, sample_index, key, failure, answer)
        return True

    async def _note(self, prompt: Prompt, sample_index: int, key: str, failure: _Failure, answer: Answer | None):
        """Appends a sample's failure row; one of an `answer` that was billed but not stored keeps its usage and the
        limit it was sent with, which later runs count as billed (`journal.read_done_and_billed`). Where the row
        cannot be written, the run stops, and such an answer is counted as billed and written nowhere."""
        row = {
            "id": prompt.id,
            "line": prompt.line,
            "sample_index": sample_index,
            "key": key,
            "reason": failure.reason,
            "message": str(failure),
            "final": failure.final,
            "time": time.time(),
        }
        if answer is not None:
            row.update({"usage": answer.usage, self.cfg.token_limit: self.params["max_tokens"]})
        try:
            await self.failures.append(row)
        except OSError as err:
            self._halt(f"cannot write {self.fail_path} ({err.strerror or err})")
            if answer is not None:
                n, tokens_in, tokens_out = self.unrecorded
                usage = answer.usage
                self.unrecorded = [
                    n + 1,
                    tokens_in + usage.get("prompt_tokens", 0),
                    tokens_out + usage.get("completion_tokens", 0),
                ]

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> dict:
        start = time.monotonic()
        self.last_progress = start
        self._changed, self._stopped = asyncio.Event(), asyncio.Event()
        bar = progress.bar(total=len(self.todo), disable=not self.cfg.progress, desc="collect", unit="sample")
        queue = list(reversed(self.todo))

        async def worker(client):
            try:
                while queue and self.stop_reason is None:
                    if await self._one(*queue.pop(), client=client):
                        bar.update(1)
                        bar.set_postfix(failed=sum(self.stats["failed"].values()), refresh=False)
            finally:
                if self.prober is asyncio.current_task():  # hand the probing on to a waiting task
                    self.prober = None
                    self._pulse()

        try:
            while True:
                await asyncio.gather(
                    *(worker(self.clients[i // CONNECTIONS_PER_CLIENT]) for i in range(max(1, self.cfg.concurrency)))
                )
                if not self._over_cap(queue):  # passed over by the cap: sent after all where they fit now
                    break
        finally:
            bar.close()
            for client in self.clients:
                await client.close()
            self._finish_stats(start)
        return self.stats

    def _finish_stats(self, start: float):
        stats = self.stats
        stats["remaining"] = (
            len(self.todo) - stats["done"] - sum(stats["failed"].values()) - sum(stats["declined"].values())
        )
        elapsed = time.monotonic() - start
        stats["elapsed_s"] = round(elapsed, 3)
        stats["samples_per_s"] = round(stats["done"] / max(elapsed, 1e-9), 3)
        if self.cfg.price_input_per_mtok or self.cfg.price_output_per_mtok:
            stats["cost"] = round(self._cost(stats["tokens_in"], stats["tokens_out"]), 6)
            stats["corpus_cost"] = round(
                self.spent(), 6
            )  # its answers of every run (their stored usage) and this run's

    def outcome(self) -> str | None:
        """The one-sentence error of a run that stopped or left failures; None when all is done."""
        s = self.stats
        n_failed = sum(s["failed"].values())
        counts = (
            f"{s['done']} done this run and {s['already_done']} before, {n_failed} failed, "
            f"{s['remaining']} not yet done, of {s['requested']}"
        )
        if self.stop_reason is not None:
            lost = (
                f"; {s['lost']} answers that arrived after that could not be stored and will be requested again"
                if s["lost"]
                else ""
            )
            return (
                f"collect stopped: {self.stop_reason}; {counts}{lost}{self._written_nowhere()}; finished samples are "
                f"safe in {self.out} and re-running the same command continues with the rest"
            )
        if n_failed and not self.ever_answered:
            return (
                f"collect stopped: cannot reach {self.cfg.base_url}: no attempt got an answer (last: "
                f"{self.last_failure}); check collect.base_url and that the server is running; {counts}"
            )
        if n_failed:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["failed"].items()))
            return (
                f"collect finished with failures ({reasons}; details in {self.fail_path}); {counts}; "
                "re-running the same command retries the failed samples"
            )
        if s["requested"] and not s["done"] + s["already_done"]:
            return (
                f"collect stored nothing: every answer was empty or refused ({_counts(s['declined'])}; details in "
                f"{self.fail_path}); check the prompts and collect.model"
            )
        return None

    def _written_nowhere(self) -> str:
        """What this run was billed for answers that neither the corpus nor its failures file could take: a later
        run cannot count them (nor keep `collect.max_cost` with them)."""
        n, tokens_in, tokens_out = self.unrecorded
        if not n:
            return ""
        priced = self.cfg.price_input_per_mtok or self.cfg.price_output_per_mtok
        billed = (
            f"cost {self._cost(tokens_in, tokens_out):.6g}" if priced else f"{tokens_in}/{tokens_out} tokens in/out"
        )
        capped = " against collect.max_cost" if self.cap else " in the corpus's cost"
        return (
            f"; {n} answers billed this run ({billed}) are stored nowhere ({self.out} and {self.fail_path} could not "
            f"be written): a re-run cannot count them{capped}"
        )


def resolve_api_key(cfg) -> str:
    """The key from config or the named environment variable; loopback endpoints may go without."""
    key = cfg.api_key or os.environ.get(cfg.api_key_env or "", "")
    if key:
        return key
    host = urllib.parse.urlparse(cfg.base_url).hostname or ""
    if host in ("localhost", "::1") or host.startswith("127."):
        return "no-key"
    raise CollectError(
        f"no API key for {cfg.base_url}: set collect.api_key or the environment variable {cfg.api_key_env!r}"
    )


def _counts(by_reason: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items())) or "none"


def format_summary(stats: dict) -> str:
    declined = sum(stats["declined"].values()) + stats["already_declined"]
    reasoning = f" ({stats['reasoning_tokens']} of them reasoning)" if stats.get("reasoning_tokens") else ""
    line = (
        f"[collect] {stats['out']}: {stats['done']} done this run, {stats['already_done']} "
        f"already done, {stats['remaining']} not yet done, of {stats['requested']}; failed: "
        f"{_counts(stats['failed'])}; answered without usable text: {declined} "
        f"({_counts(stats['declined'])} this run); "
        f"tokens in/out {stats['tokens_in']}/{stats['tokens_out']}{reasoning}; {stats['requests']} requests "
        f"({stats['retries']} retries); {stats['samples_per_s']} samples/s"
    )
    line += f"; {stats['lost']} answers lost (not stored)" if stats.get("lost") else ""
    if stats.get("without_logprobs"):
        line += (
            f"; {stats['without_logprobs']} answers came without the log-probs asked for "
            "(stored as text only: no teacher log-probs for them)"
        )
    if "cost" not in stats:
        return line
    before = stats.get("corpus_cost", stats["cost"]) - stats["cost"]
    return line + f"; cost {stats['cost']}" + (f" ({stats['corpus_cost']} for the whole corpus)" if before > 0 else "")


def _check_config(cfg):
    if cfg.api not in ("chat", "completions"):
        raise CollectError(f"collect.api must be 'chat' or 'completions', not {cfg.api!r}")
    if cfg.token_limit not in TOKEN_LIMITS:
        raise CollectError(
            f"collect.token_limit must be {' or '.join(map(repr, TOKEN_LIMITS))}, not {cfg.token_limit!r}"
        )
    if cfg.token_limit == "max_completion_tokens" and cfg.api != "chat":
        raise CollectError(
            "collect.token_limit='max_completion_tokens' needs collect.api='chat' (the completions API takes "
            "max_tokens only); set one of them"
        )
    for field in ("temperature", "top_p"):
        if not cfg.send_sampling and float(cfg[field]) != 1.0:
            raise CollectError(
                f"collect.{field}={cfg[field]} is not sent with collect.send_sampling=False (the endpoint samples at "
                f"its own settings); set collect.{field}=1.0, or collect.send_sampling=True to send it"
            )
    if not 0 <= cfg.top_logprobs <= 20:
        raise CollectError(f"collect.top_logprobs must be within 0-20, not {cfg.top_logprobs}")
    if not cfg.out:
        raise CollectError("collect.out is empty; set it to the corpus JSONL path to write")
    if not cfg.model:
        raise CollectError("collect.model is empty; set it to the endpoint's model name")
    for field, low in (("samples_per_prompt", 1), ("max_attempts", 1), ("breaker_failures", 1), ("concurrency", 1)):
        if cfg[field] < low:
            raise CollectError(f"collect.{field} is {cfg[field]}; it must be at least {low}")
    for field in ("breaker_no_success_s", "request_timeout_s"):
        if not cfg[field] > 0:
            raise CollectError(f"collect.{field} is {cfg[field]}; it must be a positive number of seconds")
    for field in ("price_input_per_mtok", "price_output_per_mtok", "max_cost"):
        if not 0 <= float(cfg.get(field, 0.0)) < math.inf:
            raise CollectError(f"collect.{field} is {cfg[field]}; it must be a number >= 0")
    if cfg.get("max_cost", 0.0) and not (cfg.price_input_per_mtok or cfg.price_output_per_mtok):
        raise CollectError(
            f"collect.max_cost is {cfg.max_cost} but no price is set; set collect.price_input_per_mtok and "
            "collect.price_output_per_mtok (the endpoint's prices per million tokens) for the cap to count against"
        )


def check(cfg) -> tuple[list[Prompt], str]:
    """(prompts, API key) of the `collect` config group, or CollectError with one sentence for a bad
    field, a bad prompts file or a missing key; reads only, so a caller checks before writing anything."""
    _check_config(cfg)
    prompts = read_prompts(cfg.prompts, cfg.api)
    return prompts, resolve_api_key(cfg)


def _wanted(cfg, prompts: list[Prompt]) -> set[str]:
    params = sampling_params(cfg)
    return {request_key(cfg.model, p, params, s) for p in prompts for s in range(cfg.samples_per_prompt)}


def carry_over(cfg, prompts: list[Prompt], source: pathlib.Path, dest: pathlib.Path) -> int:
    """Copies into the corpus `dest` the samples of an earlier corpus `source` that `cfg` still asks for,
    so a redo never pays again for a sample already paid for; returns how many it copied.

    A sample's content key covers everything its answer depends on (model, prompt, sampling
    parameters, sample index), so a stored line with a key the new settings want is exactly the answer
    the redo would request: raising `samples_per_prompt`, adding prompts or changing `max_tokens`
    requests only the samples whose keys are new. The final answers without usable text recorded
    in `source`'s failures file come along too (`"final": true` rows). Resumable: lines already in
    `dest` are not copied twice, and a line torn by a crash is cut off by the next `read_done`.
    """
    source, dest = pathlib.Path(source), pathlib.Path(dest)
    wanted = _wanted(cfg, prompts)
    fails = lambda path: path.with_name(path.name + ".failures.jsonl")  # noqa: E731
    have = read_done(dest)
    copied = _copy_lines(source, dest, lambda row: row.get("key") in wanted and row["key"] not in have)
    declined = read_declined(fails(dest)) | have
    _copy_lines(
        fails(source),
        fails(dest),
        lambda row: row.get("final") is True and row.get("key") in wanted and row["key"] not in declined,
    )
    if copied:
        print(f"[collect] {dest}: kept {copied} samples of {source} that these settings still ask for (not paid again)")
    return copied


def _copy_lines(source: pathlib.Path, dest: pathlib.Path, keep) -> int:
    """Appends (and fsyncs) the whole JSON lines of `source` for which `keep(row)` holds, each key once."""
    if not source.exists():
        return 0
    seen, n = set(), 0
    try:
        with open(source, "rb") as src, open(dest, "ab") as out:
            for raw in src:
                if not raw.endswith(b"\n"):  # a torn last line left by a crash
                    continue
                try:
                    row = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("key"), str) and row["key"] not in seen and keep(row):
                    seen.add(row["key"])
                    out.write(raw)
                    n += 1
            out.flush()
            os.fsync(out.fileno())
    except OSError as err:
        raise CollectError(
            f"cannot copy the samples of {source} into {dest} ({err.strerror or err}); free space or fix the "
            "folder's permissions, then re-run the same command"
        ) from None
    return n


def collect(cfg, *, prompts: list[Prompt] | None = None, api_key: str | None = None) -> dict:
    """Runs the `collect` stage on the `collect` config group; returns (and prints) the summary.

    Raises CollectError with one clear sentence for a bad prompts file, a missing key, an
    unreachable endpoint or a rejected key, for a run the breaker or a full disk stopped, and for a
    run that ended with failed samples; every record finished before that stays in the corpus.
    `prompts` and `api_key` are `check(cfg)`'s, when the caller has checked already.
    """
    if prompts is None or api_key is None:
        prompts, api_key = check(cfg)
    collector = Collector(cfg, prompts, api_key)
    try:
        stats = asyncio.run(collector.run())
    except KeyboardInterrupt:
        stats = collector.stats
        collector.stop_reason = collector.stop_reason or "interrupted"
    print(format_summary(stats))
    message = collector.outcome()
    if message:
        raise CollectError(message, stats)
    return stats
