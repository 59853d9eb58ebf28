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
"""

import argparse
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxykd_jax.teacher.client import collect  # noqa: E402
from proxykd_jax.teacher.config import collect_config  # noqa: E402

SERVER = textwrap.dedent("""
    import sys, uvicorn
    from proxykd_jax.teacher.backends import ToyBackend
    from proxykd_jax.teacher.server import make_app
    latency, max_batch = float(sys.argv[1]), int(sys.argv[2])
    app = make_app(ToyBackend(latency_s=latency), batch_window_ms=2, max_batch=max_batch)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=400, help="samples collected per concurrency level")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="toy server time per batched call")
    ap.add_argument("--max-batch", type=int, default=64, help="sequences per batched call")
    ap.add_argument("--concurrency", default="1,8,64", help="comma-separated levels")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(args.latency_ms / 1000), str(args.max_batch)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
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
