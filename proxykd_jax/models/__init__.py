"""Llama-family models: the decoder, KV-cache sampling, HF import/export, tokenizers.

`ModelConfig` and `default_config` come from `models/config.py` (no flax); the decoder's names load with
`models/llama.py` on their first use (`proxykd_jax.deferred`).
"""

from proxykd_jax.deferred import names_of
from proxykd_jax.models.config import ModelConfig, default_config

__all__ = ["KVCache", "Llama", "ModelConfig", "default_config", "flops_per_token"]
__getattr__ = names_of(__name__, {"llama": ("KVCache", "Llama", "flops_per_token")})
