"""The eval's "prior" estimate is the prior the posterior store was built on: with one response per
prompt the store leaves each response's own token out of the counts (`count_own_token: false` in
estimate.json), and so does the prior scored against the teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pipeline_fixtures import build_run
from stage_helpers import run_stage

from proxykd_jax.bayes.tables import load_prior
from proxykd_jax.context import RunPaths
from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreReader
from proxykd_jax.eval import metrics as metrics_lib


def _prior_kl(prepared, tables, teacher, batches, kappa: float, mode: str) -> float:
    """float64 reference: mean over response positions of KL(teacher || (exact + kappa * ngram) / sum)."""
    keys = {int(r["sample_id"]): int(r["prompt_key"]) for r in prepared.iter_split("distill")}
    total = count = 0.0
    for batch in batches:
        for row in range(batch["tokens"].shape[0]):
            sid = int(batch["sample_ids"][row, 0])
            if sid < 0:
                continue
            start, end = int(batch["prompt_lengths"][row]) - 1, int(batch["lengths"][row])
            y = np.asarray(batch["targets"][row, start:end], np.int32)
            prior = tables.query(np.asarray([keys[sid]], np.int64), [y], mode=mode)
            a = kappa * np.asarray(tables.dense_ngram(prior), np.float64)
            for t in range(len(y)):
                for i, c in zip(np.asarray(prior.ids_NxS[t]), np.asarray(prior.counts_NxS[t], np.float64)):
                    a[t, i] += c
            q = teacher.distributions(batch["tokens"][row : row + 1], batch["lengths"][row : row + 1])[0, start:end]
            q = np.asarray(q, np.float64)
            p = a / a.sum(1, keepdims=True)
            total += float(np.sum(np.where(q > 0, q * (np.log(np.where(q > 0, q, 1.0)) - np.log(p)), 0.0)))
            count += len(y)
    return total / count


def test_prior_estimate_leaves_the_own_token_out_where_the_store_does(tmp_path):
    cfg, teacher = build_run(tmp_path / "run", samples_per_prompt=1)
    with cfg.unlocked():
        cfg.posterior.proxy = cfg.proxy.init_from
    run_stage("prior", cfg)
    run_stage("posterior", cfg)
    paths = RunPaths.from_config(cfg)
    est = json.loads((paths.posterior / "estimate.json").read_text())
    assert est["count_own_token"] is False  # one response per prompt: the store leaves it out
    prepared, tables = PreparedData(paths.prepared), load_prior(paths.prior)
    store = StoreReader(paths.posterior, tokenizer_hash=prepared.tokenizer_hash)
    batches = metrics_lib.eval_batches(prepared, "distill", cfg.data, batch_size=8, limit=0)
    kappa = 0.5  # a small kappa, where the own token's count weighs most
    got = metrics_lib.reference_estimator_kl(prepared, tables, store, teacher, est | {"kappa": kappa}, batches)["prior"]
    want = _prior_kl(prepared, tables, teacher, batches, kappa, "leave_one_out")
    counted = _prior_kl(prepared, tables, teacher, batches, kappa, "include_self")
    assert abs(want - counted) > 0.05  # the two priors differ by far more than the tolerance
    assert got == pytest.approx(want, rel=1e-6)
    # two or more responses per prompt: the own token counts, in the store and in the prior
    both = metrics_lib.reference_estimator_kl(
        prepared, tables, store, teacher, {"kappa": kappa, "count_own_token": True}, batches
    )["prior"]
    assert both == pytest.approx(counted, rel=1e-6)
