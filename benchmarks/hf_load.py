"""Peak memory and time of loading a Hugging Face folder onto a mesh: the streaming loader against
building each tensor whole on one device and then resharding it (what `load_hf` once did).

Writes a random float32 Llama folder (default 323 MB, in 100 MiB files with an index), then for each
mode starts a fresh process with 8 simulated CPU devices (mesh fsdp=4 x tensor=2), resets its peak
resident size (VmHWM) after start-up, loads, and prints the peak above that baseline, the bytes of
the loaded arrays (every device's shard), the excess over them, and what stays resident beyond the
arrays once `malloc_trim` has returned freed memory to the OS.

  .venv/bin/python benchmarks/hf_load.py [--folder /tmp/hf_load] [--vocab 16384] [--d-model 1024]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from _common import print_table

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from proxykd_jax import parallel
from proxykd_jax.models import hf, safetensors_io
from proxykd_jax.models.llama import Llama


def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


folder, mode = sys.argv[1], sys.argv[2]
mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
jax.block_until_ready(jax.device_put(np.ones((8, 8), np.float32), NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base, start = status(), time.perf_counter()
if mode == "stream":
    _, model = hf.load_hf(folder, mesh=mesh)
else:  # every tensor whole on one device, then the model resharded
    cfg = hf.read_config(folder)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    source = safetensors_io.SafetensorsFolder(folder)
    for key, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(hf.tensor_map(key, cfg).read(source, (), np.float32)))
    model = nnx.merge(*parallel.place_model(nnx.merge(graphdef, state), mesh, parallel.LOGICAL_RULES))
    del graphdef, state  # the whole copies are no longer needed
leaves = jax.block_until_ready(jax.tree.leaves(nnx.state(model, nnx.Param)))
seconds, end = time.perf_counter() - start, status()
import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)  # what stays resident once freed read buffers go back to the OS
print(json.dumps(dict(seconds=seconds, baseline=base["VmRSS"], peak=end["VmHWM"], trimmed=status()["VmRSS"],
    loaded=sum(s.data.nbytes for x in leaves for s in x.addressable_shards), largest=max(x.nbytes for x in leaves))))
"""


def write_folder(folder: pathlib.Path, vocab: int, d_model: int) -> None:
    from proxykd_jax.models import hf, safetensors_io
    from proxykd_jax.models.llama import ModelConfig

    cfg = ModelConfig(
        vocab_size=vocab,
        d_model=d_model,
        num_layers=4,
        num_heads=16,
        num_kv_heads=8,
        head_dim=d_model // 16,
        d_ff=int(d_model * 2.75),
        max_seq_len=256,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf._hf_config(cfg, "LlamaForCausalLM", hf.token_ids_of(None))))
    shapes = hf._hf_shapes(cfg)
    rng = np.random.default_rng(0)
    safetensors_io.write_sharded(
        folder,
        {name: (shape, np.float32) for name, shape in shapes.items()},
        lambda name: rng.standard_normal(shapes[name], np.float32),
        max_shard_bytes=100 * 2**20,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="/tmp/hf_load")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=1024)
    args = ap.parse_args()
    folder = pathlib.Path(args.folder)
    write_folder(folder, args.vocab, args.d_model)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    rows = []
    for mode in ("stream", "whole"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        m = json.loads(out.stdout.strip().splitlines()[-1])
        mb = lambda x: f"{x / 1e6:.1f}"  # noqa: E731
        above = m["peak"] - m["baseline"]
        kept = m["trimmed"] - m["baseline"] - m["loaded"]
        rows.append(
            [
                mode,
                f"{m['seconds']:.2f}",
                mb(m["loaded"]),
                mb(m["largest"]),
                mb(above),
                mb(above - m["loaded"]),
                mb(kept),
            ]
        )
    headers = [
        "mode",
        "seconds",
        "loaded MB",
        "largest MB",
        "peak above baseline MB",
        "excess MB",
        "kept after trim MB",
    ]
    print_table(rows, headers)


if __name__ == "__main__":
    main()
