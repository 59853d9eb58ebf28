"""Loss + gradient time and compiled temporary memory: token-chunked vs dense, CE alone vs CE + sparse KD.

    .venv/bin/python benchmarks/kd_loss.py [--tokens 2048] [--d-model 256] [--vocab 8192 32768]
                                           [--topk 64] [--chunk 256] [--reps 5]

Each row times jit(value_and_grad) of the per-token objective w.r.t. the hidden states and the
unembedding and reports XLA's temp_size_in_bytes for the compiled function. The KD target is a random
top-K posterior with tail. The two "DPO log-probs" rows are `sequence_logprobs` (the tokens as rows of
256, a signed weight per row, as DPO's cotangent) against its dense reference. Per vocabulary size all
rows are compiled first, then timed round-robin (one call of each per round, median over --reps
rounds after one warm-up round) so that load from other processes hits them alike; the "KD / CE"
line compares the two fused rows within the same rounds.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from proxykd_jax import losses as L


def _inputs(n, d, v, k, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    hidden = jax.random.normal(keys[0], (n, d))
    w = jax.random.normal(keys[1], (d, v)) / d**0.5
    targets = jax.random.randint(keys[2], (n,), 0, v)
    lps, ids = jax.lax.top_k(jax.nn.log_softmax(3.0 * jax.random.normal(keys[3], (n, v))), k)
    tail = jnp.maximum(1.0 - jnp.sum(jnp.exp(lps), -1), 0.0)
    return hidden, w, targets, ids, lps, tail, jnp.ones((n,)), jnp.ones((n,))


def _objectives(chunk):
    """name -> objective(hidden, w, targets, ids, lps, tail, mask, weight)."""

    def ce(fn):
        return lambda h, w, t, i, lp, tl, m, wt: L.kd_objective(*fn(h, w, t, m), 0.0, alpha=0.0)

    def kd(fn):
        return lambda *a: L.kd_objective(*fn(*a), alpha=100.0)

    def fused_kd(*a):
        loss_sum, _, _, n_tokens = L.sparse_kd_objective(*a, alpha=100.0, chunk_size=chunk)
        return loss_sum / jnp.maximum(n_tokens, 1.0)

    def dpo(fn):
        def objective(h, w, t, i, lp, tl, m, wt):
            rows = h.shape[0] // _ROW
            logp = fn(h.reshape(rows, _ROW, -1), w, t.reshape(rows, _ROW), m.reshape(rows, _ROW))
            return jnp.sum(logp * jnp.where(jnp.arange(rows) % 2 == 0, 1.0, -0.5))

        return objective

    ce_dense = lambda h, w, t, m: L.cross_entropy(jnp.dot(h, w), t, m)  # noqa: E731
    return {
        "CE dense": ce(ce_dense),
        "CE chunked fused": ce(functools.partial(L.cross_entropy_chunked, chunk_size=chunk)),
        "CE+KD dense": kd(L.sparse_kd_loss_dense),
        "CE+KD chunked remat": kd(functools.partial(L.sparse_kd_loss, chunk_size=chunk)),
        "CE+KD chunked fused": fused_kd,
        "DPO log-probs dense": dpo(L.sequence_logprobs_dense),
        "DPO log-probs remat": dpo(functools.partial(L.sequence_logprobs, chunk_size=chunk)),
    }


_ROW = 256  # tokens per row of the DPO log-prob rows


def _compile(objective, args):
    compiled = jax.jit(jax.value_and_grad(objective, argnums=(0, 1))).lower(*args).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def _round_robin(compiled: dict, args, reps: int) -> dict:
    """name -> median seconds, one call of each per round (a warm-up round first)."""
    times = {name: [] for name in compiled}
    for r in range(reps + 1):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if args.tokens % _ROW:
        parser.error(f"--tokens must be a multiple of {_ROW} (the DPO rows' length)")
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), N={args.tokens}, "
        f"D={args.d_model}, K={args.topk}, chunk={args.chunk}, median of {args.reps} round-robin rounds"
    )
    header = f"{'V':>7} | {'loss':<19} | {'loss+grad ms':>12} | {'temp MiB':>9} | {'[N,V] f32 MiB':>13}"
    print(header)
    print("-" * len(header))
    for vocab in args.vocab:
        inputs = _inputs(args.tokens, args.d_model, vocab, args.topk)
        logits_mib = args.tokens * vocab * 4 / 2**20
        built = {name: _compile(objective, inputs) for name, objective in _objectives(args.chunk).items()}
        seconds = _round_robin({name: fn for name, (fn, _) in built.items()}, inputs, args.reps)
        for name, (_, temp) in built.items():
            print(
                f"{vocab:>7} | {name:<19} | {seconds[name] * 1e3:>12.1f} | {temp / 2**20:>9.1f} | {logits_mib:>13.1f}",
                flush=True,
            )
        ratio = seconds["CE+KD chunked fused"] / seconds["CE chunked fused"] - 1
        print(f"{vocab:>7} | KD / CE (fused)     | {ratio:>+12.1%} |", flush=True)


if __name__ == "__main__":
    main()
