"""The pieces of the posterior kernel's exact sparse top-k (docs/METHOD.md, "Exact sparse top-k").

Off the prior's sparse support the posterior's score is a fixed function of one dense term, so
top-k(q_t) lies in top-k(dense term) ∪ support(prior). This module holds what builds that union:
the prior's sparse ids and pseudo-counts (`_sparse`, with the proxy's draws in `sampled` mode), its
total pseudo-count per position (`_prior_mass`), duplicate ids summed after a sort (`_dedupe_sum`),
sparse sums at arbitrary ids (`_sparse_at`), and the dense term's top-k over the vocabulary without
an [N, V] score array (`blocked_top_k`). `posterior._posterior_core` puts them together.
"""

import functools

import jax
import jax.numpy as jnp


def _sparse(prior, kappa, n_pseudo_N, sampled_ids_NxM):
    """Sparse ids and pseudo-counts of the prior (and of the proxy's draws in `sampled` mode)."""
    ids = [prior.ids_NxS, prior.ngram_ids_NxS2]
    vals = [prior.counts_NxS.astype(jnp.float32), kappa * prior.ngram_probs_NxS2.astype(jnp.float32)]
    if sampled_ids_NxM is not None:
        m = sampled_ids_NxM.shape[1]
        ids.append(sampled_ids_NxM)
        vals.append(jnp.broadcast_to((n_pseudo_N / m)[:, None], sampled_ids_NxM.shape))
    return jnp.concatenate(ids, 1).astype(jnp.int32), jnp.concatenate(vals, 1)


def _prior_mass(prior, kappa, floor_N):
    """The prior's total pseudo-count per position: counts + kappa * n-gram mass (sparse part + floor)."""
    return (
        jnp.sum(prior.counts_NxS.astype(jnp.float32), 1)
        + kappa * jnp.sum(prior.ngram_probs_NxS2.astype(jnp.float32), 1)
        + floor_N
    )


def _dedupe_sum(ids_NxC, vals_NxC):
    """Sorts ids per row; returns (ids, summed values of each run at its last element, is_last)."""
    ids_s, vals_s = jax.lax.sort((ids_NxC, vals_NxC), dimension=1, num_keys=1)
    c = ids_s.shape[1]
    incl = jnp.cumsum(vals_s, axis=1)
    excl = incl - vals_s
    first = jnp.concatenate([jnp.ones_like(ids_s[:, :1], bool), ids_s[:, 1:] != ids_s[:, :-1]], 1)
    last = jnp.concatenate([ids_s[:, 1:] != ids_s[:, :-1], jnp.ones_like(ids_s[:, :1], bool)], 1)
    start = jax.lax.cummax(jnp.where(first, jnp.arange(c)[None, :], 0), axis=1)
    run = incl - jnp.take_along_axis(excl, start, axis=1)
    return ids_s, run, last


def _sparse_at(ids_NxJ, sp_ids_NxS, sp_vals_NxS):
    """Sum of sparse pseudo-counts at arbitrary ids (small J: an equality matrix)."""
    eq = ids_NxJ[:, :, None] == sp_ids_NxS[:, None, :]
    return jnp.sum(jnp.where(eq, sp_vals_NxS[:, None, :], 0.0), axis=2)


def blocked_top_k(score, logits_NxV, base_V, k, block=16, sym_V=None):
    """Top-k values over v of score(logits[:, v], base[v]) without materialising the [N, V] scores.

    Ids are split into V/B blocks of B ids each (block j holds j, j + V/B, j + 2V/B, ...). The k
    largest scores lie in the k blocks with the largest block maxima: any other entry is at most the
    k-th largest block maximum, and k entries reach it. One fused pass computes the block maxima, the
    scores of the k*B candidate ids are recomputed from gathered logits, and a top-k over them
    finishes. On CPU this replaces an exp written over [N, V] plus XLA's row top-k over V; `block=0`
    takes that dense path (score over [N, V], then `lax.top_k`). `score`
    must be elementwise and broadcast over (logits [N, ., .], base [., .]); with `sym_V` (int32 [V])
    it takes a third argument, the ids' symbols shaped like base. Returns
    (values_NxK, ids_NxK int32): the values of `lax.top_k`; among exactly tied values the ids may
    differ from its lowest-id choice.
    """
    n, v = logits_NxV.shape
    nb = v // block if block else 0
    cols = (base_V,) if sym_V is None else (base_V, sym_V)
    if not block or v % block or nb <= 2 * k:
        vals, ids = jax.lax.top_k(score(logits_NxV[:, None, :], *(c[None, None, :] for c in cols))[:, 0, :], k)
        return vals, ids.astype(jnp.int32)
    lg = logits_NxV.reshape(n, block, nb)
    cs = [c.reshape(block, nb) for c in cols]
    # An elementwise max chain over the B contiguous [N, nb] slices, each scored on its own: XLA:CPU
    # vectorises the chain along nb (a reduce over the short B axis it does not: 4x slower at V = 32k
    # to 128k) and fuses each slice's score into it (scored as one [N, B, nb] array, the array was
    # written out and read back: the posterior kernel took 1.3-1.5x as long at V = 32k, measured).
    block_max = functools.reduce(
        jnp.maximum, [score(lg[:, i : i + 1], *(c[None, i : i + 1] for c in cs))[:, 0] for i in range(block)]
    )
    _, blocks_NxK = jax.lax.top_k(block_max, k)
    cand_lg = jnp.take_along_axis(lg, blocks_NxK[:, None, :], axis=2)  # [N, B, k]
    cand = score(cand_lg, *(c[:, blocks_NxK].transpose(1, 0, 2) for c in cs)).reshape(n, block * k)
    vals, pos = jax.lax.top_k(cand, k)
    ids = (pos // k) * nb + jnp.take_along_axis(blocks_NxK, pos % k, axis=1)
    return vals, ids.astype(jnp.int32)
