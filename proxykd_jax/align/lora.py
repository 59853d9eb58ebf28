"""Low-rank adapters (LoRA) for the Llama proxy: frozen base weights, trained adapters.

For a targeted weight W (e.g. `wq` [D, H, E]) the adapter holds A [in..., r] and B [r, out...]
with W_eff = W + (alpha / r) * A @ B, contracting the input axes of W (`wo` [H, E, D] has two).
B starts at zero so the adapted model equals the base at initialisation. A and B are float32 whatever
the base's `param_dtype` (as PEFT's default `autocast_adapter_dtype`): stored in a bfloat16 base's dtype, A
(entries ~ 1 / sqrt(fan-in)) lost every update below its ulp, e.g. 98% of its entries unchanged after 20 Adam
steps at align.dpo_lr = 1e-5. They are small; the merged weight takes the base's dtype.

The adapters are merged into the weights inside the forward pass (`merged`): the model code stays
untouched, and under jit the merged weight inherits W's sharding, so the extra memory is one
sharded copy of the targeted weights. Adapters carry the logical axes of W on their input/output
axes and None (replicated) on the rank axis.

Stacked weights (the decoder's blocks hold [layers, ...] parameters, leading logical axis `layers`)
get one adapter per layer: A [layers, in..., r], B [layers, r, out...], contracted layer by layer.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxykd_jax.align.config import lora_config as default_config  # noqa: F401  (re-exported)
from proxykd_jax.errors import ConfigError

# Number of leading (input) axes of each adaptable weight of models/llama.py.
INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


def check_targets(targets, *, empty_ok: bool = True) -> None:
    """Refuses `align.lora.targets` that name a weight models/llama.py does not have (and none at all,
    unless `empty_ok`), in one sentence."""
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(INPUT_AXES))
    if unknown or not (targets or empty_ok):
        what = f"has unknown weight names {unknown}" if unknown else "names no weight"
        raise ConfigError(
            f"config.align.lora.targets {what}; choose from {sorted(INPUT_AXES)} (or set align.lora.rank=0 "
            "for full fine-tuning)."
        )


class LoraAdapters(nnx.Module):
    """A and B factors for every targeted weight of a base model (paths kept as static data)."""

    def __init__(self, base: nnx.Module, *, rank: int, alpha: float, targets, rngs: nnx.Rngs):
        if rank <= 0:
            raise ConfigError(f"align.lora.rank must be positive to build adapters, got {rank}.")
        check_targets(targets)  # none at all: "matched no weight" below
        self.rank, self.scale = int(rank), float(alpha) / float(rank)
        paths, a_list, b_list, lead_flags = [], [], [], []
        for path, var in nnx.to_flat_state(nnx.state(base, nnx.Param)):
            name = path[-1]
            if name not in targets:
                continue
            shape = tuple(var[...].shape)
            axes = tuple(var.get_metadata().get("out_sharding") or (None,) * len(shape))
            lead = 1 if axes[:1] == ("layers",) else 0  # stacked layers: one adapter per layer
            n_in = lead + INPUT_AXES[name]
            stack_shape, in_shape, out_shape = shape[:lead], shape[lead:n_in], shape[n_in:]
            a = jax.random.normal(rngs.params(), shape[:n_in] + (rank,), jnp.float32) / math.sqrt(math.prod(in_shape))
            a_list.append(nnx.Param(a, out_sharding=axes[:n_in] + (None,), eager_sharding=False))
            b_list.append(
                nnx.Param(
                    jnp.zeros(stack_shape + (rank,) + out_shape, jnp.float32),
                    out_sharding=axes[:lead] + (None,) + axes[n_in:],
                    eager_sharding=False,
                )
            )
            paths.append(tuple(path))
            lead_flags.append(bool(lead))
        if not paths:
            raise ConfigError(
                f"align.lora.targets {list(targets)} matched no weight of the proxy; name some of {sorted(INPUT_AXES)}."
            )
        self.paths = tuple(paths)
        self.stacked = tuple(lead_flags)
        self.a = nnx.List(a_list)
        self.b = nnx.List(b_list)

    def deltas(self) -> dict:
        """{path: scale * A @ B reshaped like the base weight} (in float32)."""
        out = {}
        for path, stacked, a, b in zip(self.paths, self.stacked, self.a, self.b):
            a_val, b_val = a[...].astype(jnp.float32), b[...].astype(jnp.float32)

            def product(a_in, b_out):
                return jnp.tensordot(a_in, b_out, axes=([a_in.ndim - 1], [0]))

            delta = jax.vmap(product)(a_val, b_val) if stacked else product(a_val, b_val)
            out[path] = self.scale * delta
        return out


def merged(base: nnx.Module, adapters: LoraAdapters) -> nnx.Module:
    """A new module equal to `base` with W + scale * A @ B in every targeted weight (base untouched)."""
    graphdef, state = nnx.split(base)
    deltas = adapters.deltas()
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(path)
        if key in deltas:
            value = var[...]
            var = var.replace(value=(value.astype(jnp.float32) + deltas[key]).astype(value.dtype))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_adapters(adapters: LoraAdapters, folder: str | pathlib.Path, *, targets) -> None:
    """Writes `adapters.safetensors` (keys `<path>.lora_a` / `.lora_b`) and `lora.json`."""
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, a, b in zip(adapters.paths, adapters.a, adapters.b):
        key = ".".join(str(p) for p in path)
        tensors[f"{key}.lora_a"] = np.asarray(jax.device_get(a[...]), np.float32)
        tensors[f"{key}.lora_b"] = np.asarray(jax.device_get(b[...]), np.float32)
    save_file(tensors, str(folder / "adapters.safetensors"))
    meta = {
        "rank": adapters.rank,
        "scale": adapters.scale,
        "targets": list(targets),
        "input_axes": {k: INPUT_AXES[k] for k in targets},
    }
    (folder / "lora.json").write_text(json.dumps(meta, indent=2) + "\n")
