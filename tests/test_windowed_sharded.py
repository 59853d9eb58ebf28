"""Gemma 3 and sliding-window models on a mesh: a Gemma 3, a Gemma 2 (soft-capped) and a Qwen2 whose upper layers
slide, loaded onto 8 devices (fsdp=8, and fsdp=2 x tensor=4), give one device's logits, loss gradients and KV-cache
generations on packed rows longer than the window (scanned layers); a LoRA align and a distill of a Gemma 3 student
and windowed Mistral proxy through `configs/hf.py` on fsdp=4 x tensor=2 train what one device trains; and `proxykd
plan` compiles their steps."""

import json
import pathlib
import random
import runpy
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from parallel_helpers import mesh_cfg
from safetensors.numpy import load_file
from stage_helpers import run_stage
from test_data_common import WORDS, sentence
from test_gemma3 import random_gemma
from test_hf import _hf_logits, _hf_model

from proxykd_jax import cli
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.sampling import generate
from proxykd_jax.models.tokenizer import build_word_tokenizer
from proxykd_jax.parallel import LOGICAL_RULES, global_batch, make_mesh, under_mesh

REPO = pathlib.Path(__file__).resolve().parent.parent
VOCAB, LENGTH = 64, 24
MESHES = ((8, 1), (2, 4))  # (fsdp, tensor); 4 key/value heads split over tensor=4


def _seed() -> int:
    return int(np.random.default_rng().integers(1 << 31))


_GEMMA = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=24, rms_norm_eps=1e-6, max_position_embeddings=128,
    sliding_window=5,
)  # fmt: skip


def _gemma3(folder):
    spec = dict(
        _GEMMA,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5000.0},
        },
    )
    ref = random_gemma(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, spec)
    ref.save_pretrained(folder)
    return ref


