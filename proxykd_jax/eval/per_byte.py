"""Tokenizer-free scores and the character-teacher setup (docs/TOKENIZERS.md).

Models with different tokenizers are compared in nats per byte of text: a model's negative
log-likelihood of a held-out response (its end included: our eos token, the teacher's <eos>)
divided by the response's UTF-8 bytes. For the student's own text the judge is the teacher: its
log-likelihood per byte of the student's generations.

The setup half builds the known teacher with its own tokenizer: a character-level `KnownTeacher`,
a byte-level BPE student tokenizer trained on the teacher's text, and a randomly initialised proxy
over that tokenizer (a proxy cannot share weights with a teacher over other tokens).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from flax import nnx

from proxykd_jax.data import byte_head
from proxykd_jax.eval.metrics import _mask
from proxykd_jax.parallel import hosts


def token_byte_lengths(tokenizer, vocab_size: int | None = None) -> np.ndarray:
    """float64 [V]: UTF-8 bytes each of our tokens adds to the text (specials: 0)."""
    table = byte_head.token_bytes(tokenizer)
    out = np.zeros(vocab_size or len(table), np.float64)
    for i, b in enumerate(table[: len(out)]):
        out[i] = len(b) if b else 0
    return out


def heldout_nats_per_byte(models: dict, batches: list, byte_lengths_V: np.ndarray, scorer) -> dict:
    """{name: nats per byte} of each model's NLL of the response targets (eos included) over `batches`."""
    out = {}
    for name, model in models.items():
        sums = {"nll": 0.0, "bytes": 0.0}
        for batch in batches:
            picked, _ = scorer(model, batch, full=False)
            mask = _mask(batch)
            sums["nll"] -= float(np.sum(picked * mask))
            sums["bytes"] += float(np.sum(byte_lengths_V[np.asarray(batch["targets"])] * mask))
        sums = hosts.allsum(sums)
        out[name] = sums["nll"] / max(sums["bytes"], 1.0)
    return out


def generation_nats_per_byte(
    students: dict, prompts: list[str], teacher, tokenizer, *, max_new_tokens: int, seed: int
) -> dict:
    """{name: -(teacher log-likelihood of the student's answers, their end included) / their bytes}.

    Each student answers `prompts` (tokenised with our `tokenizer`) by sampling at temperature 1;
    the teacher scores the decoded text with its own tokenizer (`teacher.text_logprob`)."""
    from proxykd_jax.models.sampling import generate

    if not prompts:
        return {}
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(r) for r in ids)
    tokens = np.zeros((len(ids), width), np.int32)
    for i, r in enumerate(ids):
        tokens[i, : len(r)] = r
    lengths = np.asarray([len(r) for r in ids], np.int32)
    eos = tokenizer.eos_token_id
    specials = tuple(i for i in getattr(tokenizer, "all_special_ids", ()) if i != eos)
    out = {}
    for name, model in students.items():
        gen = generate(
            model,
            tokens,
            lengths,
            jax.random.key(seed),
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            stop_tokens=(eos,),
            suppress_tokens=specials,
        )
        g, glen = hosts.to_host(gen.tokens_BxT), hosts.to_host(gen.lengths_B)
        texts = [tokenizer.decode([t for t in g[i, : glen[i]].tolist() if t != eos]) for i in range(len(ids))]
        ll, nbytes = teacher.text_logprob(prompts, texts)
        out[name] = float(-ll.sum() / max(nbytes.sum(), 1))
    return out


def teacher_nats_per_byte(teacher, prompts: list[str], responses: list[str]) -> float:
    """The teacher's own nats per byte of held-out text (the floor every model is measured against)."""
    ll, nbytes = teacher.text_logprob(prompts, responses)
    return float(-ll.sum() / max(nbytes.sum(), 1))


# ---------------------------------------------------------------------------------------------
# The character teacher's setup.


