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
