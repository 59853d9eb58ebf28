"""The posterior's dense top-k as one Pallas (Triton) kernel for GPUs: one read of the logits.

`expected` mode needs, per token row, the log-normaliser of the proxy logits and the k ids with the
largest dense score s_v = N p_v + f base_v (p = softmax(logits), N = n_pseudo, f = floor). The XLA
path (`posterior.blocked_top_k`) reads the [N, V] logits twice (log-sum-exp, then block maxima of
s) and sorts for its top-k. This kernel, one program per row, reads them from HBM once:

1. Stream the row in tiles of `tile` ids. Lane j of a tile sees ids j, j + tile, j + 2 tile, ...;
   per lane it sums 2^(y - c) in log2 units (c: the lane's first logit; a lane whose logits rise
   more than `_SAFE` above c is summed again against its maximum, from L2) and keeps the lane's
   largest logit and its id. The lanes combine into the row's log-sum-exp.
2. t0, a lower bound on the k-th largest score: the lanes' arg-max ids are distinct, so the k-th
   largest of any maxima over disjoint sets of them (`groups` sets of lanes) is at most the k-th
   largest score.
3. A lane can hold an id scoring >= t0 only if its bound, N 2^(max logit - lse) + f (largest base
   value in the lane), reaches t0. Those lanes (about k of them) are compacted, their ids gathered
   (from L2) and scored, the ones >= t0 compacted again, and the exact k-th largest found by
   bisection over the float bits (scores are >= 0, so their int32 bits order like the values).
4. Rows where more than `cap` lanes or candidates survive (base values spread wide against the
   proxy's mass) take exact bisection over the whole row, one pass per bit: correct, slow, rare.

Ties at the k-th value are broken by position in the candidate list, which is deterministic but
not `lax.top_k`'s lowest-id rule. Ids come back in that order, not sorted by score.

On a CUDA GPU this lowers to a Triton kernel; everywhere else (`lax.platform_dependent`) the same
kernel runs in Pallas' interpreter, which is how the tests check it on CPU (slow: tests only).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_ABSENT = -1  # int32 below the bits of every non-negative float: padding, masked entries
_LOG2E = 1.0 / math.log(2.0)
_SAFE = 100.0  # log2 units a lane's logits may rise above its first one before its sum is redone


def _count(mask):
    return jnp.sum(mask.astype(jnp.int32))


def _as_bits(score, valid):
    return jnp.where(valid, jax.lax.bitcast_convert_type(score, jnp.int32), _ABSENT)


def _kth_bits(bits, k, count_ge=None):
    """The largest int32 t >= 0 with at least k entries of `bits` >= t (bisection over 31 bits);
    `count_ge(t)` counts them instead where the entries are not one array (bits is then None)."""
    count_ge = count_ge or (lambda t: _count(bits >= t))

    def step(i, t):
        cand = t | jnp.left_shift(jnp.int32(1), 30 - i)
        return jnp.where(count_ge(cand) >= k, cand, t)

    return jax.lax.fori_loop(0, 31, step, jnp.int32(0))


def _compact(values, keep, cap, ref):
    """Writes values[keep], in order, to ref[0:cap] (slot cap absorbs the overflow); returns how many."""
    slot = jnp.cumsum(keep.astype(jnp.int32)) - 1
    ok = keep & (slot < cap)
    plgpu.store(ref.at[jnp.where(ok, slot, cap)], values, mask=ok)
    return _count(keep)


def _kernel(
    logits_ref,
    base_ref,
    lane_bmax_ref,
    n_pseudo_ref,
    floor_ref,
    lse_ref,
    ids_ref,
    lanes_ref,
    cand_ids_ref,
    cand_bits_ref,
    *,
    k,
    tile,
    groups,
    cap,
    interpret,
):
    v = logits_ref.shape[-1]
    n_tiles = pl.cdiv(v, tile)
    depth = pl.next_power_of_2(n_tiles)
    lane = jnp.arange(tile, dtype=jnp.int32)
    n_pseudo, floor = n_pseudo_ref[...], floor_ref[...]

    def sync():
        if not interpret:  # scratch written by some threads is read by others (the interpreter runs in order)
            plgpu.debug_barrier()

    def logits2_at(t):
        ids = t * tile + lane
        y = plgpu.load(logits_ref.at[pl.ds(t * tile, tile)], mask=ids < v, other=-jnp.inf)
        return ids, y.astype(jnp.float32) * _LOG2E

    # 1. One pass over the row: per lane the sum of 2^(y - c), the largest logit and its id.
    ids0, c = logits2_at(0)
    first = ids0 < v
    c = jnp.where(first, c, 0.0)

    def lanes_pass(t, carry):
        s, m, arg = carry
        ids, y = logits2_at(t)
        return s + jnp.exp2(y - c), jnp.maximum(m, y), jnp.where(y > m, ids, arg)

    init = (jnp.where(first, 1.0, 0.0), jnp.where(first, c, -jnp.inf), jnp.where(first, ids0, -1))
    s, m, arg = jax.lax.fori_loop(1, n_tiles, lanes_pass, init)

    def sums_again():
        def again(t, acc):
            return acc + jnp.where(m > -jnp.inf, jnp.exp2(logits2_at(t)[1] - m), 0.0)

        return jax.lax.fori_loop(0, n_tiles, again, jnp.zeros((tile,), jnp.float32)), m

    live = m > -jnp.inf  # a lane of -inf logits only adds nothing (its sum may have come out NaN)
    s, c = jax.lax.cond(jnp.max(jnp.where(live, m - c, 0.0)) > _SAFE, sums_again, lambda: (s, c))
    s = jnp.where(live, s, 0.0)
    top = jnp.max(m)
    lse2 = top + jnp.log2(jnp.sum(s * jnp.exp2(c - top)))
    lse_ref[...] = lse2 / _LOG2E

    def score(y, b):
        return n_pseudo * jnp.exp2(y - lse2) + floor * b

    def emit(bits, ids, t, room, n_out):
        """Stores the ids with bits > t, and with bits == t while `room` lasts, from output slot n_out."""
        eq = bits == t
        take = (bits > t) | (eq & (jnp.cumsum(eq.astype(jnp.int32)) <= room))
        slot = n_out + jnp.cumsum(take.astype(jnp.int32)) - 1
        plgpu.store(ids_ref.at[jnp.where(take, slot, k)], ids, mask=take)
        return room - _count(eq & take), n_out + _count(take)

    # 2. t0 <= the k-th largest score.
    has = arg >= 0
    b_arg = plgpu.load(base_ref.at[jnp.where(has, arg, 0)], mask=has, other=0.0)
    lane_bits = _as_bits(score(m, b_arg), has)
    t0 = _kth_bits(jnp.max(lane_bits.reshape(groups, tile // groups), axis=1), k)

    # 3. The lanes whose bound reaches t0, their ids scored, the candidates >= t0, the exact top k.
    n_lanes = _compact(lane, _as_bits(score(m, lane_bmax_ref[...]), has) >= t0, cap, lanes_ref)
    sync()

    @pl.when(n_lanes <= cap)
    def _():
        row = jnp.arange(cap, dtype=jnp.int32)[:, None]
        lanes = plgpu.load(lanes_ref.at[pl.ds(0, cap)], mask=row[:, 0] < n_lanes, other=0)
        ids_CxD = lanes[:, None] + tile * jnp.arange(depth, dtype=jnp.int32)[None, :]
        ok = (row < n_lanes) & (ids_CxD < v)
        at = jnp.where(ok, ids_CxD, 0)
        y = plgpu.load(logits_ref.at[at], mask=ok, other=-jnp.inf).astype(jnp.float32) * _LOG2E
        b = plgpu.load(base_ref.at[at], mask=ok, other=0.0)
        bits = _as_bits(score(y, b), ok).reshape(cap * depth)
        ids = ids_CxD.reshape(cap * depth)
        keep = bits >= t0
        n_keep = _compact(ids, keep, cap, cand_ids_ref)
        _compact(bits, keep, cap, cand_bits_ref)
        sync()

        @pl.when(n_keep <= cap)
        def _():
            live = jnp.arange(cap, dtype=jnp.int32) < n_keep
            few_ids = plgpu.load(cand_ids_ref.at[pl.ds(0, cap)], mask=live, other=0)
            few_bits = plgpu.load(cand_bits_ref.at[pl.ds(0, cap)], mask=live, other=_ABSENT)
            t = _kth_bits(few_bits, k)
            emit(few_bits, few_ids, t, k - _count(few_bits > t), jnp.int32(0))

        @pl.when(n_keep > cap)
        def _():
            t = _kth_bits(bits, k)
            emit(bits, ids, t, k - _count(bits > t), jnp.int32(0))

    # 4. Too many lanes: exact bisection over the whole row, one pass (from L2) per bit.
    @pl.when(n_lanes > cap)
    def _():
        def bits_at(t):
            ids, y = logits2_at(t)
            b = plgpu.load(base_ref.at[pl.ds(t * tile, tile)], mask=ids < v, other=0.0)
            return ids, _as_bits(score(y, b), ids < v)

        def count_ge(c):
            return jax.lax.fori_loop(0, n_tiles, lambda t, n: n + _count(bits_at(t)[1] >= c), jnp.int32(0))

        t = _kth_bits(None, k, count_ge)

        def out(i, carry):
            ids, bits = bits_at(i)
            return emit(bits, ids, t, *carry)

        jax.lax.fori_loop(0, n_tiles, out, (k - count_ge(t + 1), jnp.int32(0)))


def expected_score_topk(logits_NxV, base_V, n_pseudo_N, floor_N, k, *, tile=2048, groups=256, cap=128, num_warps=4):
    """(lse_N, ids_NxK): log-sum-exp of each logits row and the ids of its k largest dense scores
    s_v = n_pseudo * softmax(logits)_v + floor * base_v, one Pallas kernel program per row.

    logits_NxV: any float dtype (read once); base_V >= 0; n_pseudo_N, floor_N >= 0; k <= V. `tile`:
    ids per streamed tile (lanes); `groups`: lane groups for the lower bound (>= k); `cap`: candidate
    slots (>= k); the three are rounded to powers of two as Triton needs. Ids are in candidate order,
    not sorted by score (see the module docstring for ties).
    """
    n, v = logits_NxV.shape
    if not 0 < k <= v:
        raise ValueError(f"posterior kernel: k={k} must be in [1, vocab={v}].")
    tile = min(pl.next_power_of_2(tile), pl.next_power_of_2(v))
    groups = min(max(pl.next_power_of_2(groups), pl.next_power_of_2(k)), tile)
    cap = max(pl.next_power_of_2(cap), pl.next_power_of_2(k))
    n_tiles = pl.cdiv(v, tile)
    base = jnp.asarray(base_V, jnp.float32)
    lane_bmax = jnp.pad(base, (0, n_tiles * tile - v)).reshape(n_tiles, tile).max(0)
    row, one, whole = (lambda i: (i, 0)), (lambda i: (i,)), (lambda i: (0,))
    # Under shard_map the logits are one shard's rows: the outputs vary over the same manual axes.
    like_rows = functools.partial(jax.ShapeDtypeStruct, manual_axis_type=jax.typeof(logits_NxV).mat)

    def call(interpret):
        return pl.pallas_call(
            functools.partial(_kernel, k=k, tile=tile, groups=groups, cap=cap, interpret=interpret),
            grid=(n,),
            in_specs=[
                pl.BlockSpec((None, v), row),
                pl.BlockSpec((v,), whole),
                pl.BlockSpec((tile,), whole),
                pl.BlockSpec((None,), one),
                pl.BlockSpec((None,), one),
            ],
            out_specs=[pl.BlockSpec((None,), one), pl.BlockSpec((None, k + 1), row)]
            + [pl.BlockSpec((None, cap + 1), row)] * 3,
            out_shape=[like_rows((n,), jnp.float32), like_rows((n, k + 1), jnp.int32)]
            + [like_rows((n, cap + 1), jnp.int32)] * 3,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
            interpret=interpret,
        )

    args = (logits_NxV, base, lane_bmax, jnp.asarray(n_pseudo_N, jnp.float32), jnp.asarray(floor_N, jnp.float32))
    lse, ids, *_ = jax.lax.platform_dependent(*args, cuda=lambda *a: call(False)(*a), default=lambda *a: call(True)(*a))
    return lse, ids[:, :k]