def top_logprob_fields(teacher, prompt: str, response: str, n: int) -> dict:
    """OpenAI-style `tokens` + `top_logprobs` (with `bytes`) of a response from the teacher's true
    distributions, exactly what its HTTP server sends; the final <eos> has no entry (as an API)."""
    p_ids, r_ids = teacher.encode(prompt), teacher.encode(response)
    q = teacher.distributions([p_ids + r_ids])[0]
    pieces, top = [], []
    for t, tok in enumerate(r_ids):
        dist = q[len(p_ids) + t - 1]
        pieces.append(teacher.tokenizer.decode([tok]))
        best = np.argsort(-dist)[:n]
        alts = []
        for i in best:
            text = teacher.tokenizer.decode([int(i)], skip_special_tokens=False)
            alts.append({"token": text, "logprob": float(np.log(max(dist[i], 1e-30))), "bytes": list(text.encode())})
        top.append(alts)
    return {"tokens": pieces, "top_logprobs": top}


def char_teacher(seed: int, folder: pathlib.Path, *, vocab_size: int, d_model: int, num_layers: int, proxy_cfg, **kw):
    """A character-level known teacher, saved to `folder` (loaded when it exists)."""
    from proxykd_jax.teacher.known import KnownTeacher

    if (folder / "config.json").exists():
        return KnownTeacher.load(str(folder), seed=seed)
    teacher = KnownTeacher.create(
        seed,
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=proxy_cfg.num_heads,
        num_kv_heads=proxy_cfg.num_kv_heads,
        d_ff=proxy_cfg.d_ff,
        max_seq_len=proxy_cfg.max_seq_len,
        folder=folder / "tokenizer_build",
        tokenizer="char",
        **kw,
    )
    teacher.save(str(folder))
    return teacher


def bpe_from_teacher(teacher, folder: pathlib.Path, vocab_size: int, *, texts: int = 256, seed: int = 0):
    """Our tokenizer: a byte-level BPE trained on `texts` prompts and answers of the teacher (saved)."""
    from proxykd_jax.models.tokenizer import build_bpe_tokenizer, load_tokenizer

    if (folder / "tokenizer.json").exists():
        return load_tokenizer(folder)
    prompts = teacher.make_prompts(texts, np.random.default_rng(seed + 17))
    answers = [a for group in teacher.sample(prompts, 1, 48, seed=seed + 17) for a in group]
    build_bpe_tokenizer(prompts + answers, vocab_size, folder)
    return load_tokenizer(folder)


def random_proxy(tokenizer, proxy_cfg, folder: pathlib.Path, seed: int) -> None:
    """A randomly initialised proxy (the `proxy` group's shape) over `tokenizer`, as an HF folder."""
    from proxykd_jax.models import hf
    from proxykd_jax.models.llama import Llama, ModelConfig

    if (folder / "config.json").exists():
        return
    cfg = ModelConfig(
        vocab_size=int(proxy_cfg.vocab_size),
        d_model=int(proxy_cfg.d_model),
        num_layers=int(proxy_cfg.num_layers),
        num_heads=int(proxy_cfg.num_heads),
        num_kv_heads=int(proxy_cfg.num_kv_heads),
        head_dim=int(proxy_cfg.head_dim),
        d_ff=int(proxy_cfg.d_ff),
        max_seq_len=int(proxy_cfg.max_seq_len),
    )
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"proxy.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens.")
    hf.save_hf(Llama(cfg, rngs=nnx.Rngs(seed)), cfg, str(folder), tokenizer=tokenizer)


def write_corpus(
    teacher, prompts: list[str], path: pathlib.Path, *, samples: int, max_new_tokens: int, top: int, seed: int
):
    """The teacher's answers with their top log-probs as a corpus JSONL (one line per sample), as
    `collect` writes it from the HTTP server (the benchmarks' shortcut; tests cover the HTTP path)."""
    answers = teacher.sample(prompts, samples, max_new_tokens, seed=seed)
    with open(path, "w") as f:
        for i, (p, group) in enumerate(zip(prompts, answers)):
            for j, a in enumerate(x for x in group if x.strip()):
                row = {"id": f"p{i:05d}", "prompt": p, "response": a, "sample_index": j}
                f.write(json.dumps(row | top_logprob_fields(teacher, p, a, top)) + "\n")
