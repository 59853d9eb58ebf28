"""Qwen3 (`Qwen3ForCausalLM`) as student and proxy: Qwen2's decoder without the q/k/v bias plus a per-head
RMSNorm on queries and keys (`model.qk_norm`), here with head_dim 16 != d_model / heads 8 and grouped-query
attention. Import equals transformers' logits (scanned and unrolled, packed and padded rows, cached decoding),
export loads in transformers as a Qwen3, LoRA trains a Qwen3 proxy's adapters only, and an fsdp x tensor mesh
of 8 devices gives the single device's numbers."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from parallel_helpers import ce_loss, mesh_cfg, optim_cfg
from test_hf import _hf_logits, packed_and_cached_match

from proxykd_jax.align import lora, objectives, phases, rounds
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.parallel import LOGICAL_RULES, batch_sharding, global_batch, make_mesh, shardings_of, under_mesh
from proxykd_jax.train import make_optimizer, make_train_step

VOCAB = 67
QWEN3 = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # not hidden_size / heads = 8: Qwen3 states it
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
)


def _seed() -> int:
    return int(np.random.default_rng().integers(1 << 31))


def _tokens(rows: int, length: int, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng().integers(0, vocab, (rows, length))


def _qwen3(**kw):
    """A tiny Qwen3 with every tensor random (norm weights around 1, q/k norms too: a swap or a miss shows)."""
    torch.manual_seed(_seed())
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**QWEN3, **kw})).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model


def _randomised(model: Llama) -> Llama:
    """`model` with every parameter random (scales around 1): a fresh init has q/k norm scales of one."""
    rng = np.random.default_rng()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shift = 1.0 if path[-1] == "scale" else 0.0
        var.set_value(jnp.asarray(rng.normal(shift, 0.3, var.get_value().shape), var.get_value().dtype))
    return model


@pytest.mark.parametrize("scan, tie", [(True, False), (False, True)])
def test_import_matches_transformers(tmp_path, scan, tie):
    ref = _qwen3(tie_word_embeddings=tie)
    ref.save_pretrained(tmp_path)
    cfg, model = hf.load_hf(tmp_path, run={"scan_layers": scan})
    assert cfg.qk_norm and not cfg.qkv_bias and cfg.head_dim == 16
    assert (cfg.tie_embeddings, cfg.scan_layers) == (tie, scan)
    assert cfg.num_params() == sum(p.numel() for p in ref.parameters())
    tokens = _tokens(2, 19)
    expected = _hf_logits(ref, tokens)
    assert np.std(expected) > 0.5
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, atol=1e-4, rtol=1e-4)


def test_packed_and_padded_rows_and_cached_decoding_match_transformers(tmp_path):
    ref = _qwen3()
    ref.save_pretrained(tmp_path)
    _, model = hf.load_hf(tmp_path)
    packed_and_cached_match(ref, model, lambda n: _tokens(1, n)[0])  # keys are normed before they are cached


def tiny_config(**numerics) -> ModelConfig:
    """A 2-layer grouped-query model with head_dim 16 != d_model / heads (as Qwen3 has), 128 positions."""
    return ModelConfig(
        vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=48,
        max_seq_len=128, rms_eps=1e-6, **numerics,
    )  # fmt: skip


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_as_qwen3(tmp_path, tie):
    cfg = tiny_config(rope_theta=1e6, qk_norm=True, tie_embeddings=tie)
    model = _randomised(Llama(cfg, rngs=nnx.Rngs(_seed())))
    hf.save_hf(model, cfg, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["architectures"], written["model_type"], written["head_dim"]) == (["Qwen3ForCausalLM"], "qwen3", 16)
    assert not written["attention_bias"] and not written["use_sliding_window"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back).__name__ == "Qwen3ForCausalLM"
    tokens = _tokens(2, 19)
    np.testing.assert_allclose(_hf_logits(back, tokens), np.asarray(model(jnp.asarray(tokens))), atol=1e-4, rtol=1e-4)
    assert hf.read_config(tmp_path) == cfg


def test_windows_and_refusals_follow_transformers(tmp_path):
    """Qwen3 slides as Qwen2 does (only with use_sliding_window, from max_window_layers on), past the window too;
    attention_bias (on o_proj too) and q/k norm with q/k bias (no Hugging Face family has both) are refused."""
    ref = _qwen3(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    ref.save_pretrained(tmp_path / "w")
    cfg, model = hf.load_hf(tmp_path / "w")
    assert (cfg.max_seq_len, cfg.sliding_window, cfg.layer_types) == (128, 8, ("full_attention", "sliding_attention"))
    tokens = _tokens(2, 20)  # longer than the window
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), _hf_logits(ref, tokens), atol=1e-4, rtol=1e-4)
    spec = json.loads((tmp_path / "w" / "config.json").read_text())
    assert hf.config_from_hf({**spec, "use_sliding_window": False}).sliding_window is None
    no_types = {k: v for k, v in spec.items() if k != "layer_types"}  # then layers from max_window_layers on slide
    assert hf.config_from_hf({**no_types, "max_window_layers": 1}).sliding_window == 8
    assert hf.config_from_hf({**no_types, "max_window_layers": 2}).sliding_window is None
    assert hf.config_from_hf({k: v for k, v in spec.items() if k != "head_dim"}).head_dim == 128  # Qwen3Config's
    with pytest.raises(ValueError, match="attention_bias=true"):
        hf.config_from_hf({**spec, "attention_bias": True})
    with pytest.raises(ValueError, match=r"model\.qk_norm .*model\.qkv_bias"):
        ModelConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, d_ff=8,
                    qk_norm=True, qkv_bias=True)  # fmt: skip


def _one_device_mesh():
    return make_mesh(mesh_cfg(), jax.devices()[:1])


def test_lora_on_a_qwen3_proxy_trains_only_the_adapters(tmp_path):
    _qwen3().save_pretrained(tmp_path)
    mesh = _one_device_mesh()
    _, proxy = hf.load_hf(tmp_path, mesh=mesh, rules=LOGICAL_RULES)
    lora_cfg = lora.default_config()
    lora_cfg.rank = 2
    adapters, frozen = rounds.make_trainable(proxy, lora_cfg, 0, mesh, LOGICAL_RULES)
    assert frozen == (proxy,) and all(p[-1] in ("wq", "wk", "wv", "wo") for p in adapters.paths)
    before = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(proxy))}
    optimizer = make_optimizer(optim_cfg(), total_steps=10)
    graphdef, state, shardings = phases.train_state_from(adapters, optimizer, mesh, LOGICAL_RULES)
    step = make_train_step(
        functools.partial(objectives.sft_loss_fn, chunk=16),
        graphdef,
        optimizer,
        state_shardings=shardings,
        batch_shardings=batch_sharding(mesh, LOGICAL_RULES),
        frozen_shardings=(shardings_of(proxy),),
    )
    seq = _tokens(4, 17)
    batch = dict(tokens=seq[:, :-1], targets=seq[:, 1:], segment_ids=np.ones((4, 16), np.int32))
    batch["loss_mask"] = np.ones((4, 16), np.float32)
    batch = global_batch(batch, mesh, LOGICAL_RULES)
    b_before = [np.asarray(b[...]) for b in adapters.b]
    state, first = step(state, batch, proxy)
    state, second = step(state, batch, proxy)
    assert float(second["loss"]) < float(first["loss"])
    trained = nnx.merge(graphdef, state.params, state.rest)
    assert all(np.abs(np.asarray(b[...])).max() > 0 for b in trained.b) and not any(np.any(b) for b in b_before)
    for key, var in nnx.to_flat_state(nnx.state(proxy)):  # the base, q/k norms included, is untouched
        np.testing.assert_array_equal(np.asarray(var.get_value()), before[key], err_msg=str(key))


def _logits_loss_and_grads(model, batch):
    """Logits, loss and the loss's gradients of a model on its mesh."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(params, rest, batch):
        logits = nnx.merge(graphdef, params, rest)(batch["tokens"])
        loss, grads = jax.value_and_grad(lambda p: ce_loss(nnx.merge(graphdef, p, rest), batch)[0])(params)
        return logits, loss, grads

    return under_mesh(jax.jit(run), batch["tokens"].sharding.mesh)(params, rest, batch)


