"""The posterior estimate over the distillation split: sample weights, the empirical-Bayes fit and
the sparse top-k store (the method is written out in docs/METHOD.md).

Two passes over the split:

1. *Weights and empirical Bayes* (`fit_estimate`). The proxy scores every teacher response:
   l(x, y) (mean or summed token log-likelihood) gives mu, gamma and the sample weights
   w = sigmoid((l - mu) / gamma). A fraction of the samples is held out: prior tables built
   without them (their sibling responses still count in the per-prompt tries) must predict their
   tokens, and (kappa, N_max) are fitted by that held-out log-likelihood; the fitted posterior
   scores at least the prior and the proxy there (both are points of the search). The scores are kept
   in chunks as they come (`pass1_log`): a killed run resumes at the last chunk.
2. *Store* (`write_store`). One jitted function per batch runs the proxy forward and the posterior
   kernel (exact sparse top-k; no dense prior); the top-k, the tail mass and the sample weight go
   to this host's store shards. A killed run resumes after the last finished shard.

Each process reads its own slice of the split; every collective step runs on every process the
same number of times (`parallel.hosts.lockstep`), and the statistics are gathered over processes.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxykd_jax import progress as progress_bars
from proxykd_jax.bayes import empirical, pass1_log
from proxykd_jax.bayes import posterior as kernel
from proxykd_jax.bayes import weights as weights_lib
from proxykd_jax.bayes.posterior_bytes import OTHER_SYMBOL
from proxykd_jax.bayes.prior import SparsePrior, own_weight, prior_query
from proxykd_jax.bayes.tables import build_prior
from proxykd_jax.data import pipeline
from proxykd_jax.data.store import StoreWriter
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.parallel import hosts
from proxykd_jax.parallel.sharding import batch_sharding, global_batch, replicated, spec_axes, under_mesh

log = logging.getLogger(__name__)
SPLIT = "distill"
_N_MAX_CAP = 1e9  # N_max = inf (the proxy alone) is run as this many pseudo-observations
_MODEL_FIELDS = ("tokens", "targets", "positions", "segment_ids")


def token_logits(model, hidden_BxLxD, vocab: int = 0):
    """The proxy's logits [B, L, V] at final-norm hidden states; with `vocab` below V (a padded embedding, as
    Qwen's), the ids from `vocab` on are no token of the tokenizer and get no probability."""
    logits = model.logits(hidden_BxLxD)
    if 0 < vocab < logits.shape[-1]:
        real = jnp.arange(logits.shape[-1]) < vocab
        logits = jnp.where(real, logits, jnp.finfo(logits.dtype).min)
    return logits


