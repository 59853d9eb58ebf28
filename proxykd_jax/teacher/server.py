"""`serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of a generation backend.

Endpoints: `/v1/models`, `/v1/chat/completions`, `/v1/completions` with `n`, temperature, top-p,
max tokens, stop strings, `logprobs`/`top_logprobs` and usage counts. Concurrent requests with the
same sampling settings are gathered for `batch_window_ms` and run as one backend call (one jitted
`generate` for `backends.LlamaBackend`). Faults (429 with
Retry-After, 500, slow responses, connections closed mid-response) are injected only when a
`Faults` object is passed explicitly. Every completion request is logged with its arrival time,
its `X-Request-Key` header (sent by `collect`) and its outcome, so tests can count requests.

A backend is any object with
  model_name: str
  encode(text) -> list[int];  chat_ids(messages) -> list[int];  decode(ids) -> str
  pieces(context_ids, candidate_ids) -> list[str]: the text each candidate adds after the context
      (chosen pieces concatenate to `decode(ids)`, as OpenAI token strings do)
  max_context: int (prompt + max_tokens limit)
  complete(prompts: list[list[int]], *, n, temperature, top_p, max_tokens, logprobs, top_logprobs,
           seeds: list[int | None] | None = None)
      -> per prompt, n `Completion`s (end-of-sequence stripped; stop strings are applied here).
      A prompt with a seed (the request's `seed` field) gets the same completions whatever else
      shares the call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import random
import threading
import time
from typing import Any

import fastapi
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict


@dataclasses.dataclass
class Completion:
    """One generated sequence: ids without end-of-sequence, per-token log-probs and alternatives."""

    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence or stop string) or "length"
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob), most likely first


@dataclasses.dataclass
class Faults:
    """Injected failures for tests; each completion request draws one outcome from a seeded RNG."""

    fail_429_rate: float = 0.0
    retry_after_s: float = 1.0
    fail_500_rate: float = 0.0
    slow_rate: float = 0.0
    slow_delay_s: float = 1.0
    drop_rate: float = 0.0
    seed: int = 0

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        if self.fail_429_rate + self.fail_500_rate + self.drop_rate > 1.0:
            raise ValueError("serve.faults: fail_429_rate + fail_500_rate + drop_rate must be <= 1")

    def draw(self) -> tuple[str | None, bool]:
        u, slow = self._rng.random(), self._rng.random() < self.slow_rate
        for name, rate in (("429", self.fail_429_rate), ("500", self.fail_500_rate), ("drop", self.drop_rate)):
            if u < rate:
                return name, slow
            u -= rate
        return None, slow


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


def _error_response(status: int, message: str, code: str, headers=None) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error" if status < 500 else "server_error",
                "code": code,
            }
        },
        status_code=status,
        headers=headers,
    )


class WireMiddleware:
    """ASGI middleware: logs completion requests and injects faults (only when `faults` is set)."""

    def __init__(self, app, faults: Faults | None, log: list, api_key: str | None):
        self.app, self.faults, self.log, self.api_key = app, faults, log, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and headers.get(b"authorization", b"").decode() != f"Bearer {self.api_key}":
            return await _error_response(401, "Incorrect API key provided.", "invalid_api_key")(scope, receive, send)
        if scope["method"] != "POST" or not scope["path"].endswith("completions"):
            return await self.app(scope, receive, send)
        entry = {
            "t": time.monotonic(),
            "key": headers.get(b"x-request-key", b"").decode(),
            "path": scope["path"],
            "outcome": None,
        }
        self.log.append(entry)
        fault, slow = self.faults.draw() if self.faults else (None, False)
        if slow:
            await asyncio.sleep(self.faults.slow_delay_s)
        if fault in ("429", "500"):
            entry["outcome"] = fault
            ra = self.faults.retry_after_s
            extra = {"retry-after": f"{ra:g}", "retry-after-ms": str(int(ra * 1000))} if fault == "429" else {}
            msg = "Rate limit reached (injected)." if fault == "429" else "Internal error (injected)."
            return await _error_response(int(fault), msg, "injected", extra)(scope, receive, send)
        if fault == "drop":
            start, body = {}, bytearray()

            async def capture(message):
                if message["type"] == "http.response.start":
                    start.update(message)
                else:
                    body.extend(message.get("body", b""))

            await self.app(scope, receive, capture)
            entry["outcome"] = "drop"
            hdrs = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send(
                {
                    "type": "http.response.start",
                    "status": start.get("status", 200),
                    "headers": hdrs + [(b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": bytes(body[: len(body) // 2]), "more_body": True})
            return  # the server closes the connection on an incomplete body

        async def logged_send(message):
            if message["type"] == "http.response.start":
                entry["outcome"] = "ok" if message["status"] == 200 else str(message["status"])
            await send(message)

        await self.app(scope, receive, logged_send)


class Batcher:
    """Gathers concurrent requests with equal sampling settings into one backend call.

    Requests wait up to `window_s` for company; one call runs at a time on a single worker thread
    (the accelerator), and requests that arrive while it runs join the next call.
    """

    def __init__(self, backend, window_s: float, max_batch: int):
        self.backend, self.window_s, self.max_batch = backend, window_s, max_batch
        self.pending: dict[tuple, list] = {}
        self.device = asyncio.Lock()
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.calls: list[int] = []  # sequences per backend call, for tests and benchmarks

    async def submit(self, prompts: list[list[int]], params: dict, seed: int | None = None) -> list[list[Completion]]:
        key = tuple(sorted(params.items()))
        future = asyncio.get_running_loop().create_future()
        first = key not in self.pending
        self.pending.setdefault(key, []).append((prompts, future, seed))
        if first:
            asyncio.get_running_loop().call_later(self.window_s, self._start, key)
        return await future

    def _start(self, key):
        asyncio.ensure_future(self._run(key))

    async def _run(self, key):
        async with self.device:
            items = self.pending.get(key, [])
            take, size = [], 0
            while items and (not take or size + len(items[0][0]) * dict(key)["n"] <= self.max_batch):
                take.append(items.pop(0))
                size += len(take[-1][0]) * dict(key)["n"]
            if not items:
                self.pending.pop(key, None)
            else:  # leftovers go in the next call
                asyncio.get_running_loop().call_soon(self._start, key)
            if not take:
                return
            prompts = [p for item, _, _ in take for p in item]
            seeds = [seed for item, _, seed in take for _ in item]
            self.calls.append(len(prompts) * dict(key)["n"])
            extra = {"seeds": seeds} if any(s is not None for s in seeds) else {}
            call = functools.partial(self.backend.complete, prompts, **dict(key), **extra)
            try:
                results = await asyncio.get_running_loop().run_in_executor(self.executor, call)
            except Exception as err:  # handed to each waiting request
                for _, future, _ in take:
                    future.set_exception(err)
                return
            i = 0
            for item, future, _ in take:
                future.set_result(results[i : i + len(item)])
                i += len(item)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[dict[str, Any]]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    seed: int | None = None  # same seed, same completion, whatever shares the batch


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str | list[str]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    logprobs: int | None = None
    seed: int | None = None


def apply_stop(backend, c: Completion, stops: list[str]) -> tuple[str, Completion]:
    """Cuts text and tokens before the earliest stop string (OpenAI semantics: stop not included)."""
    text = backend.decode(c.token_ids)
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not cuts:
        return text, c
    cut = min(cuts)
    keep = next(
        (i for i in range(len(c.token_ids)) if len(backend.decode(c.token_ids[: i + 1])) > cut), len(c.token_ids)
    )
    return text[:cut], Completion(
        c.token_ids[:keep],
        "stop",
        c.logprobs[:keep] if c.logprobs is not None else None,
        c.top[:keep] if c.top is not None else None,
    )


def make_app(
    backend,
    faults: Faults | None = None,
    *,
    api_key: str | None = None,
    max_tokens_limit: int = 1024,
    batch_window_ms: float = 5.0,
    max_batch: int = 32,
) -> fastapi.FastAPI:
    """The OpenAI-compatible app. `app.state.requests` logs completion requests (for tests)."""
    app = fastapi.FastAPI(title="proxykd_jax serve")
    app.state.requests = []
    app.state.batcher = None
    app.add_middleware(WireMiddleware, faults=faults, log=app.state.requests, api_key=api_key)

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return _error_response(err.status, str(err), err.code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(x) for x in first["loc"] if x != "body")
        return _error_response(400, f"invalid request field '{field}': {first['msg']}", "invalid_request")

    def check(model: str, n: int, temperature: float, top_p: float, max_tokens: int, k: int):
        if model != backend.model_name:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this server serves '{backend.model_name}'.",
                "model_not_found",
            )
        if not 1 <= n <= 128 or temperature < 0 or not 0 < top_p <= 1 or not 0 <= k <= 20:
            raise ApiError(
                400, "n must be 1-128, temperature >= 0, top_p in (0, 1] and top_logprobs 0-20.", "invalid_request"
            )
        if not 1 <= max_tokens <= max_tokens_limit:
            raise ApiError(400, f"max_tokens must be 1-{max_tokens_limit}, got {max_tokens}.", "invalid_request")

    async def run(prompts, n, temperature, top_p, max_tokens, logprobs, k, seed=None):
        if app.state.batcher is None:  # created inside the server's event loop
            app.state.batcher = Batcher(backend, batch_window_ms / 1000.0, max_batch)
        for ids in prompts:
            if not ids:
                raise ApiError(400, "the prompt is empty.", "invalid_request")
            if len(ids) + max_tokens > backend.max_context:
                raise ApiError(
                    400,
                    f"the prompt has {len(ids)} tokens; with max_tokens {max_tokens} "
                    f"it exceeds the context of {backend.max_context}.",
                    "context_length_exceeded",
                )
        params = dict(
            n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=logprobs, top_logprobs=k
        )
        return await app.state.batcher.submit(prompts, params, seed)

    def token_table(c: Completion) -> list[tuple[str, float, list[tuple[str, float]]]]:
        """Per generated token: its text piece, its log-prob, and its alternatives' pieces."""
        rows = []
        for j, (tid, lp) in enumerate(zip(c.token_ids, c.logprobs)):
            alts = c.top[j] if c.top else []
            texts = backend.pieces(c.token_ids[:j], [tid] + [a for a, _ in alts])
            rows.append((texts[0], lp, [(t, alp) for t, (_, alp) in zip(texts[1:], alts)]))
        return rows

    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    def usage(prompts, choices_tokens) -> dict:
        p, c = sum(len(x) for x in prompts), sum(choices_tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": backend.model_name, "object": "model", "created": 0, "owned_by": "proxykd_jax"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens or max_tokens_limit
        k = req.top_logprobs or 0
        check(req.model, req.n, req.temperature, req.top_p, max_tokens, k)
        prompts = [backend.chat_ids(req.messages)]
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        outs = (await run(prompts, req.n, req.temperature, req.top_p, max_tokens, req.logprobs or k > 0, k, req.seed))[
            0
        ]
        choices, counts = [], []
        for i, c in enumerate(outs):
            text, c = apply_stop(backend, c, stops)
            counts.append(len(c.token_ids))
            choice = {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            if req.logprobs and c.logprobs is not None:
                choice["logprobs"] = {
                    "content": [
                        {**entry(text, lp), "top_logprobs": [entry(*a) for a in alts]}
                        for text, lp, alts in token_table(c)
                    ]
                }
            choices.append(choice)
        return {
            "id": f"chatcmpl-{time.time_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": backend.model_name,
            "choices": choices,
            "usage": usage(prompts, counts),
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        k = req.logprobs or 0
        max_tokens = req.max_tokens or max_tokens_limit
        check(req.model, req.n, req.temperature, req.top_p, max_tokens, k)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        prompts = [backend.encode(t) for t in texts]
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        outs = await run(prompts, req.n, req.temperature, req.top_p, max_tokens, k > 0, k, req.seed)
        choices, counts = [], []
        for per_prompt in outs:
            for c in per_prompt:
                text, c = apply_stop(backend, c, stops)
                counts.append(len(c.token_ids))
                choice = {"index": len(choices), "text": text, "finish_reason": c.finish_reason, "logprobs": None}
                if k and c.logprobs is not None:
                    table = token_table(c)
                    toks = [text for text, _, _ in table]
                    offsets = [sum(len(x) for x in toks[:j]) for j in range(len(toks))]
                    choice["logprobs"] = {
                        "tokens": toks,
                        "token_logprobs": c.logprobs,
                        "text_offset": offsets,
                        "top_logprobs": [dict(reversed(alts)) for _, _, alts in table],
                    }
                choices.append(choice)
        return {
            "id": f"cmpl-{time.time_ns()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": backend.model_name,
            "choices": choices,
            "usage": usage(prompts, counts),
        }

    return app


class ServerThread:
    """Runs an app under uvicorn in a background thread on a loopback port (0 = a free one)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        config = uvicorn.Config(app, host=host, port=port, log_level="error", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        while not self.server.started:  # uvicorn flips this once the socket listens
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited before it started listening")
            self.thread.join(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def serve(cfg, backend) -> None:
    """Serves `backend` (see `backends.py`; the `serve` stage places its model on the mesh) with the
    `serve` config group's settings until interrupted (Ctrl-C)."""
    import os  # pylint: disable=import-outside-toplevel

    f = cfg.faults
    faults = Faults(f.fail_429_rate, f.retry_after_s, f.fail_500_rate, f.slow_rate, f.slow_delay_s, f.drop_rate, f.seed)
    active = faults if faults.fail_429_rate or faults.fail_500_rate or faults.slow_rate or faults.drop_rate else None
    api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
    if cfg.api_key_env and not api_key:
        raise ValueError(
            f"serve.api_key_env names {cfg.api_key_env!r}, which is not set; export "
            "it or set serve.api_key_env to '' for no authentication"
        )
    app = make_app(
        backend,
        active,
        api_key=api_key or None,
        max_tokens_limit=cfg.max_tokens_limit,
        batch_window_ms=cfg.batch_window_ms,
        max_batch=cfg.max_batch,
    )
    print(
        f"[serve] {backend.model_name} on http://{cfg.host}:{cfg.port}/v1"
        + (f" with injected faults {dataclasses.asdict(faults)}" if active else "")
    )
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
