"""A user's run with a Gemma 3 (or Gemma 2) student through `configs/hf.py:STUDENT,PROXY`: the config group takes
every number the folder computes with (Gemma's norms, activation, attention scale, per-layer RoPE, Gemma 2's
soft-caps), a folder of another tokenizer is refused before prepare, and prepare, a short distill and the export run
with the Gemma student, the export loading in transformers as the same family with the student's logits."""

import dataclasses
import json
import pathlib
import runpy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from stage_helpers import run_stage
from test_data_common import WORDS
from test_qwen3_run import _corpus

from proxykd_jax import context
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.tokenizer import build_word_tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
GEMMA3 = ModelConfig(
    vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=48, max_seq_len=32,
    rms_eps=1e-6, rope_theta=1e6, qk_norm=True, tie_embeddings=True, norm_plus_one=True, embed_scale=True,
    activation="gelu_tanh", sandwich_norms=True, query_pre_attn_scalar=24,
    layer_types=("sliding_attention", "full_attention"), rope_local_theta=1e4,
)  # fmt: skip
GEMMA2 = dataclasses.replace(
    GEMMA3, qk_norm=False, rope_local_theta=None, sliding_window=6, attn_softcap=1.5, logit_softcap=2.0
)  # (caps small enough to bind on random weights)
LLAMA = ModelConfig(vocab_size=40, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48)


def _folder(path, cfg, tokenizer):
    model = Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng()
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # norms away from their init of 0 too
        var.set_value(jnp.asarray(rng.normal(0.0, 0.2, var.get_value().shape), var.get_value().dtype))
    hf.save_hf(model, cfg, path, tokenizer=tokenizer)
    return path


def _config(tmp_path, student, proxy):
    cfg = runpy.run_path(str(REPO / "configs" / "hf.py"))["get_config"](f"{student},{proxy}")
    cfg.run.dir = str(tmp_path / "run")
    cfg.data.corpus = str(tmp_path / "corpus.jsonl")
    cfg.data.seq_len = cfg.train.seq_len = 32
    cfg.distill.loss.alpha = 0.0  # (the SFT student: distill then reads prepared/ alone)
    return cfg


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    run_tok = build_word_tokenizer(WORDS)
    return {
        "proxy": _folder(root / "llama-proxy", LLAMA, run_tok),
        "student": _folder(root / "gemma3-student", GEMMA3, run_tok),
        "gemma2": _folder(root / "gemma2-student", GEMMA2, run_tok),
        "other": _folder(root / "gemma3-other-tokenizer", GEMMA3, build_word_tokenizer(WORDS[::-1])),
    }


def test_configs_hf_takes_every_number_a_gemma_folder_computes_with(tmp_path, folders):
    cfg = _config(tmp_path, folders["student"], folders["proxy"])
    ours = context.RunContext.model_config(None, cfg.model)
    assert dataclasses.replace(ours, dtype="float32", scan_layers=GEMMA3.scan_layers) == GEMMA3
    ours = context.RunContext.model_config(None, _config(tmp_path, folders["gemma2"], folders["proxy"]).model)
    assert dataclasses.replace(ours, dtype="float32", scan_layers=GEMMA2.scan_layers) == GEMMA2
    with pytest.raises(ProxyKDError, match=r"gemma3-other-tokenizer holds another tokenizer"):
        _corpus(tmp_path)
        context.preflight(_config(tmp_path, folders["other"], folders["proxy"]), "prepare")


@pytest.mark.parametrize("family", ["Gemma3ForCausalLM", "Gemma2ForCausalLM"])
def test_prepare_distill_and_export_with_a_gemma_student(tmp_path, folders, family):
    _corpus(tmp_path)
    cfg = _config(tmp_path, folders["student" if family == "Gemma3ForCausalLM" else "gemma2"], folders["proxy"])
    cfg.model.dtype = "float32"
    cfg.train.steps, cfg.train.batch_size, cfg.data.batch_size = 2, 8, 8
    cfg.data.num_epochs, cfg.optim.warmup_steps = 0, 0
    run_stage("prepare", cfg)
    run_stage("distill", cfg)
    out = pathlib.Path(run_stage("export", cfg))
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [family] and written["query_pre_attn_scalar"] == 24
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert type(back).__name__ == family
    back.eval()
    _, ours = hf.load_hf(out)
    before = hf.load_hf(folders["student" if family == "Gemma3ForCausalLM" else "gemma2"])[1]
    tokens = np.random.default_rng().integers(0, 40, (2, 20))
    with torch.no_grad():
        theirs = back(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))), theirs, atol=1e-4, rtol=1e-4)
    assert np.abs(np.asarray(before(jnp.asarray(tokens))) - theirs).max() > 1e-4  # it trained: not the folder's
