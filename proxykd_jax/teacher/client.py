"""`collect`: prompts JSONL + an OpenAI-compatible endpoint -> teacher corpus JSONL.

Each (prompt, sample_index) is one request with a content key (sha256 of model, prompt, sampling
parameters and sample index). Finished samples are appended to the corpus with flush + fsync, so a
crash loses at most the requests in flight and a re-run skips every key already in the file.
Retryable failures (429, 5xx, timeouts, dropped connections) back off exponentially with full jitter,
honouring Retry-After; the rest are recorded in `<out>.failures.jsonl` and counted in the summary.
The API key is read from config or the environment and never written anywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import hashlib
import json
import math
import os
import pathlib
import random
import time
import urllib.parse

import openai
import tqdm

try:  # the HTTP library under the official client: httpx2 from openai 3, httpx before
    import httpx2 as _http
except ImportError:  # pragma: no cover - older openai
    import httpx as _http

from proxykd_jax.errors import ProxyKDError

RETRYABLE_STATUS = (408, 409, 429)
CONNECTIONS_PER_CLIENT = 8
FATAL_STATUS = {
    401: "the API key was rejected (401)",
    403: "access is forbidden (403)",
    404: "the endpoint or model was not found (404)",
}


class CollectError(ProxyKDError):
    """A user-facing failure of `collect` (bad prompts file, unreachable endpoint, rejected key)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt line: exactly one of `prompt` (text) and `messages` (chat) is set."""

    id: str
    line: int
    prompt: str | None
    messages: tuple | None


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def read_prompts(path: str, api: str) -> list[Prompt]:
    """Reads and validates the whole prompts file before any request is made."""
    p = pathlib.Path(path)
    if not path or not p.is_file():
        raise CollectError(f"prompts file {path!r} does not exist; set collect.prompts to a JSONL file")
    prompts, seen = [], {}
    for lineno, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{p.name} line {lineno}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CollectError(f"{where}: not valid JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
            raise CollectError(
                f"{where}: expected an object with exactly one of 'prompt' (string) "
                "or 'messages' (list of {role, content}); fix or remove the line"
            )
        text, messages = obj.get("prompt"), obj.get("messages")
        if "prompt" in obj and (not isinstance(text, str) or not text):
            raise CollectError(f"{where}: 'prompt' must be a non-empty string; fix or remove the line")
        if "messages" in obj:
            ok = (
                isinstance(messages, list)
                and messages
                and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages
                )
            )
            if not ok:
                raise CollectError(
                    f"{where}: 'messages' must be a non-empty list of objects with "
                    "string 'role' and 'content'; fix or remove the line"
                )
            if api != "chat":
                raise CollectError(
                    f"{where}: chat 'messages' need collect.api='chat' "
                    f"(it is {api!r}); use 'prompt' text or switch the api"
                )
            messages = tuple({"role": m["role"], "content": m["content"]} for m in messages)
        pid = obj.get("id")
        if pid is None:
            pid = hashlib.sha256(_canonical(text if messages is None else list(messages)).encode()).hexdigest()[:16]
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise CollectError(f"{where}: 'id' must be a string or integer; fix the line")
        pid = str(pid)
        if pid in seen:
            raise CollectError(f"{where}: id {pid!r} already used on line {seen[pid]}; prompt ids must be unique")
        seen[pid] = lineno
        prompts.append(Prompt(pid, lineno, text, messages))
    if not prompts:
        raise CollectError(f"prompts file {path!r} holds no prompts")
    return prompts


def sampling_params(cfg) -> dict:
    """The sampling parameters that go into every request and every content key."""
    return {
        "api": cfg.api,
        "temperature": float(cfg.temperature),
        "top_p": float(cfg.top_p),
        "max_tokens": int(cfg.max_tokens),
        "stop": list(cfg.stop),
        "top_logprobs": int(cfg.top_logprobs),
    }


def request_key(model: str, prompt: Prompt, params: dict, sample_index: int) -> str:
    """Content hash of (endpoint model, prompt, sampling parameters, sample index)."""
    content = prompt.prompt if prompt.messages is None else list(prompt.messages)
    return hashlib.sha256(_canonical([model, content, params, sample_index]).encode()).hexdigest()


def read_done(out: pathlib.Path) -> set[str]:
    """Keys already in the corpus; a torn last line (crash mid-write) is cut off the file."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    lines = data.split(b"\n")
    if lines[-1]:  # no trailing newline: the last write was torn by a crash
        print(f"[collect] {out}: dropping a torn last line ({len(lines[-1])} bytes) left by a crash")
        with open(out, "r+b") as f:
            f.truncate(len(data) - len(lines[-1]))
    done = set()
    for lineno, raw in enumerate(lines[:-1], start=1):
        if not raw.strip():
            continue
        try:
            done.add(json.loads(raw)["key"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CollectError(
                f"{out} line {lineno}: not a corpus record with a 'key'; "
                "move the file aside or point collect.out elsewhere"
            ) from None
    return done


class RateLimiter:
    """Token bucket that never lets more than `per_minute` units through in any 60 s window.

    Capacity (burst) is one second's worth, at least 1; the refill rate is lowered by the capacity
    so that burst + 60 s of refill equals the limit. A request larger than the capacity waits for a
    full bucket and drives it negative (debt), which keeps the long-run rate exact.
    """

    def __init__(self, per_minute: float):
        self.capacity = max(1.0, per_minute / 60.0)
        self.rate = max(per_minute - self.capacity, 1e-9) / 60.0
        self.level = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self):
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, amount: float = 1.0):
        async with self.lock:  # FIFO: one waiter at a time
            need = min(amount, self.capacity)
            self._refill()
            while self.level < need:
                await asyncio.sleep((need - self.level) / self.rate)
                self._refill()
            self.level -= amount

    def refund(self, amount: float):
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class _Failure(Exception):
    def __init__(
        self, reason: str, message: str, retryable: bool, retry_after: float | None = None, fatal: bool = False
    ):
        super().__init__(message)
        self.reason, self.retryable, self.retry_after, self.fatal = reason, retryable, retry_after, fatal


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
        parsed = email.utils.parsedate_to_datetime(value)
        return None if parsed is None else max(0.0, parsed.timestamp() - time.time())


