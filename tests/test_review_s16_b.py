"""Review of 94a68bb and 7e7308f.

The blocked kernel's band (94a68bb) on a mesh: a Gemma-3-like model (its traced per-layer window, the `lax.cond`),
scanned under remat, on 8 devices with fsdp and tensor sharding, equals the dense `xla` path (found correct; the
commit's own tests run it on one device, and the sharded ones on rows too short for the band).

`parallel.distributed.PeerWatch` (7e7308f): a process that stops with an error (or finishes) waits at
jax's shutdown barrier for the others; where one of them stops because it lost the run (a hung peer that gave up on
it), the barrier never completes, and process 0, which holds jax's coordination service, going first aborted every
process still connected with a C++ stack trace (exit 134 instead of the process's own status). Now a process that
has left keeps watching for a "lost" peer and exits with its own status, and process 0 waits for it to go first.

The unit tests drive the watches by hand on one in-memory store (as test_lost_peer_hang.py); the two-process runs
start this file as a script: `python tests/test_review_s16_b.py <port> <process> <role>` runs `cli.main` with a
stage that starts jax.distributed (heartbeat_timeout_s 2) and then hangs, fails or works."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 2


def test_the_band_of_a_mixed_model_on_8_devices_under_remat_equals_xla():
    """Loss and parameter gradients of a Gemma-3-like model (sliding, full, sliding; window 40 on rows of 512: the
    band's query blocks of 64 each meet two key blocks) on fsdp=2 x tensor=4, remat=full, scanned: blocked = xla."""
    from flax import nnx
    from parallel_helpers import mesh_cfg

    from proxykd_jax.models.attention import band_plan
    from proxykd_jax.models.llama import Llama, ModelConfig
    from proxykd_jax.parallel import LOGICAL_RULES, create_sharded_model, global_batch, make_mesh, under_mesh

    length, window = 512, 40
    assert band_plan(length, window) == (64, 1) and len(jax.devices()) >= 8
    mesh = make_mesh(mesh_cfg(fsdp=2, tensor=4), jax.devices()[:8])
    rng = np.random.default_rng()
    seg = np.ones((8, length), np.int32)
    seg[::2, 200:] = 2
    seg[1::4, 450:] = 0
    seg[2, :70] = 0  # a left-padded row
    seq = rng.integers(0, 48, (8, length + 1))
    host = dict(tokens=seq[:, :-1], targets=seq[:, 1:], segment_ids=seg)
    weights = None
    results = {}
    for implementation in ("blocked", "xla"):
        cfg = ModelConfig(
            vocab_size=48, d_model=32, num_layers=3, num_heads=4, num_kv_heads=4, head_dim=16, d_ff=48,
            max_seq_len=length, qk_norm=True, tie_embeddings=True, norm_plus_one=True, embed_scale=True,
            activation="gelu_tanh", sandwich_norms=True, query_pre_attn_scalar=24, rope_local_theta=1e4,
            layer_types=("sliding_attention", "full_attention", "sliding_attention"), sliding_window=window,
            scan_layers=True, remat="full", attention=implementation,
        )  # fmt: skip
        model = create_sharded_model(Llama, mesh, LOGICAL_RULES, cfg, rngs=nnx.Rngs(0))
        params = nnx.state(model, nnx.Param)
        if weights is None:
            weights = [rng.normal(0.0, 0.2, v.get_value().shape) for _, v in nnx.to_flat_state(params)]
        for w, (_, var) in zip(weights, nnx.to_flat_state(params)):
            var.set_value(jax.device_put(jnp.asarray(w, var.get_value().dtype), var.get_value().sharding))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, batch, graphdef=graphdef, rest=rest):
            logits = nnx.merge(graphdef, params, rest)(batch["tokens"], None, batch["segment_ids"])
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
            return jnp.sum(jnp.where(batch["segment_ids"] != 0, nll, 0.0)) / jnp.sum(batch["segment_ids"] != 0)

        batch = global_batch(host, mesh, LOGICAL_RULES)
        if implementation == "blocked":
            jaxpr = str(under_mesh(jax.make_jaxpr(loss), mesh)(params, batch))
            assert "_band_core" in jaxpr and "_causal_lse_core" in jaxpr  # the cond's branches
        value, grads = under_mesh(jax.jit(jax.value_and_grad(loss)), mesh)(params, batch)
        results[implementation] = float(value), [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(grads)]
    (got, got_grads), (want, want_grads) = results["blocked"], results["xla"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert np.abs(w).max() > 0
        np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max(), rtol=1e-4)


def _watches(count, timeout_s=4.0):
    """`test_lost_peer_hang._watches`, each having beaten once at 0.0."""
    from test_lost_peer_hang import _watches as fresh

    store, watches, stopped = fresh(count, timeout_s)
    for w in watches:
        w.check(0.0)
    return store, watches, stopped


@pytest.mark.parametrize("ok, code, status", [(False, 2, 2), (True, 1, 0)], ids=["failed", "done"])
def test_a_process_at_the_shutdown_barrier_exits_with_its_own_status_once_another_says_lost(capsys, ok, code, status):
    """Process 1 has left ("failed" with status 2, or "done"); process 2 gives up on the run: process 1 goes at once
    with its own status and no line of its own (its error is printed already, or it finished)."""
    store, (w0, w1, w2), stopped = _watches(3)
    w1.leave(ok=ok, code=code)
    assert store.kv["proxykd/heartbeat/1"] == ("done" if ok else "failed")
    assert w1.check(1.0) is None and store.kv["proxykd/heartbeat/1"] == ("done" if ok else "failed")  # no beat
    for t in (2.0, 10.0, 50.0):  # another process's silence is not this one's concern once it left
        assert w1.check(t) is None
    w2.end("process 0 sent no heartbeat for 4 s: mesh.distributed.heartbeat_timeout_s")
    assert stopped == [1] and store.kv["proxykd/heartbeat/2"].startswith("lost:")
    capsys.readouterr()
    w1.end(w1.check(50.5))
    assert stopped == [1, status] and capsys.readouterr().err == ""
    assert store.kv["proxykd/heartbeat/1"].startswith("lost:")  # its last act: process 0 waits for it


