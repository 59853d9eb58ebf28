"""The posterior kernel: proxy distribution x corpus prior -> exact sparse top-k
(docs/METHOD.md).

Pseudo-counts a'_t = exact_t + kappa * (ngram_sparse_t + floor_t * base) + evidence_t, with
evidence_t = N_t * p_t (`expected`) or (N_t / M) * counts of M draws from p_t (`sampled`); the
`geometric` mode scores log q_t ∝ log p_t + beta * log prior_mean_t. Outside the prior's sparse
support the score is a fixed function of the dense term (N_t p_t + kappa floor_t base in `expected`),
so top-k(q_t) lies in top-k(dense term) ∪ support(prior): the kernel takes the dense top-k, adds the
sparse ids, sums duplicate ids after a sort, and keeps the top k of that union plus the tail mass.
No dense prior is ever built. Where the teacher returned top log-probs over our own tokens
(`exact` head) they are fixed as the head and the posterior, without the head's ids, is
renormalised to the remaining mass.

A teacher with another tokenizer (`bytes` head, docs/TOKENIZERS.md) gives the distribution of the
continuation's first byte instead: masses a(b) over symbols b (bytes 0-255, end of text 256) and an
unknown remainder r = 1 - sum_b a(b). With `sym_V` mapping each of our tokens to its first byte
(specials to 256/257), the posterior q̂ is projected to q'(t) = q̂(t) m(b(t)) / Q̂(b(t)),
m(b) = a(b) + r Q̂(b), where Q̂(b) is the exact group sum of q̂. The kernel computes the group sums
of the dense term per block of tokens (a [V] -> [258] segment sum), then takes the blocked top-k of
the dense term times the group factor, so the stored top-k and tail are exact for q'.

This module holds the kernel on one block of tokens (`_posterior_core`) and its callers: token blocks,
`posterior_topk`, and `make_sharded_posterior` over a mesh. The union's pieces (sparse pseudo-counts,
duplicate sums, `blocked_top_k`) are in `posterior_union.py`, the first-byte projection of a `bytes`
head (`group_factor`, the symbol constants) in `posterior_bytes.py`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from proxykd_jax.bayes.config import KERNELS, MODES
from proxykd_jax.bayes.posterior_bytes import _byte_groups, _rows_at, group_factor
from proxykd_jax.bayes.posterior_union import _dedupe_sum, _prior_mass, _sparse, _sparse_at, blocked_top_k
from proxykd_jax.bayes.prior import SparsePrior
from proxykd_jax.bayes.score_topk import expected_posterior_topk, expected_score_topk

_PRIORITY = 4.0  # added to head probabilities so teacher entries always win a top-k slot


def _posterior_core(
    proxy_logits_NxV,
    prior,
    base_V,
    n_pseudo_N,
    kappa,
    uniforms_NxM,
    head_ids_NxH,
    head_logprobs_NxH,
    sym_V=None,
    *,
    k,
    mode,
    beta,
    block=16,
    kernel="xla",
):
    """One block of tokens; returns (ids_NxK int32, logprobs_NxK float32, tail_N float32).

    With `sym_V` the head holds first-byte symbols (a `bytes` head), else our token ids; `block`: ids
    per block of `blocked_top_k`; `kernel`: "pallas" runs `expected` mode in `score_topk`'s kernel (one
    read of the logits on a GPU): the whole top k (`expected_posterior_topk`), or with a teacher head
    the log-normaliser and the dense top k (`expected_score_topk`), merged with the head here."""
    top_k = functools.partial(blocked_top_k, block=block)
    logits = jnp.asarray(proxy_logits_NxV).astype(jnp.float32)
    base = jnp.asarray(base_V, jnp.float32)
    kappa = jnp.asarray(kappa, jnp.float32)
    n_pseudo = jnp.asarray(n_pseudo_N, jnp.float32)
    prior = SparsePrior(*(jnp.asarray(x) for x in prior))
    floor = kappa * prior.floor_N.astype(jnp.float32)
    fused = kernel == "pallas" and mode == "expected" and not (sym_V is not None and head_ids_NxH is not None)
    if fused and head_ids_NxH is None:  # the whole posterior top k in the kernel
        sp_ids, sp_vals = _sparse(prior, kappa, n_pseudo, None)
        total = _prior_mass(prior, kappa, floor) + n_pseudo
        return expected_posterior_topk(proxy_logits_NxV, base, n_pseudo, floor, sp_ids, sp_vals, total, k)
    if fused:
        lse_N, fused_ids = expected_score_topk(proxy_logits_NxV, base, n_pseudo, floor, k)
        lse = lse_N[:, None]
    else:
        lse = jax.nn.logsumexp(logits, axis=1, keepdims=True)
    logp = logits - lse  # fused into each consumer; gathers read `logits` and subtract lse instead
    logp_at = lambda ids: jnp.take_along_axis(logits, ids, axis=1) - lse  # noqa: E731

    sampled = None
    if mode == "sampled":
        cdf = jnp.cumsum(jnp.exp(logp), axis=1)
        u = uniforms_NxM * cdf[:, -1:]
        sampled = jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right"))(cdf, u)
        sampled = jnp.minimum(sampled, logits.shape[1] - 1)
    sp_ids, sp_vals = _sparse(prior, kappa, n_pseudo, sampled)
    prior_mass = _prior_mass(prior, kappa, floor)

    rho = None
    if sym_V is not None and head_ids_NxH is not None:
        sym = jnp.asarray(sym_V, jnp.int32)
        rho = group_factor(
            head_ids_NxH,
            head_logprobs_NxH,
            _byte_groups(logp, logp_at, prior_mass, floor, base, n_pseudo, sp_ids, sp_vals, sym, mode, beta),
        )

    # Dense term whose top-k (together with the sparse ids) contains the posterior's top-k; with a
    # bytes head, of the dense term times the group factor (off the sparse support q' is exactly that).
    if fused:
        top_ids = fused_ids
    elif mode == "expected":
        npn, fl = n_pseudo[:, None, None], floor[:, None, None]
        if rho is None:
            _, top_ids = top_k(lambda lg, b: npn * jnp.exp(lg - lse[:, :, None]) + fl * b, logits, base, k)
        else:
            _, top_ids = top_k(
                lambda lg, b, sy: (npn * jnp.exp(lg - lse[:, :, None]) + fl * b) * _rows_at(rho, sy),
                logits,
                base,
                k,
                sym_V=sym,
            )
    elif mode == "sampled" and rho is None:
        _, top_ids = jax.lax.top_k(base, k)
        top_ids = jnp.broadcast_to(top_ids[None, :], (logits.shape[0], k))
    elif mode == "sampled":
        _, top_ids = top_k(lambda lg, b, sy: b * _rows_at(rho, sy), logits, base, k, sym_V=sym)
    elif rho is None:
        _, top_ids = top_k(lambda lg, b: lg + beta * jnp.log(b), logits, base, k)
    else:
        _, top_ids = top_k(
            lambda lg, b, sy: lg + beta * jnp.log(b) + jnp.log(_rows_at(rho, sy)), logits, base, k, sym_V=sym
        )

    cand_ids = jnp.concatenate([top_ids.astype(jnp.int32), sp_ids], 1)
    cand_sp = jnp.concatenate([jnp.zeros(top_ids.shape, jnp.float32), sp_vals], 1)
    cand_ids, run, keep = _dedupe_sum(cand_ids, cand_sp)
    cand_logp = logp_at(cand_ids)
    floor_at = floor[:, None] * base[cand_ids]

    if mode == "geometric":
        # q ∝ p * prior_mean^beta; off the support prior_mean = floor * base / prior_mass.
        log_mass = jnp.log(prior_mass)[:, None]
        dense_all = logp + beta * (jnp.log(floor[:, None] * base[None, :]) - log_mass)
        full = cand_logp + beta * (jnp.log(run + floor_at) - log_mass)
        dense_c = cand_logp + beta * (jnp.log(floor_at) - log_mass)
        full = jnp.where(keep, full, -jnp.inf)
        shift = jnp.maximum(jnp.max(full, 1, keepdims=True), jnp.max(dense_all, 1, keepdims=True))
        shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
        z = jnp.sum(jnp.exp(dense_all - shift), 1) + jnp.sum(
            jnp.where(keep, jnp.exp(full - shift) - jnp.exp(dense_c - shift), 0.0), 1
        )
        log_z = shift[:, 0] + jnp.log(z)
        cand_q = jnp.exp(full - log_z[:, None])
        # q = dense_q over the vocabulary + cand_adj on the sparse support (for the head's rest mass)
        cand_adj = cand_q - jnp.exp(dense_c - log_z[:, None])

        def dense_q(lg, b):
            return jnp.exp(lg - lse + beta * (jnp.log(floor[:, None] * b) - log_mass) - log_z[:, None])

        def q_at(ids):
            pm = _sparse_at(ids, sp_ids, sp_vals) + floor[:, None] * base[ids]
            return jnp.exp(logp_at(ids) + beta * (jnp.log(pm) - log_mass) - log_z[:, None])
    else:
        total = prior_mass + n_pseudo
        dense_at = floor_at + (n_pseudo[:, None] * jnp.exp(cand_logp) if mode == "expected" else 0.0)
        cand_q = jnp.where(keep, (dense_at + run) / total[:, None], -jnp.inf)
        cand_adj = run / total[:, None]

        def dense_q(lg, b):
            val = floor[:, None] * b + (n_pseudo[:, None] * jnp.exp(lg - lse) if mode == "expected" else 0.0)
            return val / total[:, None]

        def q_at(ids):
            return dense_q(logp_at(ids) + lse, base[ids]) + _sparse_at(ids, sp_ids, sp_vals) / total[:, None]

    if rho is not None:
        cand_q = jnp.where(keep, cand_q * _rows_at(rho, sym[cand_ids]), -jnp.inf)
    if head_ids_NxH is None or rho is not None:
        top_q, pos = jax.lax.top_k(cand_q, k)
        out_ids = jnp.take_along_axis(cand_ids, pos, axis=1)
    else:
        head_ids = head_ids_NxH.astype(jnp.int32)
        valid = jnp.isfinite(head_logprobs_NxH)
        head_p = jnp.where(valid, jnp.exp(jnp.where(valid, head_logprobs_NxH, 0.0)), 0.0)
        # An API's rounded log-probs can sum past 1 (the parser allows up to +1e-4): the head is then the
        # whole distribution, renormalised, and the rest gets nothing.
        head_p = head_p / jnp.maximum(jnp.sum(head_p, 1, keepdims=True), 1.0)
        head_mass = jnp.minimum(jnp.sum(head_p, 1), 1.0)
        in_head = jnp.any((cand_ids[:, :, None] == head_ids[:, None, :]) & valid[:, None, :], 2)

        def summed_rest():
            """q̂'s mass off the head summed over the rest itself: one more pass over the vocabulary."""
            ids_v = jnp.arange(logits.shape[1])[None, :]
            off_head = functools.reduce(
                jnp.logical_and,
                [(ids_v != head_ids[:, j : j + 1]) | ~valid[:, j : j + 1] for j in range(head_ids.shape[1])],
            )
            rest = jnp.sum(jnp.where(off_head, dense_q(logits, base[None, :]), 0.0), 1)
            return rest + jnp.sum(jnp.where(in_head | ~keep, 0.0, cand_adj), 1)

        # 1 - q̂(head) cancels in float32 where q̂ sits almost all on the head (a sure proxy at a large N_t):
        # to zero or below, which scaled the rest past 1. Accurate to ~1e-4 of itself above 1e-3; below,
        # the block takes the sum over the rest (which doubled the kernel's time when always taken).
        rest = 1.0 - jnp.sum(jnp.where(valid, q_at(head_ids), 0.0), 1)
        rest = jax.lax.cond(jnp.min(rest) > 1e-3, lambda: rest, summed_rest)
        scale = (1.0 - head_mass) / jnp.maximum(rest, 1e-30)
        # Dropped candidates are -inf: never multiplied by a zero scale (NaN, which top_k ranks first
        # on a GPU, where -inf * 0 is a positive NaN).
        cand_r = jnp.where(in_head | ~keep, -jnp.inf, cand_q * scale[:, None])
        key = jnp.concatenate([jnp.where(valid, head_p + _PRIORITY, -jnp.inf), cand_r], 1)
        all_ids = jnp.concatenate([head_ids, cand_ids], 1)
        _, pos = jax.lax.top_k(key, k)
        out_ids = jnp.take_along_axis(all_ids, pos, axis=1)
        top_q = jnp.take_along_axis(jnp.concatenate([head_p, cand_r], 1), pos, axis=1)
    top_q = jnp.maximum(top_q, 0.0)
    tail = jnp.maximum(1.0 - jnp.sum(top_q, 1), 0.0)
    return out_ids, jnp.log(top_q), tail


