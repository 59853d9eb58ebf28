"""Posterior kernel throughput vs the memory-bandwidth floor of reading the proxy's logits once.

For each vocabulary size it times, on the default device:
  floor    — jnp.sum over the float32 logits [N, V] (one read of the array: the bandwidth floor);
  lse      — one logsumexp over the logits (the least any normalised estimate must compute: one
             exp per logit; on CPU this, not memory bandwidth, bounds the kernel);
  proxy    — softmax + top-k of the proxy alone (what any top-k store would pay);
  kernel   — the posterior combination (`posterior_topk`, mode expected, k = 64), all jitted, with
             the token axis in blocks of `chunk` tokens (0: all at once);
and prints tokens/s and kernel time as a fraction of the floor (floor / kernel, higher is better).

  .venv/bin/python benchmarks/posterior.py [--tokens 512] [--vocabs 32768,131072] [--k 64] [--chunks 0,64]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from proxykd_jax.bayes import SparsePrior, posterior_topk


def _time(fn, *args, reps):
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def case(n, v, s=16, s2=96, seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(n, v)).astype(np.float32) * 3)
    ng = rng.random((n, s2)).astype(np.float32)
    prior = SparsePrior(
        jnp.asarray(rng.integers(0, v, (n, s)), jnp.int32),
        jnp.asarray(rng.integers(0, 4, (n, s)), jnp.float32),
        jnp.asarray(rng.integers(0, v, (n, s2)), jnp.int32),
        jnp.asarray(0.8 * ng / ng.sum(1, keepdims=True)),
        jnp.full((n,), 0.2, jnp.float32),
    )
    base = rng.random(v).astype(np.float32)
    return logits, prior, jnp.asarray(base / base.sum()), jnp.full((n,), 10.0, jnp.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--vocabs", default="32768,131072")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunks", default="0,64", help="tokens per kernel block (0: all), one row each")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(
        f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}, tokens {args.tokens}, "
        f"k {args.k}, exact S=16, n-gram S2=96"
    )
    print(
        f"{'vocab':>7} {'chunk':>6} {'floor ms':>9} {'lse ms':>8} {'proxy ms':>9} {'kernel ms':>10} "
        f"{'kernel tok/s':>13} {'GB/s floor':>11} {'floor/lse':>10} {'floor/kernel':>13}"
    )
    floor_fn = jax.jit(lambda x: jnp.sum(x))
    proxy_fn = jax.jit(lambda x: jax.lax.top_k(jax.nn.softmax(x, axis=-1), args.k))
    lse_fn = jax.jit(lambda x: jax.nn.logsumexp(x, axis=-1))
    for v in (int(x) for x in args.vocabs.split(",")):
        logits, prior, base, npn = case(args.tokens, v)
        for chunk in (int(c) for c in args.chunks.split(",")):
            kernel_fn = jax.jit(lambda lg, pr, b, npn, c=chunk: posterior_topk(lg, pr, b, npn, 1.0, k=args.k, chunk=c))
            t_floor = _time(floor_fn, logits, reps=args.reps)
            t_lse = _time(lse_fn, logits, reps=args.reps)
            t_proxy = _time(proxy_fn, logits, reps=args.reps)
            t_kernel = _time(kernel_fn, logits, prior, base, npn, reps=args.reps)
            gbs = logits.size * 4 / t_floor / 1e9
            print(
                f"{v:>7} {chunk:>6} {t_floor * 1e3:>9.2f} {t_lse * 1e3:>8.2f} {t_proxy * 1e3:>9.2f} "
                f"{t_kernel * 1e3:>10.2f} {args.tokens / t_kernel:>13.0f} {gbs:>11.1f} "
                f"{t_floor / t_lse:>10.1%} {t_floor / t_kernel:>13.1%}"
            )


if __name__ == "__main__":
    main()
