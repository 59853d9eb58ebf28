"""Compile time of the train step (forward + backward) against depth: scanned vs unrolled layers.

    python benchmarks/compile_time.py [--layers 4 32] [--remat full]

Lowers and compiles `jax.jit(jax.value_and_grad(loss))` of a narrow Llama (the width barely
matters to compile time) with a fresh compilation cache, once per (layers, scan_layers), and
prints one table: lowering and compile seconds and the number of dot ops in the StableHLO.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # every compile measured from scratch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks._common import print_table  # noqa: E402
from proxykd_jax.models.llama import Llama, ModelConfig  # noqa: E402


def _loss(model, tokens, targets):
    logp = jax.nn.log_softmax(model(tokens), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def measure(cfg: ModelConfig, batch: int, seq: int) -> tuple[float, float, int]:
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    fn = jax.jit(jax.value_and_grad(lambda s, t, y: _loss(nnx.merge(graphdef, s), t, y)))
    start = time.perf_counter()
    lowered = fn.lower(state, tokens, tokens)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start
    return lower_s, compile_s, lowered.as_text().count("stablehlo.dot_general")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--remat", default="none")
    args = ap.parse_args(argv)
    base = ModelConfig(
        vocab_size=512,
        d_model=args.d_model,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=args.d_model // 4,
        d_ff=2 * args.d_model,
        max_seq_len=max(2048, args.seq),
        remat=args.remat,
    )
    rows = []
    for layers in args.layers:
        for scan in (True, False):
            cfg = dataclasses.replace(base, num_layers=layers, scan_layers=scan)
            lower_s, compile_s, dots = measure(cfg, args.batch, args.seq)
            rows.append([layers, "scan" if scan else "unrolled", args.remat, lower_s, compile_s, dots])
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; d_model {args.d_model}, seq {args.seq}")
    print_table(rows, ["layers", "layers run by", "remat", "lower s", "compile s", "dot ops"])


if __name__ == "__main__":
    main()
