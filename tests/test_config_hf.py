"""configs/hf.py: the model groups read their shapes and numerics from the user's own Hugging Face folders,
so the load-time check (the folder agrees with its group) holds without a single shape override."""

import sys

import pytest
from flax import nnx

from proxykd_jax import cli
from proxykd_jax.context import FOLDER_FIELDS
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.tokenizer import build_word_tokenizer

STUDENT = ModelConfig(
    vocab_size=72,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    d_ff=48,
    rope_theta=500000.0,
    rope_scaling=("llama3", 8.0, 1.0, 4.0, 64),
    rms_eps=1e-6,
    max_seq_len=512,
)
PROXY = ModelConfig(
    vocab_size=72,
    d_model=48,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    head_dim=8,
    d_ff=96,
    qkv_bias=True,
    tie_embeddings=True,
    max_seq_len=1024,
)


def _load(argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["proxykd", "distill", *argv])  # ml_collections reads overrides there
    return cli.load_config("distill", argv)


def test_groups_take_the_folders_shapes_and_agree_with_them(tmp_path, monkeypatch):
    student, proxy = tmp_path / "my-student", tmp_path / "my-proxy"
    hf.save_hf(Llama(STUDENT, rngs=nnx.Rngs(0)), STUDENT, student)
    hf.save_hf(
        Llama(PROXY, rngs=nnx.Rngs(1)), PROXY, proxy, tokenizer=build_word_tokenizer([f"w{i}" for i in range(60)])
    )
    cfg = _load([f"--config=configs/hf.py:{student},{proxy}", "--config.train.steps=7"], monkeypatch)
    for name, folder, want in (("model", student, STUDENT), ("proxy", proxy, PROXY)):
        group = ModelConfig.from_config(cfg[name])
        # the check init_model makes before reading a weight
        assert [f for f in FOLDER_FIELDS if getattr(group, f) != getattr(want, f)] == [], name
        assert cfg[name].init_from == str(folder) and (group.dtype, group.param_dtype) == ("bfloat16", "float32")
    assert cfg.data.tokenizer == str(proxy)  # the proxy folder holds the tokenizer; the student's does not
    assert cfg.train.seq_len == cfg.data.seq_len == 512 and cfg.train.steps == 7
    assert cfg.run.dir == "runs/my-student-from-my-proxy"
    one = _load([f"--config=configs/hf.py:{proxy}"], monkeypatch)  # one folder: the proxy is the student's shape
    assert one.proxy.init_from == one.model.init_from == str(proxy) and one.train.seq_len == 1024


@pytest.mark.parametrize(
    "arg, sentence",
    [("{tmp}/nope", "nope does not exist"), ("", "needs a student folder"), ("a,b,c", "takes one or two folders")],
)
def test_a_missing_folder_is_one_sentence(tmp_path, monkeypatch, arg, sentence):
    with pytest.raises(cli.UserError, match=sentence) as info:
        _load([f"--config=configs/hf.py:{arg.format(tmp=tmp_path)}"], monkeypatch)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage", ["missing shard", "torch weights only"])
def test_a_folder_without_its_weights_says_what_to_do(tmp_path, damage):
    """A shard the index names is gone, or the folder holds pytorch_model.bin only: one sentence naming the
    folder, that weights are read as safetensors, and what to do."""
    from proxykd_jax.context import load_folder
    from proxykd_jax.errors import ModelFolderError

    folder = tmp_path / "m"
    hf.save_hf(Llama(STUDENT, rngs=nnx.Rngs(0)), STUDENT, folder, max_shard_bytes=20_000)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    if damage == "missing shard":
        shards[-1].unlink()
    else:
        for f in [*shards, folder / "model.safetensors.index.json"]:
            f.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelFolderError) as info:
        load_folder(folder)
    message = str(info.value)
    assert message.startswith(str(folder)) and "safetensors" in message and "restore what is missing" in message
    assert ".;" not in message and "\n" not in message
