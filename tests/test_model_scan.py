"""Stacked (scanned) layers: scan == unrolled loop in value and gradients, remat policies, decode
with the stacked cache, and bf16 compute against float32."""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from proxykd_jax.models import llama
from proxykd_jax.models.llama import Llama, ModelConfig


def small_cfg(**kw):
    base = dict(
        vocab_size=61, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48, rope_theta=500.0
    )
    base.update(kw)
    return ModelConfig(**base)


def _batch(cfg, seed, b=2, length=24):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (b, length))
    seg = np.ones((b, length), np.int32)
    seg[1, length // 2 :] = 2
    seg[1, length - 3 :] = 0
    targets = rng.integers(0, cfg.vocab_size, (b, length))
    return jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(targets)


def _loss(model, tokens, seg, targets):
    logits = model(tokens, segment_ids_BxL=seg)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * (seg != 0)) / jnp.sum(seg != 0)


def _value_and_grads(cfg, state, batch):
    graphdef = nnx.graphdef(Llama(cfg, rngs=nnx.Rngs(0)))

    @jax.jit
    def run(state):
        return jax.value_and_grad(lambda s: _loss(nnx.merge(graphdef, s), *batch))(state)

    loss, grads = run(state)
    return float(loss), jax.tree.map(np.asarray, grads)


