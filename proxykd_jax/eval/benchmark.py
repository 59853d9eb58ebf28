"""The known-teacher benchmark's setup: a "black-box" teacher whose true distributions the evaluator
knows, the prompts sent to it, and an open proxy related to it.

The teacher is a tiny Llama built from a seed (`teacher.known`); the pipeline only ever sees the
text it samples (served over HTTP by the demo). The proxy is the teacher's architecture with
perturbed weights, a stand-in for "an open model of a related family"; the student is smaller.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from flax import nnx

from proxykd_jax.eval.config import CHAR_TEACHER_VOCAB
from proxykd_jax.eval.config import demo_config as default_config  # noqa: F401  (re-exported)
from proxykd_jax.eval.folders import save_atomic, saved_teacher
from proxykd_jax.models import hf


def make_teacher(demo_cfg, proxy_cfg, folder: pathlib.Path):
    """The known teacher (`demo` group; shape shared with the `proxy` group), saved to `folder`."""
    d = demo_cfg
    mode = d.get("teacher_tokenizer", "same")
    if mode not in ("same", "char"):
        raise ValueError(f"demo.teacher_tokenizer={mode!r} is not one of ('same', 'char').")
    kw = {"vocab_size": proxy_cfg.vocab_size}
    if mode == "char":
        if proxy_cfg.vocab_size < 260:
            raise ValueError(
                f"demo.teacher_tokenizer=char gives the student a byte-level BPE: proxy.vocab_size and "
                f"model.vocab_size must be at least 260, got {proxy_cfg.vocab_size}."
            )
        kw = {"vocab_size": CHAR_TEACHER_VOCAB, "tokenizer": "char"}
    return saved_teacher(
        d.teacher_seed,
        folder,
        d_model=d.teacher_d_model,
        num_layers=d.teacher_num_layers,
        proxy_cfg=proxy_cfg,
        target_entropy=d.teacher_entropy,
        **kw,
    )


def write_prompts(teacher, path: pathlib.Path, n: int, seed: int) -> None:
    """`n` prompts for the teacher as a prompts JSONL (kept when it exists)."""
    if path.exists():
        return
    prompts = teacher.make_prompts(n, np.random.default_rng(seed))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"id": f"p{i:05d}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    tmp.rename(path)


def perturbed_proxy(teacher, folder: pathlib.Path, noise: float, seed: int) -> None:
    """The open proxy: the teacher's weights with multiplicative Gaussian noise, as an HF folder.

    Multiplicative noise keeps the teacher's structure (blocked special tokens stay blocked) while
    moving every distribution: at 0.15 the proxy starts about 1.5 nats of KL from the teacher.
    """
    if (folder / "config.json").exists():  # a folder that exists is complete: saved atomically
        return
    graphdef, state = nnx.split(teacher.model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x * (1 + noise * jax.random.normal(k, x.shape, x.dtype)) for x, k in zip(leaves, keys)]
    proxy = nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))
    save_atomic(lambda tmp: hf.save_hf(proxy, teacher.model_config, str(tmp), tokenizer=teacher.tokenizer), folder)


def teacher_probs_fn(teacher):
    """probs(tokens_BxL, segment_ids_BxL) -> the teacher's next-token distributions [B, L, V]."""

    def probs(tokens_BxL, segment_ids_BxL):
        return teacher.distributions(np.asarray(tokens_BxL), np.asarray((np.asarray(segment_ids_BxL) > 0).sum(1)))

    return probs


def build(demo_cfg, proxy_cfg, folder: pathlib.Path, seed: int):
    """Teacher (`folder/teacher`), prompts (`folder/prompts.jsonl`), proxy init (`folder/proxy_init`).

    With demo.teacher_tokenizer = "char" the teacher is character-level; the proxy is then a random
    model over a byte-level BPE trained on the teacher's text (it cannot share the teacher's weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    if demo_cfg.get("teacher_tokenizer", "same") == "char":
        from proxykd_jax.eval import per_byte

        teacher = make_teacher(demo_cfg, proxy_cfg, folder / "teacher")
        write_prompts(teacher, folder / "prompts.jsonl", demo_cfg.num_prompts, seed)
        texts = min(256, int(demo_cfg.num_prompts))
        tok = per_byte.bpe_from_teacher(teacher, folder / "bpe", int(proxy_cfg.vocab_size), texts=texts, seed=seed)
        per_byte.random_proxy(tok, proxy_cfg, folder / "proxy_init", seed + 1)
        return teacher
    teacher = make_teacher(demo_cfg, proxy_cfg, folder / "teacher")
    write_prompts(teacher, folder / "prompts.jsonl", demo_cfg.num_prompts, seed)
    perturbed_proxy(teacher, folder / "proxy_init", demo_cfg.proxy_noise, seed + 1)
    return teacher


def demo_settings(cfg, folder) -> None:
    """Sets on `cfg` (in place) what `proxykd demo` runs its stages with: its built-in teacher's prompts, the
    collect request, the proxy init and tokenizer, and the known teacher, all under `folder` (the run's demo/)."""
    folder = pathlib.Path(folder)
    with cfg.unlocked():
        cfg.collect.prompts = str(folder / "prompts.jsonl")
        cfg.collect.model = "known-teacher"
        cfg.collect.api = "completions"
        cfg.collect.samples_per_prompt = cfg.demo.samples_per_prompt
        cfg.collect.max_tokens = cfg.demo.max_new_tokens
        cfg.data.tokenizer = str(folder / "proxy_init")
        cfg.proxy.init_from = str(folder / "proxy_init")
        cfg.eval.known_teacher = str(folder / "teacher")
        if cfg.demo.teacher_tokenizer == "char":  # the teacher's own tokens: its top log-probs are the point
            cfg.collect.top_logprobs = 20
