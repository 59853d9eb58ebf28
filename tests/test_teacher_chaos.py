"""`collect` through the real CLI against a real, fault-injecting server in its own process.

The server draws 429 (with Retry-After), 500/503, slow answers, connections dropped mid-body and
malformed 200 bodies for about 40% of requests, and is killed and restarted mid-run; the run must
end complete, or with a clear non-zero exit that a re-run completes, within its configured time,
and no sample may be paid twice (a 200 with a usable body sent twice for one key). A full disk
must end in exit 2 with whole lines on disk. Every wait is bounded.
"""

import collections
import json
import pathlib
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.client import collect
from proxykd_jax.teacher.config import collect_config
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.server import make_app

ROOT = pathlib.Path(__file__).resolve().parent.parent

SERVER = textwrap.dedent("""
    import socket, sys, uvicorn
    from proxykd_jax.teacher.backends import ToyBackend
    from proxykd_jax.teacher.server import Faults, make_app

    port, log, seed = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    faults = Faults(fail_429_rate=0.1, retry_after_s=0.05, fail_500_rate=0.1, slow_rate=0.1, slow_delay_s=0.1,
                    drop_rate=0.1, malformed_rate=0.1, seed=seed)
    app = make_app(ToyBackend(latency_s=0.002), faults, request_log=log, batch_window_ms=2)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    print("ready", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off")).run(sockets=[sock])
""")


def start_server(port: int, log: pathlib.Path, seed: int) -> subprocess.Popen:
    errors = open(log.with_suffix(f".server{seed}.err"), "w")  # noqa: SIM115 - the server process writes it
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), str(log), str(seed)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    errors.close()
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    started = ready and proc.stdout.readline().strip() == "ready"
    assert started, f"the server did not start within 60 s: {log.with_suffix(f'.server{seed}.err').read_text()}"
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `python -m proxykd_jax` with every file of the process capped at argv[1] bytes first (Python
# ignores SIGXFSZ, so a write past the cap fails with EFBIG, as a full disk fails with ENOSPC).
SMALL_DISK = (
    "import resource, runpy, sys; limit = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "runpy.run_module('proxykd_jax', run_name='__main__', alter_sys=True)"
)


def cli_collect(run_dir, prompts, base_url, *extra, file_limit=None) -> subprocess.Popen:
    args = [
        "--config=configs/demo.py",
        f"--config.run.dir={run_dir}",
        f"--config.collect.prompts={prompts}",
        f"--config.collect.base_url={base_url}",
        "--config.collect.model=toy",
        "--config.collect.max_tokens=8",
        "--config.collect.concurrency=8",
        "--config.collect.backoff_initial_s=0.02",
        "--config.collect.backoff_max_s=0.3",
        "--config.collect.request_timeout_s=10",
        *extra,
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "proxykd_jax", "collect", *args]
        if file_limit is None
        else [sys.executable, "-c", SMALL_DISK, str(file_limit), "collect", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def write_prompts(path: pathlib.Path, n: int) -> pathlib.Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"chaos prompt {i}"}) + "\n" for i in range(n)))
    return path