def _random_state(cfg, seed):
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    new = [
        (0.3 * jax.random.normal(k, x.shape) + (1.0 if x.ndim == 2 else 0.0)).astype(x.dtype)
        for k, x in zip(keys, leaves)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return nnx.state(model)


def _assert_trees_close(got, want, rtol, atol):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_scan_equals_unrolled_loop_in_value_and_grads():
    cfg_scan = small_cfg(scan_layers=True)
    cfg_loop = dataclasses.replace(cfg_scan, scan_layers=False)
    state = _random_state(cfg_scan, seed=1)
    batch = _batch(cfg_scan, seed=2)
    loss_s, grads_s = _value_and_grads(cfg_scan, state, batch)
    loss_l, grads_l = _value_and_grads(cfg_loop, state, batch)
    assert loss_s > 1.0
    np.testing.assert_allclose(loss_s, loss_l, rtol=1e-6)
    _assert_trees_close(grads_s, grads_l, rtol=1e-4, atol=1e-6)
    wq = grads_s["layers"]["attn"]["wq"]
    assert wq.shape[0] == 3 and all(np.abs(wq[i]).max() > 1e-4 for i in range(3))  # every layer gets a gradient


def test_scan_uses_one_layer_body():
    """The scanned program holds one copy of the block; the unrolled one holds num_layers copies."""
    batch = _batch(small_cfg(), seed=3)

    def n_dots(cfg):
        model = Llama(cfg, rngs=nnx.Rngs(0))
        text = jax.jit(lambda m: m(batch[0], segment_ids_BxL=batch[1])).lower(model).as_text()
        return text.count("stablehlo.dot_general")

    scanned, unrolled = n_dots(small_cfg(scan_layers=True)), n_dots(small_cfg(scan_layers=False))
    assert unrolled > scanned
    assert n_dots(small_cfg(scan_layers=True, num_layers=6)) == scanned
    assert n_dots(small_cfg(scan_layers=False, num_layers=6)) > unrolled


@pytest.mark.parametrize(
    "remat,scan_layers", [("full", True), ("save_dots", True), ("dots_with_no_batch_dims", True), ("full", False)]
)
def test_remat_policies_give_the_same_grads(remat, scan_layers):
    base = small_cfg(scan_layers=scan_layers)
    state = _random_state(base, seed=4)
    batch = _batch(base, seed=5)
    loss0, grads0 = _value_and_grads(base, state, batch)
    loss1, grads1 = _value_and_grads(dataclasses.replace(base, remat=remat), state, batch)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    _assert_trees_close(grads1, grads0, rtol=1e-4, atol=1e-6)


def test_full_remat_saves_less_than_none():
    """Compiled temporaries of the scanned train step shrink under full remat (deeper model, longer rows)."""
    cfg = small_cfg(num_layers=6, d_model=64, d_ff=128, scan_layers=True)
    state = _random_state(cfg, seed=6)
    batch = _batch(cfg, seed=7, b=4, length=128)

    def temp_bytes(remat):
        c = dataclasses.replace(cfg, remat=remat)
        graphdef = nnx.graphdef(Llama(c, rngs=nnx.Rngs(0)))
        fn = jax.jit(jax.grad(lambda s: _loss(nnx.merge(graphdef, s), *batch)))
        return fn.lower(state).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("full") < 0.7 * temp_bytes("none")


def test_pallas_attention_model_matches_blocked_and_lowers_for_tpu():
    """The scanned, rematerialised model with the Pallas splash path: on CPU (Pallas' interpreter) the
    loss and gradients equal the blocked path's; exported for a TPU from this host, the train step's
    program holds the Mosaic kernels (forward, dq, dkv) in its layer scans and no interpreter loop."""
    from jax import export

    cfg = small_cfg(scan_layers=True, remat="full", attention="pallas")
    state = _random_state(cfg, seed=8)
    batch = _batch(cfg, seed=9, length=32)
    loss_p, grads_p = _value_and_grads(cfg, state, batch)
    loss_b, grads_b = _value_and_grads(dataclasses.replace(cfg, attention="blocked"), state, batch)
    np.testing.assert_allclose(loss_p, loss_b, rtol=1e-6)
    _assert_trees_close(grads_p, grads_b, rtol=1e-4, atol=1e-6)

    tpu_cfg = dataclasses.replace(cfg, dtype="bfloat16", max_seq_len=256)
    graphdef = nnx.graphdef(Llama(tpu_cfg, rngs=nnx.Rngs(0)))
    tpu_batch = _batch(tpu_cfg, seed=10, length=256)
    step = jax.jit(jax.value_and_grad(lambda s, b: _loss(nnx.merge(graphdef, s), *b)))
    text = export.export(step, platforms=["tpu"])(state, tpu_batch).mlir_module()
    kernels = re.findall(r'kernel_name = "splash_mqa_(\w+?)_segmented', text)
    assert sorted(kernels) == ["dkv", "dq", "fwd", "fwd"]  # full remat runs the forward kernel again
    assert text.count("stablehlo.while") == 2  # the two layer scans; no interpreter grid loop


def _splash_q_shapes(mlir_text):
    """Shapes of q (the third operand) of every splash kernel call in exported StableHLO text."""
    calls = [line for line in mlir_text.splitlines() if "@tpu_custom_call" in line]
    return {re.findall(r"tensor<([\dx]+)x\w+>", line[line.rindex(" : (") :])[2] for line in calls}


def test_pallas_attention_runs_per_shard_under_a_mesh():
    """XLA cannot partition the Mosaic kernel, so under a mesh the splash path runs in shard_map: on
    8 simulated devices (data 2, fsdp 2, tensor 2) value and gradients equal one device's blocked
    path, and the TPU export hands each kernel call its device's rows and key/value head only."""
    import ml_collections
    from jax import export

    from proxykd_jax import parallel

    mesh = parallel.make_mesh(ml_collections.ConfigDict({"shape": {"data": 2, "fsdp": 2, "tensor": 2}}))
    cfg = small_cfg(scan_layers=True, attention="pallas")  # 4 query heads in 2 key/value groups
    state = _random_state(cfg, seed=11)
    batch = _batch(cfg, seed=12, b=8, length=32)
    graphdef = nnx.graphdef(Llama(cfg, rngs=nnx.Rngs(0)))
    step = jax.jit(jax.value_and_grad(lambda s, b: _loss(nnx.merge(graphdef, s), *b)))
    with jax.set_mesh(mesh):
        loss, grads = step(state, batch)
        sharded = export.export(step, platforms=["tpu"])(state, batch).mlir_module()
    whole = export.export(step, platforms=["tpu"])(state, batch).mlir_module()
    loss_b, grads_b = _value_and_grads(dataclasses.replace(cfg, attention="blocked"), state, batch)
    np.testing.assert_allclose(float(loss), loss_b, rtol=1e-6)
    _assert_trees_close(jax.tree.map(np.asarray, grads), grads_b, rtol=1e-4, atol=1e-6)
    # q as [rows, (kv heads,) query heads per kv head, L padded to 128, E]: 8 rows and 2 groups whole,
    # 2 rows and 1 group (squeezed) per device.
    assert _splash_q_shapes(whole) == {"8x2x2x128x8"}
    assert _splash_q_shapes(sharded) == {"2x2x128x8"}


def test_remat_and_attention_config_errors():
    with pytest.raises(ValueError, match="model.remat must be one of"):
        small_cfg(remat="sometimes")
    with pytest.raises(ValueError, match="model.attention must be one of"):
        small_cfg(attention="flash9")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="needs a GPU or TPU"):
            llama.remat_policy("offload")


@pytest.mark.parametrize("platform,backend,attention", [("tpu", "tpu", "pallas"), ("cuda", "gpu", "xla")])
def test_offload_remat_lowers_for_accelerators(platform, backend, attention, monkeypatch):
    """remat='offload' has no CPU form (no pinned host memory), so it is checked by export: traced as on
    a TPU or a GPU, the scanned train step annotates the saved matmul outputs for pinned host memory;
    with remat='full' nothing is offloaded."""
    from jax import export

    monkeypatch.setattr(jax, "default_backend", lambda: backend)  # trace as on that platform
    batch = _batch(small_cfg(), seed=13, length=128)

    def exported(remat):
        cfg = small_cfg(scan_layers=True, remat=remat, attention=attention)
        state = _random_state(cfg, seed=13)
        graphdef = nnx.graphdef(Llama(cfg, rngs=nnx.Rngs(0)))
        step = jax.jit(jax.value_and_grad(lambda s, b: _loss(nnx.merge(graphdef, s), *b)))
        return export.export(step, platforms=[platform])(state, batch).mlir_module()

    offload, full = exported("offload"), exported("full")
    assert "pinned_host" in offload and offload.count("annotate_device_placement") >= 2
    assert "pinned_host" not in full and "annotate_device_placement" not in full


