"""prior, align, posterior, distill and eval as 2 jax.distributed processes x 4 CPU devices, started
through launch/local.sh exactly as a user would, against the same stage as 1 process x 8 devices
(this test process): metrics to 1e-5, the posterior store's values to 1e-6.

One small run directory is built once (prepared data, prior tables, a proxy, a student, a store);
each test copies it twice, removes the stage's own output and runs the stage in both copies.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from stage_helpers import run_stage, synthetic_store

from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreReader
from tests.pipeline_fixtures import build_run

REPO = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multiprocess


class Launch:
    """`NUM_PROCESSES=2 SIMULATE_DEVICES=4 launch/local.sh <stage> --config=...` on `cfg`, started in
    the background (the one-process reference runs meanwhile); `wait()` checks that it succeeded."""

    def __init__(self, stage: str, cfg, log: pathlib.Path, processes: int = 2, devices: int = 4):
        pkl = log.with_suffix(".cfg.pkl")
        pkl.write_bytes(pickle.dumps(cfg))
        env = dict(
            os.environ,
            NUM_PROCESSES=str(processes),
            SIMULATE_DEVICES=str(devices),
            PYTHON=sys.executable,
            PYTHONPATH=str(REPO),
            JAX_COMPILATION_CACHE_DIR=os.environ["JAX_COMPILATION_CACHE_DIR"],  # set by conftest.py
        )
        command = ["bash", str(REPO / "launch" / "local.sh"), stage, f"--config={REPO}/tests/pickled_config.py:{pkl}"]
        self.stage, self.log = stage, log
        self.out = log.open("w")
        self.proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=self.out, stderr=subprocess.STDOUT)

    def wait(self) -> None:
        try:
            code = self.proc.wait(timeout=600)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.out.close()
        assert code == 0, f"{self.stage} on 2 processes failed:\n" + self.log.read_text()[-6000:]


def _synthetic_store(run: pathlib.Path, k: int, vocab: int, seed: int = 0) -> None:
    """A posterior store of random top-k distributions (+ estimate.json) for the distillation split."""
    synthetic_store(run, k, vocab, np.random.default_rng(seed))
    (run / "posterior" / "estimate.json").write_text(json.dumps({"kappa": 1.0}))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(run dir, config): prepared data, prior tables, proxy/final, student/final and a store."""
    from flax import nnx

    from proxykd_jax.models import hf
    from proxykd_jax.models.llama import Llama, ModelConfig
    from proxykd_jax.models.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("multiprocess")
    cfg, _ = build_run(root / "base")
    with cfg.unlocked():
        cfg.data.store.value_dtype = cfg.data.store.tail_dtype = "float32"
        cfg.posterior.proxy = cfg.proxy.init_from
        cfg.train.steps, cfg.train.checkpoint_every, cfg.train.log_every, cfg.optim.warmup_steps = 4, 2, 1, 1
        cfg.mesh.shape.update(data=2, fsdp=4, tensor=1)  # parameters split within a host, batch across hosts
    run = root / "base"
    run_stage("prior", cfg)
    shutil.copytree(cfg.proxy.init_from, run / "proxy" / "final")
    student_cfg = ModelConfig.from_config(cfg.model)
    tokenizer = load_tokenizer(run / "prepared" / "tokenizer")
    hf.save_hf(Llama(student_cfg, rngs=nnx.Rngs(3)), student_cfg, run / "student" / "final", tokenizer=tokenizer)
    _synthetic_store(run, cfg.data.store.k, cfg.model.vocab_size)
    return run, cfg


def two_runs(base, tmp_path, remove: str):
    """(config on 1 process, config on 2 processes): two copies of the base run without `remove`."""
    run, cfg = base
    out = []
    for name in ("one", "two"):
        shutil.copytree(run, tmp_path / name)
        shutil.rmtree(tmp_path / name / remove, ignore_errors=True)
        copy = cfg.copy_and_resolve_references()
        copy.run.dir = str(tmp_path / name)
        out.append(copy)
    return out


def _metrics(path: pathlib.Path, keys=("loss", "ce", "kd", "grad_norm", "nll", "heldout_nll")) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in keys if k in r} | {"at": r.get("step", r.get("phase"))} for r in rows]


def _close(a, b, tol):
    assert [r["at"] for r in a] == [r["at"] for r in b]
    for x, y in zip(a, b):
        for key in x:
            if key != "at":
                np.testing.assert_allclose(x[key], y[key], rtol=tol, atol=tol, err_msg=f"{key} at {x['at']}")


