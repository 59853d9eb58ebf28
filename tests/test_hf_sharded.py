"""Sharded model I/O: a Hugging Face folder streamed onto an fsdp=4 x tensor=2 mesh equals the
single-device load bit for bit, each device reading only its own block; a scanned (stacked) leaf
is assembled from per-layer tensors; export writes files within the size limit, tensor by tensor,
that read back bit for bit."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from proxykd_jax.models import hf, safetensors_io
from proxykd_jax.parallel import LOGICAL_RULES, MESH_AXES

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _write_hf(folder, kind: str, torch_dtype, layers: int = 3, **save_kw):
    torch.manual_seed(0)
    cls, cfg_cls = {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
    }[kind]
    model = cls(cfg_cls(**{**COMMON, "num_hidden_layers": layers})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    model.to(torch_dtype).save_pretrained(folder, **save_kw)
    return folder


def _mesh():
    return jax.make_mesh((1, 4, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:8])


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _layer(flat, i: int, rest: tuple) -> np.ndarray:
    """Layer i's parameter `rest` from a flat state with per-layer or stacked (scanned) layers."""
    if ("layers", i, *rest) in flat:
        return np.asarray(flat[("layers", i, *rest)].get_value())
    return np.asarray(flat[("layers", *rest)].get_value())[i]


class _CountingReads:
    """Records every block read from the files (tensor name, elements)."""

    def __init__(self, monkeypatch):
        self.reads = []
        original = safetensors_io.SafetensorsFolder.read

        def read(source, name, ranges):
            out = original(source, name, ranges)
            self.reads.append((name, out.size))
            return out

        monkeypatch.setattr(safetensors_io.SafetensorsFolder, "read", read)


@pytest.mark.parametrize(
    "kind,torch_dtype,param_dtype,save_kw",
    [
        ("llama", torch.float32, "float32", {}),
        ("llama", torch.bfloat16, "bfloat16", {"max_shard_size": "20KB"}),
        ("llama", torch.bfloat16, "float32", {}),
        ("qwen2", torch.float32, "bfloat16", {}),
    ],
)
def test_mesh_load_equals_single_device_bit_for_bit(tmp_path, monkeypatch, kind, torch_dtype, param_dtype, save_kw):
    folder = _write_hf(tmp_path / "m", kind, torch_dtype, **save_kw)
    assert (folder / "model.safetensors.index.json").exists() == bool(save_kw)
    _, single = hf.load_hf(folder, param_dtype=param_dtype)
    reads = _CountingReads(monkeypatch)
    cfg, sharded = hf.load_hf(folder, param_dtype=param_dtype, mesh=_mesh(), rules=LOGICAL_RULES)
    a = dict(nnx.to_flat_state(nnx.state(sharded, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(single, nnx.Param)))
    assert a.keys() == b.keys()
    split = 0
    for key in a:
        x, y = a[key].get_value(), b[key].get_value()
        assert x.dtype == y.dtype == np.dtype(param_dtype if param_dtype == "float32" else ml_dtypes.bfloat16)
        assert len(x.sharding.device_set) == 8 and len(y.sharding.device_set) == 1
        split += not x.sharding.is_fully_replicated
        np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=str(key))
        for shard in x.addressable_shards:  # every device holds exactly its block of the whole
            np.testing.assert_array_equal(_bits(shard.data), _bits(np.asarray(y)[shard.index]))
    assert split == len(a)  # every parameter is split (norms over fsdp), none only copied
    # each element of each tensor was read once, in blocks no larger than a device's share
    sizes = {key: int(np.prod(a[key].get_value().shape)) for key in a}
    assert sum(n for _, n in reads.reads) == sum(sizes.values())
    biggest = max(max(s.data.size for s in v.get_value().addressable_shards) for v in a.values())
    assert max(n for _, n in reads.reads) <= biggest
    # and the values are the transformers model's: the embedding and a q_proj as plain numpy
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    cast = np.float32 if param_dtype == "float32" else ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(sharded.embedding[...]), sd["model.embed_tokens.weight"].astype(cast))
    wq = sd["model.layers.1.self_attn.q_proj.weight"].T.reshape(32, 4, 8).astype(cast)
    np.testing.assert_array_equal(_layer(a, 1, ("attn", "wq")), wq)


PER_LAYER = [
    ("attn", "wq"),
    ("attn", "wk"),
    ("attn", "wv"),
    ("attn", "wo"),
    ("attn", "bq"),
    ("attn", "bk"),
    ("attn", "bv"),
    ("mlp", "w_gate"),
    ("mlp", "w_up"),
    ("mlp", "w_down"),
    ("attn_norm", "scale"),
    ("mlp_norm", "scale"),
]


