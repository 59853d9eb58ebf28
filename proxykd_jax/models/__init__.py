"""Llama-family models: the decoder, KV-cache sampling, HF import/export, tokenizers."""

from proxykd_jax.models.llama import KVCache, Llama, ModelConfig, default_config, flops_per_token

__all__ = ["KVCache", "Llama", "ModelConfig", "default_config", "flops_per_token"]
