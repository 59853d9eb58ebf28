"""`proxykd demo` with demo.teacher_tokenizer=char: a character-level teacher over HTTP, a byte-level BPE
student, the first-byte head, and the eval in nats per byte."""

from __future__ import annotations

import json

from stage_helpers import run_stage
from test_demo import demo_config

from proxykd_jax.context import RunPaths


def test_char_teacher_demo_runs_with_a_bytes_head(tmp_path):
    cfg = demo_config(tmp_path / "run")
    with cfg.unlocked():
        cfg.demo.teacher_tokenizer = "char"
        cfg.proxy.vocab_size = cfg.model.vocab_size = 288
        cfg.data.seq_len = cfg.train.seq_len = 60
        cfg.proxy.max_seq_len = cfg.model.max_seq_len = 96
        cfg.demo.max_new_tokens = 16
        cfg.demo.num_prompts, cfg.demo.samples_per_prompt = 32, 2
    metrics = run_stage("demo", cfg)
    paths = RunPaths.from_config(cfg)
    manifest = json.loads((paths.prepared / "manifest.json").read_text())
    assert manifest["teacher_head"] == "bytes"
    assert manifest["teacher_logprobs"]["student_position_fraction"] >= 0.95
    assert json.loads((paths.posterior / "estimate.json").read_text())["fit_with_head"]
    assert metrics["units"] == "per_byte" and 0.5 < metrics["teacher_nats_per_byte"] < 5.0
    models = metrics["models"]
    assert set(models) == {"proxy (before align)", "proxy (aligned)", "student (SFT, alpha=0)", "student (Proxy-KD)"}
    assert all(0.0 < m["heldout_nats_per_byte"] < 20.0 for m in models.values())
    assert models["proxy (aligned)"]["heldout_nats_per_byte"] < models["proxy (before align)"]["heldout_nats_per_byte"]
    assert all(m["teacher_nats_per_byte_of_generations"] > 0 for k, m in models.items() if k.startswith("student"))
    assert (paths.root / "results.md").read_text().startswith("| model | held-out nats/byte |")


def test_bad_teacher_settings_are_one_sentence(tmp_path):
    import pytest

    from proxykd_jax.errors import ProxyKDError

    cfg = demo_config(tmp_path / "run")
    with cfg.unlocked():
        cfg.demo.teacher_tokenizer = "char"  # the tiny config's vocabulary (96) is too small for a BPE
    with pytest.raises(ProxyKDError, match="at least 260"):
        run_stage("demo", cfg)
    with cfg.unlocked():
        cfg.demo.teacher_tokenizer = "bpe"
    with pytest.raises(ProxyKDError, match="not one of same, char"):
        run_stage("demo", cfg)
    with cfg.unlocked():
        cfg.demo.teacher_tokenizer = "same"
        cfg.data.teacher_head = "tokens"
        cfg.data.corpus = str(tmp_path / "none.jsonl")
    with pytest.raises(ProxyKDError, match="data.teacher_head='tokens'"):
        run_stage("prepare", cfg)
