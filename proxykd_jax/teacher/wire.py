"""What `serve` does on the wire before a request reaches its handler.

`WireMiddleware` checks the API key, refuses bodies over the size limit with 413 before they are
read (by their Content-Length, or as they stream in), logs every completion request with its
arrival time, its `X-Request-Key` header (sent by `collect`) and its outcome (to a list, and to a
JSONL file when one is named), and injects faults when a `Faults` object is passed explicitly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
import time

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class ApiError(Exception):
    """An error answered in the OpenAI layout: status, message, code and the offending field."""

    def __init__(self, status: int, message: str, code: str, headers: dict | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.headers, self.param = status, code, headers or {}, param


def error_response(status: int, message: str, code: str, headers=None, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error" if status < 500 else "server_error",
                "param": param,
                "code": code,
            }
        },
        status_code=status,
        headers=headers,
    )


# 200 bodies a broken gateway or server might send: each one unusable as a completion.
MALFORMED_BODIES = (
    (b'{"id": "cmpl-0", "object": "chat.completion", "choices": [{"index": 0', b"application/json"),
    (b'{"id": "cmpl-0", "choices": [{"index": 0, "finish_reason": "stop"}], "usage": null}', b"application/json"),
    (b"[]", b"application/json"),
    (b"<html><body><h1>502 Bad Gateway</h1></body></html>", b"text/html"),
)


@dataclasses.dataclass
class Faults:
    """Injected failures for tests; each completion request draws one outcome from a seeded RNG."""

    fail_429_rate: float = 0.0
    retry_after_s: float = 1.0
    fail_500_rate: float = 0.0  # answered 500 or 503
    slow_rate: float = 0.0
    slow_delay_s: float = 1.0
    drop_rate: float = 0.0
    seed: int = 0
    malformed_rate: float = 0.0  # answered 200 with one of MALFORMED_BODIES

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        if self.fail_429_rate + self.fail_500_rate + self.drop_rate + self.malformed_rate > 1.0:
            raise ValueError("serve.faults: fail_429_rate + fail_500_rate + drop_rate + malformed_rate must be <= 1")

    @property
    def active(self) -> bool:
        return any((self.fail_429_rate, self.fail_500_rate, self.slow_rate, self.drop_rate, self.malformed_rate))

    def draw(self) -> tuple[str | None, bool]:
        """(fault, slow): fault is None, '429', '500', '503', 'drop' or 'malformed:<i>'."""
        u, slow = self._rng.random(), self._rng.random() < self.slow_rate
        rates = (("429", self.fail_429_rate), ("500", self.fail_500_rate), ("drop", self.drop_rate))
        for name, rate in rates + (("malformed", self.malformed_rate),):
            if u < rate:
                if name == "500" and self._rng.random() < 0.5:
                    name = "503"
                if name == "malformed":
                    name = f"malformed:{self._rng.randrange(len(MALFORMED_BODIES))}"
                return name, slow
            u -= rate
        return None, slow


class RequestLog:
    """Completion requests in arrival order (`entries`), and as JSON lines in `path` once finished."""

    def __init__(self, path: str | None = None):
        self.entries: list[dict] = []
        self.path = path
        self._lock = threading.Lock()

    def start(self, key: str, path: str) -> dict:
        entry = {"t": time.monotonic(), "key": key, "path": path, "outcome": None}
        self.entries.append(entry)
        return entry

    def finish(self, entry: dict, outcome: str):
        if entry["outcome"] is not None:
            return
        entry["outcome"] = outcome
        if self.path:
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")  # one write per line: whole lines survive a kill


async def _send_json(send, status: int, body: bytes, content_type: bytes = b"application/json", extra=()):
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class WireMiddleware:
    """ASGI middleware: auth, body size limit, request log and (only when `faults` is set) faults."""

    def __init__(self, app, faults: Faults | None, log: RequestLog, api_key: str | None, max_body_bytes: int):
        self.app, self.faults, self.log, self.api_key = app, faults, log, api_key
        self.max_body_bytes = max_body_bytes

    def _too_large_message(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_body_bytes} bytes (serve.max_body_bytes)."

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        entry = None
        if scope["method"] == "POST" and scope["path"].endswith("completions"):
            entry = self.log.start(headers.get(b"x-request-key", b"").decode(), scope["path"])
        if self.api_key and headers.get(b"authorization", b"").decode() != f"Bearer {self.api_key}":
            if entry is not None:
                self.log.finish(entry, "401")
            return await error_response(401, "Incorrect API key provided.", "invalid_api_key")(scope, receive, send)
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_body_bytes:
            if entry is not None:
                self.log.finish(entry, "413")
            return await error_response(413, self._too_large_message(), "request_too_large")(scope, receive, send)
        seen = 0

        async def limited_receive():  # a body streamed without Content-Length: counted as it comes
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:  # the app's HTTPException handler answers 413
                raise HTTPException(413, self._too_large_message())
            return message

        if entry is None:
            return await self.app(scope, limited_receive, send)
        try:
            await self._completion(scope, limited_receive, send, entry)
        finally:
            self.log.finish(entry, "aborted")  # no-op when the outcome is already known

    async def _completion(self, scope, receive, send, entry):
        fault, slow = self.faults.draw() if self.faults else (None, False)
        if slow:
            await asyncio.sleep(self.faults.slow_delay_s)
        if fault in ("429", "500", "503"):
            ra = self.faults.retry_after_s
            extra = {"retry-after": f"{ra:g}", "retry-after-ms": str(int(ra * 1000))} if fault == "429" else {}
            msg = "Rate limit reached (injected)." if fault == "429" else "Internal error (injected)."
            self.log.finish(entry, fault)
            return await error_response(int(fault), msg, "injected", extra)(scope, receive, send)
        if fault and fault.startswith("malformed"):
            body, content_type = MALFORMED_BODIES[int(fault.split(":")[1])]
            await _send_json(send, 200, body, content_type)
            return self.log.finish(entry, "malformed")
        if fault == "drop":
            start, body = {}, bytearray()

            async def capture(message):
                if message["type"] == "http.response.start":
                    start.update(message)
                else:
                    body.extend(message.get("body", b""))

            await self.app(scope, receive, capture)
            hdrs = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send(
                {
                    "type": "http.response.start",
                    "status": start.get("status", 200),
                    "headers": hdrs + [(b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": bytes(body[: len(body) // 2]), "more_body": True})
            return self.log.finish(entry, "drop")  # the server closes the connection on an incomplete body

        status = None

        async def logged_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.log.finish(entry, "ok" if status == 200 else str(status))

        await self.app(scope, receive, logged_send)
