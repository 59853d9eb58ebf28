"""Peak memory of the streaming loader: a 323 MB float32 model loaded onto an fsdp=4 x tensor=2
mesh of 8 simulated CPU devices, in a fresh process. Its peak resident memory above the baseline
may exceed the bytes of the loaded arrays (every device's shard) by at most the largest tensor plus
BOUND (allocator slack and the blocks in flight; measured figures in BUILD_NOTES.md). Building each
tensor whole first, as the loader once did, exceeds it by 481 MB."""

import json
import os
import subprocess
import sys

import numpy as np

from proxykd_jax.models import hf, safetensors_io
from proxykd_jax.models.llama import ModelConfig

# Measured excess 65-84 MB alone (2026-12-04 and -05), once 101 MB inside the full suite (two workers): the
# bound leaves that room and still fails the whole-tensor loader (481-549 MB excess) by far.
BOUND = 64 * 2**20

CHILD = r"""
import json, os, sys
import jax, numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from proxykd_jax.models import hf


def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
sharding = NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))  # warm the runtime up: not part of a load
jax.block_until_ready(jax.device_put(np.ones((8, 8), np.float32), sharding))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident size
base = status()
_, model = hf.load_hf(sys.argv[1], mesh=mesh)
leaves = jax.block_until_ready(jax.tree.leaves(nnx.state(model, nnx.Param)))
end = status()
print(json.dumps(dict(
    baseline=base["VmRSS"],
    peak=end["VmHWM"],
    loaded=sum(s.data.nbytes for x in leaves for s in x.addressable_shards),
    largest=max(x.nbytes for x in leaves),
)))
"""


def test_streaming_load_peak_memory(tmp_path):
    cfg = ModelConfig(
        vocab_size=16384,
        d_model=1024,
        num_layers=4,
        num_heads=16,
        num_kv_heads=8,
        head_dim=64,
        d_ff=2816,
        max_seq_len=256,
    )
    (tmp_path / "config.json").write_text(json.dumps(hf._hf_config(cfg, "LlamaForCausalLM", hf.token_ids_of(None))))
    shapes = hf._hf_shapes(cfg)
    rng = np.random.default_rng(0)
    safetensors_io.write_sharded(
        tmp_path,
        {name: (shape, np.float32) for name, shape in shapes.items()},
        lambda name: rng.standard_normal(shapes[name], np.float32),
        max_shard_bytes=100 * 2**20,  # several files with an index
    )
    assert (tmp_path / "model.safetensors.index.json").exists()
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    assert m["loaded"] >= total > 300 * 10**6  # every parameter, split over the devices (norms copied twice)
    excess = m["peak"] - m["baseline"] - m["loaded"]
    print(f"peak above baseline {m['peak'] - m['baseline']} B, loaded {m['loaded']} B, excess {excess} B")
    assert excess <= m["largest"] + BOUND, m