def _stacked_targets(cfg, mesh):
    """A scanned model's targets: one leaf per per-layer parameter kind with a leading layer axis;
    wq and wo split over (layers: fsdp, next axis: tensor), the others over their last axis."""
    targets = {}
    for key in [("embedding",), ("final_norm", "scale"), ("lm_head",)] + [("layers", *r) for r in PER_LAYER]:
        shape = hf.tensor_map(key, cfg).shape
        spec = PartitionSpec()
        if key[0] == "layers":
            spec = PartitionSpec(*([None] * (len(shape) - 1)), "tensor")
            if key[-1] in ("wq", "wo"):
                spec = PartitionSpec("fsdp", "tensor")
        targets[key] = (shape, NamedSharding(mesh, spec))
    return targets


def test_stacked_leaves_from_per_layer_tensors_and_back(tmp_path, monkeypatch):
    """Scanned layers: each per-layer tensor kind becomes one leaf [num_layers, ...]; a device
    reads only its layer range and its block. Written back, every file tensor is bit-identical."""
    folder = _write_hf(tmp_path / "m", "qwen2", torch.bfloat16, layers=4)
    cfg = hf.read_config(folder, param_dtype="bfloat16")
    targets = _stacked_targets(cfg, _mesh())
    tmap = hf.tensor_map(("layers", "attn", "wq"), cfg)
    assert tmap.stacked and tmap.shape == (4, 32, 4, 8)
    assert tmap.names[3] == "model.layers.3.self_attn.q_proj.weight"
    reads = _CountingReads(monkeypatch)
    stacked = hf.load_params(folder, cfg, targets, "bfloat16")
    layer_reads = [n for name, n in reads.reads if name.endswith("q_proj.weight")]
    assert len(layer_reads) == 4 * 2 and sum(layer_reads) == 4 * 32 * 32  # 4 layers x 2 tensor halves
    theirs = safetensors_io.SafetensorsFolder(folder)
    for key, x in stacked.items():
        assert x.sharding == targets[key][1]
        tmap = hf.tensor_map(key, cfg)
        value = np.asarray(x)
        for i, name in enumerate(tmap.names):  # element i of the stack is the file's tensor, bit for bit
            np.testing.assert_array_equal(
                _bits(tmap.to_hf(value[i] if tmap.stacked else value)), _bits(theirs.read(name, ())), err_msg=name
            )
    # written back from the stacked sharded leaves: the same tensors, in files within the limit
    hf.save_params(stacked, cfg, tmp_path / "out", max_shard_bytes=6_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3
    ours = safetensors_io.SafetensorsFolder(tmp_path / "out")
    assert set(ours.headers) == set(theirs.headers)
    for name in theirs.headers:
        assert ours.headers[name] == theirs.headers[name]
        np.testing.assert_array_equal(_bits(ours.read(name, ())), _bits(theirs.read(name, ())), err_msg=name)
    for f in files:
        single_tensor = len([n for n, g in index["weight_map"].items() if g == f]) == 1
        assert (tmp_path / "out" / f).stat().st_size <= 6_000 + 4_096 or single_tensor


# generate() without arguments is the point here; transformers warns that it then uses the default max_length
@pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`:UserWarning")
def test_export_writes_token_ids_and_generate_stops_at_eos(tmp_path):
    """transformers' generate() with no generation arguments stops at the exported eos id."""
    from proxykd_jax.models.llama import Llama, ModelConfig
    from proxykd_jax.models.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer([f"w{i}" for i in range(20)])
    cfg = ModelConfig(
        vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, d_ff=24, max_seq_len=64
    )
    model = Llama(cfg, rngs=nnx.Rngs(0))
    eos, w5 = tok.eos_token_id, tok.convert_tokens_to_ids("w5")
    # residual dim 0 carries only the current token's embedding (+10 for w5, -10 otherwise); the
    # output reads only dim 0: after w5 the model says eos, after anything else w5
    emb = np.asarray(model.embedding[...]).copy()
    emb[:, 0] = -10.0
    emb[w5, 0] = 10.0
    model.embedding.set_value(jnp.asarray(emb))
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if key[-1] in ("wo", "w_down"):  # their last axis writes the residual stream
            var.set_value(var.get_value().at[..., 0].set(0.0))
    head = np.zeros((cfg.d_model, cfg.vocab_size), np.float32)
    head[0, eos], head[0, w5] = 50.0, -50.0
    model.lm_head.set_value(jnp.asarray(head))
    hf.save_hf(model, cfg, tmp_path, tokenizer=tok)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_token_id,
        eos,
        tok.pad_token_id,
    )
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == eos
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.tensor([tok.encode("w1 w2 w3")])
    with torch.no_grad():
        out = ref.generate(prompt)
    assert out[0].tolist() == prompt[0].tolist() + [w5, eos]
    with torch.no_grad():  # no input at all: starts from bos
        assert ref.generate()[0].tolist() == [tok.bos_token_id, w5, eos]