def test_prior(base, tmp_path):
    """Host work that process 0 does while the others wait: the same tables, and every process ends."""
    one, two = two_runs(base, tmp_path, "prior")
    launch = Launch("prior", two, tmp_path / "prior.log")
    run_stage("prior", one)
    launch.wait()
    a, b = (np.load(pathlib.Path(c.run.dir) / "prior" / "tables.npz") for c in (one, two))
    assert sorted(a.files) == sorted(b.files) and a.files
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert json.loads((pathlib.Path(two.run.dir) / "prior" / "artifact.json").read_text())["finished"]


def test_align(base, tmp_path):
    from safetensors.numpy import load_file

    one, two = two_runs(base, tmp_path, "proxy")
    for cfg in (one, two):  # no SFT; one DPO round of 2 steps (checkpointed at 1) on 16 pairs
        cfg.align.update(sft_steps=0, checkpoint_every=1, dpo_steps_per_round=2, max_new_tokens=6, heldout_samples=4)
    launch = Launch("align", two, tmp_path / "align.log")
    run_stage("align", one)
    launch.wait()
    proxy_one, proxy_two = (pathlib.Path(c.run.dir) / "proxy" for c in (one, two))
    _close(_metrics(proxy_one / "metrics.jsonl"), _metrics(proxy_two / "metrics.jsonl"), 1e-5)
    for phase in ("round_000",):
        _close(_metrics(proxy_one / phase / "metrics.jsonl"), _metrics(proxy_two / phase / "metrics.jsonl"), 1e-5)
    a, b = (load_file(str(p / "final" / "model.safetensors")) for p in (proxy_one, proxy_two))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_posterior(base, tmp_path):
    one, two = two_runs(base, tmp_path, "posterior")
    for cfg in (one, two):  # data-parallel: a sum split over devices is added in another order by the
        cfg.mesh.shape.update(data=8, fsdp=1)  # two-process runtime (3e-6 apart), too loose for the 1e-6 check
    launch = Launch("posterior", two, tmp_path / "posterior.log")
    est_one = run_stage("posterior", one)
    launch.wait()
    stores = []
    for cfg in (one, two):
        folder = pathlib.Path(cfg.run.dir) / "posterior"
        stores.append(StoreReader(folder, tokenizer_hash=PreparedData(folder.parent / "prepared").tokenizer_hash))
    assert len(list((pathlib.Path(two.run.dir) / "posterior").glob("shard-00001-*.json"))) >= 1  # process 1's shards
    ids = sorted(int(s) for s in stores[0].sample_ids)
    assert ids == sorted(int(s) for s in stores[1].sample_ids) and len(ids) > 0
    # Each process puts its own rows in order of length (`pipeline.by_length`), so a sample can run in a batch
    # cut to another length than on one process: the proxy's sums in another shape, a few 1e-6 apart.
    same = total = 0
    for sid in ids:
        a, b = stores[0].get(sid), stores[1].get(sid)
        equal = a.ids_TxK == b.ids_TxK
        same, total = same + equal.sum(), total + equal.size
        np.testing.assert_allclose(a.logprobs_TxK[equal], b.logprobs_TxK[equal], rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.tail_T, b.tail_T, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.weight, b.weight, rtol=0, atol=1e-5)
    assert same / total > 0.99  # (a near tie may swap two ids between the two runs' forwards)
    est_two = json.loads((pathlib.Path(two.run.dir) / "posterior" / "estimate.json").read_text())
    for key in ("mu", "gamma", "kappa", "n_max"):
        np.testing.assert_allclose(est_one[key], est_two[key], rtol=1e-5, err_msg=key)
    assert est_one["heldout_tokens"] == est_two["heldout_tokens"]


def test_distill(base, tmp_path):
    one, two = two_runs(base, tmp_path, "student")
    launch = Launch("distill", two, tmp_path / "distill.log")
    run_stage("distill", one)
    launch.wait()
    student_one, student_two = (pathlib.Path(c.run.dir) / "student" for c in (one, two))
    first, second = _metrics(student_one / "metrics.jsonl"), _metrics(student_two / "metrics.jsonl")
    assert [r["at"] for r in first] == [1, 2, 3, 4] and all(r["kd"] > 0 for r in first)
    _close(first, second, 1e-5)


