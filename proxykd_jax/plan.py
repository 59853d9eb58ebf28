"""`proxykd plan --config=...`: will this config fit this mesh? Ahead-of-time, nothing allocated.

    proxykd plan --config=configs/llama.py:7b,70b --devices=8 [--steps=distill,posterior]
        [--peak-tflops=989] [--limit-gb=80] [--layers=2,4] [--config.FIELD=VALUE ...]

First the checks the stages that run the planned steps make before they load anything (`check`:
`config.validate` for each stage on `--devices`, step counts, LoRA targets, rows within the model's
context, the vocabulary against the tokenizer), so a config a stage refuses gets its sentence in
seconds. Then it builds the config's mesh over `--devices` simulated CPU devices (XLA's
`--xla_force_host_platform_device_count`, set before jax starts its backend), makes every input of
every stage's step an abstract `jax.ShapeDtypeStruct` carrying its `NamedSharding`, and lowers and
compiles the steps: the distillation train step (student, sparse KD), the alignment SFT and DPO train
steps of the proxy (full fine-tuning and LoRA), the posterior step (proxy forward + posterior kernel)
and an eval forward (the student's chunked NLL). Each step runs the batch its stage runs (`row_shape`:
rows and sequence length, and the config fields they come from, printed with the table). For each it
prints the per-device argument, output, temporary and total bytes (`compiled.memory_analysis()`), the
model's FLOPs per device (`models.llama.flops_per_token`) and the step time they imply at
`--peak-tflops` per device (100% MFU; divide by the MFU you expect). XLA's own FLOP count
(`cost_analysis()`, kept in `StepPlan.hlo_flops`) is not printed: XLA counts a `while`/scan body once,
so with scanned layers it is about one layer's work, not the step's.

`--layers=A,B` compiles the models with A and then B layers and extrapolates bytes (and FLOPs) linearly to the
configured depth: with scanned layers every per-layer buffer (parameters, optimizer moments, saved
activations) grows linearly with depth, so two depths fix the line (use it when compiling the
full depth on CPU is too slow). The memory figures are those of the XLA:CPU compilation of the
same sharded program: an approximation of a GPU/TPU compilation (fusion, layouts and the attention
kernel differ).

This module holds the command: the checks, the flags, the device count and the printed header, table and legend;
the lowering, compiling and measuring of the steps is `compiled_steps.py`'s.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib

from proxykd_jax.batch_steps import STAGE, STEPS, TRAINS, model_group, row_shape
from proxykd_jax.compiled_steps import StepPlan, extrapolate, plan_steps


def simulate_devices(n: int) -> None:
    """Makes jax's CPU backend expose `n` devices; must run before jax initialises a backend."""
    import jax

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    try:
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # backend already up (e.g. inside a test process): use what is there
        pass
    have = len(jax.devices())
    if have < n:
        raise ValueError(
            f"plan needs {n} simulated devices but jax already started with {have}; run `proxykd plan` "
            "in a fresh process (or set XLA_FLAGS=--xla_force_host_platform_device_count before starting)."
        )


def _tokenizer_size(cfg) -> tuple[int | None, str]:
    """(tokens, where from) of the run's tokenizer: the prepared data's manifest (what the stages check)
    when the run has one, else `data.tokenizer` loaded; (None, why not) when neither is there."""
    import json

    from proxykd_jax.context.paths import RunPaths

    manifest = RunPaths.from_config(cfg).prepared / "manifest.json"
    if manifest.exists():
        return int(json.loads(manifest.read_text())["tokenizer"]["vocab_size"]), f"prepared data {manifest.parent}"
    if not cfg.data.tokenizer:
        return None, f"no prepared data in {manifest.parent} and no data.tokenizer"
    from proxykd_jax.models.tokenizer import load_tokenizer

    try:
        return len(load_tokenizer(pathlib.Path(str(cfg.data.tokenizer)).expanduser())), str(cfg.data.tokenizer)
    except (OSError, ValueError) as e:
        return None, f"data.tokenizer={str(cfg.data.tokenizer)!r} did not load ({type(e).__name__})"


