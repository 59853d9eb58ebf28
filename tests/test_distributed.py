"""Two jax.distributed processes x 4 CPU devices agree with one process x 8 devices."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
from parallel_helpers import make_batch, mesh_cfg, sharded_forward_and_step

from proxykd_jax.parallel import make_mesh

HELPER = pathlib.Path(__file__).with_name("parallel_helpers.py")
REPO = HELPER.parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "result.npz"
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)
    )
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(HELPER), coordinator, "2", str(pid), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)[-6000:]

    mesh = make_mesh(mesh_cfg(fsdp=-1, tensor=2))  # the same 4 x 2 mesh, one process
    logits, state, losses = sharded_forward_and_step(mesh, make_batch(seed=1))
    result = np.load(out)
    np.testing.assert_allclose(result["logits"], np.asarray(logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(result["loss"], float(losses[0]), atol=1e-5, rtol=0)
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    assert len(flat) == len(result.files) - 2
    for path, value in flat:
        np.testing.assert_allclose(result[jax.tree_util.keystr(path)], np.asarray(value), atol=1e-5, rtol=0)
