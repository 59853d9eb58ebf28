"""The first-byte I-projection of a `bytes` teacher head (docs/TOKENIZERS.md), for the posterior kernel.

A teacher with another tokenizer gives masses a(b) over first-byte symbols b (bytes 0-255,
`END_SYMBOL`, `OTHER_SYMBOL`; `N_SYMBOLS` in all) and a remainder r = 1 - sum_b a(b). With `sym_V`
mapping each of our tokens to its symbol, the posterior q̂ is projected to q'(t) = q̂(t) rho(b(t)),
rho(b) = m(b) / Q̂(b), m(b) = a(b) + r Q̂(b): `_byte_groups` sums q̂'s unnormalised mass per group
(`_group_sums`, a one-hot matmul), `group_factor` turns the groups and the head into rho, and
`_rows_at` reads rho at each token's symbol. `posterior._posterior_core` applies it.
"""

import jax
import jax.numpy as jnp

from proxykd_jax.bayes.posterior_union import _dedupe_sum

N_SYMBOLS = 258  # first-byte symbols: bytes 0-255, END_SYMBOL, OTHER_SYMBOL
END_SYMBOL = 256  # end of text (the eos token; a teacher's end-of-text entry)
OTHER_SYMBOL = 257  # special tokens that are not end of text, tokens without bytes


def _rows_at(x_NxS, sym):
    """x[n, sym[n, ...]] for symbols shaped [1 or N, ...] (broadcast over rows)."""
    n = x_NxS.shape[0]
    idx = jnp.broadcast_to(sym, (n,) + sym.shape[1:])
    return jnp.take_along_axis(x_NxS, idx.reshape(n, -1), axis=1).reshape(idx.shape)


def group_factor(head_syms_NxH, head_logprobs_NxH, groups_NxS):
    """rho(b) = m(b) / Q̂(b) of the first-byte I-projection, from unnormalised group masses of q̂.

    a(b): teacher masses per symbol (-inf log-probs are absent entries; repeated symbols add up);
    r = 1 - sum a. Groups with Q̂(b) = 0 cannot take mass: their a(b) is dropped and the rest
    renormalised (rows without any head get rho = 1).
    """
    n, s = groups_NxS.shape
    total = jnp.sum(groups_NxS, 1, keepdims=True)
    q_hat = groups_NxS / jnp.where(total > 0, total, 1.0)
    valid = jnp.isfinite(head_logprobs_NxH)
    syms = jnp.clip(jnp.where(valid, head_syms_NxH.astype(jnp.int32), 0), 0, s - 1)
    mass = jnp.where(valid, jnp.exp(jnp.where(valid, head_logprobs_NxH, 0.0)), 0.0)
    a = jnp.zeros((n, s), jnp.float32).at[jnp.arange(n)[:, None], syms].add(mass)
    r = jnp.maximum(1.0 - jnp.sum(a, 1, keepdims=True), 0.0)
    feasible = q_hat > 0
    rho = jnp.where(feasible, a / jnp.where(feasible, q_hat, 1.0), 0.0) + r
    norm = jnp.sum(q_hat * rho, 1, keepdims=True)
    return jnp.where(norm > 0, rho / jnp.where(norm > 0, norm, 1.0), 1.0)


def _group_sums(x_NxV, sym_V):
    """Per-row sums of x over each first-byte group: [N, V] -> [N, N_SYMBOLS] (a one-hot matmul)."""
    onehot = jax.nn.one_hot(sym_V, N_SYMBOLS, dtype=jnp.float32)
    return jnp.dot(x_NxV, onehot, precision=jax.lax.Precision.HIGHEST)


def _byte_groups(logp, logp_at, prior_mass, floor, base, n_pseudo, sp_ids, sp_vals, sym, mode, beta):
    """Unnormalised first-byte group masses [N, N_SYMBOLS] of the posterior q̂ (before the head).

    q̂ = (d + adj) / Z with d a fixed function of (logits, base) over the whole vocabulary and adj
    non-zero only on the prior's sparse support; both are summed per group.
    """
    ids, run, keep = _dedupe_sum(sp_ids, sp_vals)
    floor_at = floor[:, None] * base[ids]
    if mode == "geometric":
        log_mass = jnp.log(prior_mass)[:, None]
        dense_all = logp + beta * (jnp.log(floor[:, None] * base[None, :]) - log_mass)
        lp = logp_at(ids)
        full = jnp.where(keep, lp + beta * (jnp.log(run + floor_at) - log_mass), -jnp.inf)
        dense_c = lp + beta * (jnp.log(floor_at) - log_mass)
        shift = jnp.maximum(jnp.max(full, 1, keepdims=True), jnp.max(dense_all, 1, keepdims=True))
        shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
        d = jnp.exp(dense_all - shift)
        adj = jnp.where(keep, jnp.exp(full - shift) - jnp.exp(dense_c - shift), 0.0)
        dense_groups = _group_sums(d, sym)
    else:
        adj = jnp.where(keep, run, 0.0)
        dense_groups = floor[:, None] * _group_sums(base[None, :], sym)
        if mode == "expected":
            dense_groups = dense_groups + n_pseudo[:, None] * _group_sums(jnp.exp(logp), sym)
    n = ids.shape[0]
    return dense_groups.at[jnp.arange(n)[:, None], sym[ids]].add(adj)
