"""The align stage end to end on a tiny run directory: SFT + DPO rounds, frozen reference, final HF folder."""
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from proxykd_jax import data
from proxykd_jax.models.tokenizer import build_word_tokenizer

WORDS = [f"w{i}" for i in range(56)]
SEQ = 32


def make_config(run_dir) -> ml_collections.ConfigDict:
    from proxykd_jax import config as config_lib
    from proxykd_jax.parallel import mesh
    from proxykd_jax.stages import align
    from proxykd_jax.train import loop, optim

    cfg = ml_collections.ConfigDict()
    cfg.run = config_lib.run_config()
    cfg.run.dir = str(run_dir)
    cfg.mesh = mesh.default_config()
    cfg.proxy = config_lib.model_group()
    cfg.proxy.update(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=48,
                     max_seq_len=SEQ)
    cfg.data = data.default_config()
    cfg.data.update(seq_len=SEQ)
    cfg.data.split.update(warmup=0.3, align=0.5, distill=0.0, heldout=0.2)
    cfg.optim = optim.default_config()
    cfg.train = loop.default_config()
    cfg.train.update(log_every=1, tensorboard=False, progress=False, peak_flops=1e9)
    cfg.align = align.default_config()
    cfg.align.update(batch_size=8, sft_steps=4, sft_lr=3e-3, rounds=2, dpo_steps_per_round=3, dpo_lr=1e-3,
                     max_new_tokens=8, sample_batch_size=8, logprob_chunk=64, eval_batch_size=8, checkpoint_every=2)
    return cfg


def build_run(root: pathlib.Path, n: int = 48, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    run = root / "run"
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(WORDS, rng.integers(2, 5)))
            response = " ".join(rng.choice(WORDS[:12], rng.integers(2, 6)))
            f.write(json.dumps({"id": f"p{i}", "prompt": prompt, "response": response}) + "\n")
    tokenizer = build_word_tokenizer(WORDS, run / "prepared_tokenizer")
    data.prepare([corpus], tokenizer, run / "prepared", make_config(run).data, progress=False)
    tokenizer.save_pretrained(run / "prepared" / "tokenizer")
    return run


def test_align_stage_runs_and_keeps_reference_frozen(tmp_path):
    from safetensors.numpy import load_file

    from proxykd_jax.align import phases
    from proxykd_jax.stages import align

    run = build_run(tmp_path)
    cfg = make_config(run)
    summaries = align.run(cfg)
    out = run / "proxy"
    assert set(summaries) == {"init", "sft", "round_000", "round_001"}
    assert summaries["sft"]["heldout_nll"] < summaries["init"]["heldout_nll"]
    for name in ("sft", "round_000", "round_001"):
        assert phases.is_done(out / name)
    # the round-0 reference is the SFT result, untouched by the round's steps
    from proxykd_jax.models.llama import Llama
    from flax import nnx
    template = Llama(align.phases.build_proxy(cfg.proxy, 0, *_mesh(cfg))[0], rngs=nnx.Rngs(0))
    ref0 = phases.restore_params(template, out / "round_000" / "reference")
    sft = phases.restore_params(template, out / "sft" / "params")
    after = phases.restore_params(template, out / "round_000" / "params")
    ref_leaves = [np.asarray(x) for x in jax_leaves(ref0)]
    for a, b in zip(ref_leaves, jax_leaves(sft)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert max(np.abs(a - np.asarray(b)).max() for a, b in zip(ref_leaves, jax_leaves(after))) > 0
    assert load_file(str(out / "final" / "model.safetensors"))
    assert align.run(cfg) == {}  # finished: nothing to redo


def _mesh(cfg):
    from proxykd_jax.parallel import make_mesh
    return make_mesh(cfg.mesh), cfg.mesh.rules


def jax_leaves(module):
    import jax
    from flax import nnx
    return jax.tree.leaves(nnx.state(module, nnx.Param))
