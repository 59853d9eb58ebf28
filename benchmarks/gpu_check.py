"""One-GPU check of the accelerator path: one table, under 8 minutes on one H100/H200.

    python benchmarks/gpu_check.py            # ~1.1B Llama student, bf16 compute, seq 2048, sparse KD K=64
    python benchmarks/gpu_check.py --tiny     # tiny shapes on CPU (the test suite runs this)

Rows:
  distill  the distillation train step (chunked CE + sparse KD to K=64 posterior entries), MFU
  sft      the same step with alpha = 0 (hard labels only) on the same batches, MFU
  kd       KD overhead: distill step time / SFT step time - 1
  kernel   the posterior kernel (`posterior_topk`, mode expected, K=64) on [N, V] float32 proxy logits:
           bytes of logits read per second against the device's HBM bandwidth; by default the XLA path
           and then `kernel="pallas"` (bayes/score_topk.py: one read of the logits, and the merge with
           the prior and the final top-k in the same kernel), with the share of rows whose top-k ids
           match the XLA path's, and the kernel alone: its dense top-k only, and whole at 4 and 8 warps

MFU = model FLOPs (`models.llama.flops_per_token`, training = 3x forward) per second / peak. Peak and
bandwidth come from the device kind (H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s; H200: 989, 4.8 TB/s;
A100: 312, 2.0 TB/s) or `--peak-tflops` / `--hbm-tbs`. Every run also measures both ceilings itself (a bf16
8192^3 product and a 1 GiB `x + 1` copy; tiny: a float32 512^3 product, a 64 MiB copy), prints the
figures against them too, and uses them where no datasheet figure is known (the CPU).

More in one run: `--more` adds variants (attention / remat / rows / layer loop / segment slots), each
only while `--budget-s` allows; `--kernels` times several posterior-kernel settings; `--check-attention`
first compares the GPU attention paths with float32 `xla` attention (values and q/k/v gradients);
`--trace DIR` profiles two steps of each variant; `--out FILE` appends every row as a JSON line.
Measured on an H200: benchmarks/results/h200_2026-12-04/ (figures in BUILD_NOTES.md).
"""

from __future__ import annotations

import argparse
import json
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
from proxykd_jax.bayes.posterior_union import _prior_mass, _sparse  # noqa: E402
from proxykd_jax.bayes.score_topk import expected_posterior_topk, expected_score_topk  # noqa: E402
from proxykd_jax.models.llama import Llama, ModelConfig, flops_per_token  # noqa: E402
from proxykd_jax.parallel.mesh import make_mesh  # noqa: E402
from proxykd_jax.parallel.rules import LOGICAL_RULES  # noqa: E402
from proxykd_jax.train import distill, optim  # noqa: E402
from proxykd_jax.train.metrics import measure_matmul_peak  # noqa: E402

# device kind substring -> (dense bf16 peak FLOP/s, HBM bytes/s)
KNOWN = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}


def student_config(
    tiny: bool, remat: str, attention: str, scan_layers="auto", segments: int = 0, max_seq_len: int = 4096
) -> ModelConfig:
    if tiny:
        shape = dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128)
    else:  # 1.10B parameters
        shape = dict(
            vocab_size=32000, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, d_ff=8192
        )
    return ModelConfig(
        **shape,
        max_seq_len=max_seq_len,
        param_dtype="float32",
        dtype="bfloat16",
        remat=remat,
        attention=attention,
        scan_layers=scan_layers,
        **({"attention_segments": segments} if segments else {}),
    )


