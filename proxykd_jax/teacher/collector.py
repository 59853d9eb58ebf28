"""The `Collector`: one `collect` run's requests to the teacher's endpoint, from the work list to the corpus.

Workers (`collect.concurrency`, over one HTTP client per CONNECTIONS_PER_CLIENT of them) take samples off the work
list; each request waits for the rate limits (`rate.py`), the circuit breaker and the spend cap (`spend.py`), is
sent as a plain JSON body, and its answer is parsed (`responses.py`), paid for, and appended to the corpus; a
failure (`failures.py`) is retried with jittered backoff, recorded for its sample, or stops the run; its stats and
their wording are `summary.py`'s. `client.py` describes the whole stage and runs it (`client.collect`).
"""

from __future__ import annotations

import asyncio
import collections
import math
import pathlib
import random
import time

import openai

try:  # the HTTP library under the official client: httpx2 from openai 3, httpx before
    import httpx2 as _http
except ImportError:  # pragma: no cover - older openai
    import httpx as _http

from proxykd_jax import progress
from proxykd_jax.teacher import summary
from proxykd_jax.teacher.failures import Failure, classify
from proxykd_jax.teacher.journal import DurableAppender, read_declined, read_done_and_billed
from proxykd_jax.teacher.prompts import CollectError, Prompt, canonical, request_key, sampling_params
from proxykd_jax.teacher.rate import RateLimiter, acquire_together
from proxykd_jax.teacher.responses import Answer, parse_answer, reasoning_tokens
from proxykd_jax.teacher.spend import Spend
from proxykd_jax.teacher.summary import format_summary  # re-exported: client.collect imports it from here

__all__ = ["Collector", "format_summary"]

CONNECTIONS_PER_CLIENT = 8
LOGPROBS_CHECK = 3  # stored answers, all without the log-probs asked for, that stop the run
UNREACHED_PROBES = 6  # probes (about 16 s) after which an endpoint that never answered is given up


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
        self.stats = summary.new_stats(self.out, work, done, declined, len(self.todo))
        self.with_logprobs = 0  # stored answers of this run that carried them
        self.spend = Spend(cfg, billed, self.out)  # the corpus's cost and collect.max_cost
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
        self.last_failure: Failure | None = None
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

    def _failed_attempt(self, failure: Failure, sent: float):
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

    async def _reserve(self, prompt_bytes: int) -> float | None:
        """Reserves under `collect.max_cost` a request's worst cost (`Spend.admit`); returns it, or None once the run
        stopped or the request does not fit. Waits while requests in flight may still leave room; one that does not
        fit even with none in flight is passed over (`_over_cap`)."""
        while self.stop_reason is None:
            worst = self.spend.admit(prompt_bytes, self.stats)
            if worst is not None:
                return worst
            if self.spend.hopeless(prompt_bytes, self.stats):
                break
            await self._changed.wait()
        return None

    def _over_cap(self, queue: list) -> bool:
        """After the workers ran out of samples: puts the samples the cap passed over that fit now back on `queue`
        and returns True; else, where some were passed over, stops the run at the cap and returns False."""
        if self.stop_reason is not None or not self.spend.passed_over:
            return False
        fitting = self.spend.fitting(self.stats)
        if fitting:
            queue.extend(reversed(fitting))
            return True
        self._halt(self.spend.reached(self.stats))
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
        under a spend cap an answer that leaves the cap unkept (`Spend.unkept`) stops the run."""
        self.stats["tokens_in"] += usage.get("prompt_tokens", 0)
        self.stats["tokens_out"] += usage.get("completion_tokens", 0)
        self.stats["reasoning_tokens"] += reasoning_tokens(usage) or 0
        unkept = self.spend.unkept(usage)
        if unkept:
            self._halt(unkept)
        if self.tpm and usage:
            self.tpm.refund(estimate - usage["prompt_tokens"] - usage["completion_tokens"], tokens)

    def _record(self, prompt: Prompt, sample_index: int, key: str, answer: Answer) -> dict:
        if answer.finish_reason == "content_filter":
            raise Failure(
                "content_filter", "the endpoint's content filter stopped the response", False, answered=True, final=True
            )
        if not answer.text:
            why = f" (refusal: {answer.refusal})" if answer.refusal else ""
            if answer.finish_reason == "length":  # a reasoning model that thought until the limit
                reasoning = reasoning_tokens(answer.usage)
                spent = f" ({reasoning} tokens of hidden reasoning)" if reasoning else ""
                why = f": collect.max_tokens={self.cfg.max_tokens} ran out first{spent}; raise it for room to answer"
            raise Failure("no_content", f"the response has no content{why}", False, answered=True, final=True)
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
                    self.spend.passed_over.append((prompt, sample_index, key, prompt_bytes))
                return False
            try:
                outcome = await self._attempt(prompt, sample_index, key, client, estimate, used)
            finally:
                self.spend.release(worst)
                if self.spend.cap:
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
            failure = err if isinstance(err, Failure) else classify(err, self.secret)
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
            lost = Failure("not_stored", f"cannot write {self.out} ({err.strerror or err})", False, answered=True)
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

    async def _fail(self, prompt: Prompt, sample_index: int, key: str, failure: Failure, answer=None) -> bool:
        """Counts a failed or declined sample and records it in the failures file; `answer`: the one it was billed."""
        counts = self.stats["declined" if failure.final else "failed"]
        counts[failure.reason] = counts.get(failure.reason, 0) + 1
        await self._note(prompt, sample_index, key, failure, answer)
        return True

    async def _note(self, prompt: Prompt, sample_index: int, key: str, failure: Failure, answer: Answer | None):
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
                self.spend.written_nowhere(answer.usage)

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
            summary.finish_stats(self.stats, self.cfg, self.spend, len(self.todo), time.monotonic() - start)
        return self.stats

    def outcome(self) -> str | None:
        """The one-sentence error of a run that stopped or left failures (`summary.outcome`); None when all is done."""
        return summary.outcome(self)
