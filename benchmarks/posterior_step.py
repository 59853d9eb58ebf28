"""The posterior stage's two per-batch steps with the proxy's logits in tiles against the whole batch's logits.

Pass 1 (`estimate.target_logprobs`: the proxy's log-prob of each target) and pass 2 (`estimate.make_posterior_step`:
the proxy forward and the posterior kernel, mode expected) on one batch of `--rows` rows of `--seq` tokens, with
`posterior.chunk_tokens` = `--chunk` (tiles of about that many tokens) and 0 (the whole batch's [rows*seq, V] logits
at once, the stage before tiles). Each pair runs round-robin in one process (`round_robin_medians`), and the table
gives the median time per batch, tokens/s, the minor page faults and system CPU seconds per call, and tiled / whole.

  .venv/bin/python benchmarks/posterior_step.py [--vocabs 32000,128256] [--rows 32] [--seq 256] [--d-model 64]
"""

from __future__ import annotations

import argparse
import functools
import resource

import jax
import ml_collections
import numpy as np
from _common import print_table, round_robin_medians
from flax import nnx

from proxykd_jax import parallel
from proxykd_jax.bayes import SparsePrior, estimate
from proxykd_jax.models.llama import Llama, ModelConfig


def _inputs(rows: int, seq: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, s1, s2 = rows * seq, 16, 128  # the prior's defaults: exact_top_s 16, ngram_top_s 32 x order 4
    batch = {
        "tokens": rng.integers(0, vocab, (rows, seq), dtype=np.int32),
        "targets": rng.integers(0, vocab, (rows, seq), dtype=np.int32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
        "segment_ids": np.ones((rows, seq), np.int32),
    }
    ng = rng.random((n, s2)).astype(np.float32)
    prior = SparsePrior(
        rng.integers(0, vocab, (n, s1)).astype(np.int32),
        rng.integers(0, 4, (n, s1)).astype(np.float32),
        rng.integers(0, vocab, (n, s2)).astype(np.int32),
        (0.8 * ng / ng.sum(1, keepdims=True)).astype(np.float32),
        np.full((n,), 0.2, np.float32),
    )
    base = rng.random(vocab).astype(np.float32)
    return batch, prior, base / base.sum(), np.full((n,), 10.0, np.float32)


def _per_call(fn, reps: int) -> tuple[float, float]:
    """Minor page faults and system CPU seconds per call of `fn`."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(reps):
        jax.block_until_ready(fn())
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (after.ru_minflt - before.ru_minflt) / reps, (after.ru_stime - before.ru_stime) / reps


def _calls(graphdef, state, inputs, chunks, k: int, mesh, rules) -> dict:
    """(pass, chunk_tokens) -> a call of that step on `inputs` (batch, prior, base, n_pseudo)."""
    batch, prior, base, n_pseudo = inputs
    score = jax.jit(estimate.target_logprobs, static_argnums=(0, 3, 4))
    calls = {}
    for chunk in chunks:
        pcfg = ml_collections.ConfigDict(
            {"mode": "expected", "num_samples": 64, "beta": 1.0, "chunk_tokens": chunk, "kernel": "xla"}
        )
        step = estimate.make_posterior_step(graphdef, pcfg, k=k, mesh=mesh, rules=rules)
        calls["pass 1", chunk] = functools.partial(score, graphdef, state, batch, 0, chunk)
        calls["pass 2", chunk] = functools.partial(
            step, state, batch, prior, base, n_pseudo, np.float32(2.0), None, None, None
        )
    return calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", default="32000,128256")
    ap.add_argument("--rows", type=int, default=32, help="posterior.batch_size")
    ap.add_argument("--seq", type=int, default=256, help="data.seq_len")
    ap.add_argument("--d-model", type=int, default=64, help="the proxy's width (2 layers)")
    ap.add_argument("--chunk", type=int, default=1024, help="posterior.chunk_tokens of the tiled rows")
    ap.add_argument("--k", type=int, default=32, help="data.store.k")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    mesh = parallel.make_mesh(
        ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": 1, "tensor": 1}}), jax.devices()[:1]
    )
    rules = parallel.LOGICAL_RULES
    print(
        f"device: {jax.devices()[0].device_kind}; batch {args.rows} x {args.seq} tokens, proxy d_model "
        f"{args.d_model} x 2 layers, k {args.k}, chunk_tokens {args.chunk} vs 0 (whole)"
    )
    table = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        d = args.d_model
        cfg = ModelConfig(
            vocab_size=vocab, d_model=d, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=d // 4, d_ff=2 * d,
            max_seq_len=args.seq,
        )  # fmt: skip
        graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
        calls = _calls(graphdef, state, _inputs(args.rows, args.seq, vocab), (args.chunk, 0), args.k, mesh, rules)
        medians = round_robin_medians(calls, args.reps)
        tokens = args.rows * args.seq
        for name in ("pass 1", "pass 2"):
            row = [vocab, name]
            for chunk in (args.chunk, 0):
                faults, sys_s = _per_call(calls[name, chunk], 2)
                row += [medians[name, chunk] * 1e3, tokens / medians[name, chunk], faults, sys_s]
            row.append(medians[name, 0] / medians[name, args.chunk])
            table.append(row)
    print_table(
        table,
        ["vocab", "step", "tiled ms", "tiled tok/s", "tiled faults", "tiled sys s", "whole ms", "whole tok/s",
         "whole faults", "whole sys s", "whole / tiled"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
