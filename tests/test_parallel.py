"""Mesh, logical-axis rules, sharded construction and sharded numerics on 8 simulated devices."""

import ast
import dataclasses
import http.server
import importlib.util
import re
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from parallel_helpers import BATCH, TINY, make_batch, mesh_cfg, sharded_forward_and_step

from proxykd_jax.errors import ConfigError
from proxykd_jax.models.llama import Llama
from proxykd_jax.parallel import (
    LOGICAL_RULES,
    create_sharded_model,
    default_config,
    distributed,
    global_batch,
    logical_to_pspec,
    make_mesh,
    resolve_distributed,
)


def test_make_mesh_fills_the_free_axis():
    mesh = make_mesh(mesh_cfg(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(default_config()).shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize(
    "shape, message",
    [
        (
            dict(data=3, fsdp=1, tensor=1),
            "mesh data=3 x fsdp=1 x tensor=1 needs 3 devices, 8 available; change mesh.shape",
        ),
        (dict(data=3, fsdp=-1, tensor=1), "needs a multiple of 3 devices, 8 available"),
        (dict(data=-1, fsdp=-1, tensor=1), "at most one -1"),
        (dict(data=1, fsdp=8, pipeline=1), "unknown axes ['pipeline']"),
    ],
)
def test_bad_mesh_shape_raises_a_clear_message(shape, message):
    with pytest.raises(ValueError) as err:
        make_mesh(ml_collections.ConfigDict({"shape": shape}))
    assert message in str(err.value)


def test_logical_rules_map_axes_and_reject_unknown_ones():
    assert logical_to_pspec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    assert logical_to_pspec(("vocab", "embed")) == P("tensor", "fsdp")
    # fsdp is taken by batch, so embed stays whole within the same activation
    assert logical_to_pspec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    with pytest.raises(ValueError, match="logical axis 'experts' has no entry"):
        logical_to_pspec(("embed", "experts"))
    mesh = make_mesh(mesh_cfg(fsdp=8))
    with pytest.raises(ValueError, match="does not have"):
        logical_to_pspec(("embed",), (("embed", "pipeline"),), mesh)
    with pytest.raises(ValueError, match="twice"):
        logical_to_pspec(("embed",), (("embed", "fsdp"), ("embed", None)))


def test_create_sharded_model_shards_params_and_matches_eager_init():
    mesh = make_mesh(mesh_cfg(fsdp=4, tensor=2))
    rngs = nnx.Rngs(3)
    model = create_sharded_model(Llama, mesh, LOGICAL_RULES, TINY, rngs=rngs)
    eager_rngs = nnx.Rngs(3)
    eager = Llama(TINY, rngs=eager_rngs)
    # the caller's Rngs advances exactly as an eager construction would
    assert int(rngs.params.count[...]) == int(eager_rngs.params.count[...]) > 0
    wq = model.layers.attn.wq[...]  # stacked [layers, D, H, E]; the layers axis stays whole
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (
        TINY.num_layers,
        TINY.d_model // 4,
        TINY.num_heads // 2,
        TINY.head_dim,
    )
    assert model.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert model.layers.mlp.w_down[...].sharding.spec == P(None, "tensor", "fsdp")
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0],
        jax.tree.leaves(nnx.state(eager, nnx.Param)),
    ):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path)
        )


class _Unannotated(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 4)))


class _Indivisible(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (6, 4)), out_sharding=("embed", None))


def test_unannotated_or_indivisible_params_raise():
    mesh = make_mesh(mesh_cfg(fsdp=4, tensor=2))
    with pytest.raises(ValueError, match=r"parameter .*'w'.* has no logical axis names"):
        create_sharded_model(_Unannotated, mesh, LOGICAL_RULES, nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dim 0 \('embed', size 6\) does not split"):
        create_sharded_model(_Indivisible, mesh, LOGICAL_RULES, nnx.Rngs(0))


def test_mesh_misfits_are_config_errors_the_cli_reports_in_one_line():
    """A model dimension, a batch or a rule that does not fit the mesh is bad input (`ConfigError`, which the
    CLI prints as one line), not a bug with a traceback: here GQA's 2 key/value heads over tensor=4."""
    mesh = make_mesh(mesh_cfg(fsdp=2, tensor=4))
    cfg = dataclasses.replace(TINY, num_heads=8, num_kv_heads=2)
    with pytest.raises(ConfigError, match=r"'kv_heads', size 2\) does not split over mesh axes tensor \(4 ways\)") as e:
        create_sharded_model(Llama, mesh, LOGICAL_RULES, cfg, rngs=nnx.Rngs(0))
    # the override the sentence offers is a working value: the key/value heads whole on every device
    override = re.search(r'--config.mesh.rules="(.*)"', str(e.value)).group(1)
    rules = ast.literal_eval(override)
    assert dict(rules)["kv_heads"] is None and len(rules) == len(LOGICAL_RULES)
    assert all(dict(rules)[k] == v for k, v in LOGICAL_RULES if k != "kv_heads")
    create_sharded_model(Llama, mesh, rules, cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="a multiple of 2"):
        global_batch(make_batch(seed=0, rows=3), mesh, LOGICAL_RULES)
    with pytest.raises(ConfigError, match="logical axis 'kv_heads' has no entry"):
        create_sharded_model(Llama, mesh, [r for r in LOGICAL_RULES if r[0] != "kv_heads"], TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="does not have"):
        logical_to_pspec(("embed",), (("embed", "pipeline"),), mesh)


def test_global_batch_shards_rows_and_rejects_indivisible_batches():
    mesh = make_mesh(mesh_cfg(data=2, fsdp=4))
    batch = global_batch(make_batch(seed=0), mesh, LOGICAL_RULES)
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"))
    assert batch["tokens"].addressable_shards[0].data.shape == (1, 16)
    with pytest.raises(ValueError, match="batch size .* a multiple of 8"):
        global_batch(make_batch(seed=0, rows=6), mesh, LOGICAL_RULES)


@pytest.fixture(scope="module")
def single_device_result():
    mesh = make_mesh(mesh_cfg(), devices=jax.devices()[:1])
    logits, state, losses = sharded_forward_and_step(mesh, make_batch(seed=1), steps=2)
    return np.asarray(logits), jax.tree.map(np.asarray, state.params), [float(x) for x in losses]


@pytest.mark.parametrize("shape", [dict(fsdp=4, tensor=2), dict(data=2, fsdp=4)])
def test_sharded_forward_and_optimizer_steps_match_single_device(shape, single_device_result):
    ref_logits, ref_params, ref_losses = single_device_result
    mesh = make_mesh(mesh_cfg(**shape))
    logits, state, losses = sharded_forward_and_step(mesh, make_batch(seed=1), steps=2)
    assert float(jnp.std(logits)) > 0.1  # a real, non-degenerate forward
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose([float(x) for x in losses], ref_losses, atol=1e-5, rtol=0)
    wq = state.params["layers"]["attn"]["wq"][...]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None) and wq.sharding.mesh.shape == mesh.shape
    moved = 0.0
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))
    # the steps changed the parameters (compare with a fresh init)
    fresh = nnx.state(Llama(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    moved = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(fresh))
    )
    assert moved > 1e-3
    assert BATCH % mesh.size == 0