def corpus_lines(path: pathlib.Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_collect_survives_chaos_and_a_server_restart_without_paying_twice(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 30)
    run_dir, log, port = tmp_path / "run", tmp_path / "requests.jsonl", free_port()
    corpus = run_dir / "corpus" / "teacher.jsonl"
    breaker = ["--config.collect.breaker_failures=40", "--config.collect.breaker_no_success_s=15"]
    settings = [
        "--config.collect.samples_per_prompt=2",
        "--config.collect.max_attempts=30",
        "--config.collect.top_logprobs=2",
    ]
    server = start_server(port, log, seed=1)
    runs = []
    try:
        start = time.monotonic()
        proc = cli_collect(run_dir, prompts, f"http://127.0.0.1:{port}/v1", *breaker, *settings)
        deadline = time.monotonic() + 60
        while corpus_lines(corpus) < 15:  # polling a file another process writes
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "collect stored nothing within 60 s"
            time.sleep(0.02)
        server.send_signal(signal.SIGKILL)  # mid-run: requests in flight die with it
        server.wait(10)
        time.sleep(0.5)  # the outage
        server = start_server(port, log, seed=2)
        out, err = proc.communicate(timeout=60)
        runs.append((proc.returncode, time.monotonic() - start, out, err))
        if proc.returncode != 0:  # a clear stop that a re-run completes
            proc = cli_collect(run_dir, prompts, f"http://127.0.0.1:{port}/v1", *breaker, *settings)
            out, err = proc.communicate(timeout=60)
            runs.append((proc.returncode, None, out, err))
    finally:
        server.kill()
        server.wait(10)
    first_rc, elapsed, _, first_err = runs[0]
    assert elapsed < 45, f"the first run took {elapsed:.0f} s"
    assert first_rc in (0, 2) and "Traceback" not in first_err, first_err
    if first_rc == 2:
        assert "re-running the same command continues" in first_err, first_err
    assert runs[-1][0] == 0 and "Traceback" not in runs[-1][3], runs[-1][3]
    assert "\r" not in first_err and "collect:" in first_err  # progress as lines: stderr is not a terminal
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    keys = [r["key"] for r in rows]
    assert len(keys) == 60 and len(set(keys)) == 60
    assert {(r["id"], r["sample_index"]) for r in rows} == {(f"p{i}", s) for i in range(30) for s in range(2)}
    assert all(len(r["token_bytes"]) == len(r["tokens"]) == len(r["top_logprobs"]) for r in rows)
    requests = [json.loads(line) for line in log.read_text().splitlines()]
    outcomes = collections.Counter(e["outcome"] for e in requests)
    assert all(outcomes[k] for k in ("ok", "429", "500", "503", "drop", "malformed")), outcomes
    paid = collections.Counter(e["key"] for e in requests if e["outcome"] == "ok")
    assert max(paid.values()) == 1, "a sample was paid twice"
    assert set(paid) <= set(keys)


def test_a_server_gone_for_good_stops_collect_with_exit_2_within_the_breaker_window(tmp_path):
    """The server is killed mid-run and never comes back: collect must stop on its own (it used to
    retry for 14 minutes and exit 0), keep what it stored, and say that a re-run continues."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 300)
    run_dir, log, port = tmp_path / "run", tmp_path / "requests.jsonl", free_port()
    corpus = run_dir / "corpus" / "teacher.jsonl"
    server = start_server(port, log, seed=3)
    proc = cli_collect(
        run_dir,
        prompts,
        f"http://127.0.0.1:{port}/v1",
        "--config.collect.samples_per_prompt=2",
        "--config.collect.max_attempts=1000",
        "--config.collect.breaker_failures=6",
        "--config.collect.breaker_no_success_s=5",
    )
    try:
        deadline = time.monotonic() + 60
        while corpus_lines(corpus) < 10:  # polling a file another process writes
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "collect stored nothing within 60 s"
            time.sleep(0.02)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=120)
        stopped_after = time.monotonic() - killed_at
    finally:
        server.kill()
        server.wait(10)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert stopped_after < 30, f"collect kept going {stopped_after:.0f} s after the server was gone"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "re-running the same command continues" in errors[0], err
    stored = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert 10 <= len(stored) < 600 and len({r["key"] for r in stored}) == len(stored)


def test_disk_full_exits_2_with_whole_lines_and_a_rerun_completes(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 30)
    run_dir = tmp_path / "run"
    corpus = run_dir / "corpus" / "teacher.jsonl"
    limit = 3000  # bytes any file of the process may reach: room for a few records

    app = make_app(ToyBackend())
    with ServerThread(app) as srv:
        proc = cli_collect(run_dir, prompts, srv.base_url, file_limit=limit)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert f"cannot write {corpus} (File too large)" in err and "re-running the same command continues" in err
        assert "not yet done, of 30" in out  # the summary came first
        data = corpus.read_bytes()
        assert 0 < len(data) <= limit and data.endswith(b"\n")
        stored = [json.loads(line)["key"] for line in data.splitlines()]  # whole lines only
        cfg = collect_config()  # the same run again, in this process, with room on the disk
        cfg.prompts, cfg.out, cfg.base_url, cfg.model, cfg.max_tokens = (
            str(prompts),
            str(corpus),
            srv.base_url,
            "toy",
            8,
        )
        cfg.progress = False
        stats = collect(cfg)
    assert stats["already_done"] == len(stored) and stats["done"] == 30 - len(stored)
    keys = [json.loads(line)["key"] for line in corpus.read_text().splitlines()]
    assert len(keys) == 30 and len(set(keys)) == 30 and keys[: len(stored)] == stored


def test_serve_without_a_model_folder_exits_2_naming_the_field(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "proxykd_jax", "serve", "--config=configs/demo.py", f"--config.serve.path={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"serve.path '{tmp_path}' has no config.json or tokenizer.json" in proc.stderr
