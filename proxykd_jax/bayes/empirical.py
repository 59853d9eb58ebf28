"""Empirical Bayes: fit kappa and N_max by held-out (leave-one-out) log-likelihood
(docs/METHOD.md).

At each held-out teacher token y_t the posterior, built without y_t's own count, must predict it:

  q_t(y) = (exact_t(y) + kappa * p_ngram(y) + N_max w p_t(y)) / (exact_t + kappa * |p_ngram| + N_max w),

and mean log q_t(y_t) is a proper score. Everything reduces to five numbers per token, so the grid
search is cheap. The grids include N_max = 0 (the prior) and N_max = inf (the proxy), so the fitted
posterior never scores below either. The grids only start the search: when the best value sits on a
grid's finite edge, the search expands in log space (x10 a step) until the held-out score turns down,
so the optimum is never cut off by the grid; it says so each time it expands, and when it reaches
the numeric bounds `SEARCH_BOUNDS` (where q no longer changes in float64). Golden sections along kappa,
N_max and both scaled together then refine the best point until none moves (the scaled step follows the
ridge of near-constant kappa : N_max, out to infinity where the exact counts are best ignored).
"""

import dataclasses
import logging
import typing

import jax
import jax.numpy as jnp
import numpy as np

from proxykd_jax.bayes.prior import SparsePrior

log = logging.getLogger(__name__)

DEFAULT_KAPPA_GRID = (0.0,) + tuple(np.logspace(-2, 3, 11).tolist())
DEFAULT_N_MAX_GRID = (0.0,) + tuple(np.logspace(-1, 4, 11).tolist()) + (float("inf"),)
SEARCH_BOUNDS = (1e-12, 1e15)  # the expanding search stops here (and says so)
_REFINE_ROUNDS = 32  # rounds of golden sections at most (the refinement stops when none moves; 2-14 measured)


class HeldoutStats(typing.NamedTuple):
    """Per held-out token: exact count of y and in total, p_ngram(y) and its mass, p_proxy(y), w."""

    exact_y_N: np.ndarray
    exact_total_N: np.ndarray
    ngram_y_N: np.ndarray
    ngram_mass_N: np.ndarray
    proxy_y_N: np.ndarray
    weight_N: np.ndarray


class HeadStats(typing.NamedTuple):
    """Per held-out token, what the teacher head adds (docs/TOKENIZERS.md).

    `bytes` head: a_y = teacher mass of y's first-byte group b, a_eff = mass of the head's symbols
    that some token of ours starts with, r = max(1 - total mass, 0), and the exact counts, n-gram
    mass and proxy mass of group b. `exact` head: a_y = teacher probability of y (0 when y is not in
    the head), a_eff = head mass, and the same three sums over the head's tokens H. Rows without a
    head have a_eff = 0, r = 1.
    """

    a_y_N: np.ndarray
    a_eff_N: np.ndarray
    r_N: np.ndarray
    exact_g_N: np.ndarray
    ngram_g_N: np.ndarray
    proxy_g_N: np.ndarray
    in_head_N: np.ndarray  # exact head: y is one of the head's tokens (float 0/1); bytes head: 1