def _token_block(chunk, mode, bytes_head):
    """Tokens per kernel block: `chunk`, or 0 (all at once) where the kernel keeps no [N, V] buffer.

    Blocks bound the modes with [N, V] buffers (`sampled`'s CDF, `geometric`'s dense term) and a
    bytes head's group sums. `expected` without one keeps none, and blocks only cost it: [4096, 32768]
    float32 logits (537 MB) took 36 MB of temporaries whole and 404 MB in blocks of 1024 (`lax.map`
    copies the logits into its stacked input), and 2,048 tokens ran 1.4-2.1x slower in blocks on CPU
    (XLA:CPU moves each block's slice at about 3 GB/s; BUILD_NOTES, "CPU profiles, late night").
    """
    return 0 if mode == "expected" and not bytes_head else chunk


def _run_blocked(
    core,
    proxy_logits_NxV,
    prior,
    base_V,
    n_pseudo_N,
    kappa,
    uniforms_NxM,
    head_ids_NxH,
    head_logprobs_NxH,
    chunk,
    sym_V=None,
):
    """Runs `core` on the whole token axis, or block by block (lax.map) when chunk < N."""
    n = proxy_logits_NxV.shape[0]
    if not chunk or chunk >= n:
        return core(
            proxy_logits_NxV, prior, base_V, n_pseudo_N, kappa, uniforms_NxM, head_ids_NxH, head_logprobs_NxH, sym_V
        )
    pad = (-n) % chunk

    def blocks(x, fill=0):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape((-1, chunk) + x.shape[1:])

    per_token = (proxy_logits_NxV, prior, uniforms_NxM, head_ids_NxH, head_logprobs_NxH)
    blocked = jax.tree.map(blocks, per_token), blocks(n_pseudo_N, fill=1)

    def one(xs):
        (lg, pr, un, hi, hl), npn = xs
        return core(lg, pr, base_V, npn, kappa, un, hi, hl, sym_V)

    out = jax.lax.map(one, blocked)
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:n], out)