def _classify(err: Exception) -> _Failure:
    """Maps a client exception to a retryable / per-prompt / fatal failure."""
    if isinstance(err, openai.APITimeoutError):
        return _Failure("timeout", "the request timed out", True)
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__ or err
        return _Failure("connection", f"connection failed ({type(cause).__name__}: {cause})", True)
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        code = str(getattr(err, "code", "") or "")
        if status == 429 and code == "insufficient_quota":
            return _Failure("quota", "the account is out of quota (429 insufficient_quota)", False, fatal=True)
        if status in FATAL_STATUS:
            return _Failure(f"http_{status}", FATAL_STATUS[status], False, fatal=True)
        if status >= 500 or status in RETRYABLE_STATUS:
            return _Failure(f"http_{status}", f"HTTP {status}", True, _retry_after(err.response))
        if "content_filter" in code or "content_filter" in str(err.message):
            return _Failure("content_filter", "the endpoint's content filter refused the prompt", False)
        return _Failure(f"http_{status}", f"HTTP {status}: {err.message}", False)
    if isinstance(err, (openai.APIResponseValidationError, json.JSONDecodeError)):
        return _Failure("malformed_response", f"the response could not be parsed ({err})", True)
    raise err


def _logprob_fields(choice, api: str) -> dict:
    """Teacher token strings and per-token top-k alternatives, when the endpoint returned them."""
    lp = getattr(choice, "logprobs", None)
    if lp is None:
        return {}
    if api == "chat":
        content = lp.content or []
        if not content:
            return {}
        tops = [
            [
                {
                    "token": t.token,
                    "logprob": float(t.logprob),
                    **({"bytes": list(t.bytes)} if t.bytes is not None else {}),
                }
                for t in (entry.top_logprobs or [])
            ]
            for entry in content
        ]
        return {"tokens": [entry.token for entry in content], "top_logprobs": tops}
    if not lp.tokens or lp.top_logprobs is None:
        return {}
    tops = [
        [{"token": tok, "logprob": float(v)} for tok, v in sorted((d or {}).items(), key=lambda kv: -kv[1])]
        for d in lp.top_logprobs
    ]
    return {"tokens": list(lp.tokens), "top_logprobs": tops}


