"""Throughput of one jitted AdamW train step of a small Llama, against the measured matmul peak.

    .venv/bin/python benchmarks/train_step.py [--steps 4] [--rounds 4] [--warmup 3] [--no-torch]
                                              [--torch-compile] [--no-dense-ce] [--scanned] [--steps-per-call 16]

Model: 4 layers, d_model 256, 8 heads (head_dim 32), d_ff 1024, vocab 8192, seq 256, batch 8,
float32, AdamW with global-norm clipping. Rows, timed in alternating rounds (median):

  jax (jit), fused CE    the library's step (`train.make_train_step`) with the library's loss,
                         `losses.cross_entropy_chunked` (gradient computed in the forward pass)
  jax (jit), dense CE    the same step with log_softmax + take_along_axis over full [B, L, V] logits
  jax (jit), scanned     the fused-CE step with `jax.lax.scan` over the stacked layers
                         (`model.scan_layers=True`; the default "auto" unrolls these 4 layers) (--scanned)
  jax (jit), N steps     the fused-CE step as `train.Loop` runs it on CPU in runs of >= 1,000 steps
    per call             (`train.steps_per_call` auto = 16): N steps over N batches in one compiled call
                         (`train.make_multi_step`); time per step (--steps-per-call N, default 16; 1 = skip)
  pytorch eager          LlamaForCausalLM (transformers, sdpa attention) + F.cross_entropy, AdamW,
                         clip_grad_norm_ (when torch + transformers import)
  pytorch torch.compile  the same with the model under torch.compile (--torch-compile; needs a C++
                         compiler, adds about a minute of compilation)

FLOPs/token follow `models.llama.flops_per_token` (2 per MAC, training = 3x forward, causal
attention halved).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import matmul_peak, median_time, print_table  # noqa: E402
from flax import nnx  # noqa: E402

from proxykd_jax import losses  # noqa: E402
from proxykd_jax.models.llama import Llama, ModelConfig, flops_per_token  # noqa: E402
from proxykd_jax.parallel import LOGICAL_RULES, batch_sharding, global_batch, global_batches, make_mesh  # noqa: E402
from proxykd_jax.parallel.mesh import default_config as mesh_default_config  # noqa: E402
from proxykd_jax.train import create_train_state, make_multi_step, make_optimizer, make_train_step  # noqa: E402
from proxykd_jax.train.optim import default_config as optim_default_config  # noqa: E402

CFG = ModelConfig(
    vocab_size=8192, d_model=256, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=32, d_ff=1024, max_seq_len=256
)
BATCH, LENGTH = 8, 256
CHUNK = 512  # tokens per logits tile of the fused cross-entropy


def ce_loss(model, batch, chunk_size=CHUNK):
    """Mean next-token cross-entropy: the library's fused linear + CE (`losses.cross_entropy_chunked`)."""
    hidden = model.hidden(batch["tokens"])
    targets = batch["targets"].reshape(-1)
    ce_sum, n_tokens = losses.cross_entropy_chunked(
        hidden.reshape(-1, hidden.shape[-1]),
        model.unembedding(),
        targets,
        jnp.ones(targets.shape, jnp.float32),
        chunk_size=chunk_size,
    )
    return ce_sum / n_tokens, {}


def dense_ce_loss(model, batch):
    """The same loss from full [B, L, V] logits (plain autodiff), for comparison."""
    logp = jax.nn.log_softmax(model(batch["tokens"]), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.mean(nll), {}


def host_batch(seed: int = 0) -> dict[str, np.ndarray]:
    seq = np.random.default_rng(seed).integers(0, CFG.vocab_size, (BATCH, LENGTH + 1), dtype=np.int32)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:]}


def jax_step_fn(loss_fn=ce_loss, cfg: ModelConfig = CFG, steps_per_call: int = 1):
    """The benchmarked JAX step as a blocking closure: one `make_train_step` call per step, or with
    `steps_per_call` > 1 the train loop's several-step call (`make_multi_step`, what `train.Loop` runs
    on CPU for runs of >= 1,000 steps by default) over that many batches."""
    mesh = make_mesh(mesh_default_config())
    optim_cfg = optim_default_config()
    optim_cfg.warmup_steps = 10
    optimizer = make_optimizer(optim_cfg, total_steps=1000)
    graphdef, state, shardings = create_train_state(optimizer, mesh, LOGICAL_RULES, Llama, cfg, rngs=nnx.Rngs(0))
    step = make_train_step(
        loss_fn, graphdef, optimizer, state_shardings=shardings, batch_shardings=batch_sharding(mesh, LOGICAL_RULES)
    )
    holder = {"state": state}
    if steps_per_call > 1:
        call = make_multi_step(step, shardings)
        data = global_batches([host_batch(i) for i in range(steps_per_call)], mesh, LOGICAL_RULES)
    else:
        call, data = step, global_batch(host_batch(), mesh, LOGICAL_RULES)

    def run():
        holder["state"], metrics = call(holder["state"], data)
        jax.block_until_ready(metrics["loss"])

    run.steps = steps_per_call  # train steps per call: `interleaved_medians` divides by it
    return run


