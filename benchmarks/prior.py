"""Prior table build time and memory vs corpus size (one CPU core, numpy).

A synthetic corpus: prompts with several responses that share a random-length prefix (so the
per-prompt tries are informative) and Zipf-distributed tokens over the vocabulary (so n-gram
contexts repeat). For each size it prints the streaming build time, the peak traced memory of the
build, the finished tables' size, and the query rate (positions/s, include_self mode).

  .venv/bin/python benchmarks/prior.py [--sizes 0.1,1,10] [--vocab 32000] [--order 4]
"""

import argparse
import time
import tracemalloc

import numpy as np

from proxykd_jax.bayes import PriorBuilder


def corpus(num_tokens, vocab, *, per_prompt=4, length=128, seed=0):
    """Yields (prompt_keys, sequences) batches of about 64k tokens."""
    rng = np.random.default_rng(seed)
    n_resp = max(num_tokens // length, per_prompt)
    batch = max(512 // per_prompt, 1) * per_prompt
    for start in range(0, n_resp, batch):
        b = min(batch, n_resp - start)
        n_prompts = -(-b // per_prompt)
        toks = np.minimum(rng.zipf(1.3, size=(b, length)) - 1, vocab - 1)
        shared = np.repeat(np.minimum(rng.zipf(1.3, size=(n_prompts, length)) - 1, vocab - 1), per_prompt, 0)[:b]
        split = rng.integers(0, length, b)
        toks = np.where(np.arange(length)[None, :] < split[:, None], shared, toks)
        keys = np.repeat(np.arange(start, start + n_prompts * per_prompt, per_prompt), per_prompt)[:b]
        yield keys.astype(np.int64), list(toks.astype(np.int32))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1,1,10", help="corpus sizes in millions of tokens")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--order", type=int, default=4)
    args = ap.parse_args()
    print(f"vocab {args.vocab}, order {args.order}, 4 responses/prompt, 128 tokens/response")
    print(
        f"{'tokens':>10} {'build s':>8} {'tok/s':>10} {'peak MB':>8} {'tables MB':>10} "
        f"{'B/token':>8} {'query pos/s':>12}"
    )
    for size in (float(x) for x in args.sizes.split(",")):
        n = int(size * 1e6)
        batches = list(corpus(n, args.vocab))
        tracemalloc.start()
        t0 = time.perf_counter()
        b = PriorBuilder(vocab_size=args.vocab, order=args.order)
        for keys, seqs in batches:
            b.add(keys, seqs)
        tables = b.finalize()
        t_build = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        q_keys, q_seqs = batches[0]
        t0 = time.perf_counter()
        tables.query(q_keys, q_seqs)
        t_query = time.perf_counter() - t0
        q_n = sum(len(s) for s in q_seqs)
        print(
            f"{tables.num_tokens:>10} {t_build:>8.1f} {tables.num_tokens / t_build:>10.0f} "
            f"{peak / 2**20:>8.0f} {tables.nbytes / 2**20:>10.1f} "
            f"{tables.nbytes / tables.num_tokens:>8.1f} {q_n / t_query:>12.0f}"
        )


if __name__ == "__main__":
    main()
