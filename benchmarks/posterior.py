"""Posterior kernel throughput vs the memory-bandwidth floor of reading the proxy's logits once.

For each vocabulary size it times, on the default device:
  floor    — jnp.sum over the float32 logits [N, V] (one read of the array: the bandwidth floor);
  proxy    — softmax + top-k of the proxy alone (what any top-k store would pay);
  kernel   — the posterior combination (`posterior_topk`, mode expected, k = 64), all jitted;
and prints tokens/s and kernel time as a fraction of the floor (floor / kernel, higher is better).

  .venv/bin/python benchmarks/posterior.py [--tokens 512] [--vocabs 32768,131072] [--k 64]
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
  prior = SparsePrior(jnp.asarray(rng.integers(0, v, (n, s)), jnp.int32),
                      jnp.asarray(rng.integers(0, 4, (n, s)), jnp.float32),
                      jnp.asarray(rng.integers(0, v, (n, s2)), jnp.int32),
                      jnp.asarray(0.8 * ng / ng.sum(1, keepdims=True)),
                      jnp.full((n,), 0.2, jnp.float32))
  base = rng.random(v).astype(np.float32)
  return logits, prior, jnp.asarray(base / base.sum()), jnp.full((n,), 10.0, jnp.float32)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=512)
  ap.add_argument("--vocabs", default="32768,131072")
  ap.add_argument("--k", type=int, default=64)
  ap.add_argument("--chunk", type=int, default=0, help="tokens per kernel block (0: all)")
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}, tokens {args.tokens}, "
        f"k {args.k}, exact S=16, n-gram S2=96")
  print(f"{'vocab':>7} {'floor ms':>9} {'proxy ms':>9} {'kernel ms':>10} {'kernel tok/s':>13} "
        f"{'GB/s floor':>11} {'floor/kernel':>13}")
  floor_fn = jax.jit(lambda x: jnp.sum(x))
  proxy_fn = jax.jit(lambda x: jax.lax.top_k(jax.nn.softmax(x, axis=-1), args.k))
  kernel_fn = jax.jit(lambda lg, pr, b, npn: posterior_topk(lg, pr, b, npn, 1.0, k=args.k,
                                                            chunk=args.chunk))
  for v in (int(x) for x in args.vocabs.split(",")):
    logits, prior, base, npn = case(args.tokens, v)
    t_floor = _time(floor_fn, logits, reps=args.reps)
    t_proxy = _time(proxy_fn, logits, reps=args.reps)
    t_kernel = _time(kernel_fn, logits, prior, base, npn, reps=args.reps)
    gbs = logits.size * 4 / t_floor / 1e9
    print(f"{v:>7} {t_floor * 1e3:>9.2f} {t_proxy * 1e3:>9.2f} {t_kernel * 1e3:>10.2f} "
          f"{args.tokens / t_kernel:>13.0f} {gbs:>11.1f} {t_floor / t_kernel:>13.1%}")


if __name__ == "__main__":
  main()