def attention_check(seed: int = 0) -> dict:
    """Relative errors of each GPU attention path against the float32 `xla` path on one packed, padded
    GQA batch of bf16 inputs (values and q/k/v gradients); `cudnn_fallback` forces the masked branch of
    the packed path (2 segment slots for rows of 3-4 segments)."""
    from proxykd_jax.models import attention
    from proxykd_jax.models.llama import positions_from_segments

    b, length, h, g, e = 3, 512, 8, 2, 64
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, length, h, e), jnp.float32)
    k = jax.random.normal(keys[1], (b, length, g, e), jnp.float32)
    v = jax.random.normal(keys[2], (b, length, g, e), jnp.float32)
    cot = jax.random.normal(keys[3], (b, length, h, e), jnp.float32)
    seg = np.ones((b, length), np.int32)
    seg[1, 100:] = 2
    seg[1, 300:] = 3
    seg[2, :50], seg[2, 50:200], seg[2, 200:470], seg[2, 470:] = 1, 2, 3, 0  # packed + padding tail
    seg = jnp.asarray(seg)
    pos = positions_from_segments(seg)

    def grads(fn, dtype):
        def loss(q_, k_, v_):
            out = fn(q_.astype(dtype), k_.astype(dtype), v_.astype(dtype)).astype(jnp.float32)
            return jnp.sum(out * cot), out

        (_, out), gs = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return (out, *gs)

    ref = grads(lambda q_, k_, v_: attention.self_attention(q_, k_, v_, pos, seg, implementation="xla"), jnp.float32)
    paths = {
        "cudnn": lambda q_, k_, v_: attention.self_attention(q_, k_, v_, pos, seg, implementation="cudnn"),
        "cudnn_masked": lambda q_, k_, v_: attention.self_attention(
            q_, k_, v_, pos, seg, implementation="cudnn_masked"
        ),
        "cudnn_fallback": lambda q_, k_, v_: attention.self_attention(
            q_, k_, v_, pos, seg, implementation="cudnn", max_segments=2
        ),
    }
    out = {}
    for name, fn in paths.items():
        try:
            got = grads(fn, jnp.bfloat16)
            out[name] = [float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r)) for a, r in zip(got, ref, strict=True)]
        except Exception as err:  # noqa: BLE001 - reported in the table
            out[name] = repr(err)[:300]
    return out


def _copy_bandwidth(elements: int, repeats: int) -> float:
    """Bytes/s (read + write) of a streaming `x + 1` over `elements` float32 values."""
    x = jax.random.normal(jax.random.key(0), (elements,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    jax.block_until_ready(f(x))
    t0 = time.perf_counter()
    for _ in range(repeats):
        y = f(x)
    jax.block_until_ready(y)
    return 2 * x.nbytes * repeats / (time.perf_counter() - t0)


def device_limits(args, measured_peak: float, measured_bw: float) -> tuple[float, float, str]:
    """(peak FLOP/s, HBM bytes/s, device kind): the flags, else the datasheet's for known GPUs, else this
    run's own measurements (`measured_limits`)."""
    kind = jax.devices()[0].device_kind
    peak, bw = next((v for k, v in KNOWN.items() if k in kind), (0.0, 0.0))
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
    if args.hbm_tbs:
        bw = args.hbm_tbs * 1e12
    return peak or measured_peak, bw or measured_bw, kind


def measured_limits(tiny: bool) -> tuple[float, float]:
    """(matmul FLOP/s, copy bytes/s) measured in this run: an 8192^3 bf16 product (tiny: 512^3 float32) on
    random data, fastest of 40; a 1 GiB float32 `x + 1` (tiny: 64 MiB), read + write bytes."""
    if tiny:
        return matmul_peak(n=512, repeats=3), _copy_bandwidth(16 << 20, 5)
    # 40 runs: the first products run while the clocks ramp up from idle; the fastest counts
    return measure_matmul_peak(n=8192, dtype=jnp.bfloat16, repeats=40, devices=jax.devices()[:1]), _copy_bandwidth(
        1 << 28, 20
    )


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


def time_steps(step, state, batch, reps: int) -> tuple[float, float, object]:
    """(compile + first step seconds, median step seconds, state); each step waits for state and metrics."""
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times)), state