def torch_step_fn(compile_model: bool = False):
    """The same step in PyTorch + transformers (eager, or the model under torch.compile), or None without torch."""
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=CFG.vocab_size,
        hidden_size=CFG.d_model,
        intermediate_size=CFG.d_ff,
        num_hidden_layers=CFG.num_layers,
        num_attention_heads=CFG.num_heads,
        num_key_value_heads=CFG.num_kv_heads,
        head_dim=CFG.head_dim,
        max_position_embeddings=LENGTH,
        tie_word_embeddings=False,
        rms_norm_eps=CFG.rms_eps,
        use_cache=False,  # a training step: no KV cache (transformers builds one by default)
    )
    model = LlamaForCausalLM(config).train()
    forward = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    batch = host_batch()
    tokens, targets = torch.from_numpy(batch["tokens"]).long(), torch.from_numpy(batch["targets"]).long()

    def run():
        logits = forward(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size).float(), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def interleaved_medians(fns: dict, *, warmup: int, steps: int, rounds: int) -> dict:
    """Median seconds per train step of each closure, timed in alternating rounds so machine noise hits
    all alike (a closure running several steps per call is timed per call, divided by its steps)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        median_time(fn, warmup=warmup, repeats=1)
    for _ in range(rounds):
        for name, fn in fns.items():
            per_call = getattr(fn, "steps", 1)
            times[name].append(median_time(fn, warmup=0, repeats=max(1, steps // per_call)) / per_call)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round (median reported)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds over the implementations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (incl. compilation)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="also time PyTorch with the model under torch.compile (needs a C++ compiler)",
    )
    parser.add_argument("--no-dense-ce", action="store_true", help="skip the JAX row with the dense cross-entropy")
    parser.add_argument(
        "--scanned", action="store_true", help="also time the fused-CE step with scanned layers (scan_layers=True)"
    )
    parser.add_argument(
        "--steps-per-call",
        type=int,
        default=16,
        help="also time the fused-CE step as the train loop runs it on CPU: this many steps per call (1: skip)",
    )
    args = parser.parse_args()

    tokens = BATCH * LENGTH
    flops_tok = flops_per_token(CFG, LENGTH)
    peak = matmul_peak()
    fns = {f"jax (jit), fused CE, tiles of {CHUNK}": jax_step_fn()}
    if args.steps_per_call > 1:
        fns[f"jax (jit), fused CE, {args.steps_per_call} steps per call"] = jax_step_fn(
            steps_per_call=args.steps_per_call
        )
    if not args.no_dense_ce:
        fns["jax (jit), dense CE"] = jax_step_fn(dense_ce_loss)
    if args.scanned:
        fns["jax (jit), fused CE, scanned layers"] = jax_step_fn(cfg=dataclasses.replace(CFG, scan_layers=True))
    if not args.no_torch:
        for name, compiled in (("pytorch eager", False), ("pytorch torch.compile", True)):
            if compiled and not args.torch_compile:
                continue
            fn = torch_step_fn(compiled)
            if fn is not None:
                fns[name] = fn
    medians = interleaved_medians(fns, warmup=args.warmup, steps=args.steps, rounds=args.rounds)
    rows = []
    for name, seconds in medians.items():
        achieved = flops_tok * tokens / seconds
        rows.append([name, tokens / seconds, flops_tok / 1e6, achieved / 1e9, peak / 1e9, achieved / peak])
    print(
        f"# train_step, {datetime.date.today()}, jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"x{jax.device_count()}; batch {BATCH} x seq {LENGTH}, float32; median of {args.rounds} alternating "
        f"rounds of {args.steps} steps"
    )
    print("# FLOPs/token: 2 per MAC, training = 3x forward, causal attention halved, embedding lookup free")
    print_table(rows, ["impl", "tokens/s", "MFLOP/token", "GFLOP/s", "matmul peak GFLOP/s", "frac of peak"])
    jax_rows = {n: s for n, s in medians.items() if n.startswith("jax") and "dense" not in n and "scanned" not in n}
    for name, seconds in medians.items():
        if name.startswith("pytorch"):
            for jax_name, jax_s in jax_rows.items():
                print(f"JAX [{jax_name.removeprefix('jax (jit), ')}] / {name} tokens/s ratio: {seconds / jax_s:.2f}")


if __name__ == "__main__":
    main()
