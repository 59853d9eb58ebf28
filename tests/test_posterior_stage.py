"""The prior and posterior stages on a tiny known-teacher run: store contents, EB fit, resume."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import safetensors.numpy

from proxykd_jax import config as config_lib
from proxykd_jax import context
from proxykd_jax.bayes import estimate
from proxykd_jax.bayes.tables import built_with, load_prior
from proxykd_jax.context import RunPaths
from proxykd_jax.context.records import read_record, record_path
from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreReader
from proxykd_jax.errors import ConfigError, ProxyKDError
from proxykd_jax.parallel import hosts
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


def test_a_run_killed_in_pass_one_resumes_at_its_last_chunk(run, tmp_path, monkeypatch):
    """Pass 1 (the proxy's scores of every sample) is kept in chunks: killed after two of them, the next run
    scores only the batches after them and fits exactly what an unbroken pass fits (weights, held-out
    statistics, kappa and N_max); the stage leaves no chunk behind once estimate.json is written."""
    from proxykd_jax.bayes import pass1_log

    cfg, _, _ = run
    paths = RunPaths.from_config(cfg)
    assert not list(paths.posterior.glob("pass1.*"))
    prepared, tables = PreparedData(paths.prepared), load_prior(paths.prior)
    with context.create(cfg, "eval") as ctx:  # any stage's context: mesh and model loading
        _, model = ctx.load_model(pathlib.Path(cfg.posterior.proxy))
        sizes = dict(mesh=ctx.mesh, rules=ctx.rules, seq_len=cfg.data.seq_len, batch_size=cfg.posterior.batch_size)

        def fit(log_dir):
            prior_cfg = built_with(tables, cfg.prior)
            return estimate.fit_estimate(prepared, model, cfg.posterior, prior_cfg, cfg.data, log_dir=log_dir, **sizes)

        whole = fit(None)
        saves, real_save = [], pass1_log.Pass1Log.save

        def killed_at_the_third(self, part):
            if len(saves) == 2:
                raise KeyboardInterrupt
            saves.append(part)
            real_save(self, part)

        monkeypatch.setattr(pass1_log.Pass1Log, "save", killed_at_the_third)
        with pytest.raises(KeyboardInterrupt):
            fit(tmp_path)
        monkeypatch.setattr(pass1_log.Pass1Log, "save", real_save)
        assert len(list(tmp_path.glob("pass1.*.npz"))) == 2
        scored, real_global_batch = [], estimate.global_batch
        monkeypatch.setattr(estimate, "global_batch", lambda *a: scored.append(1) or real_global_batch(*a))
        again = fit(tmp_path)
    total = hosts.batches_per_process(prepared.num_samples("distill"), estimate.local_rows(cfg.posterior.batch_size))
    assert len(scored) == total - 2 * pass1_log.chunk_batches(total) and total > 3
    assert sum(len(p["ids"]) for p in saves) > 0 and again == whole


def test_own_token_weight_moves_the_stored_posterior_by_its_share(run, tmp_path):
    """posterior.own_token (the report's no_own_token and half_own_token variants): with several responses per
    prompt the fit sets the scale and the store counts each response's own token once (auto); left out, or counting
    one half, the fit is the same, the estimate records the weight, and at every stored position the posterior is
    the leave-one-out one plus that weight on the observed token: q_w(v) = S q_0(v) / (S + w) for v != y and
    q_w(y) = (S q_0(y) + w) / (S + w), with one S (the leave-one-out pseudo-count total) for every weight."""
    cfg, _, _ = run  # 3 responses per prompt: the fit sets the scale
    runs, estimates, stores = {}, {}, {}
    for own in ("auto", "0.5", "leave_out"):
        runs[own] = other = cfg.copy_and_resolve_references()
        other.run.dir = str(tmp_path / own)
        shutil.copytree(cfg.run.dir, other.run.dir, ignore=shutil.ignore_patterns("posterior"))
        other.posterior.own_token = own
        other.data.store.value_dtype = "float32"  # (bf16 log-probs would blur the ratios below by 2%)
        run_stage("posterior", other)
        estimates[own] = json.loads((RunPaths.from_config(other).posterior / posterior.ESTIMATE).read_text())
        prepared, stores[own] = _store(other)
    assert [(e["own_weight"], e["count_own_token"]) for e in estimates.values()] == [(1, True), (0.5, True), (0, False)]
    assert len({(e["kappa"], e["n_max"], json.dumps(e["weights"])) for e in estimates.values()}) == 1
    compared = 0
    for rec in prepared.iter_split("distill"):
        sid = int(rec["sample_id"])
        entries = {own: store.get(sid) for own, store in stores.items()}
        for t, y in enumerate(rec["tokens"][int(rec["prompt_len"]) :]):
            q = {own: {int(i): float(np.exp(lp)) for i, lp in zip(e.ids_TxK[t], e.logprobs_TxK[t])}
                 for own, e in entries.items()}  # fmt: skip
            q0 = q["leave_out"]
            shared = set.intersection(*map(set, q.values()))
            others = [v for v in shared if v != y and q0[v] > 1e-3]
            if y not in shared or len(others) < 2:
                continue
            totals = []
            for own, w in (("auto", 1.0), ("0.5", 0.5)):
                ratios = np.asarray([q[own][v] / q0[v] for v in others])
                r = float(np.median(ratios))  # S / (S + w)
                np.testing.assert_allclose(ratios, r, rtol=1e-4)
                np.testing.assert_allclose(q[own][y], r * q0[y] + 1 - r, atol=1e-4)
                assert r < 0.995 and q[own][y] > q0[y]
                totals.append(w * r / (1 - r))
            np.testing.assert_allclose(totals[0], totals[1], rtol=2e-2)  # one S
            compared += 1
    assert compared > 100
    other.posterior.own_token = "drop"
    with pytest.raises(
        ConfigError, match=r"posterior.own_token='drop' must be one of auto, count, leave_out or a weight from 0 to 1"
    ):
        config_lib.validate(other, "posterior")


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


@pytest.mark.parametrize(
    "field,value", [("prior.kappa", -1.0), ("posterior.n_max", -4.0), ("posterior.beta", 0.0), ("prior.kappa", "nan")]
)
def test_negative_pseudo_counts_are_refused_before_any_work(run, tmp_path, field, value):
    """With the EB fit off, prior.kappa and posterior.n_max go to the store as set: a negative N_max gave rows
    summing past 1, a NaN kappa NaN rows, after the whole proxy pass; now one sentence before anything is read."""
    cfg, _, _ = run
    bad = cfg.copy_and_resolve_references()
    group, name = field.split(".")
    bad[group][name] = float(value)
    bad.posterior.fit_empirical_bayes = False
    bad.run.overwrite = True
    with pytest.raises(ConfigError, match=rf"config.{field}=.* must be a (finite )?number (of at least 0|above 0)"):
        run_stage("posterior", bad)
    assert not (RunPaths.from_config(cfg).root / ".posterior.new").exists()


def test_a_holdout_that_holds_out_nothing_is_refused_before_anything_is_written(run):
    """An eb_holdout_fraction too small for the split was refused after the proxy's whole first pass, leaving an
    unfinished posterior of those settings that blocked the corrected command; now before anything is written."""
    cfg, _, _ = run
    bad = cfg.copy_and_resolve_references()
    bad.posterior.eb_holdout_fraction = 1e-9
    bad.run.overwrite = True
    with pytest.raises(ProxyKDError, match=r"posterior.eb_holdout_fraction=1e-09 holds out no sample"):
        run_stage("posterior", bad)
    assert not (RunPaths.from_config(cfg).root / ".posterior.new").exists()


def test_prior_stage_is_skipped_when_finished(run):
    cfg, _, _ = run
    manifest = run_stage("prior", cfg)
    assert manifest["tokens"] > 0 and manifest["split"] == "distill"
    assert (RunPaths.from_config(cfg).prior / "tables.npz").exists()


def test_proxy_weights_replaced_in_place_are_a_change_not_a_reuse(run):
    """posterior.proxy is a folder outside the run: new weights under the same path are not the store's proxy."""
    cfg, _, _ = run
    record = read_record(RunPaths.from_config(cfg).posterior)
    weights = pathlib.Path(cfg.posterior.proxy) / "model.safetensors"
    kept, stat = weights.read_bytes(), weights.stat()
    run_stage("posterior", cfg)  # untouched: reused
    assert read_record(RunPaths.from_config(cfg).posterior) == record
    tensors = safetensors.numpy.load_file(str(weights))
    name = sorted(tensors)[0]
    safetensors.numpy.save_file(tensors | {name: tensors[name] * 1.5}, str(weights), metadata={"format": "pt"})
    try:
        changed = r"the content of its input posterior.proxy \(.*proxy_init\) changed\. Set --config.run.overwrite=True"
        with pytest.raises(ProxyKDError, match=changed):
            run_stage("posterior", cfg)
    finally:  # the module's other tests use this proxy: its bytes and stamp back
        weights.write_bytes(kept)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    run_stage("posterior", cfg)
    assert read_record(RunPaths.from_config(cfg).posterior) == record


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


def padded_copy(src: pathlib.Path, dst: pathlib.Path, extra: int) -> None:
    """The Hugging Face folder `src` with `extra` more embedding and output rows (random, as large as
    the others), as checkpoints that pad their vocabulary past the tokenizer's (Qwen2) have."""
    shutil.copytree(src, dst)
    rng = np.random.default_rng(0)
    for path in dst.glob("*.safetensors"):
        tensors = safetensors.numpy.load_file(path)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in tensors:
                w = tensors[name]
                pad = (rng.normal(size=(extra, w.shape[1])) * w.std()).astype(w.dtype)
                tensors[name] = np.concatenate([w, pad])
        safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] += extra
    (dst / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def one_response_run(tmp_path_factory):
    """One teacher response per prompt (collect.samples_per_prompt's default), and a proxy whose
    embedding is padded 8 rows past the tokenizer."""
    root = tmp_path_factory.mktemp("one_response_run")
    cfg, _ = build_run(root, samples_per_prompt=1)
    padded_copy(pathlib.Path(cfg.proxy.init_from), root / "proxy_padded", 8)
    with cfg.unlocked():
        cfg.posterior.proxy = str(root / "proxy_padded")
        cfg.data.store.value_dtype = "float32"
    run_stage("prior", cfg)
    run_stage("posterior", cfg)
    return cfg


def test_padded_proxy_vocabulary_gets_no_posterior_mass(one_response_run):
    """A proxy embedding larger than the tokenizer is accepted (it was refused), and its extra ids,
    which are no token, get no probability in the store."""
    cfg = one_response_run
    prepared, store = _store(cfg)
    vocab = int(prepared.manifest["tokenizer"]["vocab_size"])
    for sid in store.sample_ids:
        entry = store.get(int(sid))
        kept = entry.ids_TxK[np.exp(entry.logprobs_TxK) > 0]
        assert kept.size and kept.max() < vocab
        np.testing.assert_allclose(np.exp(entry.logprobs_TxK.astype(np.float64)).sum(1) + entry.tail_T, 1.0, atol=1e-3)


def test_one_response_per_prompt_stores_the_posterior_the_fit_scored(one_response_run, tmp_path):
    """With one response per prompt no held-out token has an exact count, so the held-out score fixes
    kappa : N_max but not their scale. The store must not depend on that scale: it leaves each
    response's own token out of the counts. (Counting it, as with several responses per prompt, put
    most of the mass on the observed token at the small scale the fit happened to land on.)"""
    cfg = one_response_run
    paths = RunPaths.from_config(cfg)
    est = json.loads((paths.posterior / posterior.ESTIMATE).read_text())
    assert est["fitted"] and est["count_own_token"] is False
    prepared, tables = PreparedData(paths.prepared), load_prior(paths.prior)

    def store_at(scale: float, count_own_token: bool) -> dict:
        out = tmp_path / f"x{scale}-{count_own_token}"
        scaled = est | {"kappa": est["kappa"] * scale, "n_max": est["n_max"] * scale}
        with context.create(cfg, "eval") as ctx:  # any stage's context: mesh and model loading
            _, model = ctx.load_model(pathlib.Path(cfg.posterior.proxy))
            estimate.write_store(
                prepared,
                tables,
                scaled | {"count_own_token": count_own_token, "own_weight": float(count_own_token)},
                model,
                cfg.posterior,
                cfg.data,
                out=out,
                mesh=ctx.mesh,
                rules=ctx.rules,
                seq_len=cfg.data.seq_len,
                batch_size=cfg.posterior.batch_size,
                seed=ctx.seed,
            )
        reader = StoreReader(out, tokenizer_hash=prepared.tokenizer_hash)
        return {int(s): reader.get(int(s)) for s in reader.sample_ids}

    def dense(entries: dict) -> np.ndarray:
        rows = []
        for sid in sorted(entries):
            e = entries[sid]
            q = np.zeros((e.ids_TxK.shape[0], cfg.proxy.vocab_size + 8))
            np.put_along_axis(q, e.ids_TxK.astype(np.int64), np.exp(e.logprobs_TxK.astype(np.float64)), 1)
            rows.append(q)
        return np.concatenate(rows)

    # Scales at which one count is not negligible against kappa + N_t (wherever the fit landed).
    low = 1.0 / (est["kappa"] + est["n_max"])
    np.testing.assert_allclose(dense(store_at(low, False)), dense(store_at(100 * low, False)), atol=1e-4)
    # Counting the own token makes the store depend on the scale the fit could not set (the check
    # above would pass vacuously if it did not).
    assert np.abs(dense(store_at(low, True)) - dense(store_at(100 * low, True))).max() > 0.1


def test_fit_builds_its_held_out_tables_as_the_tables_on_disk_were_built(one_response_run):
    """The EB fit scores held-out tokens against tables rebuilt without them; those must be built like
    the `prior` stage's tables, which the store queries, not with whatever `prior.*` the posterior's
    command line carries (the posterior's record does not hold them)."""
    cfg = one_response_run
    est_path = RunPaths.from_config(cfg).posterior / posterior.ESTIMATE
    before = json.loads(est_path.read_text())
    other = cfg.copy_and_resolve_references()
    other.prior.ngram_order, other.prior.exact_top_s, other.prior.ngram_top_s = 2, 1, 2
    other.run.seed += 1  # a posterior field (unused by the expected mode), so that the stage runs again
    other.run.overwrite = True
    run_stage("posterior", other)
    after = json.loads(est_path.read_text())
    assert after["heldout_loglik"] == before["heldout_loglik"]
    assert (after["kappa"], after["n_max"]) == (before["kappa"], before["n_max"])