def test_distill_validation_keeps_the_same_best_step(base, tmp_path):
    """train.eval_every scores the student on the held-out split in lockstep batches across processes, and
    distill.keep_best keeps the step of the lowest score: the same eval losses (1e-5), the same kept step and the
    same final/ weights on 2 processes as on 1."""
    from safetensors.numpy import load_file

    one, two = two_runs(base, tmp_path, "student")
    for cfg in (one, two):
        cfg.train.eval_every, cfg.distill.keep_best = 2, True
    launch = Launch("distill", two, tmp_path / "distill.log")
    run_stage("distill", one)
    launch.wait()
    student_one, student_two = (pathlib.Path(c.run.dir) / "student" for c in (one, two))
    keys = ("loss", "ce", "kd", "eval_loss", "eval_nats_per_byte", "eval_tokens")
    first, second = _metrics(student_one / "metrics.jsonl", keys), _metrics(student_two / "metrics.jsonl", keys)
    scored = [r["at"] for r in first if "eval_loss" in r]
    assert scored == [2, 4] and all(r["eval_tokens"] > 0 for r in first if "eval_loss" in r)
    _close(first, second, 1e-5)
    kept = [json.loads((s / "artifact.json").read_text())["summary"] for s in (student_one, student_two)]
    assert kept[0]["best_step"] == kept[1]["best_step"] and kept[0]["best_step"] in scored, kept
    np.testing.assert_allclose(kept[0]["best_eval_nll"], kept[1]["best_eval_nll"], rtol=1e-5)
    a, b = (load_file(str(s / "final" / "model.safetensors")) for s in (student_one, student_two))
    assert sorted(a) == sorted(b) and a
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)


