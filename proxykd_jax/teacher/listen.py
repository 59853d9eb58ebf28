"""Running the OpenAI-compatible app of `server.py` under uvicorn: `serve` (the `serve` stage: the
settings checked, `check_request_log` and `check_port` before the model loads, then the app in the
foreground until SIGINT or SIGTERM, `_Server`) and `ServerThread` (the app on a background thread on
a loopback port, for tests and the demo's `collect`)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pathlib
import signal
import socket
import threading

import uvicorn

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.teacher.server import make_app
from proxykd_jax.teacher.wire import Faults

__all__ = ["ServerThread", "check_port", "check_request_log", "serve"]


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


class _Server(uvicorn.Server):
    """uvicorn's server, stopped by SIGINT or SIGTERM as any stage is: it finishes the requests in
    flight, then `run` returns and `serve` raises KeyboardInterrupt naming the signal (the CLI's one
    line and exit status 130 or 143). uvicorn itself re-raises the signal once stopped, which
    `uvicorn.run` then swallows: the process ended with status 0 and no word."""

    stopped_by: str | None = None

    def handle_exit(self, sig: int, frame) -> None:
        self.stopped_by = self.stopped_by or signal.Signals(sig).name
        super().handle_exit(sig, frame)  # a second Ctrl-C: stop without waiting for the requests

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def check_port(host: str, port: int) -> None:
    """Refuses, with one sentence naming the field, an address uvicorn could not listen on (tried
    the way uvicorn binds: SO_REUSEADDR, the address family of `host`), before the model loads."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as err:
        raise ProxyKDError(
            f"serve.host={host!r} is not an address of this machine ({err.strerror}); set --config.serve.host "
            "to one, e.g. 127.0.0.1 or 0.0.0.0."
        ) from None
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ProxyKDError(
                f"port {port} is in use on {host}; pick another with --config.serve.port (or stop what listens there)."
            ) from None
        if err.errno == errno.EACCES:
            raise ProxyKDError(
                f"port {port} on {host} needs privileges this process lacks; pick one above 1023 with "
                "--config.serve.port."
            ) from None
        raise ProxyKDError(
            f"cannot listen on {host}:{port} ({err.strerror}); set --config.serve.host to an address of this "
            "machine and --config.serve.port to a free port."
        ) from None


def check_request_log(path_text: str) -> None:
    """Refuses a `serve.request_log` the server could not append to (a missing folder, a folder, no
    permission), before the model loads; creates nothing."""
    path = pathlib.Path(path_text)
    problem = None
    if path.is_dir():
        problem = "is a folder"
    elif path.exists():
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as err:
            problem = f"cannot be appended to ({err.strerror})"
    elif not path.parent.is_dir():
        problem = f"is in a folder that does not exist ({path.parent})"
    elif not os.access(path.parent, os.W_OK | os.X_OK):
        problem = f"cannot be created: its folder {path.parent} is not writable"
    if problem:
        raise ProxyKDError(
            f"serve.request_log={path_text!r} {problem}; create the folder or point --config.serve.request_log "
            "at a writable file ('' = no log)."
        )


def serve(cfg, make_backend) -> None:
    """Serves the backend `make_backend()` builds (e.g. `lambda: backends.load_backend(cfg)`; the
    `serve` stage places its model on the mesh) on the `serve` config group until interrupted: SIGINT
    or SIGTERM lets the requests in flight finish, then raises KeyboardInterrupt naming the signal.

    Bad settings (a missing model folder, an unset key variable, impossible fault rates, an
    unwritable request log, a port in use) raise ProxyKDError naming the field before anything is
    loaded or bound.
    """
    f = cfg.faults
    try:
        faults = Faults(
            f.fail_429_rate,
            f.retry_after_s,
            f.fail_500_rate,
            f.slow_rate,
            f.slow_delay_s,
            f.drop_rate,
            f.seed,
            f.malformed_rate,
        )
    except ValueError as err:
        raise ProxyKDError(f"{err}; lower the rates") from None
    api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
    if cfg.api_key_env and not api_key:
        raise ProxyKDError(
            f"serve.api_key_env names {cfg.api_key_env!r}, which is not set; export "
            "it or set serve.api_key_env to '' for no authentication"
        )
    if cfg.max_body_bytes < 1:
        raise ProxyKDError(f"serve.max_body_bytes is {cfg.max_body_bytes}; set a positive number of bytes")
    if cfg.request_log:
        check_request_log(str(cfg.request_log))
    check_port(str(cfg.host), int(cfg.port))  # before the model loads and the banner is printed
    backend = make_backend()
    app = make_app(
        backend,
        faults if faults.active else None,
        api_key=api_key or None,
        max_tokens_limit=cfg.max_tokens_limit,
        batch_window_ms=cfg.batch_window_ms,
        max_batch=cfg.max_batch,
        max_body_bytes=cfg.max_body_bytes,
        request_log=cfg.request_log or None,
    )
    print(
        f"[serve] {backend.model_name} on http://{cfg.host}:{cfg.port}/v1"
        + (f" with injected faults {dataclasses.asdict(faults)}" if faults.active else "")
    )
    server = _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"))
    server.run()
    if server.stopped_by:
        raise KeyboardInterrupt(server.stopped_by)
