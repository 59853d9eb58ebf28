"""Distillation-step throughput: JAX SFT step, JAX sparse-KD step, PyTorch + transformers KD step.

All three rows train the same model on the same batch (default: 4 layers, d_model 256, vocab 8192,
seq 256, batch 8, K = 64 sparse targets, forward KL with the tail bucket, α = 100, AdamW):

  jax sft    `distill.make_loss_fn` with loss.alpha = 0 (chunked CE only) in `train.make_train_step`
  jax kd     the same with loss.alpha = 100: chunked CE + sparse KD over the token tiles
  torch kd   `LlamaForCausalLM` (eager PyTorch, sdpa attention), dense float32 logits,
             log_softmax + gather for CE and KD, AdamW; the same objective written plainly

Rows are timed round-robin (one step of each per round, median over rounds) so load from other
processes hits them alike. MFU = model FLOPs (`models.flops_per_token`: 6·params per token plus
causal-halved attention; the KD gather is not counted) / time / a float32 matmul peak measured on
the same device in the same run. Prints the KD/SFT overhead and the JAX/PyTorch throughput ratio.

  .venv/bin/python benchmarks/distill_step.py [--rounds 5] [--layers 4 --d-model 256 --vocab 8192
      --seq 256 --batch 8 --k 64]
Needs torch (the `bench` extra) for the third row.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import numpy as np
from flax import nnx

from proxykd_jax import losses, parallel, train
from proxykd_jax.models import flops_per_token
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.train import distill


def make_batch(cfg: ModelConfig, batch: int, seq: int, k: int, prompt: int, seed: int = 0) -> dict:
    """One packed batch of random tokens with a random top-k target per response position."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    kd_ids = np.argsort(rng.random((batch, seq, cfg.vocab_size), np.float32), axis=-1)[..., :k].astype(np.int32)
    probs = rng.dirichlet(np.full(k + 1, 0.2), size=(batch, seq)).astype(np.float32)
    mask = np.ones((batch, seq), np.float32)
    mask[:, :prompt] = 0.0
    positions = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
    return dict(
        tokens=tokens[:, :-1],
        targets=tokens[:, 1:],
        positions=positions,
        segment_ids=np.ones((batch, seq), np.int32),
        loss_mask=mask,
        sample_ids=np.repeat(np.arange(batch, dtype=np.int32)[:, None], seq, 1),
        kd_ids=kd_ids,
        kd_logprobs=np.log(np.maximum(probs[..., :k], 1e-30)),
        kd_tail=probs[..., k],
        weight=np.full((batch, seq), 0.7, np.float32),
    )


def jax_step(cfg: ModelConfig, batch: dict, alpha: float, lr: float):
    """A zero-argument callable running one jitted JAX distill step (state threaded inside)."""
    mesh_cfg = parallel.default_config()
    mesh_cfg.shape.update(data=1, fsdp=1, tensor=1)
    mesh = parallel.make_mesh(mesh_cfg, devices=jax.devices()[:1])
    rules = parallel.LOGICAL_RULES
    optim_cfg = train.optim.default_config()
    optim_cfg.update(lr=lr, warmup_steps=1, clip_norm=0.0, weight_decay=0.0)
    optimizer = train.make_optimizer(optim_cfg, 1000)
    graphdef, state, shardings = train.create_train_state(optimizer, mesh, rules, Llama, cfg, rngs=nnx.Rngs(0))
    loss_cfg = losses.default_config()
    loss_cfg.alpha = alpha
    fields = (
        batch
        if alpha > 0
        else {k: v for k, v in batch.items() if k not in ("kd_ids", "kd_logprobs", "kd_tail", "weight")}
    )
    step = train.make_train_step(
        distill.make_loss_fn(loss_cfg),
        graphdef,
        optimizer,
        state_shardings=shardings,
        batch_shardings=parallel.batch_sharding(mesh, rules),
    )
    device_batch = parallel.global_batch(fields, mesh, rules)
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], device_batch)
        loss = float(metrics["loss"])  # waits for the step
        if not np.isfinite(loss):
            raise FloatingPointError(f"JAX step (alpha={alpha}) produced loss {loss}.")

    return run


def torch_step(cfg: ModelConfig, batch: dict, alpha: float, lr: float):
    """The same KD step in eager PyTorch + transformers; a zero-argument callable."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = (
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.d_model,
                intermediate_size=cfg.d_ff,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim,
                max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.rms_eps,
                tie_word_embeddings=False,
                use_cache=False,
            )
        )
        .float()
        .train()
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    b = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    tokens, targets, kd_ids = b["tokens"].long(), b["targets"].long(), b["kd_ids"].long()
    mask, weight, p_tail = b["loss_mask"], b["weight"], b["kd_tail"]
    logp_k, p_k = b["kd_logprobs"], b["kd_logprobs"].exp()

    def run():
        optimizer.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=tokens).last_hidden_state
        logq = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
        ce = -logq.gather(-1, targets[..., None]).squeeze(-1)
        logq_k = logq.gather(-1, kd_ids)
        head = (p_k * (logp_k - logq_k)).sum(-1)
        logq_tail = torch.log1p(-logq_k.exp().sum(-1).clamp(max=1 - 1e-6))
        kd = head + p_tail * (p_tail.clamp(min=1e-30).log() - logq_tail)
        loss = ((mask * ce).sum() + alpha * (mask * weight * kd).sum()) / mask.sum()
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"PyTorch step produced loss {float(loss)}.")

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=100.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch row")
    args = ap.parse_args()

    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        head_dim=args.d_model // args.heads,
        d_ff=args.d_ff,
        max_seq_len=args.seq,
    )
    batch = make_batch(cfg, args.batch, args.seq, args.k, prompt=args.seq // 8)
    lr = 1e-4
    rows = {
        "jax sft (alpha=0)": jax_step(cfg, batch, 0.0, lr),
        f"jax kd (alpha={args.alpha:g}, K={args.k})": jax_step(cfg, batch, args.alpha, lr),
    }
    if not args.no_torch:
        rows[f"torch kd (alpha={args.alpha:g}, K={args.k}, eager)"] = torch_step(cfg, batch, args.alpha, lr)
    for fn in rows.values():  # compile + warm up
        fn()
        fn()
    times = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    peak = train.measure_matmul_peak(n=1024, repeats=10, devices=jax.devices()[:1])
    tokens = args.batch * args.seq
    flops = tokens * flops_per_token(cfg, args.seq, backward=True)

    device = jax.devices()[0]
    print(
        f"# distill step, {datetime.date.today().isoformat()}, {device.platform} ({device.device_kind}), "
        f"{args.layers} layers, d_model {args.d_model}, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, "
        f"K {args.k}; median of {args.rounds} rounds; float32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    print(f"{'step':<40} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7}")
    medians = {}
    for name, ts in times.items():
        medians[name] = statistics.median(ts)
        print(
            f"{name:<40} {medians[name] * 1e3:>9.1f} {tokens / medians[name]:>10.0f} "
            f"{flops / medians[name] / peak:>7.1%}"
        )
    sft, kd, *ref = list(medians.values())
    print(f"KD overhead over SFT (JAX): {kd / sft - 1:+.1%}")
    if ref:
        print(f"JAX/PyTorch KD throughput ratio: {ref[0] / kd:.2f}x")


if __name__ == "__main__":
    main()
