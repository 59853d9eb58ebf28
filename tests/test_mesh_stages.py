"""`eval` and `serve` place their models on the mesh: with mesh.shape.fsdp=4 (parameters split over
4 simulated devices) they give the numbers they give on one device."""

from __future__ import annotations

import json
import shutil

import httpx
import jax
import numpy as np
import pytest
from stage_helpers import run_stage

from proxykd_jax import context
from proxykd_jax.errors import ProxyKDError
from tests.pipeline_fixtures import build_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny known-teacher run with the proxy's init folder also as proxy/final and as the student."""
    root = tmp_path_factory.mktemp("mesh_stages")
    cfg, teacher = build_run(root / "run")
    shutil.copytree(cfg.proxy.init_from, root / "run" / "proxy" / "final")
    shutil.copytree(cfg.proxy.init_from, root / "run" / "student" / "final")
    return root, cfg, teacher


def _numbers(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _numbers(value, f"{prefix}/{key}").items()}
    return {prefix: tree} if isinstance(tree, (int, float)) else {}


def test_eval_on_four_devices_equals_one_device(run):
    root, cfg, _ = run
    results = {}
    for devices, name in ((4, "fsdp4"), (1, "single")):
        shutil.copytree(root / "run", root / name)
        c = cfg.copy_and_resolve_references()
        c.run.dir = str(root / name)
        c.mesh.shape.update(data=1, fsdp=devices, tensor=1)
        results[name] = run_stage("eval", c, devices=jax.devices()[:devices])
    a, b = _numbers(results["fsdp4"]), _numbers(results["single"])
    assert a.keys() == b.keys() and "/models/student (Proxy-KD)/teacher_loglik_of_generations" in a
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
    # the finished evaluation is reused; other settings are refused by the overwrite rule
    c = cfg.copy_and_resolve_references()
    c.run.dir = str(root / "fsdp4")
    stamp = (root / "fsdp4" / "eval" / "metrics.json").stat().st_mtime_ns
    assert run_stage("eval", c) == results["fsdp4"]
    assert (root / "fsdp4" / "eval" / "metrics.json").stat().st_mtime_ns == stamp
    c.eval.max_samples = 8
    with pytest.raises(ProxyKDError, match=r"eval.max_samples 16 -> 8"):
        run_stage("eval", c)


def _backend(cfg, devices: int):
    from proxykd_jax.stages.serve import make_backend

    c = cfg.copy_and_resolve_references()
    c.mesh.shape.update(data=1, fsdp=devices, tensor=1)
    c.serve.update(source="hf", path=cfg.proxy.init_from, model_name="proxy")
    with context.create(c, "serve", devices=jax.devices()[:devices]) as ctx:
        return make_backend(ctx)


def test_serve_places_the_model_on_the_mesh_and_samples_as_one_device(run):
    from flax import nnx

    from proxykd_jax.models import sampling
    from proxykd_jax.teacher.listen import ServerThread
    from proxykd_jax.teacher.server import make_app

    _, cfg, _ = run
    sharded, single = _backend(cfg, 4), _backend(cfg, 1)
    leaves = jax.tree.leaves(nnx.state(sharded.model, nnx.Param))
    assert all(len(leaf.sharding.device_set) == 4 for leaf in leaves)
    assert any(not leaf.sharding.is_fully_replicated for leaf in leaves)  # split over fsdp, not copied
    cache = sampling.cache_shardings(sharded.model, 4, 16, sharded.rules)  # KV cache rows split too
    assert cache.kv.spec[0] == ("data", "fsdp") and len(cache.kv.device_set) == 4
    prompts = [sharded.encode("w1 w2 w3"), sharded.encode("w4 w5")]
    kwargs = dict(n=2, temperature=1.0, top_p=0.9, max_tokens=8, logprobs=True, top_logprobs=3, seeds=[11, 12])
    a, b = sharded.complete(prompts, **kwargs), single.complete(prompts, **kwargs)
    for row_a, row_b in zip(a, b):
        for x, y in zip(row_a, row_b):
            assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
            np.testing.assert_allclose(x.logprobs, y.logprobs, rtol=1e-5, atol=1e-5)
    with ServerThread(make_app(sharded)) as server:  # and it answers over HTTP
        body = {"model": "proxy", "prompt": "w1 w2", "max_tokens": 4, "seed": 3}
        reply = httpx.post(server.base_url + "/completions", json=body, timeout=120).json()
    assert reply["choices"][0]["text"] and json.dumps(reply)


def test_an_init_folder_runs_as_its_group_says_and_must_share_its_numerics(run, tmp_path):
    """`proxy.init_from` with `proxy.remat="full"` and scanned layers: the loaded proxy runs so (config.json
    says nothing of it; it ran unrolled without remat). A group whose RoPE base is not the folder's is
    refused before any weight is read (distill built its student from the group: other RoPE, silently)."""
    _, cfg, _ = run
    c = cfg.copy_and_resolve_references()
    c.run.dir = str(tmp_path / "run")
    c.mesh.shape.update(data=1, fsdp=1, tensor=1)
    c.proxy.update(remat="full", attention="xla")  # scan_layers "auto": scanned under remat
    with context.create(c, "serve", devices=jax.devices()[:1]) as ctx:
        model_cfg, model = ctx.init_model("proxy", 0)
    assert (model_cfg.remat, model_cfg.scan_layers, model_cfg.attention) == ("full", True, "xla")
    assert model.cfg == model_cfg
    folder = tmp_path / "proxy_init"
    shutil.copytree(cfg.proxy.init_from, folder)
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"")  # nothing readable: the refusal must come from config.json alone
    c.proxy.update(init_from=str(folder), rope_theta=500000.0)
    with context.create(c, "serve", devices=jax.devices()[:1]) as ctx:
        with pytest.raises(ProxyKDError, match=r"config.json disagrees with config.proxy on rope_theta=10000.0"):
            ctx.init_model("proxy", 0)


def test_stages_that_place_no_model_run_whatever_mesh_the_config_names(run, tmp_path, monkeypatch, capsys):
    """A cluster's config (mesh.shape.fsdp=16) on a host with fewer devices, such as a login node: prior
    (like collect and prepare, no model on the mesh) runs; distill stops with one sentence on the mesh."""
    import pickle
    import sys

    from proxykd_jax import cli

    root, cfg, _ = run
    c = cfg.copy_and_resolve_references()
    c.run.dir = str(tmp_path / "run")
    shutil.copytree(root / "run", c.run.dir, ignore=shutil.ignore_patterns("prior", "proxykd.lock"))
    c.mesh.shape.update(data=1, fsdp=16, tensor=1)  # 16 > the 8 simulated devices
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(c))
    config = f"--config=tests/pickled_config.py:{tmp_path / 'cfg.pkl'}"

    def main(*args):
        monkeypatch.setattr(sys, "argv", ["proxykd", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main(list(args))
        return exit_info.value.code

    assert main("prior", config) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "prior" / "artifact.json").read_text())["finished"]
    assert main("posterior", config) == 2
    err = capsys.readouterr().err
    assert "mesh data=1 x fsdp=16 x tensor=1 needs 16 devices, 8 available" in err and "Traceback" not in err, err
