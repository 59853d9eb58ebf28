"""`collect` throughput (samples/s) against a local `serve` at several concurrency levels.

The server runs in its own process with the toy backend, whose batched call costs a fixed
`--latency-ms` (like one generate step of a real model) for up to `--max-batch` sequences, so the
server saturates at about max_batch / latency. If throughput grows with concurrency until that
ceiling, the client is not the bottleneck. Each row also prints the CPU time per sample of the
client (this process) and of the server process, and the client's own ceiling (1 / its CPU per
sample): the rate one core running only the client could reach.

    .venv/bin/python benchmarks/collect.py --samples 400 --latency-ms 20 --max-batch 64   # client-bound
    .venv/bin/python benchmarks/collect.py --samples 200 --latency-ms 100 --max-batch 16 \
        --concurrency 1,8,16,64                                                          # server-bound

`--breaker` instead times how long `collect`, with the default breaker settings, takes to give up
(and how it exits) when nothing listens, when the server is killed mid-run, and when every request
is answered 500:

    .venv/bin/python benchmarks/collect.py --breaker
"""

import argparse
import contextlib
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxykd_jax.teacher.client import CollectError, collect  # noqa: E402
from proxykd_jax.teacher.config import collect_config  # noqa: E402

SERVER = textwrap.dedent("""
    import sys, uvicorn
    from proxykd_jax.teacher.backends import ToyBackend
    from proxykd_jax.teacher.server import Faults, make_app
    latency, max_batch, fail_500 = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    faults = Faults(fail_500_rate=fail_500) if fail_500 else None
    app = make_app(ToyBackend(latency_s=latency), faults, batch_window_ms=2, max_batch=max_batch)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    import threading
    def report():
        import time
        while not server.started:
            time.sleep(0.01)
        print(server.servers[0].sockets[0].getsockname()[1], flush=True)
    threading.Thread(target=report, daemon=True).start()
    server.run()
""")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(latency_s: float, max_batch: int, fail_500: float = 0.0) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(latency_s), str(max_batch), str(fail_500)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, int(proc.stdout.readline())


def _prompts_cfg(tmp: str, n: int, port: int, **kw):
    prompts = pathlib.Path(tmp) / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"benchmark prompt {i}"}) + "\n" for i in range(n)))
    cfg = collect_config()
    cfg.prompts, cfg.out = str(prompts), str(pathlib.Path(tmp) / "corpus.jsonl")
    cfg.base_url, cfg.model, cfg.progress = f"http://127.0.0.1:{port}/v1", "toy", False
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _timed_collect(cfg) -> tuple[float, str]:
    start = time.monotonic()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            collect(cfg)
        outcome = "exit 0"
    except CollectError as err:
        outcome = "exit 2: " + str(err).split(";")[0]
    return time.monotonic() - start, outcome


def breaker_table():
    """Seconds until `collect` (default breaker settings) gives up in three broken-endpoint cases."""
    print("collect with default settings: breaker_failures=6, breaker_no_success_s=60, max_attempts=8")
    print(f"{'case':<34} {'seconds':>8}  outcome")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again: nothing listens there
        rows.append(("nothing listens", *_timed_collect(_prompts_cfg(tmp, 20, port))))
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(0.05, 8)
        cfg = _prompts_cfg(tmp, 2000, port)
        killed = {}

        def kill_after_first_records():
            out = pathlib.Path(cfg.out)
            while not (out.exists() and out.read_bytes().count(b"\n") >= 50):
                time.sleep(0.01)  # polling a file the run writes
            proc.kill()
            killed["t"] = time.monotonic()

        threading.Thread(target=kill_after_first_records, daemon=True).start()
        _, outcome = _timed_collect(cfg)
        rows.append(("server killed mid-run", time.monotonic() - killed["t"], outcome))
        proc.wait()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(0.0, 8, fail_500=1.0)
        try:
            rows.append(("every request answered 500", *_timed_collect(_prompts_cfg(tmp, 6, port))))
        finally:
            proc.terminate()
            proc.wait()
    for case, seconds, outcome in rows:
        print(f"{case:<34} {seconds:>8.1f}  {outcome[:110]}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=400, help="samples collected per concurrency level")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="toy server time per batched call")
    ap.add_argument("--max-batch", type=int, default=64, help="sequences per batched call")
    ap.add_argument("--concurrency", default="1,8,64", help="comma-separated levels")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--breaker", action="store_true", help="time the breaker on broken endpoints instead")
    args = ap.parse_args()
    if args.breaker:
        return breaker_table()
    proc, port = start_server(args.latency_ms / 1000, args.max_batch)
    try:
        ceiling = args.max_batch / (args.latency_ms / 1000)
        print(
            f"toy server: {args.latency_ms:g} ms per call of <= {args.max_batch} sequences "
            f"(ceiling ~{ceiling:.0f} samples/s)"
        )
        print(
            f"{'concurrency':>11} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'vs c=1':>7} "
            f"{'client CPU ms/sample':>21} {'server CPU ms/sample':>21} {'client-only ceiling/s':>22}"
        )
        base = None
        for level in [int(x) for x in args.concurrency.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                prompts = pathlib.Path(tmp) / "prompts.jsonl"
                prompts.write_text(
                    "".join(
                        json.dumps({"id": f"p{i}", "prompt": f"benchmark prompt {i}"}) + "\n"
                        for i in range(args.samples)
                    )
                )
                cfg = collect_config()
                cfg.prompts, cfg.out = str(prompts), str(pathlib.Path(tmp) / "corpus.jsonl")
                cfg.base_url, cfg.model = f"http://127.0.0.1:{port}/v1", "toy"
                cfg.max_tokens, cfg.concurrency, cfg.progress = args.max_tokens, level, False
                client0, server0 = time.process_time(), _cpu_seconds(proc.pid)
                with contextlib.redirect_stdout(io.StringIO()):  # the per-run summary line
                    stats = collect(cfg)
                client_s = (time.process_time() - client0) / stats["done"]
                server_s = (_cpu_seconds(proc.pid) - server0) / stats["done"]
            rate = stats["samples_per_s"]
            base = base or rate
            print(
                f"{level:>11} {stats['done']:>8} {stats['elapsed_s']:>8.2f} {rate:>10.1f} {rate / base:>6.1f}x "
                f"{client_s * 1e3:>21.2f} {server_s * 1e3:>21.2f} {1 / client_s:>22.0f}",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
