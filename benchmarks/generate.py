"""Sampling (`models.sampling.generate`): top_p = 1 and nucleus sampling, against sorting the vocabulary every step.

Until 2026-12-08 every call sorted each row's logits at every step, top_p = 1 included (the default of `align`'s
round sampling and of `serve`). Now a call in which no row asks for the nucleus skips it, and the nucleus is looked
for among each row's 256 likeliest tokens first; the vocabulary is sorted only where those strictly likelier than
the 256th hold less than top_p of a row's mass (`sampling._nucleus`).

The d64, 2-layer model of `benchmarks/posterior_stage.py` with a `--vocab` vocabulary and its output layer scaled so
that its logits have a standard deviation of 5 (about 2.5 nats of entropy over 32,000 tokens, the 256 likeliest
holding about 98% of the mass, as a trained model's peaked distributions), `--rows` prompts of 20-128 tokens,
`--new` tokens each (no stop token), temperature 1, one call per variant in turn (`--repeats` rounds after a
warm-up one):

  - top_p 1: no nucleus;
  - top_p 0.9: the nucleus among the 256 likeliest tokens;
  - top_p 0.9999: a nucleus past the 256 likeliest tokens, so the vocabulary is sorted, as every call did before.

  .venv/bin/python benchmarks/generate.py [--vocab 32000] [--rows 16] [--new 64] [--repeats 3]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from _common import print_table, round_robin_medians
from flax import nnx

from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.sampling import generate


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new", type=int, default=64, help="max_new_tokens")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = ModelConfig(
        vocab_size=args.vocab, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128,
        max_seq_len=2048,
    )  # fmt: skip
    model = Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, args.vocab, (args.rows, 128)).astype(np.int32)
    lengths = rng.integers(20, 129, args.rows).astype(np.int32)
    logits = model.hidden(prompts, None, np.ones_like(prompts)) @ model.unembedding()
    model.lm_head[...] = model.lm_head[...] * (5.0 / float(np.std(np.asarray(logits))))
    variants = {
        "top_p 1 (no nucleus)": 1.0,
        "top_p 0.9 (among the 256 likeliest)": 0.9,
        "top_p 0.9999 (the vocabulary sorted, as before)": 0.9999,
    }

    def call(top_p):
        top_p = np.full(args.rows, top_p, np.float32)  # (an array: one compiled program for every value)
        out = generate(model, prompts, lengths, jax.random.key(0), max_new_tokens=args.new, top_p=top_p)
        return out.tokens_BxT

    seconds = round_robin_medians({k: (lambda p=p: call(p)) for k, p in variants.items()}, args.repeats)
    tokens = args.rows * args.new
    print(f"generate: d64 2-layer model, {args.vocab:,}-token vocabulary, {args.rows} rows x {args.new} new tokens, "
          f"median of {args.repeats} calls")  # fmt: skip
    first = next(iter(seconds.values()))
    rows = [[label, s, tokens / s, s / first] for label, s in seconds.items()]
    print_table(rows, ["top_p", "s per call", "tokens/s", "/ top_p 1"])


if __name__ == "__main__":
    main()