def test_stacked_cache_decode_matches_forward():
    cfg = small_cfg()
    model = Llama(cfg, rngs=nnx.Rngs(8))
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, cfg.vocab_size, (2, 10)))
    full = model(tokens)
    cache = model.init_cache(2, 12)
    assert cache.k.shape == (cfg.num_layers, 2, 12, cfg.num_kv_heads, cfg.head_dim)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    ones = jnp.ones((2, 10), jnp.int32)
    prefill, cache = model.decode(tokens[:, :6], pos[:, :6], ones[:, :6], cache)
    steps = [prefill]
    for t in range(6, 10):
        logits, cache = model.decode(tokens[:, t : t + 1], pos[:, t : t + 1], ones[:, t : t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=2e-5, atol=2e-5)
    assert int(cache.index) == 10


def test_bf16_compute_agrees_with_float32():
    """Mixed precision: float32 master weights, bf16 matmuls, float32 norms/softmax/logits/loss.

    On random inputs the bf16-compute loss is within 1% of the float32 loss, logits within 5% of
    their spread, and gradients (float32, like the master weights) point the same way (cosine > 0.99)."""
    cfg32 = small_cfg(d_model=64, d_ff=128)
    cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
    state = _random_state(cfg32, seed=10)
    batch = _batch(cfg32, seed=11, length=32)
    m32 = nnx.merge(nnx.graphdef(Llama(cfg32, rngs=nnx.Rngs(0))), state)
    m16 = nnx.merge(nnx.graphdef(Llama(cfg16, rngs=nnx.Rngs(0))), state)
    l32, l16 = m32(batch[0]), m16(batch[0])
    assert l16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(l32 - l16))) < 0.25 * float(jnp.std(l32))
    assert float(jnp.sqrt(jnp.mean((l32 - l16) ** 2))) < 0.05 * float(jnp.std(l32))
    loss32, g32 = _value_and_grads(cfg32, state, batch)
    loss16, g16 = _value_and_grads(cfg16, state, batch)
    assert abs(loss16 - loss32) < 0.01 * loss32
    flat32, flat16 = jax.tree.leaves(g32), jax.tree.leaves(g16)
    assert all(g.dtype == np.float32 for g in flat16)
    a, b = np.concatenate([g.ravel() for g in flat32]), np.concatenate([g.ravel() for g in flat16])
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


def test_scan_layers_auto_unrolls_shallow_models_and_scans_deep_ones():
    shallow = small_cfg(scan_layers="auto", num_layers=llama.AUTO_UNROLL_MAX_LAYERS)
    deep = small_cfg(scan_layers="auto", num_layers=llama.AUTO_UNROLL_MAX_LAYERS + 1)
    assert shallow.scan_layers is False and deep.scan_layers is True
    assert dataclasses.replace(deep, num_layers=2).scan_layers is True  # resolved once, kept by replace
    assert small_cfg(scan_layers="auto", num_layers=2, remat="full").scan_layers is True  # remat needs the scan
    assert llama.ModelConfig.from_config(llama.default_config()).scan_layers is False  # 2 layers
    with pytest.raises(ValueError, match="model.scan_layers must be True, False or 'auto'"):
        small_cfg(scan_layers="sometimes")
    # on a GPU the scan cost the 16-layer student 15% of its step: "auto" unrolls at any depth there
    deep_layers = 4 * llama.AUTO_UNROLL_MAX_LAYERS
    assert llama.resolve_scan_layers("auto", deep_layers, "none", platform="gpu") is False
    assert llama.resolve_scan_layers("auto", deep_layers, "full", platform="gpu") is True
    assert llama.resolve_scan_layers("auto", deep_layers, "none", platform="cpu") is True


def test_resolving_auto_layers_leaves_the_backend_uninitialised():
    """Configs are validated before `jax.distributed.initialize`, which refuses an initialised backend."""
    code = (
        "from jax._src import xla_bridge\n"
        "from proxykd_jax.models import llama\n"
        "cfg = llama.ModelConfig(vocab_size=64, d_model=16, num_layers=12, num_heads=2, num_kv_heads=1, head_dim=8,"
        " d_ff=32)\n"
        "assert cfg.scan_layers is (llama.default_platform() != 'gpu'), cfg\n"
        "assert not xla_bridge.backends_are_initialized()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