def check(cfg, steps, num_devices: int) -> list[str]:
    """The checks the stages that run `steps` make before loading a model, for `num_devices` devices:
    `config.validate` per stage (fields, input paths, batch sizes against the mesh's batch shards), step
    counts against optim.grad_accum, LoRA targets, each step's rows within its model's context, and the
    model's vocabulary against the tokenizer. Raises the stage's ConfigError; returns notes on what the
    plan could not check (or its stage does not)."""
    from proxykd_jax import config as config_lib
    from proxykd_jax.align import lora, rounds
    from proxykd_jax.context import RunContext
    from proxykd_jax.errors import ConfigError
    from proxykd_jax.train import distill

    stages = tuple(dict.fromkeys(STAGE[s] for s in steps))
    for stage in stages:
        try:
            config_lib.validate(cfg, stage, num_devices=num_devices)
        except ConfigError as e:  # the mesh names more (or a non-multiple of) devices than --devices
            if "available; change mesh.shape." not in str(e):
                raise
            raise ConfigError(str(e).removesuffix(" change mesh.shape.") + " change --devices or mesh.shape.") from None
    if "distill" in stages:
        distill.check_steps(cfg.train, cfg.optim)
    if "align" in stages:
        rounds.check_steps(cfg.align, cfg.optim)
    if any(s.endswith("lora") for s in steps):
        lora.check_targets(cfg.align.lora.targets, empty_ok=False)
    from proxykd_jax.context import init_folder
    from proxykd_jax.models.config import ModelConfig

    # a start folder must match its group, where a stage starts from it (align, distill; posterior and eval run
    # the models those made)
    for group in dict.fromkeys(model_group(name) for name in steps if STAGE[name] in ("align", "distill")):
        if cfg[group].get("init_from"):
            init_folder(group, cfg[group], ModelConfig.from_config(cfg[group]))
    notes = []
    for name in steps:
        group = model_group(name)
        _, length, _, seq_field = row_shape(cfg, name)
        if name != "distill":  # (distill's train.seq_len: config.validate)
            RunContext.require_fits(cfg[group], length, seq_field, f"the {group}")
    fields = [f for s, f in (("distill", "model"), ("align", "proxy"), ("posterior", "proxy")) if s in stages]
    if fields:
        tokens, source = _tokenizer_size(cfg)
        if tokens is None:
            notes.append(
                f"{' and '.join(dict.fromkeys(f'{f}.vocab_size' for f in fields))} not checked against a "
                f"tokenizer ({source}); the stages refuse one smaller than the prepared tokenizer's."
            )
        for group in dict.fromkeys(fields):
            if tokens is not None and int(cfg[group].vocab_size) < tokens:
                raise ConfigError(
                    f"config.{group}.vocab_size={cfg[group].vocab_size} is smaller than the {tokens} tokens of the "
                    f"tokenizer ({source}); use a model of that tokenizer and set {group}.vocab_size to its "
                    f"embedding rows (at least {tokens})."
                )
    return notes


