"""The export stage: the newest student checkpoint as an HF folder that transformers loads with the
same logits; refusal to replace a folder it did not write; the step and missing-checkpoint errors."""

import numpy as np
import pytest
import torch
import transformers
from stage_helpers import run_stage
from test_distill_stage import build_run, make_config

from proxykd_jax import context
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.stages import export
from proxykd_jax.train.export import default_config


def export_config(run_dir, **overrides):
    cfg = make_config(run_dir, **{"train.steps": 3, **overrides})
    cfg.export = default_config()
    return cfg


def load_student(cfg, source, step=0):
    with context.create(cfg, "export", lock=False) as ctx:
        return export.load(ctx, step, source)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = build_run(tmp_path_factory.mktemp("export"), n_samples=24)
    run_stage("distill", export_config(run_dir))
    return run_dir


def test_export_loads_in_transformers_with_matching_logits(trained):
    cfg = export_config(trained)
    out = run_stage("export", cfg)
    assert out == trained / "export" and (out / "tokenizer.json").exists()
    _, ours, step = load_student(cfg, trained / "student")
    assert step == 3
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), local_files_only=True, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(tokenizer) <= cfg.model.vocab_size and tokenizer.decode(tokenizer.encode("w3 w7")) == "w3 w7"
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 20)).astype(np.int32)
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(tokens)), theirs, atol=1e-4, rtol=1e-4)
    # the newest checkpoint (step 3) was exported, not the older step-2 one
    _, older, _ = load_student(cfg, trained / "student", 2)
    assert not np.allclose(np.asarray(older(tokens)), theirs, atol=1e-4)


def test_export_refuses_a_non_empty_folder_and_bad_steps(trained, tmp_path):
    cfg = export_config(trained)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    cfg.export.out = str(target)
    with pytest.raises(ProxyKDError, match="not made by `proxykd export`"):
        run_stage("export", cfg)
    cfg.run.overwrite = True
    run_stage("export", cfg)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    cfg.export.step = 1
    with pytest.raises(ProxyKDError, match="export.step=1"):
        load_student(cfg, trained / "student", 1)
    with pytest.raises(ProxyKDError, match="no checkpoint"):
        load_student(cfg, trained / "nothing_here")