@pytest.mark.parametrize("fsdp, tensor", [(8, 1), (4, 2)])
def test_an_8_device_mesh_equals_one_device(tmp_path, fsdp, tensor):
    _qwen3(num_hidden_layers=3, vocab_size=64).save_pretrained(tmp_path)  # 64 rows: split over tensor
    seq = _tokens(8, 17, vocab=64)
    host = dict(tokens=seq[:, :-1], targets=seq[:, 1:], loss_mask=np.ones((8, 16), np.float32))
    out = []
    for mesh in (_one_device_mesh(), make_mesh(mesh_cfg(fsdp=fsdp, tensor=tensor), jax.devices()[:8])):
        _, model = hf.load_hf(tmp_path, mesh=mesh, rules=LOGICAL_RULES, run={"scan_layers": True})
        norm = model.layers.attn.q_norm.scale.get_value()
        assert norm.shape == (3, 16) and len(norm.sharding.device_set) == mesh.size
        logits, loss, grads = _logits_loss_and_grads(model, global_batch(host, mesh, LOGICAL_RULES))
        out.append(
            (np.asarray(logits), float(loss), {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)})
        )
    (logits1, loss1, grads1), (logits8, loss8, grads8) = out
    np.testing.assert_allclose(logits8, logits1, atol=1e-4, rtol=1e-4)  # float32 sums in another order
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
    assert np.abs(grads1[("layers", "attn", "k_norm", "scale")]).max() > 1e-3
    for key in grads1:  # the q/k norm scales' gradients summed over the mesh as the others
        scale = np.abs(grads1[key]).max()
        np.testing.assert_allclose(grads8[key], grads1[key], atol=1e-5 * scale, rtol=1e-4, err_msg=str(key))


def test_a_qwen3_folder_sets_qk_norm_through_configs_hf_and_older_records_still_match(tmp_path):
    """`configs/hf.py` copies qk_norm from a folder (it fell back to False: a student that could not load its
    weights), and qk_norm=False leaves an artifact's settings as they were before the field existed."""
    import pathlib
    import runpy

    from proxykd_jax.context import artifacts, specs

    _qwen3().save_pretrained(tmp_path / "q3")
    get_config = runpy.run_path(str(pathlib.Path(__file__).parent.parent / "configs" / "hf.py"))["get_config"]
    cfg = get_config(f"{tmp_path / 'q3'},{tmp_path / 'q3'}")
    assert cfg.model.qk_norm is True and cfg.proxy.qk_norm is True
    before = cfg.copy_and_resolve_references()
    with before.unlocked():
        del before.model["qk_norm"], before.proxy["qk_norm"]  # a config of the version before the field
    cfg.model.qk_norm = cfg.proxy.qk_norm = False
    for name, spec in specs.ARTIFACTS.items():
        assert artifacts.depends_on(cfg, spec) == artifacts.depends_on(before, spec), name
    cfg.model.qk_norm = True
    assert artifacts.depends_on(cfg, specs.ARTIFACTS["distill"])["model.qk_norm"] is True