def step_times(cfg: ModelConfig, b: int, length: int, k: int, reps: int, trace_dir: str = "") -> dict:
    """Median step seconds of the distill step (alpha 1) and the SFT step (alpha 0) on the same batches.

    With `trace_dir`, two more distill steps run under `jax.profiler.trace` (a Perfetto trace there).
    """
    mesh = make_mesh(ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": 1, "tensor": 1}}), jax.devices()[:1])
    batch = parallel.global_batch(make_batch(cfg, b, length, k), mesh, LOGICAL_RULES)
    optimizer = optim.make_optimizer(optim.default_config(), 1000)
    out = {}
    for name, alpha in (("distill", 1.0), ("sft", 0.0)):
        loss_cfg = losses.default_config()
        loss_cfg.alpha = alpha
        graphdef, state, sh = train.create_train_state(optimizer, mesh, LOGICAL_RULES, Llama, cfg, rngs=nnx.Rngs(0))
        step = train.make_train_step(
            distill.make_loss_fn(loss_cfg),
            graphdef,
            optimizer,
            state_shardings=sh,
            batch_shardings=parallel.batch_sharding(mesh, LOGICAL_RULES),
        )
        out[f"{name}_compile_s"], out[name], state = time_steps(step, state, batch, reps)
        if trace_dir and name == "distill":
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(2):
                    state, metrics = step(state, batch)
                jax.block_until_ready((state, metrics))
        del state, step
    return out


def _mean_seconds(fn, args, reps: int) -> float:
    """Mean seconds of `reps` back-to-back calls of a compiled `fn(*args)` (dispatched, then waited for)."""
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def kernel_seconds(tiny: bool, k: int, chunk: int, block, reps: int, trace_dir: str = "") -> tuple:
    """(seconds, logits bytes, [N, V], agreement, alone) of the posterior kernel on [N, V] float32 proxy
    logits: `posterior_topk`, mode expected, K=k, row chunks of `chunk` (ignored: mode expected runs
    whole), top-k blocks of `block` ids, or block "pallas": `kernel="pallas"`, the one-pass kernel.

    seconds: mean seconds per call (off --tiny, the error as a string if the Pallas posterior fails).
    agreement (Pallas only, else None): (share of rows whose top-k ids equal the XLA path's, max
    |log-prob| difference). alone (Pallas only): {name: mean seconds, or the error off --tiny} of the
    kernel by itself: `expected_score_topk` (log-normaliser and dense top-k only) and
    `expected_posterior_topk` (the merge with the prior and the final top-k too, what `posterior_topk`
    runs) at 4 and 8 warps."""
    n, v = (256, 512) if tiny else (8192, 32000)
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

    def make(impl, top_k_block):
        return jax.jit(
            lambda lg, pr, bv, npn: posterior_topk(
                lg, pr, bv, npn, 1.0, k=k, chunk=min(chunk, n), top_k_block=top_k_block, kernel=impl
            )
        )

    pallas = block == "pallas"
    kernel = make("pallas", 16) if pallas else make("xla", int(block))
    agreement = None
    try:
        out = jax.block_until_ready(kernel(logits, prior, base_v, n_pseudo))
        if pallas:
            ref = make("xla", 16)(logits, prior, base_v, n_pseudo)
            same = np.all(np.sort(np.asarray(out[0]), 1) == np.sort(np.asarray(ref[0]), 1), axis=1)
            agreement = (float(same.mean()), float(np.abs(np.asarray(out[1]) - np.asarray(ref[1])).max()))
            del ref
        seconds = _mean_seconds(kernel, (logits, prior, base_v, n_pseudo), reps)
        if trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                jax.block_until_ready([kernel(logits, prior, base_v, n_pseudo) for _ in range(2)])
    except Exception as e:  # noqa: BLE001 - the Pallas posterior failing on the card still times the kernel alone
        if tiny or not pallas:
            raise
        seconds = f"failed: {e!r}"[:2000]
    alone = {}
    if pallas:  # the kernel by itself: its dense top-k only, and the whole posterior kernel at 4 and 8 warps
        floor = jnp.full((n,), 0.2, jnp.float32)
        sp_ids, sp_vals = _sparse(prior, jnp.float32(1.0), n_pseudo, None)
        total = _prior_mass(prior, jnp.float32(1.0), floor) + n_pseudo
        fns = {"dense top-k": (jax.jit(lambda lg, bv, npn, fl: expected_score_topk(lg, bv, npn, fl, k)), ())}
        for warps in (4, 8):
            fn = jax.jit(lambda *a, w=warps: expected_posterior_topk(*a, k, num_warps=w))
            fns[f"whole, {warps} warps"] = (fn, (sp_ids, sp_vals, total))
        for name, (fn, extra) in fns.items():
            args = (logits, base_v, n_pseudo, floor, *extra)
            try:
                jax.block_until_ready(fn(*args))
                alone[name] = _mean_seconds(fn, args, reps)
            except Exception as e:  # noqa: BLE001 - one variant failing on the card must not lose the others
                if tiny:
                    raise
                alone[name] = f"failed: {e!r}"[:2000]
    return seconds, logits.nbytes, (n, v), agreement, alone


def _record(path: str | None, row: dict) -> None:
    """Appends one JSON line to `path` (so a run stopped part-way keeps what it measured)."""
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _parse_variants(text: str) -> list[tuple[str, str, int, str, int]]:
    """'cudnn/none/8,xla/none/8/unroll,cudnn/none/8/auto/4' -> [(attention, remat, batch, layers, segments),
    ...]; layers auto|scan|unroll; segments: `model.attention_segments` (0: the default)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        attention, remat, batch, *rest = item.split("/")
        layers = rest[0] if rest else "auto"
        out.append((attention, remat, int(batch), layers, int(rest[1]) if len(rest) > 1 else 0))
    return out


_SCAN = {"auto": "auto", "scan": True, "unroll": False}


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU; the test suite)")
    ap.add_argument("--batch", type=int, default=0, help="rows per step of the first variant (default 8; tiny 2)")
    ap.add_argument("--seq", type=int, default=0, help="tokens per row (default 2048; tiny 64)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=0, help="timed steps (default 10; tiny 2)")
    ap.add_argument("--remat", default="none", help="remat policy of the first variant")
    ap.add_argument("--attention", default="auto", help="attention implementation of the first variant")
    ap.add_argument("--layers", default="auto", choices=sorted(_SCAN), help="layer loop of the first variant")
    ap.add_argument(
        "--more",
        default="",
        help="extra variants after the first, 'attention/remat/batch[/auto|scan|unroll[/segments]],...' (e.g. "
        "cudnn_masked/none/8,cudnn/none/16/unroll,cudnn/none/8/auto/4 (the last: 4 segment slots)); each runs only while --budget-s allows another of the "
        "first variant's length",
    )
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall seconds the extra variants may use in all")
    ap.add_argument(
        "--kernels",
        default="0:16,0:pallas",
        help="posterior kernels to time, 'chunk:block,...' (row chunk, which mode expected ignores since "
        "2026-12-04: it runs whole; ids per top-k block, 0 = dense top-k, or 'pallas': the one-pass Pallas "
        "kernel, also checked against the XLA path)",
    )
    ap.add_argument("--check-attention", action="store_true", help="first compare the GPU attention paths")
    ap.add_argument(
        "--trace",
        default="",
        help="profile two distill steps of each variant (and each kernel) into folders named from this",
    )
    ap.add_argument("--out", default="", help="append each measured row as one JSON line to this file")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--hbm-tbs", type=float, default=0.0)
    args = ap.parse_args(argv)
    if not args.tiny and jax.default_backend() == "cpu":
        print("gpu_check: no accelerator here (jax's backend is cpu): running the --tiny shapes instead.")
        args.tiny = True
    start = time.perf_counter()
    b = args.batch or (2 if args.tiny else 8)
    length = args.seq or (64 if args.tiny else 2048)
    reps = args.reps or (2 if args.tiny else 10)
    measured_peak, measured_bw = measured_limits(args.tiny)
    peak, bw, kind = device_limits(args, measured_peak, measured_bw)
    _record(
        args.out, dict(row="device", kind=kind, peak=peak, bw=bw, measured_peak=measured_peak, measured_bw=measured_bw)
    )
    rows, first_s, shape = [], None, None
    if args.check_attention:
        for name, errs in attention_check().items():
            _record(args.out, dict(row="attention", path=name, rel_errors=errs))
            text = (
                errs
                if isinstance(errs, str)
                else ", ".join(f"{t} {x:.1e}" for t, x in zip(("out", "dq", "dk", "dv"), errs))
            )
            rows.append([f"attention {name}", "", text])

    def kernel_rows():
        shape = None
        for j, spec in enumerate(args.kernels.split(",")):
            chunk, block = spec.split(":")
            chunk, block = int(chunk), block if block == "pallas" else int(block)
            trace = f"{args.trace}_kernel_{chunk}_{block}" if args.trace else ""
            label = "kernel" if j == 0 else f"kernel [chunk {chunk}, block {block}]"
            try:
                seconds, nbytes, shape, agreement, alone = kernel_seconds(args.tiny, args.k, chunk, block, reps, trace)
            except Exception as e:  # noqa: BLE001 - a kernel that fails to compile must not lose the other rows
                if args.tiny:
                    raise
                _record(args.out, dict(row="error", kernel=spec, error=repr(e)[:2000]))
                rows.append([label, "failed", type(e).__name__])
                continue
            alone_ms = {name: t * 1e3 if isinstance(t, float) else t for name, t in alone.items()}
            if isinstance(seconds, str):  # the Pallas posterior failed; its kernel alone may still have run
                _record(args.out, dict(row="kernel", chunk=chunk, block=block, error=seconds, alone_ms=alone_ms))
                rows.append([label, "failed", seconds[:200]])
            else:
                achieved = nbytes / seconds
                _record(
                    args.out,
                    dict(
                        row="kernel",
                        chunk=chunk,
                        block=block,
                        ms=seconds * 1e3,
                        bytes_per_s=achieved,
                        of_hbm=achieved / bw,
                        agreement=agreement,
                        alone_ms=alone_ms,
                    ),
                )
                text = f"{achieved / 1e9:.1f} GB/s = {achieved / bw:.1%} of HBM "
                text += f"({achieved / measured_bw:.1%} of measured copy)"
                if agreement:
                    text += f"; ids as XLA's in {agreement[0]:.1%} of rows, log-probs within {agreement[1]:.1e}"
                rows.append([label, f"{seconds * 1e3:.2f} ms", text])
            for name, t in alone.items():
                if isinstance(t, str):
                    rows.append([f"kernel [pallas alone: {name}]", "failed", t[:200]])
                    continue
                rows.append(
                    [
                        f"kernel [pallas alone: {name}]",
                        f"{t * 1e3:.2f} ms",
                        f"{nbytes / t / 1e9:.1f} GB/s = {nbytes / t / bw:.1%} of HBM "
                        f"({nbytes / t / measured_bw:.1%} of measured copy)",
                    ]
                )
        return shape

    variants = [(args.attention, args.remat, b, args.layers, 0)] + _parse_variants(args.more)
    for i, (attention, remat, rows_per_step, layers, segments) in enumerate(variants):
        name = f"{attention}/{remat}/b{rows_per_step}/{layers}" + (f"/s{segments}" if segments else "")
        if i and time.perf_counter() - start + first_s > args.budget_s:
            print(f"skipping {name}: --budget-s {args.budget_s:.0f} s would be exceeded")
            continue
        cfg = student_config(args.tiny, remat, attention, _SCAN[layers], segments, max(4096, length))
        label = "" if i == 0 else f" [{name}]"
        t0 = time.perf_counter()
        try:
            times = step_times(cfg, rows_per_step, length, args.k, reps, f"{args.trace}_{i}" if args.trace else "")
        except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others' rows
            if i == 0 and args.tiny:
                raise
            _record(args.out, dict(row="error", variant=name, error=repr(e)[:2000]))
            rows.append([f"distill{label}", "failed", type(e).__name__])
            first_s = first_s or time.perf_counter() - t0
            shape = shape or kernel_rows()
            continue
        first_s = first_s or time.perf_counter() - t0
        step_flops = rows_per_step * length * flops_per_token(cfg, length, backward=True)
        figures = {
            step: dict(
                ms=times[step] * 1e3,
                compile_s=times[f"{step}_compile_s"],
                mfu=step_flops / times[step] / peak,
                of_measured=step_flops / times[step] / measured_peak,
            )
            for step in ("distill", "sft")
        }
        overhead = times["distill"] / times["sft"] - 1
        _record(args.out, dict(row="steps", variant=name, **figures, kd_overhead=overhead))
        for step in ("distill", "sft"):
            f = figures[step]
            rows.append(
                [
                    f"{step}{label}",
                    f"{f['ms']:.2f} ms",
                    f"MFU {f['mfu']:.1%} ({f['of_measured']:.1%} of measured matmul peak), compile {f['compile_s']:.0f} s",
                ]
            )
        rows.append([f"kd{label}", "", f"overhead {overhead:+.1%}"])
        shape = shape or kernel_rows()  # after the first variant, so the budget never skips the kernel
    cfg = student_config(args.tiny, args.remat, args.attention, _SCAN[args.layers], max_seq_len=max(4096, length))
    matmul_dtype = "float32" if args.tiny else "bf16"
    print(
        f"{kind}: peak {peak / 1e12:.1f} TFLOP/s (measured {matmul_dtype} matmul {measured_peak / 1e12:.1f}), bandwidth "
        f"{bw / 1e9:.0f} GB/s (measured copy {measured_bw / 1e9:.0f}); student {cfg.num_params() / 1e9:.2f}B params, "
        f"bf16 compute, seq {length}, K={args.k}, first variant {args.attention}/{args.remat}/batch {b}/{args.layers} "
        f"layers; posterior kernel on {list(shape or [])} float32 logits; {time.perf_counter() - start:.0f} s in all"
    )
    print_table(rows, ["step", "time", "figure"])
    return rows


if __name__ == "__main__":
    main()
