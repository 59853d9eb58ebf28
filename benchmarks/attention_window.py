"""Sliding-window attention on CPU: the blocked kernel skipping the key blocks behind the window vs masking them.

    .venv/bin/python benchmarks/attention_window.py [--lengths 2048 4096] [--windows 256 512] [--kv-heads 2]
                                                    [--batch 2] [--heads 8] [--head-dim 64] [--reps 3]

Each row times jit(vjp) of `attention.self_attend` (forward + backward, a random cotangent) on packed float32
rows (two segments per row) and reports XLA's temp_size_in_bytes for the compiled function. "masked" is the
computation before skipping: the block-causal kernel with the window in its masks (`self_attend` with a traced
window and no `window_bound`, the path without a band plan). "band" is a static window (an all-sliding model),
"cond sliding" / "cond full" a traced window with `window_bound` (one scanned body for a mixed model such as
Gemma 3) on a sliding and on a full layer, the latter the causal kernel in its log-sum-exp form. Per shape all
rows are compiled first, then timed round-robin (one call of each per round, median over --reps rounds after one
warm-up round) so that load from other processes hits them alike; "/ masked" is each row's median over the masked
row's, within the same rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import print_table, round_robin_medians  # noqa: E402
from proxykd_jax.models import attention  # noqa: E402
from proxykd_jax.models.llama import positions_from_segments  # noqa: E402

_FULL = np.iinfo(np.int32).max  # a full layer's traced window (`llama`: wider than any row)


def _inputs(b, length, h, g, e, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, length, h, e))
    k = jax.random.normal(keys[1], (b, length, g, e))
    v = jax.random.normal(keys[2], (b, length, g, e))
    seg = jnp.ones((b, length), jnp.int32).at[:, length // 3 :].set(2)  # two packed segments per row
    return q, k, v, jax.random.normal(keys[3], q.shape), seg, positions_from_segments(seg)


def _rows(window: int) -> dict:
    """name -> (window argument (traced where an array), window_bound)."""
    return {
        "masked": (jnp.int32(window), None),
        "band": (window, None),
        "cond sliding": (jnp.int32(window), window),
        "cond full": (jnp.int32(_FULL), window),
    }


def _compile(q, k, v, cot, seg, pos, window, bound):
    def step(q, k, v, *traced):
        w = traced[0] if traced else window

        def f(*a):
            return attention.self_attend(*a, pos, seg, window=w, window_bound=bound)

        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(cot)

    traced = [window] if isinstance(window, jax.Array) else []
    compiled = jax.jit(step).lower(q, k, v, *traced).compile()
    return (lambda: compiled(q, k, v, *traced)), compiled.memory_analysis().temp_size_in_bytes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--windows", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    b, h, g, e = args.batch, args.heads, args.kv_heads, args.head_dim
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), B={b}, H={h}, G={g}, E={e}, float32, "
        f"median of {args.reps} round-robin rounds"
    )
    table = []
    for length in args.lengths:
        inputs = _inputs(b, length, h, g, e)
        for window in args.windows:
            plan = attention.band_plan(length, window)
            built = {name: _compile(*inputs, w, bound) for name, (w, bound) in _rows(window).items()}
            seconds = round_robin_medians({name: fn for name, (fn, _) in built.items()}, args.reps)
            for name, (_, temp) in built.items():
                ratio = seconds[name] / seconds["masked"]
                table.append([length, window, str(plan), name, seconds[name] * 1e3, ratio, temp / 2**20])
    print_table(table, ["L", "W", "plan (bq, behind)", "kernel", "fwd+bwd ms", "/ masked", "temp MiB"])


if __name__ == "__main__":
    main()