def format_table(plans: list[StepPlan], peak_flops: float, limit_gb: float) -> str:
    """The table: one row per step, its batch (rows x seq), bytes, fit against `limit_gb`, FLOPs and time."""
    gb = 1e9
    headers = ["step", "layers", "rows", "seq", "args GB", "out GB", "temp GB", "total GB", "fits"]
    headers += ["model TFLOP", "s@peak"]
    rows = [
        [
            p.name,
            str(p.layers),
            str(p.rows),
            str(p.seq_len),
            f"{p.argument_bytes / gb:.2f}",
            f"{p.output_bytes / gb:.2f}",
            f"{p.temp_bytes / gb:.2f}",
            f"{p.total_bytes / gb:.2f}",
            "yes" if p.total_bytes <= limit_gb * gb else "NO",
            f"{p.model_flops / 1e12:.3g}",
            f"{p.model_flops / peak_flops:.3g}",
        ]
        for p in plans
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(headers, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _header(cfg, mesh, n: int, how: str, steps, args) -> list[str]:
    """What every row assumed: the mesh, the remat policy and attention path of each model, the peak and limit."""
    from proxykd_jax.models import attention
    from proxykd_jax.models.llama import ModelConfig, resolve_scan_layers

    models, overstated = [], False
    for group in dict.fromkeys(model_group(s) for s in steps):
        mc = ModelConfig.from_config(cfg[group])
        path = attention.resolve(mc.attention, mc.dtype, platform="cpu")
        trains = any(model_group(s) == group for s in steps if s in TRAINS)
        overstated |= trains and path in ("blocked", "xla") and mc.remat != "full"
        what = "student" if group == "model" else "proxy"
        layers = "scanned layers" if mc.scan_layers else "unrolled layers"
        if resolve_scan_layers(cfg[group].scan_layers, mc.num_layers, mc.remat, "gpu") != mc.scan_layers:
            layers += f" ({group}.scan_layers=auto: a GPU run unrolls them)"
        models.append(
            f"{what}: {group}.remat={mc.remat}, {layers}, attention {path} ({group}.attention={mc.attention} on CPU)"
        )
    lines = [
        f"mesh {dict(mesh.shape)} on {n} simulated CPU devices ({how}); per-device figures from the XLA:CPU "
        "compilation (an approximation of a GPU/TPU one).",
        "; ".join(models) + ".",
    ]
    if overstated:
        lines.append(
            "Without remat=full the CPU attention path keeps its float32 attention probabilities for the backward "
            "pass: the train steps' temp GB over-state a GPU's cuDNN flash attention, which keeps none."
        )
    lines.append(
        f"s@peak = model FLOPs per device / {args.peak_tflops:g} TFLOP/s (--peak-tflops; the default 989 is an "
        f"H100 SXM's dense bf16 peak) at 100% MFU; fits: total GB <= {args.limit_gb:g} (--limit-gb)."
    )
    return lines


def _legend(cfg, plans: list[StepPlan], limit_gb: float, n: int) -> list[str]:
    """Where each row's rows and seq come from, and a hint for each row that does not fit."""
    lines = ["rows x seq from the config:"]
    for p in plans:
        _, _, rows_field, seq_field = row_shape(cfg, p.name)
        unset = " (align.seq_len=0)" if p.name in TRAINS[1:] and seq_field == "data.seq_len" else ""
        lines.append(f"  {p.name}: {rows_field} x {seq_field}{unset}")
    for p in plans:
        if p.total_bytes <= limit_gb * 1e9:
            continue
        group = model_group(p.name)
        remat = str(cfg[group].remat)
        tries = [f"--config.{group}.remat=full (now {remat})"] if p.name in TRAINS and remat != "full" else []
        if p.name in ("sft", "dpo"):
            tries.append(f"LoRA (align.lora.rank > 0: the {p.name}_lora row)")
        tries += [f"a smaller {row_shape(cfg, p.name)[2].removeprefix('2 x ')}", f"more --devices than {n}"]
        lines.append(
            f"{p.name} does not fit ({p.total_bytes / 1e9:.2f} GB > {limit_gb:g} GB): try "
            + ", ".join(tries[:-1])
            + f" or {tries[-1]}."
        )
    return lines


def arguments() -> argparse.ArgumentParser:
    """The plan's own flags; the rest of the command line is the config (`--config=...`, overrides)."""
    ap = argparse.ArgumentParser(
        prog="proxykd plan",
        description=__doc__.splitlines()[0],
        usage="proxykd plan --config=CONFIG_FILE[:ARG] [--config.FIELD=VALUE ...] [options]",
    )
    ap.add_argument(
        "--devices",
        type=int,
        default=0,
        help="simulated devices; needed where mesh.shape has a -1 axis (every shipped config), else its product",
    )
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument(
        "--peak-tflops", type=float, default=989.0, help="per-device peak TFLOP/s (default 989: H100 SXM dense bf16)"
    )
    ap.add_argument("--limit-gb", type=float, default=80.0, help="per-device GB the 'fits' column checks (default 80)")
    ap.add_argument(
        "--layers",
        default="",
        help="A,B (2 <= A < B): compile at A and B layers, extrapolate bytes and FLOPs to full depth",
    )
    return ap


def _depths(text: str) -> tuple[int, int]:
    """The two depths of `--layers=A,B`; one sentence on anything else."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not 2 <= int(parts[0]) < int(parts[1]):
        raise ValueError(
            f"--layers takes two depths A,B with 2 <= A < B (e.g. --layers=2,4; a line from one layer overestimates a "
            f"scanned model's bytes by 16-29%), got {text!r}."
        )
    return int(parts[0]), int(parts[1])


def run(cfg, args: argparse.Namespace) -> str:
    """The plan of `cfg` for the flags `args` (from `arguments()`), as the printed header, table and
    legend; ValueError (one sentence) on bad input, before anything is compiled."""
    sizes = [int(v) for v in dict(cfg.mesh.shape).values()]
    n = args.devices or (math.prod(sizes) if all(s > 0 for s in sizes) else 0)
    if n <= 0:
        raise ValueError("mesh.shape has a -1 axis; pass --devices=N (the number of accelerators to plan for).")
    steps = tuple(s for s in args.steps.split(",") if s)
    unknown = sorted(set(steps) - set(STEPS))
    if unknown or not steps:
        what = f"unknown step(s) {unknown}" if unknown else "--steps names no step"
        raise ValueError(f"{what}; choose from {', '.join(STEPS)}.")
    depths = _depths(args.layers) if args.layers else None
    simulate_devices(n)
    notes = check(cfg, steps, n)  # the stages' own checks: a config they refuse stops here, in seconds
    import jax

    from proxykd_jax.parallel.mesh import make_mesh

    mesh = make_mesh(cfg.mesh, jax.devices()[:n])  # (`check` refused a mesh that --devices does not fill)
    if depths:
        lo, hi = depths
        depth = {s: int((cfg.model if model_group(s) == "model" else cfg.proxy).num_layers) for s in steps}
        plans = extrapolate(plan_steps(cfg, mesh, steps, lo), plan_steps(cfg, mesh, steps, hi), depth)
        how = f"bytes and FLOPs extrapolated linearly from {lo} and {hi} layers"
        notes += [
            f"{p.name}: the line through {lo} and {hi} layers gives negative bytes (XLA compiled the two depths "
            "differently); plan at larger depths (e.g. --layers=4,8) or at full depth."
            for p in plans
            if min(p.argument_bytes, p.output_bytes, p.temp_bytes) < 0
        ]
    else:
        plans = plan_steps(cfg, mesh, steps)
        how = "compiled at full depth"
    lines = _header(cfg, mesh, n, how, steps, args)
    lines += [format_table(plans, args.peak_tflops * 1e12, args.limit_gb)]
    lines += _legend(cfg, plans, args.limit_gb, n) + [f"note: {x}" for x in notes]
    return "\n".join(lines)
