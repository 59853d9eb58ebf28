"""`proxykd posterior`: the aligned proxy updates the corpus prior; the sparse store is written.

Two passes over the distillation split (DESIGN.md §2):

1. *Weights and empirical Bayes.* The proxy scores every teacher response:
   l(x, y) (mean or summed token log-likelihood) gives mu, gamma and the
   sample weights w = sigmoid((l - mu) / gamma). A fraction of the samples is
   held out: prior tables built without them (their sibling responses still
   count in the per-prompt tries) must predict their tokens, and (kappa, N_max)
   are fitted by that held-out log-likelihood; the fitted posterior scores at
   least the prior and the proxy there (both are points of the search). Written to
   `<run>/posterior/estimate.json`, so a resumed run skips this pass.
2. *Store.* One jitted function per batch runs the proxy forward and the
   posterior kernel (exact sparse top-k; no dense prior); the top-k, the tail
   mass and the sample weight go to this host's store shards. A killed run
   resumes after the last finished shard.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from proxykd_jax import parallel
from proxykd_jax.bayes import empirical
from proxykd_jax.bayes import posterior as kernel
from proxykd_jax.bayes import weights as weights_lib
from proxykd_jax.bayes.prior import SparsePrior
from proxykd_jax.data import pipeline
from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreWriter
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models import hf
from proxykd_jax.stages import prior as prior_stage
from proxykd_jax.stages.paths import RunPaths

log = logging.getLogger(__name__)
SPLIT = "distill"
ESTIMATE = "estimate.json"
_N_MAX_CAP = 1e9  # N_max = inf (the proxy alone) is run as this many pseudo-observations


def proxy_folder(cfg) -> pathlib.Path:
    """The aligned proxy: `posterior.proxy` if set, else the align stage's final folder."""
    return pathlib.Path(cfg.posterior.proxy or RunPaths.from_config(cfg).proxy / "final")


def load_model(folder: pathlib.Path, dtype: str, mesh, rules):
    """(ModelConfig, graphdef, sharded state) of a Hugging Face folder."""
    if not folder.exists():
        raise ProxyKDError(
            f"{folder} does not exist: no aligned proxy; run `proxykd align` first "
            "or set --config.posterior.proxy=FOLDER."
        )
    model_cfg, model = hf.load_hf(str(folder), dtype=dtype)
    graphdef, state = parallel.place_model(model, mesh, rules)
    return model_cfg, graphdef, state


def target_logprobs(graphdef, state, batch):
    """log p_proxy(target) at every position [B, L] (float32; vocabulary never leaves the device)."""
    model = nnx.merge(graphdef, state)
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return picked - lse


def _response_spans(batch) -> list[tuple[int, int, int]]:
    """(row, first input index, response tokens T) of each real row of an `iter_samples` batch."""
    spans = []
    for i, (sid, n_in, p) in enumerate(zip(batch["sample_ids"][:, 0], batch["lengths"], batch["prompt_lengths"])):
        if sid >= 0 and n_in > 0:
            spans.append((i, int(p) - 1, int(n_in) - int(p) + 1))
    return spans


def _host_rows(x: jax.Array, rows: int) -> np.ndarray:
    """This process's rows of a replicated global array."""
    start = jax.process_index() * rows
    return np.asarray(x)[start : start + rows]


