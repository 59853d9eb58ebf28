"""What the posterior's Pallas kernel compiles to on a GPU, measured on this CPU host (no GPU needed).

    .venv/bin/python -m pip install triton==3.9.0    # the Triton compiler, ptxas, cuobjdump; not a dependency
    .venv/bin/python benchmarks/kernel_sass.py [--vocab 32000] [--rows 8192] [--k 64] [--sparse 112] [--warps 4,8]
                                               [--arch 90a]

jax lowers `bayes/score_topk.expected_score_topk` (the dense top-k) and `expected_posterior_topk` (the
same plus the merge with `--sparse` prior entries per row and the final top-k: what `posterior_topk`
runs) to Triton IR (captured from jax's Pallas-Triton lowering, an internal entry point, exported for an
abstract H200), Triton compiles it to PTX for the architecture, `ptxas -v` reports registers and
spills, and `cuobjdump -sass` gives the machine code. Printed per kernel and warp count: registers per
thread, spill bytes, shared memory per program, resident programs per SM by registers (65,536 per SM),
SASS instructions in all, and each loop (a backward branch) with its instructions, MUFU (exp2/log2),
barrier and global-memory counts. The streaming loop runs once per tile after the first (V / tile - 1
times per row); the others are the fallbacks, the candidate bisection of rows with too many
candidates, and in the posterior kernel the merge's and the ranking's 16-entry steps.
Static figures: they bound work per row, they are not a timing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402
from jax._src.pallas.triton import lowering as triton_lowering  # noqa: E402

from benchmarks._common import print_table  # noqa: E402
from proxykd_jax.bayes.score_topk import expected_posterior_topk, expected_score_topk  # noqa: E402


def triton_ir(rows: int, vocab: int, k: int, warps: int, sparse: int = 0) -> str:
    """The kernel's Triton IR as text, captured while jax exports the call for CUDA (with `sparse` > 0
    `expected_posterior_topk` with that many prior entries per row, else `expected_score_topk`)."""
    captured = []
    lower = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    triton_lowering.lower_jaxpr_to_triton_module = capture
    try:
        f32, i32 = jnp.float32, jnp.int32
        shapes = [((rows, vocab), f32), ((vocab,), f32), ((rows,), f32), ((rows,), f32)]
        if sparse:
            shapes += [((rows, sparse), i32), ((rows, sparse), f32), ((rows,), f32)]
            fn = jax.jit(lambda *a: expected_posterior_topk(*a, k, num_warps=warps))
        else:
            fn = jax.jit(lambda *a: expected_score_topk(*a, k, num_warps=warps))
        # jax >= 0.11 reads the GPU's compute capability while lowering: name the target as an abstract device
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("rows",), abstract_device=device)):
            export.export(
                fn, platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
            )(*(jax.ShapeDtypeStruct(s, d) for s, d in shapes))
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = lower
    (text,) = captured
    return text


def compile_sass(ttir: str, warps: int, arch: str, folder: str) -> tuple[str, str, int]:
    """(ptxas -v report, SASS text, shared memory bytes) of the Triton IR compiled for sm_`arch`."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(folder, "kernel.ttir")
    with open(path, "w") as f:
        f.write(ttir)
    capability = int(re.match(r"\d+", arch).group())
    compiled = triton.compile(
        path, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps, "num_stages": 1}
    )  # as the kernel asks
    ptx = os.path.join(folder, "kernel.ptx")
    with open(ptx, "w") as f:
        f.write(compiled.asm["ptx"])
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # Triton 3.9's PTX is version 9.x; its ptxas-blackwell (CUDA 13) reads it, the older ptxas does not.
    ptxas = next(p for p in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bin_dir, p)))
    cubin = os.path.join(folder, "kernel.cubin")
    report = subprocess.run(
        [os.path.join(bin_dir, ptxas), "-v", f"-arch=sm_{arch}", ptx, "-o", cubin], capture_output=True, text=True
    )
    if report.returncode:
        raise RuntimeError(f"ptxas failed: {report.stderr[-2000:]}")
    sass = subprocess.run(
        [os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True
    ).stdout
    return report.stderr, sass, int(compiled.metadata.shared)


def loops(sass: str) -> list[tuple[int, int, dict]]:
    """(start, end, opcode counts) of every backward branch's body in a cuobjdump listing."""
    code = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2)))
    found = []
    for addr, text in code:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            counts: dict[str, int] = {}
            for a, t in code:
                if start <= a <= addr:
                    op = t.split()[1] if t.startswith("@") else t.split()[0]
                    counts[op.split(".")[0]] = counts.get(op.split(".")[0], 0) + 1
            found.append((start, addr, counts))
    return found


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument(
        "--sparse", type=int, default=112, help="prior entries per row of the posterior kernel (0: skip it)"
    )
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--arch", default="90a", help="sm_ architecture (90a: H100/H200)")
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print(
            "kernel_sass: needs the Triton compiler, which is not a dependency: run "
            "`.venv/bin/python -m pip install triton==3.9.0` first; skipped."
        )
        return []
    rows = []
    kernels = [("dense top-k", 0)] + ([(f"posterior, {args.sparse} sparse", args.sparse)] if args.sparse else [])
    for (name, sparse), warps in ((kn, int(w)) for kn in kernels for w in args.warps.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            report, sass, shared = compile_sass(
                triton_ir(args.rows, args.vocab, args.k, warps, sparse), warps, args.arch, folder
            )
        regs = int(re.search(r"Used (\d+) registers", report).group(1))
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        total = len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+\S", sass))
        resident = 65536 // (regs * 32 * warps)
        rows.append(
            [f"{name}, {warps} warps", regs, f"{spill.group(1)}/{spill.group(2)}", shared, resident, total, "", ""]
        )
        for start, end, counts in loops(sass):
            n = sum(counts.values())
            mix = ", ".join(f"{op} {counts.get(op, 0)}" for op in ("MUFU", "BAR", "LDG", "STG"))
            rows.append(["", "", "", "", "", "", f"{start:#x}-{end:#x}", f"{n} instr ({mix})"])
    print(f"the posterior kernel on [{args.rows}, {args.vocab}] float32 logits, k {args.k}, sm_{args.arch}")
    headers = ["kernel, warps", "regs", "spill st/ld B", "shared B", "programs/SM", "SASS instr", "loop", "loop body"]
    print_table(rows, headers)
    return rows


if __name__ == "__main__":
    main()