class DurableAppender:
    """Appends JSON lines with group commit: whatever queued while the last fsync ran is written
    and fsynced together, and each `append` returns only once its own line is on disk."""

    def __init__(self, path: pathlib.Path):
        self.path, self.pending, self.task = path, [], None

    async def append(self, record: dict):
        future = asyncio.get_running_loop().create_future()
        self.pending.append(((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"), future))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._drain())
        await future

    def _write(self, lines: list[bytes]):
        with open(self.path, "ab") as f:
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())

    async def _drain(self):
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                await asyncio.to_thread(self._write, [line for line, _ in batch])
            except OSError as err:
                for _, future in batch:
                    future.set_exception(err)
                continue
            for _, future in batch:
                future.set_result(None)


class Collector:
    """One `collect` run: the work list, the HTTP client, the limiters and the output file."""

    def __init__(self, cfg, prompts: list[Prompt], api_key: str):
        self.cfg = cfg
        self.params = sampling_params(cfg)
        self.out = pathlib.Path(cfg.out)
        self.fail_path = self.out.with_name(self.out.name + ".failures.jsonl")
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
        self.client = self.clients[0]
        self.rpm = RateLimiter(cfg.requests_per_minute) if cfg.requests_per_minute > 0 else None
        self.tpm = RateLimiter(cfg.tokens_per_minute) if cfg.tokens_per_minute > 0 else None
        self.rng = random.Random(cfg.seed)
        self.corpus = DurableAppender(self.out)
        self.failures = DurableAppender(self.fail_path)
        done = read_done(self.out)
        work = [
            (p, s, request_key(cfg.model, p, self.params, s)) for p in prompts for s in range(cfg.samples_per_prompt)
        ]
        self.todo = [w for w in work if w[2] not in done]
        unknown = len(done - {w[2] for w in work})
        if unknown:
            print(
                f"[collect] {self.out}: {unknown} existing records do not match the current "
                "prompts/sampling config; they are kept as they are"
            )
        self.stats = {
            "out": str(self.out),
            "requested": len(work),
            "already_done": len(work) - len(self.todo),
            "done": 0,
            "failed": {},
            "tokens_in": 0,
            "tokens_out": 0,
            "requests": 0,
            "retries": 0,
        }
        self.fatal: str | None = None

    async def _request(self, prompt: Prompt, key: str, client=None):
        """One API call through the official client's `post` with a plain JSON body.

        `chat.completions.create` would first walk the body through the SDK's typed-params transform
        (about 1.5 ms of client CPU per request, the largest single cost at high concurrency); the
        body here is already in wire format, so the same request and typed response skip it.
        """
        cfg, p, client = self.cfg, self.params, client or self.client
        body = dict(model=cfg.model, temperature=p["temperature"], top_p=p["top_p"], max_tokens=p["max_tokens"], n=1)
        if p["stop"]:
            body["stop"] = p["stop"]
        if cfg.send_seed:  # the sample's own seed: reproducible whatever else is in flight
            body["seed"] = int(key[:15], 16)
        options = {"headers": {"X-Request-Key": key}}
        if cfg.api == "chat":
            body["messages"] = list(prompt.messages or [{"role": "user", "content": prompt.prompt}])
            if p["top_logprobs"] > 0:
                body.update(logprobs=True, top_logprobs=p["top_logprobs"])
            return await client.post(
                "/chat/completions", body=body, options=options, cast_to=openai.types.chat.ChatCompletion
            )
        body["prompt"] = prompt.prompt
        if p["top_logprobs"] > 0:
            body["logprobs"] = p["top_logprobs"]
        return await client.post("/completions", body=body, options=options, cast_to=openai.types.Completion)

    def _record(self, prompt: Prompt, sample_index: int, key: str, resp) -> dict:
        if not resp.choices:
            raise _Failure("no_content", "the response has no choices", False)
        choice = resp.choices[0]
        if choice.finish_reason == "content_filter":
            raise _Failure("content_filter", "the endpoint's content filter stopped the response", False)
        text = choice.message.content if self.cfg.api == "chat" else choice.text
        if not text:
            raise _Failure("no_content", "the response has no content", False)
        usage = resp.usage
        usage = (
            {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
            if usage is not None
            else {}
        )
        record = {"id": prompt.id}
        record.update({"prompt": prompt.prompt} if prompt.messages is None else {"messages": list(prompt.messages)})
        record.update(response=text, sample_index=sample_index, key=key)
        if self.params["top_logprobs"] > 0:
            record.update(_logprob_fields(choice, self.cfg.api))
        record["meta"] = {
            "model": self.cfg.model,
            "temperature": self.params["temperature"],
            "top_p": self.params["top_p"],
            "max_tokens": self.params["max_tokens"],
            "finish_reason": choice.finish_reason,
            "usage": usage,
        }
        return record

    async def _one(self, prompt: Prompt, sample_index: int, key: str, max_attempts: int, client=None):
        """Runs one sample to completion: appends a record or a failure; returns the failure."""
        cfg = self.cfg
        text = prompt.prompt if prompt.messages is None else _canonical(list(prompt.messages))
        estimate = math.ceil(len(text) / 4) + cfg.max_tokens
        for attempt in range(max_attempts):
            if self.fatal:
                return None
            if self.rpm:
                await self.rpm.acquire(1)
            if self.tpm:
                await self.tpm.acquire(estimate)
            self.stats["requests"] += 1
            try:
                resp = await self._request(prompt, key, client)
                record = self._record(prompt, sample_index, key, resp)
            except Exception as err:  # classified below; unknown errors re-raise
                failure = err if isinstance(err, _Failure) else _classify(err)
                if self.tpm:
                    self.tpm.refund(estimate)
                if failure.retryable and attempt + 1 < max_attempts:
                    self.stats["retries"] += 1
                    ceiling = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2**attempt)
                    await asyncio.sleep(max(self.rng.uniform(0, ceiling), failure.retry_after or 0))
                    continue
                if failure.retryable:
                    failure.reason = f"retries_exhausted_{failure.reason}"
                await self._fail(prompt, sample_index, key, failure)
                return failure
            usage = record["meta"]["usage"]
            if self.tpm and usage:
                self.tpm.refund(estimate - usage["prompt_tokens"] - usage["completion_tokens"])
            self.stats["tokens_in"] += usage.get("prompt_tokens", 0)
            self.stats["tokens_out"] += usage.get("completion_tokens", 0)
            await self.corpus.append(record)
            self.stats["done"] += 1
            return None
        return None

    async def _fail(self, prompt: Prompt, sample_index: int, key: str, failure: _Failure):
        if failure.fatal:
            self.fatal = self.fatal or str(failure)
            return
        failed = self.stats["failed"]
        failed[failure.reason] = failed.get(failure.reason, 0) + 1
        await self.failures.append(
            {
                "id": prompt.id,
                "line": prompt.line,
                "sample_index": sample_index,
                "key": key,
                "reason": failure.reason,
                "message": str(failure),
                "time": time.time(),
            }
        )

    async def run(self) -> dict:
        start = time.monotonic()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm.tqdm(total=len(self.todo), disable=not self.cfg.progress, desc="collect", unit="sample")
        queue = list(reversed(self.todo))
        try:
            if queue:  # a lone first request: a dead endpoint or bad key stops here
                first = queue.pop()
                failure = await self._one(*first, max_attempts=min(3, self.cfg.max_attempts))
                bar.update(1)
                if failure is not None and failure.reason.endswith("connection"):
                    self.fatal = (
                        f"cannot reach {self.cfg.base_url} ({failure}); check "
                        "collect.base_url and that the server is running"
                    )

            async def worker(client):
                while queue and not self.fatal:
                    await self._one(*queue.pop(), max_attempts=self.cfg.max_attempts, client=client)
                    bar.update(1)
                    bar.set_postfix(failed=sum(self.stats["failed"].values()), refresh=False)

            await asyncio.gather(
                *(worker(self.clients[i // CONNECTIONS_PER_CLIENT]) for i in range(max(1, self.cfg.concurrency)))
            )
        finally:
            bar.close()
            for client in self.clients:
                await client.close()
        elapsed = time.monotonic() - start
        self.stats["elapsed_s"] = round(elapsed, 3)
        self.stats["samples_per_s"] = round(self.stats["done"] / max(elapsed, 1e-9), 3)
        if self.cfg.price_input_per_mtok or self.cfg.price_output_per_mtok:
            self.stats["cost"] = round(
                (
                    self.stats["tokens_in"] * self.cfg.price_input_per_mtok
                    + self.stats["tokens_out"] * self.cfg.price_output_per_mtok
                )
                / 1e6,
                6,
            )
        return self.stats


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


def format_summary(stats: dict) -> str:
    failed = ", ".join(f"{k}: {v}" for k, v in sorted(stats["failed"].items())) or "none"
    line = (
        f"[collect] {stats['out']}: {stats['done']} done this run, {stats['already_done']} "
        f"already done, of {stats['requested']}; failed: {failed}; tokens in/out "
        f"{stats['tokens_in']}/{stats['tokens_out']}; {stats['requests']} requests "
        f"({stats['retries']} retries); {stats['samples_per_s']} samples/s"
    )
    return line + (f"; cost {stats['cost']}" if "cost" in stats else "")


def collect(cfg) -> dict:
    """Runs the `collect` stage on the `collect` config group; returns (and prints) the summary.

    Raises CollectError with one clear sentence for a bad prompts file, a missing key, an
    unreachable endpoint or a rejected key; every record finished before that stays in the corpus.
    """
    if cfg.api not in ("chat", "completions"):
        raise CollectError(f"collect.api must be 'chat' or 'completions', not {cfg.api!r}")
    if not 0 <= cfg.top_logprobs <= 20:
        raise CollectError(f"collect.top_logprobs must be within 0-20, not {cfg.top_logprobs}")
    if not cfg.out:
        raise CollectError("collect.out is empty; set it to the corpus JSONL path to write")
    if not cfg.model:
        raise CollectError("collect.model is empty; set it to the endpoint's model name")
    if cfg.samples_per_prompt < 1:
        raise CollectError("collect.samples_per_prompt must be at least 1")
    prompts = read_prompts(cfg.prompts, cfg.api)
    collector = Collector(cfg, prompts, resolve_api_key(cfg))
    stats = asyncio.run(collector.run())
    print(format_summary(stats))
    if collector.fatal:
        raise CollectError(
            f"collect stopped: {collector.fatal}; {stats['done'] + stats['already_done']}"
            f" finished samples are safe in {cfg.out}"
        )
    return stats
