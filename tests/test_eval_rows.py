"""The eval stage's and distill validation's batches (`eval.metrics.iter_eval_batches`): rows in order of length within
windows of batches and each batch cut to its longest row (`pipeline.sample_batches`), the logits a tile at a time
where only the targets' log-probs are needed (`metrics.TILE_TOKENS`). The batches hold the samples of the first
ceil(limit / batch_size) batches in file order, each row whole, and the stage scores what it scored in file order at
full length with the whole batch's logits."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from pipeline_fixtures import build_run
from stage_helpers import run_stage

from proxykd_jax.context import RunPaths
from proxykd_jax.data import pipeline
from proxykd_jax.data.records import PreparedData
from proxykd_jax.eval import metrics

_ROW_FIELDS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg, _ = build_run(tmp_path_factory.mktemp("eval_rows"))
    with cfg.unlocked():
        cfg.eval.max_samples, cfg.eval.generate_prompts = 0, 0  # every held-out sample; no generations
    return cfg


def _rows(batches) -> dict:
    """sample id -> (length, prompt length, each field's real positions) of every sample row of `batches`."""
    out = {}
    for b in batches:
        for i, n in enumerate(b["lengths"]):
            if b["sample_ids"][i, 0] >= 0:
                fields = tuple(b[k][i, :n].tolist() for k in _ROW_FIELDS)
                out[int(b["sample_ids"][i, 0])] = (int(n), int(b["prompt_lengths"][i]), fields)
    return out


@pytest.mark.parametrize("split", ["heldout", "distill"])
def test_the_batches_hold_the_first_batches_samples_each_row_whole(run, split):
    cfg, rng = run, np.random.default_rng()
    prepared = PreparedData(RunPaths.from_config(cfg).prepared)
    batch_size, total = 2, prepared.num_samples(split)
    limit = int(rng.integers(1, total + 1))
    plain = list(pipeline.iter_samples(prepared, split, cfg.data, batch_size=batch_size))
    count = math.ceil(limit / batch_size)
    got = list(metrics.iter_eval_batches(prepared, split, cfg.data, batch_size=batch_size, limit=limit))
    assert len(got) == count
    assert _rows(got) == _rows(plain[:count])  # the same samples as file order's first batches, each row whole
    allowed = pipeline.lengths_of(cfg.data.seq_len)
    for b in got:
        length = b["tokens"].shape[1]
        assert length in allowed and length >= b["lengths"].max(initial=0)
        smaller = [n for n in allowed if n < length]
        assert not smaller or b["lengths"].max(initial=0) > smaller[-1]  # the fewest positions that hold it
        assert all(b[k].shape == (batch_size, length) for k in _ROW_FIELDS + ("sample_ids",))
    every = list(metrics.iter_eval_batches(prepared, split, cfg.data, batch_size=batch_size))
    assert len(every) == math.ceil(total / batch_size) and len(_rows(every)) == total
    assert min(b["tokens"].shape[1] for b in every) < cfg.data.seq_len  # the tiny run's batches are cut


@pytest.mark.parametrize("teacher", [False, True], ids=["no teacher (tiles)", "known teacher (full)"])
def test_the_stage_scores_what_file_order_at_full_length_with_whole_logits_scores(run, tmp_path, monkeypatch, teacher):
    cfg = run.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.run.dir = str(tmp_path / "ours")
        cfg.eval.known_teacher = cfg.eval.known_teacher if teacher else ""
    shutil.copytree(run.run.dir, cfg.run.dir, ignore=shutil.ignore_patterns("eval", "proxykd.lock"))
    # tiles of 3 positions of eval.batch_size 8 rows (the default's would hold the tiny run's whole rows), the last
    # one padded: none of the cut lengths is a multiple of 3
    assert cfg.eval.batch_size == 8 and all(n % 3 for n in pipeline.lengths_of(cfg.data.seq_len))
    monkeypatch.setattr(metrics, "TILE_TOKENS", 24)
    run_stage("eval", cfg)
    other = cfg.copy_and_resolve_references()
    with other.unlocked():
        other.run.dir = str(tmp_path / "file_order")
    shutil.copytree(run.run.dir, other.run.dir, ignore=shutil.ignore_patterns("eval", "proxykd.lock"))
    monkeypatch.setattr(pipeline, "by_length", lambda batches, window: batches)
    monkeypatch.setattr(pipeline, "cut", lambda batches, seq_len: batches)
    monkeypatch.setattr(metrics, "TILE_TOKENS", 0)
    run_stage("eval", other)
    a, b = (json.loads((RunPaths.from_config(c).root / "eval" / "metrics.json").read_text()) for c in (cfg, other))
    assert a["models"].keys() == b["models"].keys() == {"proxy (before align)"}
    for name, scores in a["models"].items():
        want = {"heldout_nll", "kl_to_teacher"} if teacher else {"heldout_nll"}
        assert scores.keys() == b["models"][name].keys() == want
        for key, value in scores.items():
            np.testing.assert_allclose(value, b["models"][name][key], rtol=1e-5, err_msg=f"{name}: {key}")