def head_stats(head_ids_NxH, head_logprobs_NxH, targets_N, prior: SparsePrior, base_V, proxy_g_N, sym_V=None):
    """`HeadStats` of held-out positions (prior queried external/leave_one_out, as for `heldout_stats`).

    proxy_g_N: the proxy's mass of y's group (bytes head, `sym_V` given) or of the head's tokens (exact)."""
    y = np.asarray(targets_N, np.int64)
    lp = np.asarray(head_logprobs_NxH, np.float64)
    ok = np.isfinite(lp)
    a = np.where(ok, np.exp(np.where(ok, lp, 0.0)), 0.0)
    hid = np.asarray(head_ids_NxH, np.int64)
    ids, cnt = np.asarray(prior.ids_NxS), np.asarray(prior.counts_NxS, np.float64)
    ng_ids, ng_p = np.asarray(prior.ngram_ids_NxS2), np.asarray(prior.ngram_probs_NxS2, np.float64)
    floor, base = np.asarray(prior.floor_N, np.float64), np.asarray(base_V, np.float64)
    if sym_V is not None:
        sym = np.asarray(sym_V, np.int64)
        b = sym[y]
        has_tokens = np.zeros(int(max(sym.max(), hid.max(initial=0))) + 1, bool)
        has_tokens[sym] = True
        a_y = np.sum(np.where(ok & (hid == b[:, None]), a, 0.0), 1)
        a_eff = np.sum(np.where(ok & has_tokens[np.clip(hid, 0, len(has_tokens) - 1)], a, 0.0), 1)
        base_g = np.zeros(int(sym.max()) + 1)
        np.add.at(base_g, sym, base)
        exact_g = np.sum(np.where(sym[ids] == b[:, None], cnt, 0.0), 1)
        ngram_g = np.sum(np.where(sym[ng_ids] == b[:, None], ng_p, 0.0), 1) + floor * base_g[b]
        in_head = np.ones_like(a_y)
    else:
        member = lambda x: np.any((x[:, :, None] == hid[:, None, :]) & ok[:, None, :], 2)  # noqa: E731
        a_y = np.sum(np.where(ok & (hid == y[:, None]), a, 0.0), 1)
        a_eff = a.sum(1)
        exact_g = np.sum(np.where(member(ids), cnt, 0.0), 1)
        ngram_g = np.sum(np.where(member(ng_ids), ng_p, 0.0), 1) + floor * np.sum(np.where(ok, base[hid], 0.0), 1)
        in_head = np.any(ok & (hid == y[:, None]), 1).astype(np.float64)
    r = np.maximum(1.0 - a.sum(1), 0.0)
    return HeadStats(a_y, a_eff, r, exact_g, ngram_g, np.asarray(proxy_g_N, np.float64), in_head)


def _with_head(q_y, q_g, head: HeadStats, kind: str):
    """q'(y) from q̂(y) and q̂ of y's group (bytes) or of the head's tokens (exact)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "bytes":
            rho = np.where(q_g > 0, head.a_y_N / q_g, 0.0) + head.r_N
            return q_y * rho / np.maximum(head.a_eff_N + head.r_N, 1e-300)
        rest = q_y * np.maximum(1.0 - head.a_eff_N, 0.0) / np.maximum(1.0 - q_g, 1e-300)
        return np.where(head.in_head_N > 0, head.a_y_N, rest)


@jax.jit
def _proxy_target_prob(proxy_logits_NxV, targets_N):
    logits = proxy_logits_NxV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=1)
    return jnp.exp(jnp.take_along_axis(logits, targets_N[:, None], axis=1)[:, 0] - lse)


def heldout_stats(proxy_logits_NxV, targets_N, prior: SparsePrior, base_V, weight_N=None):
    """Reduces held-out positions to `HeldoutStats` (prior queried with mode leave_one_out/external)."""
    proxy_y = _proxy_target_prob(proxy_logits_NxV, jnp.asarray(np.asarray(targets_N), jnp.int32))
    return heldout_stats_from_probs(np.asarray(proxy_y, np.float64), targets_N, prior, base_V, weight_N)


def heldout_stats_from_probs(proxy_y_N, targets_N, prior: SparsePrior, base_V, weight_N=None):
    """`heldout_stats` from the proxy's probability of each target (no [N, V] logits on the host)."""
    y = np.asarray(targets_N, np.int64)
    ids, cnt = np.asarray(prior.ids_NxS), np.asarray(prior.counts_NxS, np.float64)
    ng_ids, ng_p = np.asarray(prior.ngram_ids_NxS2), np.asarray(prior.ngram_probs_NxS2, np.float64)
    floor = np.asarray(prior.floor_N, np.float64)
    base = np.asarray(base_V, np.float64)
    exact_y = np.sum(np.where(ids == y[:, None], cnt, 0.0), 1)
    ngram_y = np.sum(np.where(ng_ids == y[:, None], ng_p, 0.0), 1) + floor * base[y]
    w = np.ones_like(floor) if weight_N is None else np.asarray(weight_N, np.float64)
    return HeldoutStats(exact_y, cnt.sum(1), ngram_y, ng_p.sum(1) + floor, np.asarray(proxy_y_N, np.float64), w)


