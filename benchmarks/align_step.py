"""Throughput of the align stage's jitted steps (SFT, reference log-probs, DPO) against the measured matmul peak.

    .venv/bin/python benchmarks/align_step.py [--pairs 8] [--repeats 5] [--warmup 2]

Model: 4 layers, d_model 256, 8 heads (head_dim 32), d_ff 1024, vocab 8192, rows of 256 tokens,
float32, AdamW. The SFT step trains on `pairs` rows (prompt + teacher response); the DPO step on
`pairs` chosen/rejected pairs (2 * pairs rows, interleaved) with NLL(chosen) + DPO; the reference
pass is the once-per-round frozen forward over the same pairs (no gradient). "DPO + reference" is
one DPO step plus its share of the reference pass (each pair is scored once per round).
FLOPs/token follow `models.llama.flops_per_token` (2 per MAC, backward = 2x forward, causal
attention halved); tokens/s counts every row position. MFU = achieved FLOP/s / float32 matmul peak
measured in the same run (`train.measure_matmul_peak`).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _common import matmul_peak, median_time, print_table  # noqa: E402
from flax import nnx  # noqa: E402

from proxykd_jax.align import objectives, pairs, phases  # noqa: E402
from proxykd_jax.models.llama import Llama, ModelConfig, flops_per_token  # noqa: E402
from proxykd_jax.parallel import LOGICAL_RULES, batch_sharding, global_batch, make_mesh, sharding  # noqa: E402
from proxykd_jax.parallel.mesh import default_config as mesh_default_config  # noqa: E402
from proxykd_jax.train import make_optimizer, make_train_step  # noqa: E402
from proxykd_jax.train.optim import default_config as optim_default_config  # noqa: E402

CFG = ModelConfig(
    vocab_size=8192, d_model=256, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=32, d_ff=1024, max_seq_len=256
)
LENGTH, CHUNK = 256, 256


def random_pairs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n pairs filling rows of LENGTH tokens: a 16-64 token prompt, then chosen / rejected responses."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = int(rng.integers(16, 65))
        prompt = tuple(rng.integers(4, CFG.vocab_size, p))
        out.append(
            (
                prompt,
                tuple(rng.integers(4, CFG.vocab_size, LENGTH - p)),
                tuple(rng.integers(4, CFG.vocab_size, int(rng.integers((LENGTH - p) // 2, LENGTH - p + 1)))),
            )
        )
    return pairs.pair_rows(out, LENGTH)


def build_step(loss_fn, model, mesh, steps: int = 1000):
    ocfg = optim_default_config()
    ocfg.warmup_steps = 10
    optimizer = make_optimizer(ocfg, steps)
    graphdef, state, shardings = phases.train_state_from(model, optimizer, mesh, LOGICAL_RULES)
    step = make_train_step(
        loss_fn, graphdef, optimizer, state_shardings=shardings, batch_shardings=batch_sharding(mesh, LOGICAL_RULES)
    )
    return step, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per DPO step (= rows per SFT step)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    args = parser.parse_args()
    mesh = make_mesh(mesh_default_config())
    put = functools.partial(global_batch, mesh=mesh, rules=LOGICAL_RULES)
    model = sharding.create_sharded_model(Llama, mesh, LOGICAL_RULES, CFG, rngs=nnx.Rngs(params=0))
    rows = random_pairs(args.pairs)
    rows["ref_chosen_logp"], rows["ref_rejected_logp"] = objectives.reference_logprobs(
        model, (), rows, batch_size=2 * args.pairs, chunk=CHUNK, put_batch=put
    )  # compiles the reference pass

    # reference pass: all 2 * pairs rows through one forward (batch of `pairs` pairs)
    ref_seconds = median_time(
        lambda: objectives.reference_logprobs(model, (), rows, batch_size=args.pairs, chunk=CHUNK, put_batch=put),
        warmup=args.warmup,
        repeats=args.repeats,
    )
    sft_batch = put({k[len("chosen_") :]: v for k, v in rows.items() if k.startswith("chosen_")})
    dpo_batch = put(phases.interleave_pairs(rows))
    timings = {}
    for name, loss_fn, batch in (
        ("sft", functools.partial(objectives.sft_loss_fn, chunk=CHUNK), sft_batch),
        ("dpo", functools.partial(objectives.dpo_loss_fn, beta=0.1, nll_weight=1.0, chunk=CHUNK), dpo_batch),
    ):
        step, state = build_step(loss_fn, phases.copy_module(model), mesh)
        holder = {"state": state}

        def call(step=step, batch=batch, holder=holder):
            holder["state"], metrics = step(holder["state"], batch)
            jax.block_until_ready(metrics["loss"])

        timings[name] = median_time(call, warmup=args.warmup, repeats=args.repeats)
    peak = matmul_peak()
    fwd_bwd, fwd = flops_per_token(CFG, LENGTH, backward=True), flops_per_token(CFG, LENGTH, backward=False)
    n = args.pairs
    entries = [  # (name, rows, seconds, FLOPs)
        ("SFT step", n, timings["sft"], n * LENGTH * fwd_bwd),
        ("reference pass (per round)", 2 * n, ref_seconds, 2 * n * LENGTH * fwd),
        ("DPO step", 2 * n, timings["dpo"], 2 * n * LENGTH * fwd_bwd),
        ("DPO step + reference", 2 * n, timings["dpo"] + ref_seconds, 2 * n * LENGTH * (fwd_bwd + fwd)),
    ]
    table = [
        (name, r, LENGTH, f"{1e3 * s:.1f}", r * LENGTH / s, flops / s / 1e9, flops / s / peak * 100)
        for name, r, s, flops in entries
    ]
    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].platform}; model {CFG.num_params() / 1e6:.1f} M params; "
        f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s (measured)"
    )
    print_table(table, ["step", "rows", "seq", "ms", "tokens/s", "GFLOP/s", "MFU %"])


if __name__ == "__main__":
    main()