def _tile_width(rows: int, length: int, chunk_tokens: int) -> int:
    """Positions per tile of a [rows, length] batch's logits: about `chunk_tokens` tokens (0: the whole row)."""
    return length if chunk_tokens <= 0 else max(1, min(length, chunk_tokens // rows))


def over_tiles(fn, width: int, *per_position):
    """`fn` on tiles of `width` positions of [B, L, ...] arrays (pytrees of them; None leaves stay None), one tile
    at a time (`lax.map`), the outputs put back as [B, L, ...]. The last tile is padded with the row's last position.

    Tiles cut the sequence axis, never the batch axis, so they keep the rows' sharding over the mesh; the proxy's
    [B, L, V] logits exist one tile at a time ([B, width, V]): on a CPU, writing the whole batch's logits cost more
    in page faults than computing them (BUILD_NOTES, "The posterior's logits one tile at a time")."""
    length = jax.tree.leaves(per_position)[0].shape[1]
    pad = (-length) % width

    def tiles(x):  # [B, L, ...] -> [T, B, width, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode="edge")
        return jnp.moveaxis(x.reshape((x.shape[0], -1, width) + x.shape[2:]), 1, 0)

    def untile(y):  # [T, B, width, ...] -> [B, L, ...]
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape((y.shape[0], -1) + y.shape[3:])[:, :length]

    if pad == 0 and width == length:
        return fn(*per_position)
    return jax.tree.map(untile, jax.lax.map(lambda xs: fn(*xs), jax.tree.map(tiles, per_position)))


def _hidden(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    return model, model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])


def _tiled_scores(graphdef, state, batch, vocab: int, chunk_tokens: int, score):
    """`score(logits, targets)` of the proxy's logits, formed `chunk_tokens` tokens at a time (`over_tiles`; 0: all
    at once) from one forward pass's hidden states."""
    model, hidden = _hidden(graphdef, state, batch)
    width = _tile_width(*batch["tokens"].shape, chunk_tokens)
    return over_tiles(lambda h, t: score(token_logits(model, h, vocab), t), width, hidden, batch["targets"])


def target_logprobs(graphdef, state, batch, vocab: int = 0, chunk_tokens: int = 0):
    """log p_proxy(target) at every position [B, L] (float32; the logits are formed `chunk_tokens` tokens at a
    time, `over_tiles`; 0: all at once)."""
    return _tiled_scores(graphdef, state, batch, vocab, chunk_tokens, _picked_logprobs)


def target_scores(graphdef, state, batch, sym_V, vocab: int = 0, chunk_tokens: int = 0):
    """log p_proxy(target) [B, L] and, for a `bytes` head (its first-byte symbols `sym_V`), the proxy's mass of
    each target's first-byte group [B, L] (the head's EB statistics): one forward pass gives both."""

    def score(logits, targets):
        return _picked_logprobs(logits, targets), _group_mass(logits, targets, sym_V)

    return _tiled_scores(graphdef, state, batch, vocab, chunk_tokens, score)


def _picked_logprobs(logits, targets):
    """log softmax(logits) at each target [B, L]."""
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _group_mass(logits, targets, sym_V):
    """sum of p(v) over the tokens v whose first byte is the target's: a masked log-sum-exp over the
    vocabulary, no [V, symbols] product."""
    logits = logits.astype(jnp.float32)
    same = sym_V == sym_V[targets][..., None]
    group = jax.nn.logsumexp(jnp.where(same, logits, -jnp.inf), axis=-1)
    return jnp.exp(group - jax.nn.logsumexp(logits, axis=-1))


def response_spans(batch) -> list[tuple[int, int, int]]:
    """(row, first input index, response tokens T) of each real row of an `iter_samples` batch."""
    spans = []
    for i, (sid, n_in, p) in enumerate(zip(batch["sample_ids"][:, 0], batch["lengths"], batch["prompt_lengths"])):
        if sid >= 0 and n_in > 0:
            spans.append((i, int(p) - 1, int(n_in) - int(p) + 1))
    return spans


def _empty(batch: dict) -> dict:
    """A padding batch shaped like `batch` (no sample in it)."""
    out = dict(batch)
    out["sample_ids"] = np.full_like(batch["sample_ids"], -1)
    out["lengths"] = np.zeros_like(batch["lengths"])
    return out


def local_rows(batch_size: int) -> int:
    """This process's rows of a global batch of `batch_size` rows."""
    if batch_size % jax.process_count():
        raise ProxyKDError(
            f"posterior.batch_size={batch_size} must be a multiple of the {jax.process_count()} processes."
        )
    return batch_size // jax.process_count()


ROWS = f"by length in windows of {pipeline.SORT_WINDOW} batches, cut to the longest"  # pass 1's chunks record it


def batches(prepared, data_cfg, *, seq_len: int, batch_size: int):
    """This process's rows of the split's global batches (`batch_size` samples, one per row), in order of length
    within windows and each cut to its longest row (`pipeline.sample_batches`). The store and the fit are keyed by
    sample id, so the order changes no result; it spares the proxy the padding of one-sample rows: a batch of short
    samples runs a short forward."""
    local_rows(batch_size)  # refuses a batch that does not split over the processes (pass 2 reads no other check)
    return pipeline.sample_batches(prepared, SPLIT, data_cfg, batch_size=batch_size, seq_len=seq_len, empty=_empty)


def is_holdout(sample_ids: np.ndarray, fraction: float) -> np.ndarray:
    """A stable pseudo-random subset of samples (by id) for the empirical-Bayes fit."""
    h = (sample_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return (h.astype(np.float64) / float(1 << 24)) < fraction


def _no_holdout(pcfg) -> ProxyKDError:
    return ProxyKDError(
        f"posterior.eb_holdout_fraction={pcfg.eb_holdout_fraction} holds out no "
        "sample of the distillation split; raise it or set posterior.fit_empirical_bayes=False."
    )


def check_holdout(prepared, pcfg) -> None:
    """Refuses, before the proxy's pass, an empirical-Bayes fit whose `eb_holdout_fraction` holds out no sample of
    the split (the ids are read only where that can happen: fewer than 30 samples expected held out)."""
    fraction = float(pcfg.eb_holdout_fraction)
    if not pcfg.fit_empirical_bayes or prepared.num_samples(SPLIT) * fraction >= 30:
        return
    ids = np.fromiter((int(r["sample_id"]) for r in prepared.iter_split(SPLIT)), np.int64)
    if not is_holdout(ids, fraction).any():
        raise _no_holdout(pcfg)


def fit_estimate(
    prepared, model, pcfg, prior_cfg, data_cfg, *, mesh, rules, seq_len: int, batch_size: int, log_dir=None
) -> dict:
    """Pass 1: sample log-likelihoods -> (mu, gamma, weights of every sample) and the EB fit.

    `pcfg`/`prior_cfg`/`data_cfg` are the posterior, prior and data config groups; with `log_dir` the pass is
    kept there in chunks (`pass1_log`) and a killed run resumes at the last one."""
    graphdef, state = nnx.split(model)
    vocab = int(prepared.manifest["tokenizer"]["vocab_size"])
    # A bytes head is fitted as it is used: the held-out score is that of the projected posterior.
    # (An exact head keeps the head-free fit, so same-tokenizer runs are unchanged.)
    head_sym = (
        head_symbols(prepared, model.cfg.vocab_size) if pcfg.use_teacher_topk and prepared.has_teacher_head else None
    )
    tile_tokens = int(pcfg.chunk_tokens)
    if head_sym is None:
        fwd = under_mesh(
            jax.jit(target_logprobs, static_argnums=(0, 3, 4), out_shardings=replicated(mesh)), mesh, rules
        )
    else:
        fwd = under_mesh(jax.jit(target_scores, static_argnums=(0, 4, 5), out_shardings=replicated(mesh)), mesh, rules)
    total, rows = prepared.num_samples(SPLIT), local_rows(batch_size)
    every = pass1_log.chunk_batches(hosts.batches_per_process(total, rows))
    fingerprint = dict(
        batch_size=batch_size, seq_len=seq_len, processes=jax.process_count(), head=head_sym is not None, rows=ROWS
    )
    kept = pass1_log.Pass1Log(log_dir, every=every, fingerprint=fingerprint) if log_dir is not None else None
    ids, logliks, hold_sid = [], [], []
    hold = {name: [] for name in ("seqs", "proxy_y", "head_ids", "head_lp", "head_g")}
    skip, chunks = kept.resume() if kept is not None else (0, [])
    for chunk in chunks:
        c_ids, c_logliks, c_hold_sid, c_hold = pass1_log.unpack(chunk)
        ids += c_ids
        logliks += c_logliks
        hold_sid += c_hold_sid
        for name, arrays in c_hold.items():
            hold[name] += arrays
    if skip:
        log.info("posterior: pass 1 resumes after %d of its batches (%d samples scored earlier)", skip, len(ids))
    saved = (len(ids), len(hold_sid))  # what the chunks on disk hold
    progress = jax.process_index() == 0
    with progress_bars.bar(
        total=total, desc="posterior: pass 1 of 2, proxy scores", unit="sample", disable=not progress
    ) as bar:
        bar.update(len(ids) * jax.process_count())
        for b, host_batch in enumerate(batches(prepared, data_cfg, seq_len=seq_len, batch_size=batch_size)):
            if b < skip:  # scored before the run was killed: its data is read, not run
                continue
            gb = global_batch({k: host_batch[k] for k in _MODEL_FIELDS}, mesh, rules)
            if head_sym is None:
                lp = hosts.host_rows(fwd(graphdef, state, gb, vocab, tile_tokens), rows)
            else:
                lp, g = (hosts.host_rows(x, rows) for x in fwd(graphdef, state, gb, head_sym, vocab, tile_tokens))
            spans = response_spans(host_batch)
            for row, start, t in spans:
                sid = int(host_batch["sample_ids"][row, 0])
                tok_lp = lp[row, start : start + t].astype(np.float64)
                ids.append(sid)
                logliks.append(tok_lp.sum() / (t if pcfg.weight_normalize == "mean" else 1))
                if is_holdout(np.asarray([sid]), pcfg.eb_holdout_fraction)[0]:
                    sl = slice(start, start + t)
                    hold_sid.append(sid)
                    hold["seqs"].append(np.asarray(host_batch["targets"][row, sl], np.int32))
                    hold["proxy_y"].append(np.exp(tok_lp))
                    if head_sym is not None:
                        hold["head_ids"].append(np.asarray(host_batch["teacher_topk_ids"][row, sl]))
                        hold["head_lp"].append(np.asarray(host_batch["teacher_topk_logprobs"][row, sl]))
                        hold["head_g"].append(g[row, sl].astype(np.float64))
            bar.update(len(spans) * jax.process_count())
            if kept is not None and (b + 1) % every == 0:
                n, h = saved
                kept.save(pass1_log.pack(ids[n:], logliks[n:], hold_sid[h:], {k: v[h:] for k, v in hold.items()}))
                saved = (len(ids), len(hold_sid))
    hold_head = list(zip(hold["head_ids"], hold["head_lp"], hold["head_g"])) if head_sym is not None else None
    hold_seqs, hold_proxy_y = hold["seqs"], hold["proxy_y"]
    sample_ids = np.asarray(ids, np.int64)
    loglik = np.asarray(logliks, np.float64)
    mu, gamma = weights_lib.weight_stats(hosts.allgather(loglik))
    w = (
        np.asarray(weights_lib.sample_weights(loglik, mu, gamma), np.float64)
        if pcfg.use_weights
        else np.ones_like(loglik)
    )
    all_ids, all_w = hosts.allgather(sample_ids), hosts.allgather(w)
    est = {
        "mu": mu,
        "gamma": gamma,
        "num_samples": int(all_ids.shape[0]),
        "weight_normalize": pcfg.weight_normalize,
        "kappa": float(prior_cfg.kappa),
        "n_max": float(pcfg.n_max),
        "fitted": False,
    }
    if pcfg.fit_empirical_bayes:
        est.update(
            _fit(
                prepared,
                pcfg,
                prior_cfg,
                dict(zip(all_ids.tolist(), all_w.tolist())),
                hold_sid,
                hold_seqs,
                hold_proxy_y,
                hold_head,
                None if head_sym is None else np.asarray(head_sym),
            )
        )
    # (unfitted: the config's kappa and N_max, whose scale is the user's, and the own token counted unless told)
    est["own_weight"] = own_weight(str(pcfg.get("own_token", "auto")), est.get("count_own_token", True))
    est["count_own_token"] = est["own_weight"] > 0
    log.info(
        "posterior: a stored response's own token counts %g in its exact counts (posterior.own_token=%s)",
        est["own_weight"],
        pcfg.get("own_token", "auto"),
    )
    est["weights"] = {str(s): float(x) for s, x in sorted(zip(all_ids.tolist(), all_w.tolist()))}
    return est


def _fit(prepared, pcfg, prior_cfg, w_of: dict, hold_sid, hold_seqs, hold_proxy_y, hold_head=None, sym=None) -> dict:
    """Empirical Bayes on held-out samples, scored against tables built without them."""
    all_held = hosts.allgather(np.asarray(hold_sid, np.int64))
    if not len(all_held):
        raise _no_holdout(pcfg)
    wanted = set(hold_sid)
    keys = {
        int(r["sample_id"]): int(r["prompt_key"]) for r in prepared.iter_split(SPLIT) if int(r["sample_id"]) in wanted
    }
    held_out_tables = build_prior(prepared, prior_cfg, exclude=frozenset(all_held.tolist()), progress=False)
    stats_parts, head_parts = [], []
    if hold_sid:
        prior = held_out_tables.query(np.asarray([keys[s] for s in hold_sid], np.int64), hold_seqs, mode="external")
        weight_N = np.concatenate([np.full(len(y), w_of[s]) for s, y in zip(hold_sid, hold_seqs)])
        stats_parts = empirical.heldout_stats_from_probs(
            np.concatenate(hold_proxy_y), np.concatenate(hold_seqs), prior, held_out_tables.base_V, weight_N
        )
        if hold_head is not None:
            ids, lps, g = (np.concatenate([h[i] for h in hold_head]) for i in range(3))
            head_parts = empirical.head_stats(
                ids, lps, np.concatenate(hold_seqs), prior, _padded_base(held_out_tables, len(sym)), g, sym
            )
    stats = empirical.HeldoutStats(*(hosts.allgather(np.asarray(x)) for x in _or_empty(stats_parts)))
    head = None
    if hold_head is not None:
        parts = head_parts or [np.zeros((0,), np.float64) for _ in empirical.HeadStats._fields]
        head = empirical.HeadStats(*(hosts.allgather(np.asarray(x)) for x in parts))
    res = empirical.fit_empirical_bayes(stats, refine_steps=pcfg.eb_refine_steps, head=head, head_kind="bytes")
    log.info("posterior: %s on %d held-out tokens", res.summary(), stats.proxy_y_N.shape[0])
    # Only another response to the same prompt gives a held-out token an exact count. Without one the
    # score depends on kappa : N_max alone (scaling both leaves it unchanged), so the fit cannot say
    # what they weigh against the one count of a response's own token: under posterior.own_token=auto the
    # store then leaves that count out and stores the posterior the fit scored.
    scaled = bool(stats.exact_total_N.size and np.max(stats.exact_total_N) > 0)
    if not scaled and str(pcfg.get("own_token", "auto")) == "auto":
        log.warning(
            "posterior: no held-out token has a count from another response to its prompt (one response "
            "per prompt?), so the fit sets kappa : N_max but not their scale; the store leaves each "
            "response's own token out of its counts. Collect collect.samples_per_prompt >= 2 to fit it."
        )
    return {
        "kappa": res.kappa,
        "n_max": res.n_max,
        "fitted": True,
        "count_own_token": scaled,
        "fit_with_head": head is not None,
        "heldout_tokens": int(stats.proxy_y_N.shape[0]),
        "eb_search": res.search,  # where the kappa / N_max search went past its grid or hit a bound
        "heldout_loglik": {
            "posterior": res.score_posterior,
            "prior": res.score_prior,
            "prior_kappa": res.prior_kappa,
            "proxy": res.score_proxy,
        },
    }


def _padded_base(tables, vocab_size: int) -> np.ndarray:
    """The n-gram's base distribution over a model's `vocab_size` ids: a padded embedding's extra ids
    (beyond the tokenizer's, never a token) get none of its mass."""
    base = np.zeros(vocab_size, np.float64)
    base[: tables.base_V.shape[0]] = tables.base_V
    return base


def _store_vocab(out: pathlib.Path, tokens: int) -> int:
    """The vocab_size a store in `out` records: the tokenizer's `tokens`, or, resuming a store begun
    before it recorded that, the size its finished shards already hold."""
    first = next(iter(sorted(pathlib.Path(out).glob("shard-*.json"))), None)
    return int(json.loads(first.read_text())["vocab_size"]) if first is not None else int(tokens)


def _token_ids(ids_NxK: np.ndarray, logprobs_NxK: np.ndarray, tokens: int):
    """(ids, log-probs) with every id of a padded embedding (>= `tokens`, never a token) stored as an
    absent entry of id 0: the posterior gives those ids no probability (`token_logits`), but the top-k
    picks them where it holds more slots than ids with mass, and a smaller student could not index them."""
    padded = ids_NxK >= tokens
    if not padded.any():
        return ids_NxK, logprobs_NxK
    return np.where(padded, 0, ids_NxK), np.where(padded, -np.inf, logprobs_NxK).astype(logprobs_NxK.dtype)


def _or_empty(stats_parts):
    """The held-out statistics of this process (empty arrays of the right kind when it held none out)."""
    if stats_parts:
        return stats_parts
    return [np.zeros((0,), np.float64) for _ in empirical.HeldoutStats._fields]


def _dense_prior_rows(tables, keys, seqs, spans, rows: int, length: int, query: dict) -> SparsePrior:
    """The prior at every position of a [rows, length] batch (zeros off the response tokens), read with the
    `PriorTables.query` arguments `query`."""
    q = tables.query(np.asarray(keys, np.int64), seqs, **query)
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


def head_symbols(prepared, vocab_size: int):
    """The first-byte symbols of a `bytes` head over the model's vocabulary (ids beyond the
    tokenizer's: OTHER_SYMBOL), or None for an `exact` head."""
    sym = prepared.head_symbols()
    if sym is None:
        return None
    out = np.full(vocab_size, OTHER_SYMBOL, np.int32)
    out[: min(len(sym), vocab_size)] = sym[:vocab_size]
    return jnp.asarray(out)


def make_posterior_step(graphdef, pcfg, *, k: int, mesh, rules, vocab: int = 0):
    """jit(proxy forward + posterior kernel) for one batch -> ids/logprobs [B*L, K], tail [B*L], replicated.

    `vocab`: the tokenizer's size, where the proxy's embedding is padded past it (`token_logits`).

    The logits are formed and the kernel run on tiles of about `posterior.chunk_tokens` tokens of the batch
    (`over_tiles`: every row, a span of positions), so no [B*L, V] array exists. Within a tile the kernel runs on
    each device's own rows of the logits (`make_sharded_posterior` over the mesh axes of logical `batch`), so the
    logits are never gathered: with the kernel as plain jit XLA gathered them, 125 GB per device for the 70B proxy
    on 64 devices (`proxykd plan`, which compiles this same step). Without a sharded batch axis the kernel is
    `posterior_topk` as is. `sampled` mode's draws are made for the whole batch first, so that they do not depend
    on the tiles."""
    spec = batch_sharding(mesh, rules).spec
    axes = spec_axes(spec[0] if spec else None)
    options = dict(
        k=k, mode=pcfg.mode, num_samples=pcfg.num_samples, beta=pcfg.beta, chunk=pcfg.chunk_tokens, kernel=pcfg.kernel
    )
    sharded = kernel.make_sharded_posterior(mesh, axes=axes, **options) if axes else None

    def step(state, batch, prior, base_V, n_pseudo_N, kappa, rng, head_ids, head_lps, head_sym_V=None):
        model, hidden = _hidden(graphdef, state, batch)
        rows, length = batch["tokens"].shape
        sampled = pcfg.mode == "sampled"
        uniforms = kernel.sampled_uniforms(rng, None, rows * length, pcfg.num_samples) if sampled else None

        def tile(h, pr, npn, un, hi, hl):
            logits = token_logits(model, h, vocab)
            n = logits.shape[0] * logits.shape[1]
            flat = lambda x: None if x is None else x.reshape((n,) + x.shape[2:])  # noqa: E731
            args = (flat(logits), SparsePrior(*map(flat, pr)), base_V, flat(npn), kappa)
            extra = dict(head_ids_NxH=flat(hi), head_logprobs_NxH=flat(hl), uniforms_NxM=flat(un))
            if sharded is not None:
                out = sharded(*args, head_sym_V=head_sym_V, **extra)
            else:
                out = kernel.posterior_topk(*args, head_sym_V=head_sym_V, **extra, **options)
            return tuple(x.reshape(h.shape[:2] + x.shape[1:]) for x in out)

        as_rows = lambda x: None if x is None else x.reshape((rows, length) + x.shape[1:])  # noqa: E731
        per_position = (SparsePrior(*map(as_rows, prior)), as_rows(n_pseudo_N), as_rows(uniforms))
        per_position += (as_rows(head_ids), as_rows(head_lps))
        out = over_tiles(tile, _tile_width(rows, length, int(pcfg.chunk_tokens)), hidden, *per_position)
        return tuple(x.reshape((rows * length,) + x.shape[2:]) for x in out)

    return under_mesh(jax.jit(step, out_shardings=replicated(mesh)), mesh, rules)


def write_store(
    prepared, tables, est: dict, model, pcfg, data_cfg, *, out: pathlib.Path, mesh, rules, seq_len, batch_size, seed
) -> int:
    """Pass 2: the posterior's top-k of every response token into this host's shards in `out`. The
    stored ids index the tokenizer's vocabulary (the store's vocab_size), so any model of the tokenizer
    can read them, whatever size its embedding is padded to.

    Resumes after the last finished shard; returns the number of samples written by this process."""
    graphdef, state = nnx.split(model)
    scfg = data_cfg.store
    tokens = tables.vocab_size  # the tokenizer's: what the stored ids index, whatever the models' padding
    writer = StoreWriter.from_config(
        out,
        scfg,
        vocab_size=_store_vocab(out, tokens),
        tokenizer_hash=prepared.tokenizer_hash,
        host=jax.process_index(),
    )
    done = set(writer.finished_sample_ids().tolist())
    step = make_posterior_step(graphdef, pcfg, k=scfg.k, mesh=mesh, rules=rules, vocab=tables.vocab_size)
    keys_of = {int(r["sample_id"]): int(r["prompt_key"]) for r in prepared.iter_split(SPLIT)}
    weights = est["weights"]
    kappa = jnp.float32(est["kappa"])
    # What the observed token counts in its exact counts: estimate.json's own_weight (posterior.own_token; by
    # default 0, the leave-one-out posterior the fit scored; 1 is the conjugate update with it).
    query = prior_query(est)
    n_max = min(float(est["n_max"]), _N_MAX_CAP)
    base = jnp.asarray(_padded_base(tables, model.cfg.vocab_size), jnp.float32)
    use_head = pcfg.use_teacher_topk and prepared.has_teacher_head
    head_sym = head_symbols(prepared, model.cfg.vocab_size) if use_head else None
    root = jax.random.key(seed)
    written, progress = 0, jax.process_index() == 0
    with progress_bars.bar(
        total=prepared.num_samples(SPLIT), desc="posterior: pass 2 of 2, store", unit="sample", disable=not progress
    ) as bar:
        for b, host_batch in enumerate(batches(prepared, data_cfg, seq_len=seq_len, batch_size=batch_size)):
            spans = response_spans(host_batch)
            todo = [s for s in spans if int(host_batch["sample_ids"][s[0], 0]) not in done]
            bar.update((len(spans) - len(todo)) * jax.process_count())
            if not todo and jax.process_count() == 1:  # (several processes all step together)
                continue
            sids = [int(host_batch["sample_ids"][row, 0]) for row, _, _ in todo]
            seqs = [np.asarray(host_batch["targets"][row, s : s + t], np.int32) for row, s, t in todo]
            rows, length = host_batch["tokens"].shape
            prior = _dense_prior_rows(tables, [keys_of[s] for s in sids], seqs, todo, rows, length, query)
            n_pseudo = np.zeros((rows, length), np.float32)
            for (row, s, t), sid in zip(todo, sids):
                n_pseudo[row, s : s + t] = n_max * weights[str(sid)]
            local = {k: host_batch[k] for k in _MODEL_FIELDS}
            local["n_pseudo"] = n_pseudo
            for f, name in zip(prior, SparsePrior._fields):
                local["prior_" + name] = f.reshape((rows, length) + f.shape[1:])
            if use_head:
                local["head_ids"] = host_batch["teacher_topk_ids"]
                local["head_lps"] = host_batch["teacher_topk_logprobs"]
            gb = global_batch(local, mesh, rules)
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
                head_sym,
            )
            ids, lps, tail = (hosts.host_rows(x, rows * length) for x in (ids, lps, tail))
            ids, lps = _token_ids(ids, lps, tokens)
            for (row, s, t), sid in zip(todo, sids):
                sl = slice(row * length + s, row * length + s + t)
                writer.add(sid, ids[sl], lps[sl], tail[sl], weight=weights[str(sid)])
                written += 1
            bar.update(len(todo) * jax.process_count())
    writer.close()
    return written
