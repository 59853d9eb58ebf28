"""The posterior's batches: rows in order of length within windows (`pipeline.by_length`) and each batch cut to the
fewest positions that hold its longest row (`pipeline.cut`). Every row comes through whole, and the stage writes the
same estimate and the same store as with its rows in file order at full length."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from proxykd_jax.bayes import estimate
from proxykd_jax.context import RunPaths
from proxykd_jax.data import pipeline
from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreReader
from tests.pipeline_fixtures import build_run
from tests.stage_helpers import run_stage


def _random_batches(rng, count: int, rows: int, seq_len: int) -> list[dict]:
    out = []
    for _ in range(count):
        lengths = rng.integers(0, seq_len + 1, rows).astype(np.int32)
        lengths[rng.random(rows) < 0.1] = 0  # empty (padding) rows
        tokens = np.zeros((rows, seq_len), np.int32)
        for i, n in enumerate(lengths):
            tokens[i, :n] = rng.integers(1, 100, n)
        sample_ids = np.where(lengths[:, None] > 0, rng.integers(0, 1 << 40, (rows, 1)), -1) * np.ones(seq_len, int)
        head = rng.random((rows, seq_len, 3)).astype(np.float32)
        out.append({"tokens": tokens, "sample_ids": sample_ids, "teacher_topk_logprobs": head, "lengths": lengths})
    return out


def _rows(batches) -> dict:
    """sample id (or a padding row's index) -> the row's real positions of every field."""
    rows, pad = {}, 0
    for b in batches:
        for i, n in enumerate(b["lengths"]):
            key = int(b["sample_ids"][i, 0]) if n else ("pad", (pad := pad + 1))
            rows[key] = (int(n), b["tokens"][i, :n].tolist(), b["teacher_topk_logprobs"][i, :n].tolist())
    return rows


@pytest.mark.parametrize("count, window", [(7, 3), (5, 32), (8, 1)])
def test_rows_in_order_of_length_and_cut_batches_keep_every_row_whole(count, window):
    rng = np.random.default_rng()
    rows, seq_len = int(rng.integers(1, 9)), int(rng.integers(9, 70))
    batches = _random_batches(rng, count, rows, seq_len)
    sorted_ = list(pipeline.by_length(iter(batches), window))
    assert len(sorted_) == count and all(len(b["lengths"]) == rows for b in sorted_)
    for w in range(0, count, window):  # each window's rows in order of length
        lengths = np.concatenate([b["lengths"] for b in sorted_[w : w + window]])
        assert (np.diff(lengths) >= 0).all()
    allowed = pipeline.lengths_of(seq_len)
    assert allowed[-1] == seq_len and len(allowed) <= 4 and allowed[0] >= seq_len / 8
    cut = list(pipeline.cut(iter(sorted_), seq_len))
    for b in cut:
        length = b["tokens"].shape[1]
        assert length in allowed and length >= b["lengths"].max(initial=0)
        smaller = [n for n in allowed if n < length]
        assert not smaller or b["lengths"].max(initial=0) > smaller[-1]  # the fewest positions that hold it
        assert b["teacher_topk_logprobs"].shape[:2] == b["sample_ids"].shape == (rows, length)
    assert _rows(cut) == _rows(batches)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg, _ = build_run(tmp_path_factory.mktemp("posterior_rows"))
    with cfg.unlocked():
        cfg.posterior.proxy = cfg.proxy.init_from
        cfg.posterior.batch_size = 8  # several batches per window (the 8 devices take a row each)
    run_stage("prior", cfg)
    return cfg


def test_the_stage_writes_what_rows_in_file_order_at_full_length_write(run, tmp_path, monkeypatch):
    cfg = run
    lengths = {b["tokens"].shape[1] for b in estimate.batches(
        PreparedData(RunPaths.from_config(cfg).prepared), cfg.data, seq_len=cfg.data.seq_len,
        batch_size=cfg.posterior.batch_size,
    )}  # fmt: skip
    assert len(lengths) > 1 and max(lengths) <= cfg.data.seq_len  # the tiny run's batches are cut
    other = cfg.copy_and_resolve_references()
    with other.unlocked():
        other.run.dir = str(tmp_path / "run")
    shutil.copytree(cfg.run.dir, other.run.dir, ignore=shutil.ignore_patterns("posterior", "proxykd.lock"))
    est = run_stage("posterior", cfg)
    monkeypatch.setattr(pipeline, "by_length", lambda batches, window: batches)
    monkeypatch.setattr(pipeline, "cut", lambda batches, seq_len: batches)
    assert {b["tokens"].shape[1] for b in estimate.batches(
        PreparedData(RunPaths.from_config(other).prepared), other.data, seq_len=other.data.seq_len,
        batch_size=other.posterior.batch_size,
    )} == {cfg.data.seq_len}  # fmt: skip
    plain = run_stage("posterior", other)
    for key in ("kappa", "n_max", "mu", "gamma", "heldout_tokens"):
        np.testing.assert_allclose(est[key], plain[key], rtol=1e-4, err_msg=key)
    a, b = (json.loads((RunPaths.from_config(c).posterior / "estimate.json").read_text()) for c in (cfg, other))
    assert a["weights"].keys() == b["weights"].keys()
    np.testing.assert_allclose([a["weights"][k] for k in a["weights"]], [b["weights"][k] for k in a["weights"]], 1e-4)
    prepared = PreparedData(RunPaths.from_config(cfg).prepared)
    stores = [
        StoreReader(RunPaths.from_config(c).posterior, tokenizer_hash=prepared.tokenizer_hash) for c in (cfg, other)
    ]
    same = total = 0
    for sid in prepared.sample_ids("distill"):
        x, y = (s.get(int(sid)) for s in stores)
        same += (x.ids_TxK == y.ids_TxK).sum()
        total += x.ids_TxK.size
        np.testing.assert_allclose(x.tail_T, y.tail_T, atol=2e-3)
        probs = [np.exp(e.logprobs_TxK.astype(np.float64)) for e in (x, y)]
        np.testing.assert_allclose(np.sort(probs[0], 1), np.sort(probs[1], 1), atol=1e-2)  # bf16 values
    assert same / total > 0.99  # (a near tie may swap two ids between the forwards)