def score(stats: HeldoutStats, kappa, n_max, head: HeadStats | None = None, head_kind: str = "exact"):
    """Mean log q(y) over the held-out tokens (-inf where q(y) = 0 or is undefined); with `head`, of
    the posterior after the teacher head (`head_kind` "exact" or "bytes")."""
    if head is None:
        if np.isinf(n_max):
            return float(np.mean(np.log(stats.proxy_y_N)))
        with np.errstate(divide="ignore", invalid="ignore"):
            num = stats.exact_y_N + kappa * stats.ngram_y_N + n_max * stats.weight_N * stats.proxy_y_N
            den = stats.exact_total_N + kappa * stats.ngram_mass_N + n_max * stats.weight_N
            logq = np.where((num > 0) & (den > 0), np.log(num) - np.log(den), -np.inf)
        return float(np.mean(logq))
    with np.errstate(divide="ignore", invalid="ignore"):
        if np.isinf(n_max):
            q_y = stats.proxy_y_N
            q_g = head.proxy_g_N
        else:
            den = stats.exact_total_N + kappa * stats.ngram_mass_N + n_max * stats.weight_N
            q_y = (stats.exact_y_N + kappa * stats.ngram_y_N + n_max * stats.weight_N * stats.proxy_y_N) / den
            q_g = (head.exact_g_N + kappa * head.ngram_g_N + n_max * stats.weight_N * head.proxy_g_N) / den
        q_y = _with_head(q_y, q_g, head, head_kind)
        logq = np.where(np.isfinite(q_y) & (q_y > 0), np.log(np.where(q_y > 0, q_y, 1.0)), -np.inf)
    return float(np.mean(logq))


@dataclasses.dataclass
class EBResult:
    """Fitted values and the held-out mean log-likelihoods (higher is better) of each estimate."""

    kappa: float
    n_max: float
    score_posterior: float
    score_prior: float
    prior_kappa: float
    score_proxy: float
    grid_scores: np.ndarray  # [len(kappa_grid), len(n_max_grid)]
    search: list = dataclasses.field(default_factory=list)  # what the expanding search did, one line each

    def summary(self):
        return (
            f"empirical Bayes: kappa={self.kappa:.4g} N_max={self.n_max:.4g} | held-out log-lik "
            f"posterior {self.score_posterior:.4f}, prior {self.score_prior:.4f} "
            f"(kappa={self.prior_kappa:.4g}), proxy {self.score_proxy:.4f}"
            + (f" | search: {'; '.join(self.search)}" if self.search else "")
        )


def _golden(f, lo, hi, steps):
    """Maximises f on [lo, hi] (log-space coordinates) by golden-section search."""
    g = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (c, fc) if fc >= fd else (d, fd)


def _refine(f, x, steps):
    """Golden-section in log space on [x / 10, 10 x] (x finite and positive); keeps x unless beaten."""
    fx = f(x)
    if not 0 < x < np.inf:
        return x, fx
    t, ft = _golden(lambda u: f(float(np.exp(u))), np.log(x) - np.log(10.0), np.log(x) + np.log(10.0), steps)
    return (float(np.exp(t)), ft) if ft > fx else (x, fx)


def _refine_ray(f, kappa, n_max, steps):
    """Golden-section over the common scale c of (c kappa, c N_max), c in [1/10, 10] and both inside
    `SEARCH_BOUNDS`: the direction of the ridge of near-constant kappa : N_max. Returns (kappa, n_max, f)."""
    lo, hi = SEARCH_BOUNDS

    def along(c):
        k, n = kappa * c, n_max * c
        return f(k, n) if lo <= min(k, n) and max(k, n) <= hi else -np.inf

    c, fc = _refine(along, 1.0, steps)
    return kappa * c, n_max * c, fc


def _expand(f, grid, x, name: str, notes: list, verbose: bool):
    """Moves x past the grid's finite edge in log space (x10 a step) while f improves.

    Returns (x, grid with the visited points). Only an x on the largest finite or smallest
    positive grid value moves; the search stops where f turns down or at `SEARCH_BOUNDS`; each
    expansion and bound is appended to `notes` and printed (`verbose`) or logged."""
    pos = [g for g in grid if 0 < g < np.inf]
    if not pos or x not in (pos[0], pos[-1]):
        return x, grid
    factor = 10.0 if x == pos[-1] else 0.1
    fx, visited, start, new = f(x), [], x, []
    while True:
        nxt = x * factor
        if not SEARCH_BOUNDS[0] <= nxt <= SEARCH_BOUNDS[1]:
            new.append(f"{name} hit the search bound {x:.3g}")
            break
        fn = f(nxt)
        visited.append(nxt)
        if not fn > fx:
            break
        x, fx = nxt, fn
    if x != start:
        new.insert(0, f"{name} expanded {'up' if factor > 1 else 'down'} past {start:.3g} to {x:.3g}")
    for line in new:
        (print if verbose else log.info)(f"empirical Bayes: {line}")
    notes.extend(new)
    return x, sorted(set(grid) | set(visited))