def _stop_one_of_two(cfg, tmp_path, devices: int, wait_s: float, sig=signal.SIGKILL) -> tuple[int | None, float, str]:
    """Runs `cfg`'s distill as 2 processes x `devices` CPU devices, sends process 1 `sig` once both are stepping
    and waits up to `wait_s` for process 0: (its exit code, None if it is still running; seconds from the signal
    to its exit; its log)."""
    pkl = tmp_path / "cfg.pkl"
    pkl.write_bytes(pickle.dumps(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(REPO)
    logs = [(tmp_path / f"process{i}.log").open("w+") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "proxykd_jax", "distill", f"--config={REPO}/tests/pickled_config.py:{pkl}"]
            + [f"--config.mesh.distributed.coordinator_address=127.0.0.1:{port}"]
            + ["--config.mesh.distributed.num_processes=2", f"--config.mesh.distributed.process_id={i}"],
            env=env,
            cwd=REPO,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    metrics = pathlib.Path(cfg.run.dir) / "student" / "metrics.jsonl"
    code = None
    try:
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # both processes are stepping
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs[0].name
            time.sleep(0.1)
        procs[1].send_signal(sig)
        killed = time.monotonic()
        try:
            code = procs[0].wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.wait()
    logs[0].seek(0)
    return code, took, logs[0].read()


def test_choose_makes_the_same_choice(base, tmp_path):
    """`proxykd choose` over distill.loss.alpha: the trials' links made once, their students scored in lockstep on
    every process, and the same lowest losses (1e-5), steps and choice on 2 processes as on 1."""
    one, two = two_runs(base, tmp_path, "choose")
    for cfg in (one, two):
        cfg.choose.field, cfg.choose.candidates, cfg.choose.eval_every = "distill.loss.alpha", "0.5,1.0", 2
    launch = Launch("choose", two, tmp_path / "choose.log")
    run_stage("choose", one)
    launch.wait()
    first, second = (
        json.loads((pathlib.Path(c.run.dir) / "choose" / "distill.loss.alpha" / "choice.json").read_text())
        for c in (one, two)
    )
    assert first["chosen"] == second["chosen"] and [r["value"] for r in first["trials"]] == [0.5, 1.0]
    for a, b in zip(first["trials"], second["trials"]):
        assert a["best_step"] == b["best_step"] in (2, 4)
        np.testing.assert_allclose(a["best_eval_loss"], b["best_eval_loss"], rtol=1e-5)
    trial = pathlib.Path(two.run.dir) / "choose" / "distill.loss.alpha" / "0.5"
    assert sorted(p.name for p in trial.iterdir() if p.is_symlink()) == ["posterior", "prepared", "prior"]


def test_a_process_whose_peer_is_killed_stops_at_once_in_one_line(base, tmp_path):
    """`kill -9` of one process mid-distill: the other printed the broken collective's traceback, then waited at
    jax's shutdown barrier for the heartbeat timeout (100 s) and aborted with a C++ stack trace (exit 134). Now
    it stops at once: one line, exit 1, the run directory unlocked for the same command on every process."""
    _, cfg = two_runs(base, tmp_path, "student")
    with cfg.unlocked():
        cfg.train.steps, cfg.train.checkpoint_every, cfg.train.log_every = 100_000, 0, 1
        cfg.mesh.shape.update(data=2, fsdp=1, tensor=1)  # one device each: gloo's socket to the peer breaks
        # process 0 says "lost" and waits two beats (timeout / 10 each) for a peer that might still be stopping
        cfg.mesh.distributed.heartbeat_timeout_s = 20
    code, _, err = _stop_one_of_two(cfg, tmp_path, devices=1, wait_s=90)  # past jax's own abort (3 x 20 s)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(lines) == 1, err[-4000:]
    assert lines[0].startswith("error: proxykd distill: process 0 of 2 lost the others mid-step ("), lines[0]
    assert "another process of this run stopped" in lines[0] and "Traceback" not in err, err[-4000:]
    assert not (pathlib.Path(cfg.run.dir) / "proxykd.lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_process_whose_peer_is_gone_while_its_collective_hangs_stops_in_one_line(base, tmp_path, sig):
    """Process 1 stops answering mid-distill with 4 devices per process, where process 0's collective hangs
    instead of breaking (NCCL on GPU): jax's heartbeat check aborted process 0 after
    mesh.distributed.heartbeat_timeout_s with LOG(FATAL) and a C++ stack trace (exit 134). Now its PeerWatch
    stops it after that timeout in one line, exit 1, before jax's check (three times the timeout).

    SIGSTOP (a hung host, or a dead one whose sockets stay open) hangs every collective; after `kill -9` some
    hang (all-reduce) and some break at once (all-to-all, collective permute: the existing one-line path), as the
    moment falls: both end in one line, exit 1. The lock process 0 leaves is stale: the same command takes it."""
    from proxykd_jax.context.lock import RunLock

    timeout_s = 4
    _, cfg = two_runs(base, tmp_path, "student")
    with cfg.unlocked():
        cfg.train.steps, cfg.train.checkpoint_every, cfg.train.log_every = 100_000, 0, 1
        cfg.mesh.shape.update(data=8, fsdp=1, tensor=1)
        cfg.mesh.distributed.heartbeat_timeout_s = timeout_s
    code, took, err = _stop_one_of_two(cfg, tmp_path, devices=4, wait_s=3 * timeout_s + 20, sig=sig)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(lines) == 1, (code, err[-4000:])
    watched = (
        f"error: proxykd distill: process 0 of 2 lost the others (process 1 sent no heartbeat for {timeout_s} s: "
        "mesh.distributed.heartbeat_timeout_s): another process of this run is gone or unreachable"
    )
    broken = "error: proxykd distill: process 0 of 2 lost the others mid-step ("
    assert lines[0].startswith(watched) or (sig == signal.SIGKILL and lines[0].startswith(broken)), lines[0]
    assert lines[0].endswith("run the same command on every process to resume from the last checkpoint."), lines[0]
    for trace in ("*** Check failure", "Terminating process", "terminate called", "Traceback"):
        assert trace not in err, err[-4000:]
    assert not re.search(r"^F\d{4} ", err, re.MULTILINE), err[-4000:]  # an absl FATAL line (F<month><day> ...)
    if lines[0].startswith(watched):
        # after the timeout (less the beat, every timeout / 10, it last saw), well before jax's own abort (3x)
        assert 0.9 * timeout_s <= took < 2 * timeout_s, took
        lock = RunLock(pathlib.Path(cfg.run.dir) / "proxykd.lock", "distill")
        lock.acquire()  # left by os._exit: its holder is gone, so it is taken over
        lock.release()


def _numbers(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_numbers(value, f"{prefix}{key}/"))
        return out
    if tree is None:  # a value that was not finite: metrics.json stores null where the returned metrics hold NaN
        return {prefix: float("nan")}
    return {prefix: tree} if isinstance(tree, (int, float)) else {}


def test_eval(base, tmp_path):
    one, two = two_runs(base, tmp_path, "eval")
    launch = Launch("eval", two, tmp_path / "eval.log")
    metrics_one = run_stage("eval", one)
    launch.wait()
    metrics_two = json.loads((pathlib.Path(two.run.dir) / "eval" / "metrics.json").read_text())
    assert set(metrics_one["models"]) == {"proxy (before align)", "proxy (aligned)", "student (Proxy-KD)"}
    assert "teacher_loglik_of_generations" in metrics_one["models"]["student (Proxy-KD)"]
    assert metrics_one["estimator_kl"]["positions"] > 0
    a, b = _numbers(metrics_one), _numbers(metrics_two)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
