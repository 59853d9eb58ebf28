"""One-GPU check of the accelerator path: one table, under 8 minutes on one H100/H200.

    python benchmarks/gpu_check.py            # ~1.1B Llama student, bf16 compute, seq 2048, sparse KD K=64
    python benchmarks/gpu_check.py --tiny     # tiny shapes on CPU (the test suite runs this)

Rows:
  distill  the distillation train step (chunked CE + sparse KD to K=64 posterior entries), MFU
  sft      the same step with alpha = 0 (hard labels only) on the same batches, MFU
  kd       KD overhead: distill step time / SFT step time - 1
  kernel   the posterior kernel (`posterior_topk`, mode expected, K=64) on [N, V] float32 proxy logits:
           bytes of logits read per second against the device's HBM bandwidth

MFU = model FLOPs (`models.llama.flops_per_token`, training = 3x forward) per second / peak. Peak and
bandwidth come from the device kind (H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s; H200: 989, 4.8 TB/s;
A100: 312, 2.0 TB/s) or `--peak-tflops` / `--hbm-tbs`; on CPU they are measured (a float32 matmul,
and a streaming `x + 1` over a large array).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks._common import matmul_peak, print_table  # noqa: E402
from proxykd_jax import losses, parallel, train  # noqa: E402
from proxykd_jax.bayes import SparsePrior, posterior_topk  # noqa: E402
from proxykd_jax.models.llama import Llama, ModelConfig, flops_per_token  # noqa: E402
from proxykd_jax.parallel.mesh import make_mesh  # noqa: E402
from proxykd_jax.parallel.rules import LOGICAL_RULES  # noqa: E402
from proxykd_jax.train import distill, optim  # noqa: E402

# device kind substring -> (dense bf16 peak FLOP/s, HBM bytes/s)
KNOWN = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}


def student_config(tiny: bool, remat: str, attention: str) -> ModelConfig:
    if tiny:
        shape = dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128)
    else:  # 1.10B parameters
        shape = dict(
            vocab_size=32000, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, d_ff=8192
        )
    return ModelConfig(
        **shape, max_seq_len=4096, param_dtype="float32", dtype="bfloat16", remat=remat, attention=attention
    )


def device_limits(args) -> tuple[float, float, str]:
    kind = jax.devices()[0].device_kind
    peak, bw = next((v for k, v in KNOWN.items() if k in kind), (0.0, 0.0))
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
    if args.hbm_tbs:
        bw = args.hbm_tbs * 1e12
    if not peak:
        peak = matmul_peak(n=512 if args.tiny else 2048, repeats=3)
    if not bw:
        x = jnp.ones((16 << 20,) if args.tiny else (256 << 20,), jnp.float32)
        f = jax.jit(lambda a: a + 1)
        jax.block_until_ready(f(x))
        t0 = time.perf_counter()
        for _ in range(5):
            jax.block_until_ready(f(x))
        bw = 2 * x.nbytes * 5 / (time.perf_counter() - t0)  # read + write
    return peak, bw, kind


def make_batch(cfg: ModelConfig, b: int, length: int, k: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    v = cfg.vocab_size
    tokens = rng.integers(0, v, (b, length)).astype(np.int32)
    seg = np.ones((b, length), np.int32)
    seg[:, length // 2 :] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)]).astype(np.int32)
    lp = np.sort(rng.normal(size=(b, length, k)).astype(np.float32), axis=-1)[..., ::-1] - 3.0
    return dict(
        tokens=tokens,
        targets=np.roll(tokens, -1, axis=1),
        positions=np.broadcast_to(pos, (b, length)).copy(),
        segment_ids=seg,
        loss_mask=np.ones((b, length), np.float32),
        sample_ids=np.arange(b * length, dtype=np.int32).reshape(b, length),
        kd_ids=rng.integers(0, v, (b, length, k)).astype(np.int32),
        kd_logprobs=np.ascontiguousarray(lp),
        kd_tail=np.full((b, length), 0.05, np.float32),
        weight=np.ones((b, length), np.float32),
    )


def time_steps(step, state, batch, reps: int) -> tuple[float, object]:
    state, metrics = step(state, batch)  # compile + warm up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), state


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU; the test suite)")
    ap.add_argument("--batch", type=int, default=0, help="rows per step (default 8; tiny 2)")
    ap.add_argument("--seq", type=int, default=0, help="tokens per row (default 2048; tiny 64)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=0, help="timed steps (default 10; tiny 2)")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--hbm-tbs", type=float, default=0.0)
    args = ap.parse_args(argv)
    b = args.batch or (2 if args.tiny else 8)
    length = args.seq or (64 if args.tiny else 2048)
    reps = args.reps or (2 if args.tiny else 10)
    cfg = student_config(args.tiny, args.remat, args.attention)
    peak, bw, kind = device_limits(args)
    mesh = make_mesh(ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": 1, "tensor": 1}}), jax.devices()[:1])
    rules = LOGICAL_RULES
    batch = parallel.global_batch(make_batch(cfg, b, length, args.k), mesh, rules)
    optim_cfg = optim.default_config()
    optimizer = optim.make_optimizer(optim_cfg, 1000)
    times = {}
    for name, alpha in (("distill", 1.0), ("sft", 0.0)):
        loss_cfg = losses.default_config()
        loss_cfg.alpha = alpha
        graphdef, state, sh = train.create_train_state(optimizer, mesh, rules, Llama, cfg, rngs=nnx.Rngs(0))
        step = train.make_train_step(
            distill.make_loss_fn(loss_cfg),
            graphdef,
            optimizer,
            state_shardings=sh,
            batch_shardings=parallel.batch_sharding(mesh, rules),
        )
        times[name], state = time_steps(step, state, batch, reps)
        del state, step
    step_flops = b * length * flops_per_token(cfg, length, backward=True)
    rows = [
        ["distill", f"{times['distill'] * 1e3:.2f} ms", f"MFU {step_flops / times['distill'] / peak:.1%}"],
        ["sft", f"{times['sft'] * 1e3:.2f} ms", f"MFU {step_flops / times['sft'] / peak:.1%}"],
        ["kd", "", f"overhead {times['distill'] / times['sft'] - 1:+.1%}"],
    ]
    # the posterior kernel on one batch's worth of proxy logits
    n, v = (256, cfg.vocab_size) if args.tiny else (8192, 32000)
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(n, v)).astype(np.float32) * 3)
    ng = rng.random((n, 96)).astype(np.float32)
    prior = SparsePrior(
        jnp.asarray(rng.integers(0, v, (n, 16)), jnp.int32),
        jnp.asarray(rng.integers(0, 4, (n, 16)), jnp.float32),
        jnp.asarray(rng.integers(0, v, (n, 96)), jnp.int32),
        jnp.asarray(0.8 * ng / ng.sum(1, keepdims=True)),
        jnp.full((n,), 0.2, jnp.float32),
    )
    base = rng.random(v).astype(np.float32)
    base_v, n_pseudo = jnp.asarray(base / base.sum()), jnp.full((n,), 10.0, jnp.float32)
    kernel = jax.jit(lambda lg, pr, bv, npn: posterior_topk(lg, pr, bv, npn, 1.0, k=args.k, chunk=1024))
    jax.block_until_ready(kernel(logits, prior, base_v, n_pseudo))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = kernel(logits, prior, base_v, n_pseudo)
    jax.block_until_ready(out)
    kernel_s = (time.perf_counter() - t0) / reps
    achieved = logits.nbytes / kernel_s
    rows.append(["kernel", f"{kernel_s * 1e3:.2f} ms", f"{achieved / 1e9:.1f} GB/s = {achieved / bw:.1%} of HBM"])
    print(
        f"{kind}: peak {peak / 1e12:.1f} TFLOP/s, bandwidth {bw / 1e9:.0f} GB/s; student "
        f"{cfg.num_params() / 1e9:.2f}B params, bf16 compute, batch {b} x seq {length}, K={args.k}; "
        f"posterior kernel on [{n}, {v}] float32 logits"
    )
    print_table(rows, ["step", "time", "figure"])
    return rows


if __name__ == "__main__":
    main()
