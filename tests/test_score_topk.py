"""bayes/score_topk.py: the one-pass GPU kernel for the posterior's dense top-k (and, merged with the
prior's sparse entries, the whole posterior top k), run here in Pallas' interpreter, against a float64
reference on fresh random rows; each of its paths is forced once; it lowers to a Triton kernel for CUDA
from this CPU host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from proxykd_jax.bayes import SparsePrior, posterior_topk
from proxykd_jax.bayes.score_topk import expected_posterior_topk, expected_score_topk


def _inputs(seed, n, v, scale=3.0, base_spread=1.0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, v)) * scale).astype(np.float32)
    base = rng.random(v) ** base_spread
    base = (base / base.sum()).astype(np.float32)
    n_pseudo = rng.uniform(1.0, 50.0, n).astype(np.float32)
    floor = rng.uniform(0.0, 5.0, n).astype(np.float32)
    return logits, base, n_pseudo, floor


def _check(logits, base, n_pseudo, floor, k, **kw):
    lse, ids = expected_score_topk(*(jnp.asarray(x) for x in (logits, base, n_pseudo, floor)), k, **kw)
    lse, ids = np.asarray(lse), np.asarray(ids)
    x = logits.astype(np.float64)
    ref_lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=1e-5)
    score = n_pseudo[:, None] * np.exp(x - ref_lse[:, None]) + floor[:, None] * base[None, :].astype(np.float64)
    assert ids.shape == (logits.shape[0], k)
    for r in range(logits.shape[0]):
        assert len(set(ids[r].tolist())) == k and ids[r].min() >= 0 and ids[r].max() < logits.shape[1], r
        chosen = np.zeros(logits.shape[1], bool)
        chosen[ids[r]] = True
        # a top-k set: nothing left out scores above anything taken (float32 rounding aside)
        assert score[r, ~chosen].max() <= score[r, chosen].min() * (1 + 1e-5), r
    return ids


@pytest.mark.parametrize("n,v,k,tile", [(6, 1000, 16, 256), (5, 4096, 64, 512), (4, 300, 8, 2048), (3, 777, 1, 128)])
def test_matches_float64_top_k_and_log_normaliser(n, v, k, tile):
    _check(*_inputs(v, n, v), k, tile=tile, groups=64, cap=128)


def test_forced_paths_agree():
    """Few candidate slots: rows go through the whole-row bisection (too many lanes) or the
    uncompacted candidate bisection (too many candidates); a spread base widens the lane bounds; one
    row's first tile is far below the rest (its lane sums are redone against the maxima). Each path
    is needed: breaking any one of them fails this test."""
    logits, base, n_pseudo, floor = _inputs(7, 6, 1500, base_spread=8.0)
    floor[:3] = 200.0  # the base term dominates: many lanes reach the bound
    logits[4, :256] -= 120.0  # 173 log2 units under the row's other tiles
    # Row 5: one high lane in each of 8 lane groups, five high ids in each such lane: 8 lanes reach
    # the bound but 36 of their ids score above t0 (candidates overflow, not lanes).
    floor[5] = 0.0
    for i, lane in enumerate(range(0, 256, 32)):
        logits[5, lane + 256 * np.arange(5)] = 20.0 + 0.01 * i + 0.001 * np.arange(5)
    for cap, groups in ((8, 8), (16, 8), (128, 64)):
        _check(logits, base, n_pseudo, floor, 8, tile=256, groups=groups, cap=cap)


def test_minus_infinity_logits():
    """-inf logits (masked ids) score floor * base, as in the XLA path: a lane of them throughout, and
    lanes whose first logit is -inf but later ones are not."""
    logits, base, n_pseudo, floor = _inputs(9, 3, 1000)
    logits[0, 5::256] = -np.inf  # lane 5 of every tile
    logits[1, :256:3] = -np.inf  # first tile only
    logits[2, 100:900] = -np.inf
    _check(logits, base, n_pseudo, floor, 16, tile=256, groups=64, cap=128)


@pytest.mark.parametrize("shift", [-100.0, 100.0])
def test_logits_far_from_zero(shift):
    """A softmax does not move when every logit moves: rows far below (or above) zero, with a vocabulary
    shorter than the tile (the lanes past it hold no ids), give the float64 log-normaliser and top k."""
    logits, base, n_pseudo, floor = _inputs(11, 3, 300)
    _check(logits + np.float32(shift), base, n_pseudo, floor, 8, tile=512, groups=64, cap=128)


def test_ties_give_k_distinct_ids():
    logits = np.zeros((2, 512), np.float32)
    logits[:, 100:140] = 2.0  # 40 ids tied at the top score
    base = np.full(512, 1 / 512, np.float32)
    ids = _check(logits, base, np.array([10.0, 10.0], np.float32), np.array([1.0, 0.0], np.float32), 16, tile=128)
    assert np.all((ids >= 100) & (ids < 140))


@pytest.mark.parametrize(
    "n,v,k,s,kw",
    [(6, 1000, 16, 40, {}), (4, 4096, 64, 112, {}), (5, 300, 7, 13, {}), (6, 1500, 8, 20, dict(tile=256, cap=8))],
)
def test_whole_posterior_top_k_matches_float64(n, v, k, s, kw):
    """`expected_posterior_topk` against the float64 posterior over the whole row: q_v = (n_pseudo p_v +
    floor base_v + the sparse values at v) / total. The sparse ids repeat within a row and include some
    of the dense top ids (their dense score must not count twice); the ids come back sorted by q. The
    last case has 8 candidate slots and a base term that dominates some rows: the dense top-k takes its
    fallback paths (see `test_forced_paths_agree`) before the merge."""
    logits, base, n_pseudo, floor = _inputs(v + s, n, v, base_spread=8.0 if kw else 1.0)
    if kw:
        floor[:3] = 200.0
    rng = np.random.default_rng(s)
    sp_ids = rng.integers(0, v, (n, s)).astype(np.int32)
    sp_ids[:, 1:4] = sp_ids[:, :1]  # one id four times
    sp_ids[:, 4:7] = np.argsort(-logits, 1)[:, :3]  # ids the dense top k holds too
    # sparse values from well below the dense scores (dense and sparse ids mix in the top k) to above
    sp_vals = (rng.uniform(0.0, 1.0, (n, s)) * np.geomspace(0.02, 30.0, n)[:, None]).astype(np.float32)
    total = (n_pseudo + floor + sp_vals.sum(1) + rng.uniform(0.0, 5.0, n)).astype(np.float32)
    ids, logq, tail = (
        np.asarray(a)
        for a in expected_posterior_topk(
            *(jnp.asarray(x) for x in (logits, base, n_pseudo, floor, sp_ids, sp_vals, total)), k, **kw
        )
    )
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    q = n_pseudo[:, None] * p / p.sum(1, keepdims=True) + floor[:, None] * base[None, :].astype(np.float64)
    for r in range(n):
        np.add.at(q[r], sp_ids[r], sp_vals[r].astype(np.float64))
    q /= total[:, None]
    assert ids.shape == logq.shape == (n, k) and tail.shape == (n,)
    for r in range(n):
        ref = np.argsort(-q[r], kind="stable")[:k]
        assert sorted(ids[r].tolist()) == sorted(ref.tolist()), r
        assert np.all(np.diff(logq[r]) <= 1e-6), r  # sorted by q, largest first
        np.testing.assert_allclose(logq[r], np.log(q[r, ids[r]]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(tail[r], max(1.0 - q[r, ids[r]].sum(), 0.0), atol=1e-5)


def _export_for_h200(fn, *args):
    """jax.export for CUDA from this CPU host. jax >= 0.11 reads the GPU's compute capability while
    lowering a Pallas Triton kernel, so the export runs under an abstract mesh naming an H200."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("rows",), abstract_device=device)):
        return export.export(
            fn, platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        )(*args)


