"""The posterior's top-k as one Pallas (Triton) kernel for GPUs: one read of the logits.

`expected` mode needs, per token row, the log-normaliser of the proxy logits and the k ids with the
largest dense score s_v = N p_v + f base_v (p = softmax(logits), N = n_pseudo, f = floor). The XLA
path (`posterior_union.blocked_top_k`) reads the [N, V] logits twice (log-sum-exp, then block maxima of
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
not `lax.top_k`'s lowest-id rule. Ids come back in that order, not sorted by score
(`expected_score_topk`). `expected_posterior_topk` goes on in the same program:

5. The prior's sparse entries (deduplicated before the kernel: the first of each id carries the sum
   of its values) join the k dense ids; a dense id among them drops out (the sparse entry carries
   its dense score too). Each of the union gets q = (dense score + sparse value) / total from its
   logit and base value (gathered from L2), the k-th largest q is found by bisection over the bits
   as in 3, and the k taken are ranked (larger q first; ties: dense ids first, then position) and
   written as ids, log q and the tail 1 - sum q: what `posterior._posterior_core` computes with XLA
   sorts and gathers after the dense top-k, which then has nothing left to do.

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
_CHUNK = 16  # entries per step of the selection's pairwise loops (a [k or S, 16] comparison each)
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


def _compact(values, keep, cap, ref, start=0):
    """Writes values[keep], in order, to ref[start:cap] (slot cap absorbs the overflow); returns how many."""
    slot = start + jnp.cumsum(keep.astype(jnp.int32)) - 1
    ok = keep & (slot < cap)
    plgpu.store(ref.at[jnp.where(ok, slot, cap)], values, mask=ok)
    return _count(keep)


def _take(bits, t, room):
    """(take, room left): the entries with bits > t, and those equal to t in order while `room` (slots
    left for ties at the k-th value) lasts."""
    eq = bits == t
    take = (bits > t) | (eq & (jnp.cumsum(eq.astype(jnp.int32)) <= room))
    return take, room - _count(eq & take)


def _kernel(*refs, k, tile, groups, cap, interpret, select):
    logits_ref, base_ref, lane_bmax_ref, n_pseudo_ref, floor_ref = refs[:5]
    if select:  # + the prior's sparse entries and total in; the ranking's scratch and the posterior out
        sp_ids_ref, sp_run_ref, total_ref = refs[5:8]
        lse_ref, ids_ref, lanes_ref, cand_ids_ref, cand_bits_ref, bits_ref, out_ids_ref, out_logq_ref, tail_ref = refs[
            8:
        ]
    else:
        lse_ref, ids_ref, lanes_ref, cand_ids_ref, cand_bits_ref = refs[5:]
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
    top = jnp.max(m)
    # Lanes past the vocabulary (c = 0) are left out: 0 * 2^(0 - top) is NaN once every logit is below -88.
    lse2 = top + jnp.log2(jnp.sum(jnp.where(live, s * jnp.exp2(c - top), 0.0)))
    lse_ref[...] = lse2 / _LOG2E

    def score(y, b):
        return n_pseudo * jnp.exp2(y - lse2) + floor * b

    def emit(bits, ids, t, room, n_out):
        """Stores the ids with bits > t, and with bits == t while `room` lasts, from output slot n_out."""
        take, room = _take(bits, t, room)
        return room, n_out + _compact(ids, take, k, ids_ref, start=n_out)

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

    if select:
        sync()
        sel_refs = (logits_ref, base_ref, ids_ref, sp_ids_ref, sp_run_ref, total_ref, bits_ref)
        _select(
            sel_refs + (out_ids_ref, out_logq_ref, tail_ref),
            score=lambda y, b: score(y * _LOG2E, b),
            k=k,
            sync=sync,
        )


def _select(refs, *, score, k, sync):
    """The posterior's top k from the dense top k (`ids_ref[:k]`) and the prior's sparse entries.

    The sparse entries come deduplicated (`sp_ids_ref`: -1 where an id repeats an earlier entry;
    `sp_run_ref`: each first entry's summed value). q_v = (score(logit_v, base_v) + run_v) / total over
    the union of both id lists; the k largest are written sorted by q (ties by position, dense ids
    first), as log q, with the tail 1 - sum of the k q's. Pairwise comparisons run over `_CHUNK`
    entries of one side per step (`benchmarks/kernel_sass.py`: as whole [k, S] matrices they held 255
    registers with spills and cut the programs per SM from 5 to 2; one entry per step cost ~300
    instructions a step)."""
    logits_ref, base_ref, ids_ref, sp_ids_ref, sp_run_ref, total_ref, bits_ref, out_ids_ref, out_logq_ref, tail_ref = (
        refs
    )
    kp = pl.next_power_of_2(k)
    s = sp_ids_ref.shape[-1]
    sp = pl.next_power_of_2(s)
    d_pos = jnp.arange(kp, dtype=jnp.int32)
    d_ok = d_pos < k
    s_ok = jnp.arange(sp, dtype=jnp.int32) < s
    d_ids = plgpu.load(ids_ref.at[pl.ds(0, kp)], mask=d_ok, other=-1)
    s_ids = plgpu.load(sp_ids_ref.at[pl.ds(0, sp)], mask=s_ok, other=-1)
    s_run = plgpu.load(sp_run_ref.at[pl.ds(0, sp)], mask=s_ok, other=0.0)

    def in_sparse(c, acc):  # dense ids that are also sparse ones: their q comes with the sparse entry
        j = c * _CHUNK + jnp.arange(_CHUNK, dtype=jnp.int32)
        id_j = plgpu.load(sp_ids_ref.at[pl.ds(c * _CHUNK, _CHUNK)], mask=j < s, other=-1)
        hit = (d_ids[:, None] == id_j[None, :]) & (id_j[None, :] >= 0)
        return acc | (jnp.max(hit.astype(jnp.int32), axis=1) > 0)

    d_keep = d_ok & ~jax.lax.fori_loop(0, pl.cdiv(s, _CHUNK), in_sparse, d_pos < 0)
    s_keep = s_ok & (s_ids >= 0)

    def q_num(ids, ok, extra):
        at = jnp.where(ok, ids, 0)
        y = plgpu.load(logits_ref.at[at], mask=ok, other=-jnp.inf).astype(jnp.float32)
        b = plgpu.load(base_ref.at[at], mask=ok, other=0.0)
        return score(y, b) + extra

    d_q, s_q = q_num(d_ids, d_keep, 0.0), q_num(s_ids, s_keep, s_run)
    d_bits, s_bits = _as_bits(d_q, d_keep), _as_bits(s_q, s_keep)
    t = _kth_bits(None, k, lambda c: _count(d_bits >= c) + _count(s_bits >= c))
    # The k taken: all above t, then entries equal to t in position order (dense first) while slots remain,
    # compacted in that order into the first k slots of the outputs (q for now) and of `bits_ref`.
    d_take, room = _take(d_bits, t, k - _count(d_bits > t) - _count(s_bits > t))
    s_take, _ = _take(s_bits, t, room)
    first = 0
    for ids, q, bits, take in ((d_ids, d_q, d_bits, d_take), (s_ids, s_q, s_bits, s_take)):
        for ref, x in ((out_ids_ref, ids), (out_logq_ref, q), (bits_ref, bits)):
            taken = _compact(x, take, k, ref, start=first)
        first = first + taken
    sync()
    ids = plgpu.load(out_ids_ref.at[pl.ds(0, kp)], mask=d_ok, other=0)
    q = plgpu.load(out_logq_ref.at[pl.ds(0, kp)], mask=d_ok, other=0.0)
    bits = plgpu.load(bits_ref.at[pl.ds(0, kp)], mask=d_ok, other=_ABSENT)

    def ahead(c, rank):  # the taken entries ranked above each: larger q, or equal q and earlier
        j = c * _CHUNK + jnp.arange(_CHUNK, dtype=jnp.int32)
        b = plgpu.load(bits_ref.at[pl.ds(c * _CHUNK, _CHUNK)], mask=j < k, other=_ABSENT)[None, :]
        above = (b > bits[:, None]) | ((b == bits[:, None]) & (j[None, :] < d_pos[:, None]))
        return rank + jnp.sum(above.astype(jnp.int32), axis=1)

    rank = jax.lax.fori_loop(0, pl.cdiv(k, _CHUNK), ahead, jnp.zeros((kp,), jnp.int32))
    sync()  # every program thread has read the compacted entries before they are overwritten
    total = total_ref[...]
    slot = jnp.where(d_ok, rank, k)
    plgpu.store(out_ids_ref.at[slot], ids, mask=d_ok)
    plgpu.store(out_logq_ref.at[slot], jnp.log(jnp.maximum(q / total, 0.0)), mask=d_ok)
    tail_ref[...] = jnp.maximum(1.0 - jnp.sum(jnp.where(d_ok, q, 0.0)) / total, 0.0)


def _call(logits_NxV, base_V, n_pseudo_N, floor_N, k, selection, *, tile, groups, cap, num_warps):
    """The kernel over every row; `selection`: None, or (sp_ids_NxS, sp_run_NxS, total_N) for `_select`."""
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
    args = [logits_NxV, base, lane_bmax, jnp.asarray(n_pseudo_N, jnp.float32), jnp.asarray(floor_N, jnp.float32)]
    in_specs = [
        pl.BlockSpec((None, v), row),
        pl.BlockSpec((v,), whole),
        pl.BlockSpec((tile,), whole),
        pl.BlockSpec((None,), one),
        pl.BlockSpec((None,), one),
    ]
    out_specs = [pl.BlockSpec((None,), one), pl.BlockSpec((None, k + 1), row)] + [
        pl.BlockSpec((None, cap + 1), row)
    ] * 3
    out_shape = [like_rows((n,), jnp.float32), like_rows((n, k + 1), jnp.int32)] + [
        like_rows((n, cap + 1), jnp.int32)
    ] * 3
    if selection is not None:
        sp_ids, sp_run, total = selection
        s = sp_ids.shape[1]
        args += [jnp.asarray(sp_ids, jnp.int32), jnp.asarray(sp_run, jnp.float32), jnp.asarray(total, jnp.float32)]
        in_specs += [pl.BlockSpec((None, s), row), pl.BlockSpec((None, s), row), pl.BlockSpec((None,), one)]
        width = pl.next_power_of_2(k) + 1  # the ranking's scratch: the bits of the k taken (+ an overflow slot)
        out_specs += [pl.BlockSpec((None, width), row)] + [pl.BlockSpec((None, k + 1), row)] * 2
        out_specs += [pl.BlockSpec((None,), one)]
        out_shape += [like_rows((n, width), jnp.int32), like_rows((n, k + 1), jnp.int32)]
        out_shape += [like_rows((n, k + 1), jnp.float32), like_rows((n,), jnp.float32)]

    def call(interpret):
        kernel = functools.partial(
            _kernel, k=k, tile=tile, groups=groups, cap=cap, interpret=interpret, select=selection is not None
        )
        return pl.pallas_call(
            kernel,
            grid=(n,),
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
            interpret=interpret,
        )

    return jax.lax.platform_dependent(*args, cuda=lambda *a: call(False)(*a), default=lambda *a: call(True)(*a))


def expected_score_topk(logits_NxV, base_V, n_pseudo_N, floor_N, k, *, tile=2048, groups=256, cap=128, num_warps=4):
    """(lse_N, ids_NxK): log-sum-exp of each logits row and the ids of its k largest dense scores
    s_v = n_pseudo * softmax(logits)_v + floor * base_v, one Pallas kernel program per row.

    logits_NxV: any float dtype (read once); base_V >= 0; n_pseudo_N, floor_N >= 0; k <= V. `tile`:
    ids per streamed tile (lanes); `groups`: lane groups for the lower bound (>= k); `cap`: candidate
    slots (>= k); the three are rounded to powers of two as Triton needs. Ids are in candidate order,
    not sorted by score (see the module docstring for ties).
    """
    lse, ids, *_ = _call(
        logits_NxV, base_V, n_pseudo_N, floor_N, k, None, tile=tile, groups=groups, cap=cap, num_warps=num_warps
    )
    return lse, ids[:, :k]


def expected_posterior_topk(
    logits_NxV,
    base_V,
    n_pseudo_N,
    floor_N,
    sp_ids_NxS,
    sp_vals_NxS,
    total_N,
    k,
    *,
    tile=2048,
    groups=256,
    cap=128,
    num_warps=4,
):
    """(ids_NxK, logq_NxK, tail_N): `expected` mode's whole posterior top k in the same kernel program.

    After the dense top k (as `expected_score_topk`), each row merges the prior's sparse entries
    (sp_ids_NxS with values sp_vals_NxS: pseudo-counts, an id may repeat) and keeps the k ids of the
    largest q_v = (n_pseudo softmax(logits)_v + floor base_v + sum of v's sparse values) / total_N,
    sorted by q (ties: dense ids first, then position), with log q and the tail 1 - sum of the k q's.
    The XLA code after the dense top k in `posterior._posterior_core` (sort, dedupe, gathers, top k)
    does the same; its ties go to the lower id instead.
    """
    # Deduplicate the sparse entries here (an [N, S, S] comparison XLA fuses into one small pass): the
    # first entry of each id carries the run's sum, the repeats become -1.
    sp_ids = jnp.asarray(sp_ids_NxS, jnp.int32)
    same = sp_ids[:, :, None] == sp_ids[:, None, :]
    sp_run = jnp.sum(jnp.where(same, jnp.asarray(sp_vals_NxS, jnp.float32)[:, None, :], 0.0), axis=2)
    pos = jnp.arange(sp_ids.shape[1])
    repeat = jnp.any(same & (pos[None, None, :] < pos[None, :, None]), axis=2)
    *_, ids, logq, tail = _call(
        logits_NxV,
        base_V,
        n_pseudo_N,
        floor_N,
        k,
        (jnp.where(repeat, -1, sp_ids), sp_run, total_N),
        tile=tile,
        groups=groups,
        cap=cap,
        num_warps=num_warps,
    )
    return ids[:, :k], logq[:, :k], tail
