"""Shared helpers for the data tests (no tests here): a tiny BPE tokenizer, corpora, configs."""

import json
import math
import pathlib
import random

from proxykd_jax.data import default_config
from proxykd_jax.models.tokenizer import build_bpe_tokenizer, load_tokenizer

WORDS = (
    "the quick brown fox jumps over lazy dog cat sat on mat and ran far away under a bright "
    "blue sky while birds sang songs of summer rain"
).split()


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_tokenizer(folder, vocab_size: int = 320):
    """A byte-level BPE trained on the word list, saved and loaded back with AutoTokenizer."""
    rng = random.Random(0)
    texts = [sentence(rng, 12) for _ in range(300)]
    build_bpe_tokenizer(texts, vocab_size, folder)
    return load_tokenizer(folder)


def teacher_logprobs(tokenizer, text: str, rng: random.Random, n_alts: int = 3):
    """(tokens, top_logprobs) like an API returns: the teacher splits text into words and spaces."""
    pieces, word = [], ""
    for ch in text:  # teacher tokens: " word" chunks, a different tokenisation from our BPE
        if ch == " " and word:
            pieces.append(word)
            word = ""
        word += ch
    pieces.append(word)
    top = []
    for p in pieces:
        alts = [p] + [" " + rng.choice(WORDS) for _ in range(n_alts - 1)]
        alts = list(dict.fromkeys(alts))
        probs = [rng.uniform(0.05, 0.5) for _ in alts]
        scale = min(1.0, 0.99 / sum(probs))  # one distribution's top alternatives: they sum to less than 1
        lps = sorted((math.log(q * scale) for q in probs), reverse=True)
        top.append([{"token": a, "logprob": lp} for a, lp in zip(alts, lps)])
    return pieces, top


def make_rows(
    n_prompts: int, *, responses: int = 2, seed: int = 0, logprobs: bool = False, tokenizer=None, words=(3, 8)
):
    rng = random.Random(seed)
    rows = []
    for i in range(n_prompts):
        resp = [sentence(rng, rng.randint(*words)) for _ in range(responses)]
        row = {
            "id": f"p{seed}-{i}",
            "prompt": sentence(rng, rng.randint(2, 6)),
            "responses": resp,
            "meta": {"teacher_model": "tiny", "temperature": 1.0},
        }
        if logprobs:
            pairs = [teacher_logprobs(tokenizer, r, rng) for r in resp]
            row["tokens"] = [p[0] for p in pairs]
            row["top_logprobs"] = [p[1] for p in pairs]
        rows.append(row)
    return rows


def write_jsonl(path, rows, extra_lines=()):
    path = pathlib.Path(path)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def tiny_cfg(**overrides):
    cd = default_config()
    cd.seq_len = 64
    cd.batch_size = 4
    cd.prepare_buffer_mb = 0.01
    cd.records_per_file = 40
    cd.store.k = 8
    for key, value in overrides.items():
        target = cd
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return cd
