"""What Gemma 2's soft-capping costs on CPU: the capped blocked attention kernel and the capped fused CE loss over
their uncapped selves.

    .venv/bin/python benchmarks/softcap.py [--length 2048] [--batch 2] [--heads 8] [--kv-heads 2] [--head-dim 64]
                                           [--tokens 4096] [--d-model 512] [--vocab 32000] [--reps 5]

"attention" rows time jit(vjp) of `attention.self_attend` (forward + backward, a random cotangent) on packed float32
rows (two segments per row), without and with `softcap` (Gemma 2's 50.0; the backward recomputes the raw scores for
the cap's derivative). "fused CE" rows time jit(value_and_grad) of `losses.cross_entropy_chunked` (hidden states and
unembedding, chunk 256) without and with `softcap` (Gemma 2's 30.0). Each pair is compiled first, then timed
round-robin (one call of each per round, median over --reps rounds after a warm-up round) so that load from other
processes hits both alike; "capped / uncapped" is the ratio of the two medians within the same rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._common import print_table, round_robin_medians  # noqa: E402
from proxykd_jax import losses  # noqa: E402
from proxykd_jax.models import attention  # noqa: E402
from proxykd_jax.models.llama import positions_from_segments  # noqa: E402


def _attention(b, length, h, g, e, cap):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, length, h, e))
    k = jax.random.normal(keys[1], (b, length, g, e))
    v = jax.random.normal(keys[2], (b, length, g, e))
    cot = jax.random.normal(keys[3], q.shape)
    seg = jnp.ones((b, length), jnp.int32).at[:, length // 3 :].set(2)  # two packed segments per row
    pos = positions_from_segments(seg)

    def step(q, k, v):
        out, vjp = jax.vjp(lambda *a: attention.self_attend(*a, pos, seg, softcap=cap), q, k, v)
        return out, vjp(cot)

    compiled = jax.jit(step).lower(q, k, v).compile()
    return lambda: compiled(q, k, v)


def _fused_ce(n, d, vocab, cap):
    keys = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(keys[0], (n, d))
    w = jax.random.normal(keys[1], (d, vocab)) * d**-0.5 * 4  # logits of std ~4, where a cap of 30 starts to bend
    targets = jax.random.randint(keys[2], (n,), 0, vocab)
    mask = jnp.ones((n,), jnp.float32)

    def loss(hidden, w):
        ce, count = losses.cross_entropy_chunked(hidden, w, targets, mask, chunk_size=256, softcap=cap)
        return ce / count

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, w).compile()
    return lambda: compiled(hidden, w)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    b, h, g, e = args.batch, args.heads, args.kv_heads, args.head_dim
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), float32, median of {args.reps} "
        "round-robin rounds"
    )
    pairs = [  # (computation, Gemma 2's cap, build(cap) -> a call of the compiled function)
        (
            f"attention fwd+bwd (B {b}, L {args.length}, H {h}, G {g}, E {e})",
            50.0,
            lambda cap: _attention(b, args.length, h, g, e, cap),
        ),
        (
            f"fused CE value+grad (N {args.tokens}, D {args.d_model}, V {args.vocab})",
            30.0,
            lambda cap: _fused_ce(args.tokens, args.d_model, args.vocab, cap),
        ),
    ]
    table = []
    for name, cap, build in pairs:
        seconds = round_robin_medians({"uncapped": build(None), "capped": build(cap)}, args.reps)
        ratio = seconds["capped"] / seconds["uncapped"]
        table.append([name, cap, seconds["uncapped"] * 1e3, seconds["capped"] * 1e3, ratio])
    print_table(table, ["computation", "cap", "uncapped ms", "capped ms", "capped / uncapped"])


if __name__ == "__main__":
    main()