def test_lowers_to_one_triton_kernel_for_cuda():
    n, v, k = 8192, 32000, 64
    shapes = [((n, v), jnp.float32), ((v,), jnp.float32), ((n,), jnp.float32), ((n,), jnp.float32)]
    fn = jax.jit(lambda *a: expected_score_topk(*a, k))
    exported = _export_for_h200(fn, *(jax.ShapeDtypeStruct(s, d) for s, d in shapes))
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "grid_x = 8192" in text  # one program per row


def test_posterior_with_the_pallas_kernel_lowers_for_cuda():
    """The whole posterior step with kernel='pallas' lowers for CUDA with the kernel as its one pass
    over the [N, V] logits: no reduction over the vocabulary is left to XLA, and no sort either (the
    merge with the prior's sparse entries and the final top k run in the kernel)."""
    n, v, s = 512, 32000, 16
    f32, i32 = jnp.float32, jnp.int32
    sds = jax.ShapeDtypeStruct
    prior = SparsePrior(sds((n, s), i32), sds((n, s), f32), sds((n, 2 * s), i32), sds((n, 2 * s), f32), sds((n,), f32))
    fn = jax.jit(lambda lg, pr, b, npn: posterior_topk(lg, pr, b, npn, 2.0, k=64, kernel="pallas"))
    exported = _export_for_h200(fn, sds((n, v), f32), prior, sds((v,), f32), sds((n,), f32))
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1
    reductions_over_v = [line for line in text.splitlines() if "stablehlo.reduce" in line and f"{n}x{v}x" in line]
    assert not reductions_over_v, reductions_over_v[:2]
    assert "stablehlo.sort" not in text
