"""Defects found reviewing the fifteenth session's behaviour-changing commits (path fields recorded resolved,
sliding windows, Gemma 3), each checked against what it broke."""

from __future__ import annotations

import json

import numpy as np
import pytest

from proxykd_jax import config as config_lib
from proxykd_jax import context
from proxykd_jax.context import artifacts
from proxykd_jax.context.artifacts import open_artifact
from proxykd_jax.context.records import read_record, record_path
from proxykd_jax.errors import ConfigError


def _make(stage: str, cfg, paths):
    art = open_artifact(stage, cfg, paths, overwrite=False)
    art.begin()
    art.finish({})


def test_an_older_prepare_record_of_the_runs_own_corpus_named_relative_still_resumes(tmp_path, monkeypatch):
    """A prepare record written before path fields were recorded resolved labelled a collected `data.corpus`
    input by its text relative to the run directory (`corpus/teacher.jsonl` for run.dir=r and
    data.corpus=r/corpus/teacher.jsonl); the label of the resolved path is another (the absolute path), so the
    finished prepare counted as made from other inputs and was refused."""
    monkeypatch.chdir(tmp_path)
    cfg = config_lib.base_config()
    cfg.run.dir = "r"
    paths = context.RunPaths.from_config(cfg)
    _make("collect", cfg, paths)
    words = np.random.default_rng().integers(0, 10**9, size=4)
    rows = "".join(json.dumps({"prompt": f"p {w}", "response": f"a {w}"}) + "\n" for w in words)
    (tmp_path / "r" / "corpus" / "teacher.jsonl").write_text(rows)
    cfg.data.corpus = "r/corpus/teacher.jsonl"
    _make("prepare", cfg, paths)
    where = record_path(tmp_path / "r" / "prepared", False)
    rec = read_record(tmp_path / "r" / "prepared", False)
    # as the code before 6c11266 wrote it: the field's text, the input labelled relative to the run directory,
    # the input file keyed by the text
    [upstream] = rec["inputs"].values()
    [content] = rec["files"].values()
    rec["fields"]["data.corpus"] = "r/corpus/teacher.jsonl"
    rec["inputs"] = {"corpus/teacher.jsonl": upstream}
    rec["files"] = {"data.corpus (r/corpus/teacher.jsonl)": content}
    rec["hash"] = artifacts._hash(rec["fields"], rec["inputs"], rec["files"], rec["models"])
    where.write_text(json.dumps(rec))
    assert open_artifact("prepare", cfg, paths, overwrite=False).done
    with cfg.unlocked():  # named absolute now: the same file
        cfg.data.corpus = str(tmp_path / "r" / "corpus" / "teacher.jsonl")
    assert open_artifact("prepare", cfg, paths, overwrite=False).done


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"attention": "cudnn", "sliding_window": 8}, "(proxy.sliding_window)"),
        ({"layer_types": ("sliding_attention", "full_attention")}, "proxy.sliding_window or proxy.rope_local_theta"),
    ],
)
def test_the_proxys_model_sentences_name_the_proxys_fields(changes, named):
    """ModelConfig's sentences name fields as model.<field>; the proxy group's refusal named the student's
    (model.sliding_window) wherever the field came after the first."""
    cfg = config_lib.base_config()
    for key, value in changes.items():
        cfg.proxy[key] = value
    with pytest.raises(ConfigError) as info:
        config_lib.validate(cfg, "align")
    message = str(info.value)
    assert message.startswith("config.proxy.") and named in message and "model." not in message, message


@pytest.mark.parametrize("first", [1, 3])
def test_a_qwen_export_names_its_first_sliding_layer_for_older_readers(first):
    """A Qwen export with sliding layers writes `max_window_layers` at its first sliding layer (it wrote 28, so a
    reader before `layer_types` saw a 4-layer model with sliding layers as one without): read without
    `layer_types`, the config.json gives the same layers."""
    from proxykd_jax.models import hf_config
    from proxykd_jax.models.llama import ModelConfig

    types = ("full_attention",) * first + ("sliding_attention",) * (4 - first)
    window = int(np.random.default_rng().integers(4, 16))
    cfg = ModelConfig(vocab_size=64, d_model=16, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=8, d_ff=32,
                      qkv_bias=True, max_seq_len=64, sliding_window=window, layer_types=types)  # fmt: skip
    written = hf_config._hf_config(cfg, "Qwen2ForCausalLM", {})
    assert written["max_window_layers"] == first
    older = {k: v for k, v in written.items() if k != "layer_types"}
    back = hf_config.config_from_hf(older)
    assert (back.sliding_window, back.layer_types) == (window, types)


def test_every_process_decides_on_process_0s_paths(tmp_path, monkeypatch):
    """Path fields are recorded as the paths they resolve to, which a process launched from another directory
    (or reaching the files through another mount) resolves otherwise: every process takes process 0's fields and
    input identities (`share`), so all decide alike. Here process 1 runs from b/, where `in/p.jsonl` is another
    file of the same bytes: alone it would redo the finished collect that process 0 reuses."""
    text = "".join(json.dumps({"prompt": f"p {w}"}) + "\n" for w in np.random.default_rng().integers(0, 10**9, 3))
    for host in ("a", "b"):
        (tmp_path / host / "in").mkdir(parents=True)
        (tmp_path / host / "in" / "p.jsonl").write_text(text)
    cfg = config_lib.base_config()
    cfg.run.dir, cfg.collect.prompts = str(tmp_path / "run"), "in/p.jsonl"
    paths = context.RunPaths.from_config(cfg)
    monkeypatch.chdir(tmp_path / "a")
    _make("collect", cfg, paths)
    sent = []
    assert artifacts.outlook("collect", cfg, paths, share=lambda t: sent.append(t) or t).artifact.status == "done"
    monkeypatch.chdir(tmp_path / "b")
    assert artifacts.outlook("collect", cfg, paths).artifact.status == "new"  # its own resolution: another file
    assert artifacts.outlook("collect", cfg, paths, share=lambda t: sent[-1]).artifact.status == "done"
