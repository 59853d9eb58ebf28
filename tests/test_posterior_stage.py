"""The prior and posterior stages on a tiny known-teacher run: store contents, EB fit, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from proxykd_jax.context import RunPaths
from proxykd_jax.context.artifacts import read_record, record_path
from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreReader
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.stages import posterior
from tests.pipeline_fixtures import build_run
from tests.stage_helpers import run_stage


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg, teacher = build_run(tmp_path_factory.mktemp("posterior_run"))
    with cfg.unlocked():
        cfg.posterior.proxy = cfg.proxy.init_from  # any proxy folder will do for the estimator
        cfg.data.store.shard_mb = 0.002  # several shards, so resume has something to skip
    run_stage("prior", cfg)
    est = run_stage("posterior", cfg)
    return cfg, teacher, est


def _store(cfg):
    paths = RunPaths.from_config(cfg)
    prepared = PreparedData(paths.prepared)
    return prepared, StoreReader(paths.posterior, tokenizer_hash=prepared.tokenizer_hash)


def test_store_covers_split_and_is_normalised(run):
    cfg, _, _ = run
    prepared, store = _store(cfg)
    ids = np.load(RunPaths.from_config(cfg).prepared / "distill" / "sample_ids.npy")
    assert len(store.missing(ids)) == 0 and len(store) == len(ids)
    assert len(list(RunPaths.from_config(cfg).posterior.glob("shard-*.json"))) > 1
    for rec in prepared.iter_split("distill"):
        entry = store.get(int(rec["sample_id"]))
        response = rec["tokens"][int(rec["prompt_len"]) :]
        assert entry.ids_TxK.shape == (len(response), cfg.data.store.k)
        total = np.exp(entry.logprobs_TxK.astype(np.float64)).sum(1) + entry.tail_T
        np.testing.assert_allclose(total, 1.0, atol=2e-2)  # bf16 values, float16 tail
        assert 0.0 < entry.weight < 1.0


def test_empirical_bayes_never_below_prior_or_proxy(run):
    cfg, _, est = run
    saved = json.loads((RunPaths.from_config(cfg).posterior / posterior.ESTIMATE).read_text())
    assert saved["fitted"] and saved["heldout_tokens"] > 0
    scores = saved["heldout_loglik"]
    assert scores["posterior"] >= max(scores["prior"], scores["proxy"]) - 1e-12
    assert est["kappa"] == saved["kappa"] and est["n_max"] == saved["n_max"]
    weights = np.asarray(list(saved["weights"].values()))
    assert weights.min() < 0.5 < weights.max()  # sigmoid of standardised log-likelihoods


def test_killed_run_resumes_without_recomputing(run):
    cfg, _, _ = run
    paths = RunPaths.from_config(cfg)
    _, before = _store(cfg)
    reference = {int(s): before.get(int(s)) for s in before.sample_ids}
    shards = sorted(paths.posterior.glob("shard-*.json"))
    keep = len(shards) // 2
    for meta in shards[keep:]:  # as if killed after `keep` finished shards
        meta.unlink()
        meta.with_suffix(".bin").unlink()
    record = read_record(paths.posterior)
    record_path(paths.posterior, False).write_text(json.dumps(record | {"finished": False}))  # as a killed run left it
    run_stage("posterior", cfg)
    assert read_record(paths.posterior)["finished"]
    _, after = _store(cfg)
    assert len(after) == len(reference)
    for sid, entry in reference.items():
        again = after.get(sid)
        np.testing.assert_array_equal(again.ids_TxK, entry.ids_TxK)
        np.testing.assert_array_equal(again.logprobs_TxK, entry.logprobs_TxK)
        np.testing.assert_array_equal(again.tail_T, entry.tail_T)
    kept = {m.name for m in shards[:keep]}
    assert kept <= {m.name for m in paths.posterior.glob("shard-*.json")}


def test_missing_proxy_is_a_clear_error(run, tmp_path):
    cfg, _, _ = run
    bad = cfg.copy_and_resolve_references()
    bad.posterior.proxy = str(tmp_path / "nowhere")
    with pytest.raises(ProxyKDError, match=r"posterior.proxy .* -> .*nowhere"):  # a changed field first
        run_stage("posterior", bad)
    bad.run.overwrite = True
    with pytest.raises(ProxyKDError, match="run `proxykd align` first"):
        run_stage("posterior", bad)
    assert not (RunPaths.from_config(cfg).root / ".posterior.new").exists()  # refused before writing anything


def test_prior_stage_is_skipped_when_finished(run):
    cfg, _, _ = run
    manifest = run_stage("prior", cfg)
    assert manifest["tokens"] > 0 and manifest["split"] == "distill"
    assert (RunPaths.from_config(cfg).prior / "tables.npz").exists()


def test_teacher_top_logprobs_fix_the_head(tmp_path):
    """Where the corpus carries the teacher's top log-probs, the stored posterior keeps them as is."""
    cfg, teacher = build_run(tmp_path / "head_run", top_logprobs=4)
    with cfg.unlocked():
        cfg.posterior.proxy = cfg.proxy.init_from
        cfg.data.store.value_dtype = "float32"
    run_stage("prior", cfg)
    run_stage("posterior", cfg)
    prepared, store = _store(cfg)
    assert prepared.has_teacher_head
    checked = 0
    for rec in prepared.iter_split("distill"):
        p = int(rec["prompt_len"])
        entry = store.get(int(rec["sample_id"]))
        head_ids, head_lps = rec["teacher_topk_ids"][p:], rec["teacher_topk_logprobs"][p:]
        for t in range(len(head_ids) - 1):  # the final eos position has no teacher head
            stored = dict(zip(entry.ids_TxK[t].tolist(), entry.logprobs_TxK[t].tolist()))
            for i, lp in zip(head_ids[t], head_lps[t]):
                if np.isfinite(lp):
                    assert abs(stored[int(i)] - lp) < 1e-4
                    checked += 1
    assert checked > 50