def _dist(**kw):
    cd = default_config().distributed
    cd.update(kw)
    return cd


def test_cloud_tpu_vm_slice_from_metadata(monkeypatch):
    """A Cloud TPU VM names its slice's hosts only in its metadata (no environment variable): several
    hosts there start jax.distributed; one host, or no metadata server, is a single process."""
    asked = []

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append((self.path, self.headers.get("Metadata-Flavor")))
            body = b"t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"GCE_METADATA_IP": f"127.0.0.1:{server.server_port}"}
    try:
        real_find_spec = importlib.util.find_spec
        assert distributed.tpu_vm_workers(env) == []  # no libtpu here: the metadata server is not asked
        assert asked == []
        monkeypatch.setattr(importlib.util, "find_spec", lambda n: object() if n == "libtpu" else real_find_spec(n))
        assert distributed.tpu_vm_workers(env) == ["t1v-n-0", "t1v-n-1", "t1v-n-2", "t1v-n-3"]
        assert asked == [("/computeMetadata/v1/instance/attributes/worker-network-endpoints", "Google")]
        assert resolve_distributed(_dist(), env).mode == "tpu"
        assert distributed.tpu_vm_workers({**env, "TPU_SKIP_MDS_QUERY": "1"}) == []
    finally:
        server.shutdown()
        server.server_close()
    assert distributed.tpu_vm_workers(env) == []  # the server is gone: a TPU machine outside Google Cloud
    assert resolve_distributed(_dist(), {}, tpu_workers=lambda env: ["only-host"]).mode == "single"
    assert resolve_distributed(_dist(auto=False), {}, tpu_workers=lambda env: ["a", "b"]).mode == "single"
    # GKE's worker list wins over the metadata, as in jax
    assert resolve_distributed(_dist(), {"TPU_WORKER_HOSTNAMES": "a"}, tpu_workers=lambda env: ["a", "b"]).mode == (
        "single"
    )


def test_resolve_distributed_modes():
    assert resolve_distributed(_dist(), {}).mode == "single"
    plan = resolve_distributed(
        _dist(), {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    )
    assert (plan.mode, plan.coordinator_address, plan.num_processes, plan.process_id) == (
        "explicit",
        "10.0.0.1:1234",
        4,
        2,
    )
    plan = resolve_distributed(_dist(coordinator_address="h:1", num_processes=2, process_id=1), {})
    assert (plan.mode, plan.num_processes, plan.process_id) == ("explicit", 2, 1)
    assert resolve_distributed(_dist(), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}).mode == "slurm"
    assert resolve_distributed(_dist(), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).mode == "single"
    assert resolve_distributed(_dist(), {"TPU_WORKER_HOSTNAMES": "a,b,c,d"}).mode == "tpu"
    assert resolve_distributed(_dist(auto=False), {"TPU_WORKER_HOSTNAMES": "a,b"}).mode == "single"
    assert resolve_distributed(_dist(), {"TPU_PROCESS_ADDRESSES": "a:8476,b:8476"}).mode == "tpu"
    with pytest.raises(ValueError, match="num_processes/process_id are not"):
        resolve_distributed(_dist(coordinator_address="h:1"), {})
    with pytest.raises(ValueError, match="without a coordinator"):
        resolve_distributed(_dist(num_processes=2), {})
    with pytest.raises(ValueError, match="must be in"):
        resolve_distributed(_dist(coordinator_address="h:1", num_processes=2, process_id=2), {})