def fit_empirical_bayes(
    stats: HeldoutStats,
    *,
    kappa_grid=DEFAULT_KAPPA_GRID,
    n_max_grid=DEFAULT_N_MAX_GRID,
    refine_steps=12,
    verbose=False,
    head: HeadStats | None = None,
    head_kind: str = "exact",
) -> EBResult:
    """Grid search over (kappa, N_max), an expanding log-space search past a grid edge the best value
    sits on (coordinate-wise, until neither moves), then golden-section refinement of each in turn and
    of both together (the same factor on both), until none moves; scored after the teacher head when
    `head` is given."""
    _score = score
    if head is not None:
        _score = lambda st, kp, nm: score(st, kp, nm, head, head_kind)  # noqa: E731
    if stats.proxy_y_N.size == 0:
        raise ValueError(
            "empirical Bayes: no held-out tokens; raise posterior.eb_holdout_fraction so that at least "
            "one response of the distillation split is held out."
        )
    kg = sorted(set(float(x) for x in kappa_grid) | {0.0})
    ng = sorted(set(float(x) for x in n_max_grid) | {0.0, float("inf")})
    kg0 = kg
    grid = np.array([[_score(stats, kp, nm) for nm in ng] for kp in kg])
    i, j = np.unravel_index(np.argmax(grid), grid.shape)
    kappa, n_max, best = kg[i], ng[j], grid[i, j]
    notes = []
    if np.isfinite(n_max):
        for _ in range(8):  # coordinate-wise: a moved N_max can move kappa's optimum and back
            k0, n0 = kappa, n_max
            kappa, kg = _expand(lambda x, n=n_max: _score(stats, x, n), kg, kappa, "kappa", notes, verbose)
            n_max, ng = _expand(lambda x, k=kappa: _score(stats, k, x), ng, n_max, "N_max", notes, verbose)
            if (kappa, n_max) == (k0, n0):
                break
        best = _score(stats, kappa, n_max)
    if np.isfinite(n_max) and refine_steps:
        # Golden sections along kappa, N_max and the ray (c kappa, c N_max), until none moves. The best pair
        # often lies on a ridge of near-constant kappa : N_max (the exact counts weigh little), which the
        # coordinate steps alone climbed slowly (4 rounds of them stopped up to 5e-4 nats short) and never
        # left towards its end at infinity; the ray step goes along it (x10 at most a round).
        scale = 1.0  # of the ray steps, all together
        for _ in range(_REFINE_ROUNDS):
            k0, n0 = kappa, n_max
            kappa, best = _refine(lambda x, n=n_max: _score(stats, x, n), kappa, refine_steps)
            n_max, best = _refine(lambda x, k=kappa: _score(stats, k, x), n_max, refine_steps)
            if kappa > 0 and n_max > 0:
                k1 = kappa
                kappa, n_max, best = _refine_ray(lambda k, n: _score(stats, k, n), kappa, n_max, refine_steps)
                scale *= kappa / k1
            if (kappa, n_max) == (k0, n0):
                break
        if not 0.1 < scale < 10.0:
            line = f"kappa and N_max scaled together by {scale:.3g} to {kappa:.3g}, {n_max:.3g}"
            notes.append(line)
            (print if verbose else log.info)(f"empirical Bayes: {line}")
    prior_kappa, _ = _expand(
        lambda x: _score(stats, x, 0.0), kg0, kg0[int(np.argmax(grid[:, 0]))], "prior kappa", notes, verbose
    )
    prior_kappa, prior_score = _refine(lambda x: _score(stats, x, 0.0), prior_kappa, refine_steps)
    if prior_score > best:  # the prior is a posterior too (N_max = 0)
        kappa, n_max, best = prior_kappa, 0.0, prior_score
    res = EBResult(
        float(kappa),
        float(n_max),
        float(best),
        prior_score,
        float(prior_kappa),
        float(grid[0, -1]),
        grid,
        list(dict.fromkeys(notes)),
    )
    assert res.score_posterior >= max(res.score_prior, res.score_proxy), res.summary()
    if verbose:
        print(res.summary())
    return res
