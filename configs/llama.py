"""Real model shapes: `--config=configs/llama.py:STUDENT[,PROXY]`.

    configs/llama.py:7b,70b         Llama-2-7B student, Llama-2-70B proxy (the paper's setting)
    configs/llama.py:tinyllama,7b   TinyLlama-1.1B student, Llama-2-7B proxy
    configs/llama.py:llama3-8b,70b  Llama-3.1-8B student (its tokenizer is not Llama-2's: pick a proxy of the same family)

These are shape presets: weights come from the user's local Hugging Face
folders (`--config.model.init_from=/path`, `--config.proxy.init_from=/path`),
whose config.json must agree with the shape (checked at load).
"""

from proxykd_jax.config import base_config

SHAPES = {
    # name: (vocab, d_model, layers, heads, kv_heads, head_dim, d_ff, rope_theta, rms_eps, max_seq_len)
    "tinyllama": (32000, 2048, 22, 32, 4, 64, 5632, 10000.0, 1e-5, 2048),
    "7b": (32000, 4096, 32, 32, 32, 128, 11008, 10000.0, 1e-5, 4096),
    "13b": (32000, 5120, 40, 40, 40, 128, 13824, 10000.0, 1e-5, 4096),
    "70b": (32000, 8192, 80, 64, 8, 128, 28672, 10000.0, 1e-5, 4096),
    "llama3-8b": (128256, 4096, 32, 32, 8, 128, 14336, 500000.0, 1e-5, 131072),  # Llama-3.1's config.json
}
LLAMA3_SCALING = ("llama3", 8.0, 1.0, 4.0, 8192)


def _set_shape(group, name: str) -> None:
    if name not in SHAPES:
        raise ValueError(f"configs/llama.py: unknown preset {name!r}; choose from {sorted(SHAPES)}.")
    (
        group.vocab_size,
        group.d_model,
        group.num_layers,
        group.num_heads,
        group.num_kv_heads,
        group.head_dim,
        group.d_ff,
        group.rope_theta,
        group.rms_eps,
        group.max_seq_len,
    ) = SHAPES[name]
    group.rope_scaling = LLAMA3_SCALING if name.startswith("llama3") else None
    group.param_dtype = "float32"  # master weights
    group.dtype = "bfloat16"  # compute


def get_config(arg: str = "7b,70b"):
    student, _, proxy = arg.partition(",")
    cfg = base_config()
    _set_shape(cfg.model, student)
    _set_shape(cfg.proxy, proxy or student)
    cfg.run.dir = f"runs/{student}-from-{proxy or student}"
    cfg.train.seq_len = cfg.data.seq_len = 2048  # rows trained on; the longest sample prepare takes
    cfg.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
    return cfg.lock()
