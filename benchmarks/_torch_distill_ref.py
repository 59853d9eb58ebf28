"""PyTorch + transformers reference of one sparse-KD distillation step (benchmark extra only).

The same math as `proxykd_jax.stages.distill.make_loss_fn` with forward KL and the tail bucket:

    L = (Σ_t m_t · CE_t + α · Σ_t m_t · w_t · KL_t) / Σ_t m_t
    KL_t = Σ_k q_k (log q_k − log p_k) + q_tail (log q_tail − log(1 − Σ_k p_k))

computed the way a PyTorch user would write it: `LlamaForCausalLM`'s decoder, dense float32
logits over the whole vocabulary, `log_softmax`, `gather`, eager execution (no `torch.compile`),
AdamW. Imported by `benchmarks/distill_step.py` only, so the package never needs torch.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_model(*, vocab_size, d_model, num_layers, num_heads, num_kv_heads, head_dim, d_ff, seq_len, seed=0):
    """A randomly initialised float32 `LlamaForCausalLM` with the benchmark's shapes."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_ff,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, head_dim=head_dim, max_position_embeddings=seq_len,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, use_cache=False)
    return LlamaForCausalLM(config).float().train()


def kd_loss(logits_BxLxV, targets_BxL, kd_ids_BxLxK, kd_logprobs_BxLxK, kd_tail_BxL, weight_BxL, mask_BxL, alpha):
    """CE + α·w·forward-KL (tail bucket), per-token mean over masked tokens; float32."""
    logp = torch.log_softmax(logits_BxLxV.float(), dim=-1)
    ce = -logp.gather(-1, targets_BxL[..., None]).squeeze(-1)
    student_k = logp.gather(-1, kd_ids_BxLxK)
    q_k = kd_logprobs_BxLxK.exp()
    head = (q_k * (kd_logprobs_BxLxK - student_k)).sum(-1)
    student_tail = torch.log1p(-torch.exp(torch.logsumexp(student_k, -1)).clamp(max=1 - 1e-6))
    tail = torch.where(kd_tail_BxL > 0, kd_tail_BxL * (torch.log(kd_tail_BxL.clamp(min=1e-30)) - student_tail),
                       torch.zeros_like(kd_tail_BxL))
    kd = head + tail
    n = mask_BxL.sum().clamp(min=1.0)
    return ((mask_BxL * ce).sum() + alpha * (mask_BxL * weight_BxL * kd).sum()) / n


def time_kd_step(model, batch_np: dict, *, alpha: float, lr: float = 1e-3, warmup: int = 2, iters: int = 5):
    """Seconds per KD train step (forward, backward, AdamW) after `warmup` untimed steps."""
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in batch_np.items()}
    batch["tokens"], batch["targets"] = batch["tokens"].long(), batch["targets"].long()
    batch["kd_ids"] = batch["kd_ids"].long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=batch["tokens"]).last_hidden_state
        logits = model.lm_head(hidden)
        loss = kd_loss(logits, batch["targets"], batch["kd_ids"], batch["kd_logprobs"], batch["kd_tail"],
                       batch["weight"], batch["loss_mask"], alpha)
        loss.backward()
        optimizer.step()
        return float(loss)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        loss = step()
    if not np.isfinite(loss):
        raise FloatingPointError(f"PyTorch reference step produced a non-finite loss {loss}.")
    return (time.perf_counter() - start) / iters