def test_process_0_stops_only_after_a_failed_peer_has_gone(monkeypatch):
    """Process 1 stops with an error while process 0 hangs in a collective: process 0 gives up `timeout_s` later,
    says "lost", and waits for process 1 (at jax's shutdown barrier, where it would abort once process 0's
    coordination service is gone) to read that and go first."""
    from proxykd_jax.parallel import distributed

    store, (w0, w1), stopped = _watches(2)
    monkeypatch.setattr(distributed, "_watch", w1)
    distributed.failed(2)  # the CLI's error path: "failed" at once, with the status it exits with
    assert store.kv["proxykd/heartbeat/1"] == "failed"
    assert w0.check(1.0) is None and w0.check(4.9) is None
    why = w0.check(5.0)
    assert why == "process 1 stopped with an error 4 s ago"
    clock, order = [5.0], []

    def sleep(seconds):  # meanwhile process 1's watch runs a round
        clock[0] += seconds
        order.append(("process 1 sees", store.kv["proxykd/heartbeat/0"][:5]))
        if (lost := w1.check(clock[0])) is not None:
            w1.end(lost)

    w0.end(why, clock=lambda: clock[0], sleep=sleep)
    assert stopped == [2, 1], stopped  # process 1 with its own status first, then process 0 with exit 1
    assert order[0] == ("process 1 sees", "lost:")


def test_processes_failing_at_once_meet_at_the_barrier_with_no_lost_line(capsys):
    """The same error on every process: each says "failed" and none calls the others lost, however long they take
    to meet at jax's shutdown barrier."""
    store, watches, stopped = _watches(3)
    for w in watches:
        w.leave(ok=False, code=2)
    for t in (1.0, 5.0, 100.0):
        assert [w.check(t) for w in watches] == [None, None, None]
    assert stopped == [] and capsys.readouterr().err == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(tmp_path, roles, wait_s=60) -> list[tuple[int, str]]:
    """Both processes of a run with these roles: (exit status, stderr) each."""
    port, logs = _free_port(), [(tmp_path / f"process{p}.err").open("w+") for p in range(len(roles))]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(port), str(p), role],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        for p, (role, log) in enumerate(zip(roles, logs))
    ]
    try:
        codes = [p.wait(timeout=wait_s) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for log in logs:
        log.seek(0)
    return [(code, log.read()) for code, log in zip(codes, logs)]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("failing", [0, 1])
def test_a_process_that_stops_with_an_error_while_its_peer_hangs_exits_with_its_own_status(tmp_path, failing):
    """Old: the failing process printed its error, waited at jax's shutdown barrier, and aborted there with a C++
    stack trace (exit 134) once the hung peer gave up on it (process 0 gone: the coordination service with it;
    process 1 gone: the barrier failed 3x the timeout later). Now: its line, exit 2; the other its line, exit 1."""
    roles = ["hang", "hang"]
    roles[failing] = "fail"
    results = _run_two(tmp_path, roles)
    (code_f, err_f), (code_h, err_h) = results[failing], results[1 - failing]
    assert code_f == 2 and _error_lines(err_f) == [f"error: proxykd distill: boom on process {failing}"], err_f[-3000:]
    assert code_h == 1, err_h[-3000:]
    (line,) = _error_lines(err_h)
    assert line.startswith(
        f"error: proxykd distill: process {1 - failing} of 2 lost the others (process {failing} stopped with an error "
        f"{TIMEOUT_S} s ago)"
    ), line
    for err in (err_f, err_h):
        assert "Check failure" not in err and "Terminating process" not in err, err[-3000:]
        assert not re.search(r"^F\d{4} ", err, re.MULTILINE), err[-3000:]


def test_processes_finishing_seconds_apart_both_finish_cleanly(tmp_path):
    """Process 1 finishes at once and waits at jax's shutdown barrier while process 0 works on for 3x the timeout
    (an export, a checkpoint): nobody is called lost, both exit 0."""
    results = _run_two(tmp_path, ["work", "done"])
    for code, err in results:
        assert code == 0 and _error_lines(err) == [] and "Check failure" not in err, err[-3000:]


def _worker(port: int, process: int, role: str) -> None:
    import ml_collections

    from proxykd_jax import cli
    from proxykd_jax.errors import ProxyKDError
    from proxykd_jax.parallel import distributed

    def stage(stage, rest):
        cfg = dict(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process, auto=False)
        distributed.maybe_initialize_distributed(
            ml_collections.ConfigDict(dict(cfg, heartbeat_timeout_s=TIMEOUT_S)), label="proxykd distill"
        )
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("started")
        if role == "hang":  # a collective that hangs: the main thread never comes back
            time.sleep(600)
        if role == "fail":
            time.sleep(0.5)
            raise ProxyKDError(f"boom on process {process}")
        if role == "work":
            time.sleep(3 * TIMEOUT_S)
        return 0

    cli._run_stage = stage
    cli.main(["distill"])


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