def _allgather(x: np.ndarray) -> np.ndarray:
    """Concatenates a 1-D host array over processes (lengths may differ)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    n = multihost_utils.process_allgather(np.asarray([x.shape[0]], np.int64))
    buf = np.zeros(int(n.max()), x.dtype)
    buf[: x.shape[0]] = x
    parts = multihost_utils.process_allgather(buf)
    return np.concatenate([p[: int(c)] for p, c in zip(parts, n.reshape(-1))])


def _is_holdout(sample_ids: np.ndarray, fraction: float) -> np.ndarray:
    """A stable pseudo-random subset of samples (by id) for the empirical-Bayes fit."""
    h = (sample_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return (h.astype(np.float64) / float(1 << 24)) < fraction


def _batches(prepared, cfg, seq_len: int, batch_size: int):
    return pipeline.iter_samples(prepared, SPLIT, cfg.data, batch_size=batch_size, seq_len=seq_len)


def first_pass(cfg, prepared, graphdef, state, mesh, rules, *, seq_len, batch_size) -> dict:
    """Sample log-likelihoods -> (mu, gamma, weights) and the empirical-Bayes fit."""
    pcfg = cfg.posterior
    ids, logliks = [], []
    hold_seqs, hold_proxy_y, hold_sid = [], [], []
    fwd = jax.jit(target_logprobs, static_argnums=0, out_shardings=parallel.replicated(mesh))
    total = prepared.num_samples(SPLIT)
    with tqdm.tqdm(total=total, desc="posterior: proxy scores", unit="sample") as bar:
        for host_batch in _batches(prepared, cfg, seq_len, batch_size):
            gb = parallel.global_batch(
                {k: host_batch[k] for k in ("tokens", "targets", "positions", "segment_ids")}, mesh, rules
            )
            lp = _host_rows(fwd(graphdef, state, gb), batch_size)
            for row, start, t in _response_spans(host_batch):
                sid = int(host_batch["sample_ids"][row, 0])
                tok_lp = lp[row, start : start + t].astype(np.float64)
                ids.append(sid)
                logliks.append(tok_lp.sum() / (t if pcfg.weight_normalize == "mean" else 1))
                if _is_holdout(np.asarray([sid]), pcfg.eb_holdout_fraction)[0]:
                    hold_sid.append(sid)
                    hold_seqs.append(np.asarray(host_batch["targets"][row, start : start + t], np.int32))
                    hold_proxy_y.append(np.exp(tok_lp))
            bar.update(len(_response_spans(host_batch)))
    sample_ids = np.asarray(ids, np.int64)
    loglik = np.asarray(logliks, np.float64)
    mu, gamma = weights_lib.weight_stats(_allgather(loglik))
    w = (
        np.asarray(weights_lib.sample_weights(loglik, mu, gamma), np.float64)
        if pcfg.use_weights
        else np.ones_like(loglik)
    )
    est = {
        "mu": mu,
        "gamma": gamma,
        "num_samples": int(_allgather(sample_ids).shape[0]),
        "weight_normalize": pcfg.weight_normalize,
        "kappa": float(cfg.prior.kappa),
        "n_max": float(pcfg.n_max),
        "fitted": False,
    }
    if pcfg.fit_empirical_bayes:
        est.update(_fit(cfg, prepared, sample_ids, w, hold_sid, hold_seqs, hold_proxy_y))
    est["weights"] = {str(s): float(x) for s, x in zip(sample_ids, w)}
    return est


def _prompt_keys(prepared, sample_ids) -> dict[int, int]:
    wanted = set(int(s) for s in sample_ids)
    return {
        int(r["sample_id"]): int(r["prompt_key"]) for r in prepared.iter_split(SPLIT) if int(r["sample_id"]) in wanted
    }


def _fit(cfg, prepared, sample_ids, w, hold_sid, hold_seqs, hold_proxy_y) -> dict:
    """Empirical Bayes on held-out samples, scored against tables built without them (DESIGN §2)."""
    if not hold_sid:
        raise ProxyKDError(
            f"posterior.eb_holdout_fraction={cfg.posterior.eb_holdout_fraction} holds out no "
            "sample of the distillation split; raise it or set posterior.fit_empirical_bayes=False."
        )
    keys = _prompt_keys(prepared, hold_sid)
    w_of = dict(zip(sample_ids.tolist(), w.tolist()))
    held_out_tables = prior_stage.build(prepared, cfg.prior, exclude=frozenset(_allgather(np.asarray(hold_sid))))
    prior = held_out_tables.query(np.asarray([keys[s] for s in hold_sid], np.int64), hold_seqs, mode="external")
    weight_N = np.concatenate([np.full(len(y), w_of[s]) for s, y in zip(hold_sid, hold_seqs)])
    stats = empirical.heldout_stats_from_probs(
        np.concatenate(hold_proxy_y), np.concatenate(hold_seqs), prior, held_out_tables.base_V, weight_N
    )
    stats = empirical.HeldoutStats(*(_allgather(np.asarray(x)) for x in stats))
    res = empirical.fit_empirical_bayes(stats, refine_steps=cfg.posterior.eb_refine_steps)
    print(f"[posterior] {res.summary()} on {stats.proxy_y_N.shape[0]} held-out tokens")
    return {
        "kappa": res.kappa,
        "n_max": res.n_max,
        "fitted": True,
        "heldout_tokens": int(stats.proxy_y_N.shape[0]),
        "heldout_loglik": {
            "posterior": res.score_posterior,
            "prior": res.score_prior,
            "prior_kappa": res.prior_kappa,
            "proxy": res.score_proxy,
        },
    }


def _dense_prior_rows(tables, keys, seqs, spans, rows: int, length: int) -> SparsePrior:
    """The prior at every position of a [rows, length] batch (zeros off the response tokens)."""
    q = tables.query(np.asarray(keys, np.int64), seqs, mode="include_self")
    out = []
    for field in q:
        field = np.asarray(field)
        shape = (rows * length,) + field.shape[1:]
        full = np.ones(shape, field.dtype) if field.ndim == 1 else np.zeros(shape, field.dtype)
        offset = 0
        for row, start, t in spans:
            full[row * length + start : row * length + start + t] = field[offset : offset + t]
            offset += t
        out.append(full)
    return SparsePrior(*out)


def make_posterior_step(graphdef, pcfg, *, k: int, mesh):
    """jit(proxy forward + posterior kernel) for one batch -> ids/logprobs [B*L, K], tail [B*L]."""

    def step(state, batch, prior, base_V, n_pseudo_N, kappa, rng, head_ids, head_lps):
        model = nnx.merge(graphdef, state)
        logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
        n = logits.shape[0] * logits.shape[1]
        return kernel.posterior_topk(
            logits.reshape(n, -1),
            prior,
            base_V,
            n_pseudo_N,
            kappa,
            k=k,
            mode=pcfg.mode,
            num_samples=pcfg.num_samples,
            beta=pcfg.beta,
            rng=rng,
            head_ids_NxH=head_ids,
            head_logprobs_NxH=head_lps,
            chunk=pcfg.chunk_tokens,
        )

    return jax.jit(step, out_shardings=parallel.replicated(mesh))


def second_pass(cfg, prepared, tables, est, graphdef, state, mesh, rules, *, seq_len, batch_size, vocab_size) -> int:
    pcfg, scfg = cfg.posterior, cfg.data.store
    paths = RunPaths.from_config(cfg)
    writer = StoreWriter.from_config(
        paths.posterior, scfg, vocab_size=vocab_size, tokenizer_hash=prepared.tokenizer_hash, host=jax.process_index()
    )
    done = set(writer.finished_sample_ids().tolist())
    step = make_posterior_step(graphdef, pcfg, k=scfg.k, mesh=mesh)
    keys_of = {int(r["sample_id"]): int(r["prompt_key"]) for r in prepared.iter_split(SPLIT)}
    weights = est["weights"]
    kappa = jnp.float32(est["kappa"])
    n_max = min(float(est["n_max"]), _N_MAX_CAP)
    base = jnp.asarray(tables.base_V, jnp.float32)
    use_head = pcfg.use_teacher_topk and prepared.has_teacher_head
    root = jax.random.key(cfg.run.seed)
    written = 0
    with tqdm.tqdm(total=prepared.num_samples(SPLIT), desc="posterior: store", unit="sample") as bar:
        for b, host_batch in enumerate(_batches(prepared, cfg, seq_len, batch_size)):
            spans = _response_spans(host_batch)
            todo = [s for s in spans if int(host_batch["sample_ids"][s[0], 0]) not in done]
            bar.update(len(spans) - len(todo))
            if not todo:
                continue
            sids = [int(host_batch["sample_ids"][row, 0]) for row, _, _ in todo]
            seqs = [np.asarray(host_batch["targets"][row, s : s + t], np.int32) for row, s, t in todo]
            rows, length = host_batch["tokens"].shape
            prior = _dense_prior_rows(tables, [keys_of[s] for s in sids], seqs, todo, rows, length)
            n_pseudo = np.zeros((rows, length), np.float32)
            for (row, s, t), sid in zip(todo, sids):
                n_pseudo[row, s : s + t] = n_max * weights[str(sid)]
            local = {k: host_batch[k] for k in ("tokens", "targets", "positions", "segment_ids")}
            local["n_pseudo"] = n_pseudo
            for f, name in zip(prior, SparsePrior._fields):
                local["prior_" + name] = f.reshape((rows, length) + f.shape[1:])
            if use_head:
                local["head_ids"], local["head_lps"] = (
                    host_batch["teacher_topk_ids"],
                    host_batch["teacher_topk_logprobs"],
                )
            gb = parallel.global_batch(local, mesh, rules)
            flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
            g_prior = SparsePrior(*(flat(gb["prior_" + n]) for n in SparsePrior._fields))
            ids, lps, tail = step(
                state,
                gb,
                g_prior,
                base,
                flat(gb["n_pseudo"]),
                kappa,
                jax.random.fold_in(root, b),
                flat(gb["head_ids"]) if use_head else None,
                flat(gb["head_lps"]) if use_head else None,
            )
            start = jax.process_index() * rows * length
            ids, lps, tail = (np.asarray(x)[start : start + rows * length] for x in (ids, lps, tail))
            for (row, s, t), sid in zip(todo, sids):
                sl = slice(row * length + s, row * length + s + t)
                writer.add(sid, ids[sl], lps[sl], tail[sl], weight=weights[str(sid)])
                written += 1
            bar.update(len(todo))
    writer.close()
    return written


def _write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    tmp.rename(path)


def run(cfg) -> dict:
    paths = RunPaths.from_config(cfg)
    prepared = PreparedData(paths.prepared)
    tables = prior_stage.load(cfg)
    mesh = parallel.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    folder = proxy_folder(cfg)
    model_cfg, graphdef, state = load_model(folder, cfg.proxy.dtype, mesh, rules)
    vocab = int(prepared.manifest["tokenizer"]["vocab_size"])
    if model_cfg.vocab_size < vocab or tables.vocab_size != model_cfg.vocab_size:
        raise ProxyKDError(
            f"{folder}: proxy vocab_size {model_cfg.vocab_size} does not match the prior "
            f"tables ({tables.vocab_size}) and tokenizer ({vocab}); rebuild `prior` with "
            "the proxy's tokenizer."
        )
    paths.posterior.mkdir(parents=True, exist_ok=True)
    est_path = paths.posterior / ESTIMATE
    seq_len, batch_size = cfg.data.seq_len, cfg.posterior.batch_size
    start = time.perf_counter()
    if est_path.exists():
        est = json.loads(est_path.read_text())
        log.info(
            "posterior: reusing %s (mu=%.4f gamma=%.4f kappa=%.4g N_max=%.4g)",
            est_path,
            est["mu"],
            est["gamma"],
            est["kappa"],
            est["n_max"],
        )
    else:
        est = first_pass(cfg, prepared, graphdef, state, mesh, rules, seq_len=seq_len, batch_size=batch_size)
        est.update(proxy=str(folder), prior=str(paths.prior), mode=cfg.posterior.mode, k=cfg.data.store.k)
        if jax.process_index() == 0:
            _write_json(est_path, est)
    written = second_pass(
        cfg,
        prepared,
        tables,
        est,
        graphdef,
        state,
        mesh,
        rules,
        seq_len=seq_len,
        batch_size=batch_size,
        vocab_size=model_cfg.vocab_size,
    )
    log.info("posterior: %d samples written in %.1f s -> %s", written, time.perf_counter() - start, paths.posterior)
    return {k: v for k, v in est.items() if k != "weights"}