def sampled_uniforms(rng, uniforms_NxM, n: int, num_samples: int):
    """`sampled` mode's uniforms [N, M]: those given (drawn by a caller that runs the positions in parts, so that
    the draws do not depend on the parts), else drawn from `rng`."""
    if uniforms_NxM is not None:
        return jnp.asarray(uniforms_NxM, jnp.float32)
    if rng is None:
        raise ValueError("posterior: mode='sampled' needs an rng key for the proxy draws.")
    return jax.random.uniform(rng, (n, num_samples), jnp.float32)


def _check(mode, k, v, kernel="xla"):
    if mode not in MODES:
        raise ValueError(f"posterior: mode={mode!r} is not one of {MODES}; set posterior.mode.")
    if kernel not in KERNELS:
        raise ValueError(f"posterior: kernel={kernel!r} is not one of {KERNELS}.")
    if not 0 < k <= v:
        raise ValueError(f"posterior: k={k} must be in [1, vocab={v}]; set data.store.k.")


def posterior_topk(
    proxy_logits_NxV,
    prior: SparsePrior,
    base_V,
    n_pseudo_N,
    kappa,
    *,
    k,
    mode="expected",
    num_samples=64,
    beta=1.0,
    rng=None,
    head_ids_NxH=None,
    head_logprobs_NxH=None,
    chunk=0,
    head_sym_V=None,
    top_k_block=16,
    kernel="xla",
    uniforms_NxM=None,
):
    """The posterior's exact top-k at N positions (pure; jit it, or call it inside a jitted step).

    proxy_logits_NxV: proxy logits (any float dtype); prior: `SparsePrior` at the same positions;
    base_V: the n-gram's dense base distribution; n_pseudo_N: N_t = N_max * w; kappa: prior strength;
    k: entries kept; mode: "expected" | "sampled" (needs rng; num_samples draws) | "geometric" (beta);
    head_*_NxH: teacher top log-probs (-inf where absent) fixed as the head; chunk: tokens per block
    (0: all at once; `expected` without a bytes head always runs whole, see `_token_block`);
    head_sym_V: int32 [V] first-byte symbol of each of our tokens — given, the head holds first-byte
    symbols and masses (a `bytes` head) and q̂ is I-projected onto them; top_k_block: ids per block of
    `blocked_top_k` (0: a dense score and `lax.top_k`); kernel: "xla", or "pallas" for the one-pass GPU
    kernel of `score_topk` (`expected` mode without a bytes head; other modes ignore it; off a CUDA GPU
    it runs in Pallas' interpreter); uniforms_NxM: `sampled` mode's draws, given by a caller that runs a batch's
    positions in parts (else drawn from rng). Returns (ids_NxK int32, logprobs_NxK float32, tail_N float32),
    sorted by probability (with a teacher head: the head's entries first, each part sorted), with
    exp(logprobs).sum() + tail == 1. A position whose total pseudo-count
    is zero (N_t = 0 with an empty prior) has no posterior and yields NaN; include_self queries never do.
    """
    n, v = proxy_logits_NxV.shape
    _check(mode, k, v, kernel)
    uniforms = None
    if mode == "sampled":
        uniforms = sampled_uniforms(rng, uniforms_NxM, n, num_samples)
    core = functools.partial(_posterior_core, k=k, mode=mode, beta=beta, block=top_k_block, kernel=kernel)
    return _run_blocked(
        core,
        proxy_logits_NxV,
        prior,
        base_V,
        n_pseudo_N,
        kappa,
        uniforms,
        head_ids_NxH,
        head_logprobs_NxH,
        _token_block(chunk, mode, head_sym_V is not None and head_ids_NxH is not None),
        None if head_sym_V is None else jnp.asarray(head_sym_V, jnp.int32),
    )


