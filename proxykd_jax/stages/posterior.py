"""`proxykd posterior`: the aligned proxy updates the corpus prior; the sparse store is written.

Pass 1 (sample weights, empirical Bayes) is saved as `<run>/posterior/estimate.json`, so a
resumed run skips it; pass 2 writes the store shards and resumes after the last finished shard
(`bayes/estimate.py`)."""

from __future__ import annotations

import json
import logging
import pathlib
import time

from proxykd_jax import config as config_lib
from proxykd_jax.bayes import estimate, pass1_log
from proxykd_jax.bayes.tables import built_with, load_prior
from proxykd_jax.context import load_folder
from proxykd_jax.data.records import PreparedData
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.parallel import hosts

log = logging.getLogger(__name__)
ESTIMATE = "estimate.json"


def proxy_folder(ctx) -> pathlib.Path:
    """The aligned proxy: `posterior.proxy` if set, else the align stage's final folder."""
    return pathlib.Path(ctx.cfg.posterior.proxy or ctx.paths.proxy / "final").expanduser()


def run(ctx) -> dict:
    """Writes (or resumes, or reuses) the posterior store; returns the estimate without the weights."""
    cfg, art = ctx.cfg, ctx.artifact("posterior")
    if art.done:
        log.info("posterior: %s is finished with these settings; reusing it", art.path)
        return art.summary
    config_lib.check_ranges(cfg, ("prior", "posterior"))  # kappa, n_max, beta: also for calls without the CLI
    folder = proxy_folder(ctx)
    if not (folder / "config.json").exists():
        raise ProxyKDError(
            f"{folder} does not exist: no aligned proxy; run `proxykd align` first or set --config.posterior.proxy=FOLDER."
        )
    prepared, tables = PreparedData(ctx.paths.prepared), load_prior(ctx.paths.prior)
    vocab = int(prepared.manifest["tokenizer"]["vocab_size"])
    if tables.vocab_size != vocab:
        raise ProxyKDError(
            f"{ctx.paths.prior}: the prior tables have vocab_size {tables.vocab_size} but the prepared "
            f"records' tokenizer has {vocab}; run `proxykd prior` again on these records."
        )
    est_path = art.work / ESTIMATE  # pass 1's result, once written
    if not est_path.exists():
        estimate.check_holdout(prepared, cfg.posterior)
    rows = load_folder(folder, config_only=True).vocab_size  # before any weight is read
    if rows < vocab:  # (a larger, padded embedding is fine: its extra ids are never tokens)
        raise ProxyKDError(
            f"{folder}: proxy vocab_size {rows} is smaller than the tokenizer's {vocab}; "
            "use a proxy with the tokenizer of the prepared records (data.tokenizer)."
        )
    _, model = ctx.load_model(folder, dtype=cfg.proxy.dtype, group=cfg.proxy, rows=(cfg.data.seq_len, "data.seq_len"))
    art.begin()
    sizes = dict(mesh=ctx.mesh, rules=ctx.rules, seq_len=cfg.data.seq_len, batch_size=cfg.posterior.batch_size)
    start = time.perf_counter()
    if est_path.exists():
        est = json.loads(est_path.read_text())
        log.info("posterior: pass 1 finished earlier (kappa=%.4g N_max=%.4g); reusing it", est["kappa"], est["n_max"])
    else:
        prior_cfg = built_with(tables, cfg.prior)
        est = estimate.fit_estimate(prepared, model, cfg.posterior, prior_cfg, cfg.data, log_dir=art.work, **sizes)
        est.update(proxy=str(folder), prior=str(ctx.paths.prior), mode=cfg.posterior.mode, k=cfg.data.store.k)
        ctx.write_json(est_path, est)
        hosts.sync("posterior: estimate.json written")  # before any process drops the chunks it holds
    pass1_log.Pass1Log.clear(art.work)  # (all processes' chunks: pass 1 is in estimate.json now)
    written = estimate.write_store(
        prepared, tables, est, model, cfg.posterior, cfg.data, out=art.work, seed=ctx.seed, **sizes
    )
    log.info("posterior: %d samples written in %.1f s -> %s", written, time.perf_counter() - start, art.path)
    summary = {k: v for k, v in est.items() if k != "weights"}
    art.finish(summary)
    return summary
