"""A user's run with a Phi-4-mini-like student (RoPE on 3/4 of each head, longrope, tied embeddings) through
`configs/hf.py:STUDENT,PROXY`: the config group takes every number the folder computes with, and prepare, a short
distill and the export run with it, the export loading in transformers as a Phi-3 with the student's logits."""

import dataclasses
import json
import pathlib
import runpy

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from stage_helpers import run_stage
from test_data_common import WORDS
from test_qwen3_run import _corpus

from proxykd_jax import context
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.tokenizer import build_word_tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
_RNG = np.random.default_rng()
PHI = ModelConfig(
    vocab_size=48, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=48, max_seq_len=64,
    tie_embeddings=True, partial_rotary_factor=0.75,  # 12 of 16 dims rotate: 6 factors each
    rope_scaling=("longrope", 16, 1.2, tuple(_RNG.uniform(1, 2, 6)), tuple(_RNG.uniform(2, 8, 6))),
)  # fmt: skip
LLAMA = ModelConfig(vocab_size=40, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48)


def _folder(path, cfg, tokenizer):
    model = Llama(cfg, rngs=nnx.Rngs(0))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # norms away from their init of 1 too
        var.set_value(jnp.asarray(_RNG.normal(0.0, 0.3, var.get_value().shape), var.get_value().dtype))
    hf.save_hf(model, cfg, path, tokenizer=tokenizer)
    return path


def test_prepare_distill_and_export_with_a_phi3_student(tmp_path):
    tok = build_word_tokenizer(WORDS)
    student, proxy = _folder(tmp_path / "phi-student", PHI, tok), _folder(tmp_path / "llama-proxy", LLAMA, tok)
    assert json.loads((student / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    cfg = runpy.run_path(str(REPO / "configs" / "hf.py"))["get_config"](f"{student},{proxy}")
    ours = context.RunContext.model_config(None, cfg.model)
    assert dataclasses.replace(ours, dtype="float32", scan_layers=PHI.scan_layers) == PHI
    _corpus(tmp_path)
    cfg.run.dir, cfg.data.corpus = str(tmp_path / "run"), str(tmp_path / "corpus.jsonl")
    cfg.data.seq_len = cfg.train.seq_len = 32  # rows past the original 16: the long factors, as transformers
    cfg.distill.loss.alpha = 0.0  # (the SFT student: distill then reads prepared/ alone)
    cfg.model.dtype = "float32"
    cfg.train.steps, cfg.train.batch_size, cfg.data.batch_size = 2, 8, 8
    cfg.data.num_epochs, cfg.optim.warmup_steps = 0, 0
    run_stage("prepare", cfg)
    run_stage("distill", cfg)
    out = pathlib.Path(run_stage("export", cfg))
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Phi3ForCausalLM"] and written["partial_rotary_factor"] == 0.75
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == "Phi3ForCausalLM"
    _, exported = hf.load_hf(out)
    before = hf.load_hf(student)[1]
    for n in (12, 20):  # within the original 16 and past it
        tokens = _RNG.integers(0, 40, (2, n))
        with torch.no_grad():
            theirs = back(torch.tensor(tokens)).logits.numpy()
        np.testing.assert_allclose(np.asarray(exported(jnp.asarray(tokens))), theirs, atol=1e-4, rtol=1e-4)
        assert np.abs(np.asarray(before(jnp.asarray(tokens))) - theirs).max() > 1e-4  # it trained: not the folder's