def _gemma2(folder):
    """A Gemma 2 whose soft-caps bind on its random weights (attention 2, logits 3)."""
    spec = dict(_GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    ref = random_gemma(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, spec)
    ref.save_pretrained(folder)
    return ref


def _windowed(kind, **kw):
    def build(folder):
        ref = _hf_model(kind, seed=_seed(), attn_implementation="eager", vocab_size=VOCAB, num_key_value_heads=4, **kw)
        ref.save_pretrained(folder)
        return ref

    return build


FOLDERS = {  # (a Mistral, whose every layer slides, is the stage test's proxy below)
    "gemma3": _gemma3,
    "gemma2": _gemma2,  # (soft-capped attention and logits)
    "qwen2": _windowed("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1),
}


def _batch() -> dict:
    """8 rows of 24 tokens: packed rows of two sequences of 10 and 14 (some with padding), whole rows."""
    seq = np.random.default_rng().integers(0, VOCAB, (8, LENGTH + 1))
    seg = np.ones((8, LENGTH), np.int32)
    seg[::2, 10:] = 2
    seg[1::4, 20:] = 0
    return dict(tokens=seq[:, :-1], targets=seq[:, 1:], loss_mask=(seg > 0).astype(np.float32), segment_ids=seg)


def _logits_loss_and_grads(model, batch, mesh):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(params, rest, batch):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(batch["tokens"], None, batch["segment_ids"])
            logp = jax.nn.log_softmax(logits, axis=-1)
            nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
            return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return logits, loss, grads

    logits, loss, grads = under_mesh(jax.jit(run), mesh)(params, rest, batch)
    return np.asarray(logits), float(loss), {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}


def _generated(model, prompts, lengths):
    out = generate(model, prompts, lengths, jax.random.key(0), max_new_tokens=10, temperature=0, return_logprobs=True)
    return np.asarray(out.tokens_BxT), np.asarray(out.logprobs_BxT)


@pytest.mark.parametrize("kind", FOLDERS)
def test_a_windowed_model_on_8_devices_equals_one_device(tmp_path, kind):
    ref = FOLDERS[kind](tmp_path)
    host = _batch()
    prompts = np.random.default_rng().integers(0, VOCAB, (8, 9))
    lengths = np.array([9, 3, 7, 9, 5, 8, 2, 6])  # generations run past the window from every prompt length
    results = []
    for fsdp, tensor in ((1, 1), *MESHES):
        mesh = make_mesh(mesh_cfg(fsdp=fsdp, tensor=tensor), jax.devices()[: fsdp * tensor])
        cfg, model = hf.load_hf(tmp_path, mesh=mesh, rules=LOGICAL_RULES, run={"scan_layers": True})
        assert cfg.sliding_window < 10 and len(model.layers.attn.wq.get_value().sharding.device_set) == mesh.size
        results.append((*_logits_loss_and_grads(model, global_batch(host, mesh, LOGICAL_RULES), mesh),
                        *_generated(model, prompts, lengths)))  # fmt: skip
    (logits1, loss1, grads1, tokens1, logp1) = results[0]
    whole = host["tokens"][3:4]  # a row of one sequence past the window: transformers' logits (the window applied)
    np.testing.assert_allclose(logits1[3:4], _hf_logits(ref, whole), atol=1e-4, rtol=1e-4)
    for shape, (logits, loss, grads, tokens, logp) in zip(MESHES, results[1:]):
        np.testing.assert_allclose(logits, logits1, atol=1e-4, rtol=1e-4, err_msg=str(shape))
        np.testing.assert_allclose(loss, loss1, rtol=1e-5)
        for key in grads1:
            scale = np.abs(grads1[key]).max()
            assert scale > 0, key
            np.testing.assert_allclose(grads[key], grads1[key], atol=1e-5 * scale, rtol=1e-4, err_msg=f"{shape} {key}")
        np.testing.assert_array_equal(tokens, tokens1, err_msg=str(shape))
        np.testing.assert_allclose(logp, logp1, atol=1e-4, err_msg=str(shape))


GEMMA3 = ModelConfig(
    vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=48, max_seq_len=32,
    rms_eps=1e-6, rope_theta=1e6, qk_norm=True, tie_embeddings=True, norm_plus_one=True, embed_scale=True,
    activation="gelu_tanh", sandwich_norms=True, query_pre_attn_scalar=24,
    layer_types=("sliding_attention", "full_attention"), rope_local_theta=1e4, sliding_window=6,
)  # fmt: skip
MISTRAL = ModelConfig(
    vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48, max_seq_len=32,
    sliding_window=5,
)  # fmt: skip


def _folder(path, cfg, tokenizer):
    model = Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng()
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(rng.normal(0.0, 0.2, var.get_value().shape), var.get_value().dtype))
    hf.save_hf(model, cfg, path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("windowed_folders")
    tokenizer = build_word_tokenizer(WORDS)
    rng = random.Random(0)
    rows = [
        {"id": f"q{i}", "prompt": sentence(rng, 6), "responses": [sentence(rng, 12), sentence(rng, 14)]}
        for i in range(32)
    ]  # rows of 20 tokens and more: past both windows
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, _folder(root / "gemma3", GEMMA3, tokenizer), _folder(root / "mistral", MISTRAL, tokenizer)


def _config(root, student, proxy, run):
    cfg = runpy.run_path(str(REPO / "configs" / "hf.py"))["get_config"](f"{student},{proxy}")
    cfg.run.dir = str(run)
    cfg.data.corpus = str(root / "corpus.jsonl")
    cfg.data.seq_len = cfg.train.seq_len = 32
    cfg.distill.loss.alpha = 0.0  # (the SFT student: distill reads prepared/ alone)
    cfg.model.dtype = cfg.proxy.dtype = "float32"
    cfg.train.update(steps=2, batch_size=8, log_every=1, tensorboard=False, progress=False)
    cfg.data.batch_size, cfg.data.num_epochs, cfg.optim.warmup_steps = 8, 0, 0
    cfg.align.update(sft_steps=2, sft_lr=3e-2, rounds=0, eval_batch_size=8, heldout_samples=8, warmup_steps=0)
    cfg.align.lora.rank = 2
    return cfg


def test_lora_align_and_distill_through_configs_hf_on_8_devices_equal_one_device(folders):
    root, student, proxy = folders
    run_stage("prepare", _config(root, student, proxy, root / "prepared_run"))
    out = {}
    for devices, shape in ((8, dict(fsdp=4, tensor=2)), (1, dict(fsdp=1, tensor=1))):
        run = root / f"run{devices}"
        shutil.copytree(root / "prepared_run", run)
        cfg = _config(root, student, proxy, run)
        assert (cfg.model.sliding_window, cfg.proxy.sliding_window) == (6, 5)
        cfg.mesh.shape.update(data=1, **shape)
        align = run_stage("align", cfg, devices=jax.devices()[:devices])
        distill = run_stage("distill", cfg, devices=jax.devices()[:devices])
        assert distill["steps"] == 2
        out[devices] = (align, load_file(str(run / "proxy" / "final" / "model.safetensors")),
                        load_file(str(pathlib.Path(distill["final"]) / "model.safetensors")))  # fmt: skip
    (align8, proxy8, student8), (align1, proxy1, student1) = out[8], out[1]
    assert align1["sft"]["heldout_nll"] != align1["init"]["heldout_nll"]  # the adapters trained
    np.testing.assert_allclose(align8["sft"]["heldout_nll"], align1["sft"]["heldout_nll"], rtol=1e-5)
    before = load_file(str(student / "model.safetensors"))
    assert max(np.abs(student1[k] - before[k]).max() for k in before) > 1e-4  # the student trained
    for ours, theirs in ((proxy8, proxy1), (student8, student1)):
        assert ours.keys() == theirs.keys()
        for key in theirs:
            # (after the Adam steps the 8 devices' reduction order moved one weight of 0.23 by 1.8e-5 in one run)
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=5e-5, err_msg=key)


def test_plan_compiles_a_gemma_student_and_windowed_proxy(folders, capsys):
    _, student, proxy = folders
    args = [f"--config=configs/hf.py:{student},{proxy}", "--devices=8", "--steps=distill,sft_lora"]
    assert cli._run_plan([*args, "--config.train.batch_size=8", "--config.align.lora.rank=2"]) == 0
    out = capsys.readouterr().out
    assert "distill" in out and "sft_lora" in out and "total GB" in out, out