def make_sharded_posterior(
    mesh,
    *,
    axes=("data", "fsdp"),
    k,
    mode="expected",
    num_samples=64,
    beta=1.0,
    chunk=0,
    top_k_block=16,
    kernel="xla",
):
    """A jitted posterior with the token axis sharded over `axes` of `mesh` (shard_map inside).

    Returns f(proxy_logits_NxV, prior, base_V, n_pseudo_N, kappa, rng=None, head_ids_NxH=None,
    head_logprobs_NxH=None, head_sym_V=None, uniforms_NxM=None) with the outputs of `posterior_topk`, sharded the
    same way over tokens; N must divide evenly over the product of the mesh axes.
    """
    axes = tuple(a for a in axes if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"posterior: none of the axes {axes} is in the mesh {mesh.axis_names}.")
    tok = P(axes)
    n_shards = 1
    for a in axes:
        n_shards *= mesh.shape[a]
    core = functools.partial(_posterior_core, k=k, mode=mode, beta=beta, block=top_k_block, kernel=kernel)
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)

    @jax.jit
    def run(
        proxy_logits_NxV,
        prior,
        base_V,
        n_pseudo_N,
        kappa,
        rng=None,
        head_ids_NxH=None,
        head_logprobs_NxH=None,
        head_sym_V=None,
        uniforms_NxM=None,
    ):
        n, v = proxy_logits_NxV.shape
        _check(mode, k, v, kernel)
        if n % n_shards:
            raise ValueError(
                f"posterior: {n} tokens do not split over {n_shards} devices on mesh axes "
                f"{axes}; pad the batch to a multiple of {n_shards}."
            )
        extras = {}
        if mode == "sampled":
            extras["uniforms"] = sampled_uniforms(rng, uniforms_NxM, n, num_samples)
        if head_ids_NxH is not None:
            extras["head_ids"], extras["head_lp"] = head_ids_NxH, head_logprobs_NxH

        shared = {} if head_sym_V is None else {"sym": jnp.asarray(head_sym_V, jnp.int32)}

        def per_shard(lg, pr, npn, ex, base, kp, sh):
            return _run_blocked(
                core,
                lg,
                pr,
                base,
                npn,
                kp,
                ex.get("uniforms"),
                ex.get("head_ids"),
                ex.get("head_lp"),
                _token_block(chunk, mode, "sym" in sh and "head_ids" in ex),
                sh.get("sym"),
            )

        specs = (
            tok,
            SparsePrior(tok, tok, tok, tok, tok),
            tok,
            {x: tok for x in extras},
            P(),
            P(),
            {x: P() for x in shared},
        )
        args = (
            proxy_logits_NxV,
            SparsePrior(*prior),
            n_pseudo_N,
            extras,
            jnp.asarray(base_V, jnp.float32),
            jnp.asarray(kappa, jnp.float32),
            shared,
        )
        if explicit:  # Explicit mesh axes: shard_map wants its inputs already laid out as in_specs.
            args = jax.tree.map(
                lambda x, s: jax.reshard(x, NamedSharding(mesh, s)), args, specs, is_leaf=lambda x: isinstance(x, P)
            )
        # Pallas' interpreter (the `pallas` kernel off a GPU) pads blocks with unvarying constants, which
        # shard_map's varying-axes check rejects.
        mapped = jax.shard_map(
            per_shard, mesh=mesh, in_specs=specs, out_specs=(tok, tok, tok), check_vma=kernel != "pallas"
        )
        return mapped(*args)

    return run
