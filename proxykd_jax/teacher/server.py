"""The OpenAI-compatible HTTP app (FastAPI, `make_app`) in front of a generation backend; `listen.py`
runs it under uvicorn (`serve`, `ServerThread`).

Endpoints: `/v1/models` (and `/v1/models/{id}`), `/v1/chat/completions`, `/v1/completions` (text or
token-id prompts, `echo`) with `n`, temperature, top-p, max tokens, stop strings, `logprobs`/`top_logprobs`
(each token's `bytes` too) and usage counts, built in `answers.py`; `stream: true` sends the answer as
server-sent events in the OpenAI layout (`stream.py`: one chunk per token's text, with its log-probs where
asked), once it is whole: generation stays batched and whole, so a stream brings no earlier first token.
Request bodies are checked by the pydantic models in `api.py` (a bad field is a 400 naming it) and
capped at `max_body_bytes` (413 before the body is read). Tokenising a long prompt and building a
large response run on worker threads, and generation on its own thread, so the event loop keeps
answering while a large request is tokenised (small ones stay on the loop: cheaper than a hop). Concurrent requests with the same sampling settings
are gathered for `batch_window_ms` and run as one backend call (one jitted `generate` for
`backends.LlamaBackend`). `wire.py` logs every completion request and injects faults when asked.

A backend is any object with
  model_name: str
  encode(text) -> list[int];  chat_ids(messages) -> list[int]
  decode(ids) -> str: the answer's text, without the tokens of `special_ids` (as vLLM and the
      OpenAI API return it: an end-of-turn token that does not stop the answer is not text)
  special_ids: frozenset[int]
  token_bytes(context_ids, candidate_ids) -> list[bytes]: each candidate's true bytes after the
      context, a special token's its own text (chosen tokens' bytes, those of `special_ids` left
      out, concatenate to the UTF-8 of the answer's text, `answer_text`)
  prompt_context(prompt_ids) -> list[int]: the prompt's tail an answer's text continues (vLLM's
      spelling: a SentencePiece `▁Hello` after "say" is " Hello"), [] where an answer is spelled alone
  max_context: int (prompt + max_tokens limit)
  vocab: int, optional: a completions prompt of token ids may hold ids 0 to vocab - 1 (without it,
      text prompts only)
  complete(prompts: list[list[int]], *, n, temperature, top_p, max_tokens, logprobs, top_logprobs,
           seeds: list[int | None] | None = None, starts: list[int] | None = None, to_context: bool = False)
      -> per prompt, n `Completion`s (end-of-sequence stripped; stop strings are applied here).
      A prompt with a seed (the request's `seed` field) gets the same completions whatever else
      shares the call: its j-th is sample starts[i] + j of its seed (`starts`, given with `seeds`:
      per prompt, the index in its request of the call's first sample; None: 0), so a request split
      into parts of n gets the samples of the unsplit one. With `to_context` (a request without a
      limit) each prompt's limit is min(max_tokens, max_context - its length): the call's settings do
      not depend on prompt lengths, so such requests batch together and `LlamaBackend` compiles a few
      shapes for them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools

import fastapi
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from proxykd_jax.models.tokenizer import TEMPLATE_ERRORS
from proxykd_jax.teacher.answers import Completion, chat_body, completions_body
from proxykd_jax.teacher.api import ChatRequest, CompletionRequest
from proxykd_jax.teacher.stream import chat_stream, completions_stream, streamed
from proxykd_jax.teacher.wire import ApiError, Faults, RequestLog, WireMiddleware, error_response

__all__ = ["Batcher", "Completion", "Faults", "make_app"]


class Batcher:
    """Gathers concurrent requests with equal sampling settings into backend calls of at most
    `max_batch` sequences (prompts x n).

    Requests wait up to `window_s` for company; one call runs at a time on a single worker thread
    (the accelerator), and requests that arrive while it runs join the next call. A request of more
    than `max_batch` sequences runs in parts (`parts`) and gets its answers back in order.
    """

    def __init__(self, backend, window_s: float, max_batch: int):
        self.backend, self.window_s, self.max_batch = backend, window_s, max_batch
        self.pending: dict[tuple, list] = {}
        self.device = asyncio.Lock()
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.calls: list[int] = []  # sequences per backend call, for tests and benchmarks

    def parts(self, num_prompts: int, n: int) -> list[tuple[slice, int, int]]:
        """(prompts, n, start) of each part of a request: whole prompts, as many as `max_batch` holds; a
        prompt whose n alone exceeds it, in parts of at most `max_batch` samples, `start` the index of a
        part's first sample. A seeded prompt's samples are numbered from it (`complete`'s `starts`), so
        each gets the answer of its seed and index whichever part it runs in."""
        if n <= self.max_batch:
            per = self.max_batch // n
            return [(slice(i, i + per), n, 0) for i in range(0, num_prompts, per)]
        starts = range(0, n, self.max_batch)
        return [(slice(j, j + 1), min(self.max_batch, n - i), i) for j in range(num_prompts) for i in starts]

    async def submit(self, prompts: list[list[int]], params: dict, seed: int | None = None) -> list[list[Completion]]:
        """Per prompt, its n completions (the backend's `complete` of the request's settings)."""
        parts, futures = self.parts(len(prompts), params["n"]), []
        for rows, n, start in parts:
            key = tuple(sorted(dict(params, n=n).items()))
            futures.append(asyncio.get_running_loop().create_future())
            if key not in self.pending:
                asyncio.get_running_loop().call_later(self.window_s, self._start, key)
            self.pending.setdefault(key, []).append((prompts[rows], futures[-1], seed, start))
        answers: dict[int, list[Completion]] = {}
        for (rows, _, _), part in zip(parts, await asyncio.gather(*futures)):
            for j, row in zip(range(len(prompts))[rows], part):  # a prompt's parts of n, in order
                answers.setdefault(j, []).extend(row)
        return [answers[j] for j in range(len(prompts))]

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
            prompts = [p for item, *_ in take for p in item]
            seeds = [seed for item, _, seed, _ in take for _ in item]
            starts = [start for item, _, _, start in take for _ in item]
            self.calls.append(len(prompts) * dict(key)["n"])
            extra = {"seeds": seeds, "starts": starts} if any(s is not None for s in seeds) else {}
            call = functools.partial(self.backend.complete, prompts, **dict(key), **extra)
            try:
                results = await asyncio.get_running_loop().run_in_executor(self.executor, call)
            except Exception as err:  # handed to each waiting request
                for _, future, *_ in take:
                    if not future.done():
                        future.set_exception(err)
                return
            i = 0
            for item, future, *_ in take:  # a request cancelled meanwhile (its future done) leaves the others theirs
                if not future.done():
                    future.set_result(results[i : i + len(item)])
                i += len(item)


INLINE_WORK = 16_384  # characters of text (or about that much token-table work) handled on the event loop


def _field(loc) -> str:
    return ".".join(str(x) for x in loc if x != "body")


def _unreadable(err: Exception) -> str:
    """Why a body that is no JSON syntax error still could not be read as JSON (FastAPI's bare 400)."""
    if isinstance(err, UnicodeDecodeError):
        return f"byte {err.start} is not UTF-8"
    if isinstance(err, RecursionError):
        return "it is nested too deeply"
    return str(err).split(";")[0]  # (an integer past Python's digit limit: not its advice on raising the limit)


def make_app(
    backend,
    faults: Faults | None = None,
    *,
    api_key: str | None = None,
    max_tokens_limit: int = 1024,
    batch_window_ms: float = 5.0,
    max_batch: int = 32,
    max_body_bytes: int = 2 * 1024 * 1024,
    request_log: str | None = None,
) -> fastapi.FastAPI:
    """The OpenAI-compatible app. `app.state.requests` lists completion requests (for tests), and
    `request_log` names a JSONL file that gets them too."""
    app = fastapi.FastAPI(title="proxykd_jax serve")
    log = RequestLog(request_log or None)
    app.state.requests = log.entries
    app.state.batcher = None
    app.add_middleware(WireMiddleware, faults=faults, log=log, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return error_response(err.status, str(err), err.code, err.headers, err.param)

    @app.exception_handler(HTTPException)
    async def _http_error(_, err: HTTPException):
        if err.status_code == 400 and isinstance(err.__cause__, (ValueError, RecursionError)):  # body not read as JSON
            return error_response(
                400, f"the request body cannot be read as JSON ({_unreadable(err.__cause__)}).", "invalid_json"
            )
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(err.status_code, "error")
        return error_response(err.status_code, str(err.detail), code)

    @app.exception_handler(Exception)
    async def _internal(_, err: Exception):  # the traceback still goes to the server's log
        return error_response(500, f"internal error ({type(err).__name__}); see the server's log.", "internal_error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, err: RequestValidationError):
        errors = err.errors() or [{"loc": ("body",), "msg": "invalid request", "type": ""}]
        first = errors[0]
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})."
            return error_response(400, message, "invalid_json")
        field = _field(first["loc"])
        if not field:
            return error_response(400, f"the request body must be a JSON object ({first['msg']}).", "invalid_request")
        msg = first["msg"].removeprefix("Value error, ")
        return error_response(400, f"invalid request field '{field}': {msg}.", "invalid_request", param=field)

    def check_text(texts: list[str], field: str):
        """Refuses a string JSON can carry but no tokenizer can read: a lone UTF-16 surrogate (`"\\ud800"`)."""
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ApiError(
                    400,
                    f"invalid request field '{field}': character {err.start} is a lone UTF-16 surrogate "
                    f"(\\u{ord(text[err.start]):04x}), not text; send valid Unicode.",
                    "invalid_request",
                    param=field,
                ) from None

    def check_model(model: str):
        check_text([model], "model")  # before the 404 repeats it
        if model != backend.model_name:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this server serves '{backend.model_name}'.",
                "model_not_found",
                param="model",
            )

    def check(model: str, max_tokens: int, field: str):
        check_model(model)
        if not 1 <= max_tokens <= max_tokens_limit:
            raise ApiError(
                400,
                f"invalid request field '{field}': must be 1-{max_tokens_limit} on this server, got {max_tokens}.",
                "invalid_request",
                param=field,
            )

    def check_lengths(prompts: list[list[int]], max_tokens: int, field: str):
        for ids in prompts:
            if not ids:
                raise ApiError(
                    400, f"invalid request field '{field}': the prompt is empty.", "invalid_request", param=field
                )
            if len(ids) + max_tokens > backend.max_context:
                raise ApiError(
                    400,
                    f"invalid request field '{field}': the prompt has {len(ids)} tokens; with max_tokens "
                    f"{max_tokens} it exceeds the context of {backend.max_context}.",
                    "context_length_exceeded",
                    param=field,
                )

    def check_ids(prompts: list[list[int]]):
        """Refuses token-id prompts a backend without `vocab` cannot take, and ids outside its vocabulary."""
        vocab = getattr(backend, "vocab", None)
        if prompts and vocab is None:
            raise ApiError(
                400,
                "invalid request field 'prompt': this server's model takes text prompts only, not token ids.",
                "invalid_request",
                param="prompt",
            )
        for ids in prompts:
            if max(ids) >= vocab:
                raise ApiError(
                    400,
                    f"invalid request field 'prompt': token id {max(ids)} is outside the model's vocabulary of "
                    f"{vocab} (ids 0-{vocab - 1}).",
                    "invalid_request",
                    param="prompt",
                )

    async def generate(prompts, n, temperature, top_p, max_tokens, logprobs, k, seed=None):
        """`max_tokens` None: each prompt up to the context, and at most this server's limit."""
        if app.state.batcher is None:  # created inside the server's event loop
            app.state.batcher = Batcher(backend, batch_window_ms / 1000.0, max_batch)
        params = dict(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens or max_tokens_limit,
            logprobs=logprobs,
            top_logprobs=k,
            to_context=max_tokens is None,
        )
        return await app.state.batcher.submit(prompts, params, seed)

    def read_prompts(given: list) -> tuple[list[list[int]], list[str]]:
        """Each completions prompt's token ids and text, from its text or its ids."""
        ids = [backend.encode(p) if isinstance(p, str) else p for p in given]
        return ids, [p if isinstance(p, str) else backend.decode(p) for p in given]

    async def off_loop(size: int, fn, *args):
        """Runs `fn` on a worker thread when its input is large; small work stays on the loop, where
        it costs less than the hand-off (a thread hop is ~0.2 ms of server CPU per request)."""
        if size <= INLINE_WORK:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    def response_size(completions, k: int, stops: list[str]) -> int:  # about the characters to decode
        tokens = sum(len(c.token_ids) for c in completions)
        longest = max((len(c.token_ids) for c in completions), default=0)
        return tokens * (k + 1) * 8 + (tokens * longest if stops else 0)  # a stop cut decodes prefixes

    model_card = {"id": backend.model_name, "object": "model", "created": 0, "owned_by": "proxykd_jax"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        check_model(model)
        return model_card

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_tokens = req.max_completion_tokens or req.max_tokens
        k = req.top_logprobs or 0
        check(req.model, max_tokens or 1, field)
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        for i, m in enumerate(messages):
            check_text([m["content"]], f"messages.{i}.content")
        size = sum(len(m["content"]) for m in messages)
        try:
            prompts = [await off_loop(size, backend.chat_ids, messages)]
        except TEMPLATE_ERRORS as err:  # the chat template refuses them (Gemma's: roles must alternate)
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ApiError(
                400,
                f"invalid request field 'messages': the model's chat template refuses them ({reason}); "
                "send messages it accepts.",
                "invalid_request",
                param="messages",
            ) from None
        # no max_tokens: as in the OpenAI API, up to the context (and this server's limit); room for one token
        check_lengths(prompts, max_tokens or 1, "messages")
        logprobs = req.logprobs or k > 0
        outs = (await generate(prompts, req.n, req.temperature, req.top_p, max_tokens, logprobs, k, req.seed))[0]
        size = response_size(outs, k, req.stops)
        if req.stream:
            return streamed(await off_loop(size, chat_stream, backend, req, prompts, outs))
        return await off_loop(size, chat_body, backend, req, prompts, outs)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        k = req.logprobs or 0  # logprobs=0: the chosen tokens' log-probs, no alternatives
        # left out: the API's default of 16, within this server's limit (a client that sent none is not refused for it)
        max_tokens = req.max_tokens if "max_tokens" in req.model_fields_set else min(req.max_tokens, max_tokens_limit)
        check(req.model, max_tokens or 1, "max_tokens")
        check_text([t for t in req.prompt if isinstance(t, str)], "prompt")
        check_ids([t for t in req.prompt if not isinstance(t, str)])
        size = sum(len(t) for t in req.prompt)
        prompts, texts = await off_loop(size, read_prompts, req.prompt)
        # an explicit null: as in chat, each prompt up to the context (and this server's limit)
        check_lengths(prompts, max_tokens or 1, "prompt")
        logprobs = req.logprobs is not None
        outs = await generate(prompts, req.n, req.temperature, req.top_p, max_tokens, logprobs, k, req.seed)
        size = response_size([c for row in outs for c in row], k, req.stops)
        if req.stream:
            return streamed(await off_loop(size, completions_stream, backend, req, texts, prompts, outs))
        return await off_loop(size, completions_body, backend, req, texts, prompts, outs)

    return app
