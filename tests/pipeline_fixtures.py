"""A tiny known-teacher run directory, built once per test module: corpus -> prepared -> proxy folder.

The corpus is sampled from the known teacher directly (the HTTP path has its own tests); the proxy
is the teacher with multiplicative weight noise, exactly as the demo makes it.
"""

from __future__ import annotations

import json
import pathlib
import runpy

import numpy as np

from proxykd_jax.eval import benchmark
from proxykd_jax.teacher.known import KnownTeacher

REPO = pathlib.Path(__file__).resolve().parent.parent
VOCAB = 96


def tiny_config(run_dir: pathlib.Path):
    """configs/demo.py shrunk to seconds: vocab 96, seq 40, a handful of steps."""
    cfg = runpy.run_path(str(REPO / "configs" / "demo.py"))["get_config"]()
    with cfg.unlocked():
        cfg.run.dir = str(run_dir)
        for group in (cfg.proxy, cfg.model):
            group.vocab_size = VOCAB
            group.max_seq_len = 64
        cfg.proxy.d_model, cfg.proxy.head_dim, cfg.proxy.d_ff, cfg.proxy.num_layers = 32, 8, 64, 1
        cfg.model.d_model, cfg.model.head_dim, cfg.model.d_ff, cfg.model.num_layers = 16, 8, 32, 1
        cfg.data.seq_len = cfg.train.seq_len = 40
        cfg.data.batch_size = cfg.train.batch_size = 8
        cfg.data.store.k = 8
        cfg.train.steps, cfg.train.checkpoint_every, cfg.train.log_every = 6, 3, 3
        cfg.train.tensorboard, cfg.train.progress = False, False
        cfg.train.peak_flops = 1e11
        cfg.optim.warmup_steps = 1
        cfg.align.sft_steps, cfg.align.rounds, cfg.align.prompts_per_round = 4, 1, 16
        cfg.align.batch_size, cfg.align.max_new_tokens, cfg.align.checkpoint_every = 8, 12, 2
        cfg.align.sample_batch_size, cfg.align.eval_batch_size, cfg.align.heldout_samples = 8, 8, 8
        cfg.posterior.batch_size = 8
        cfg.posterior.eb_holdout_fraction = 0.3
        cfg.eval.max_samples, cfg.eval.batch_size, cfg.eval.generate_prompts = 16, 8, 4
        cfg.eval.max_new_tokens = 8
        cfg.demo.num_prompts, cfg.demo.samples_per_prompt, cfg.demo.max_new_tokens = 48, 3, 12
        cfg.demo.teacher_d_model, cfg.demo.teacher_num_layers = 32, 1
    return cfg


def _top_logprobs(teacher, prompt: str, response: str, n: int) -> dict:
    """OpenAI-style `tokens` + `top_logprobs` of a response, from the teacher's true distributions."""
    p_ids, r_ids = teacher.encode(prompt), teacher.encode(response)
    q = teacher.distributions([p_ids + r_ids])[0]
    pieces, top = [], []
    for t, tok in enumerate(r_ids):
        dist = q[len(p_ids) + t - 1]
        sep = " " if t else ""
        pieces.append(sep + teacher.tokenizer.decode([tok]))
        best = np.argsort(-dist)[:n]
        top.append(
            [{"token": sep + teacher.tokenizer.decode([int(i)]), "logprob": float(np.log(dist[i]))} for i in best]
        )
    return {"tokens": pieces, "top_logprobs": top}


def tiny_teacher(cfg, root: pathlib.Path, vocab_size: int) -> KnownTeacher:
    """The tests' known teacher (seed 3, one layer, the proxy group's heads and width) over `vocab_size`
    words, its tokenizer in root/teacher_tok and the teacher saved in root/teacher."""
    teacher = KnownTeacher.create(
        3,
        vocab_size=vocab_size,
        d_model=32,
        num_layers=1,
        num_heads=cfg.proxy.num_heads,
        num_kv_heads=cfg.proxy.num_kv_heads,
        d_ff=cfg.proxy.d_ff,
        max_seq_len=64,
        folder=root / "teacher_tok",
    )
    teacher.save(str(root / "teacher"))
    return teacher


def build_run(run_dir: pathlib.Path, top_logprobs: int = 0, samples_per_prompt: int = 0):
    """(cfg, teacher): teacher folder, sampled corpus, prepared data and the proxy init folder.

    With `top_logprobs` > 0 every response carries the teacher's top log-probs (one line per sample);
    `samples_per_prompt` > 0 replaces the tiny config's 3 responses per prompt.
    """
    from stage_helpers import run_stage

    cfg = tiny_config(run_dir)
    if samples_per_prompt:
        with cfg.unlocked():
            cfg.demo.samples_per_prompt = samples_per_prompt
    run_dir.mkdir(parents=True, exist_ok=True)
    teacher = tiny_teacher(cfg, run_dir, VOCAB)
    prompts = teacher.make_prompts(cfg.demo.num_prompts, np.random.default_rng(0), min_words=3, max_words=8)
    responses = teacher.sample(prompts, cfg.demo.samples_per_prompt, cfg.demo.max_new_tokens, seed=1)
    corpus = run_dir / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i, (p, rs) in enumerate(zip(prompts, responses)):
            rs = [r for r in rs if r.strip()]
            if rs and top_logprobs:
                for j, r in enumerate(rs):
                    row = {"id": f"p{i}", "prompt": p, "response": r, "sample_index": j}
                    f.write(json.dumps(row | _top_logprobs(teacher, p, r, top_logprobs)) + "\n")
            elif rs:
                f.write(json.dumps({"id": f"p{i}", "prompt": p, "responses": rs}) + "\n")
    benchmark.perturbed_proxy(teacher, run_dir / "proxy_init", 0.15, 5)
    with cfg.unlocked():
        cfg.data.corpus = str(corpus)
        cfg.data.tokenizer = str(run_dir / "proxy_init")
        cfg.proxy.init_from = str(run_dir / "proxy_init")
        cfg.eval.known_teacher = str(run_dir / "teacher")
    run_stage("prepare", cfg)
    return cfg, teacher
