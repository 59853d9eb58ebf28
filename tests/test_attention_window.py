"""models/attention.py's sliding-window kernel (`self_attend` skipping the key blocks behind the window): values and
q/k/v gradients equal the float64 dense reference on packed rows with padding and GQA, for a static window, a
traced one with `window_bound` (both layer kinds of a mixed model, under jit), windows that are not a multiple of
the block, wider than the band or than the row, and positions with gaps; `band_plan` keeps every visible key."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_attention import _dense_reference

from proxykd_jax.models import attention
from proxykd_jax.models.llama import Llama, ModelConfig, positions_from_segments

_FULL = int(np.iinfo(np.int32).max)  # a full layer's traced window (`llama.Attention`)


def _rows(seed, length, h=4, g=2, e=8):
    """Three packed rows: two long segments and a padding tail; leading padding, a long, a short and a long
    segment; one segment over the whole row. Positions restart per segment."""
    keys = jax.random.split(jax.random.key(seed), 4)
    seg = np.zeros((3, length), np.int32)
    seg[0, : length * 9 // 20], seg[0, length * 9 // 20 : length * 9 // 10] = 1, 2
    seg[1, 20 : length // 3], seg[1, length // 3 : length // 3 + 40], seg[1, length // 3 + 40 :] = 1, 2, 3
    seg[2] = 1
    seg = jnp.asarray(seg)
    q = jax.random.normal(keys[0], (3, length, h, e))
    k = jax.random.normal(keys[1], (3, length, g, e))
    v = jax.random.normal(keys[2], (3, length, g, e))
    return q, k, v, positions_from_segments(seg), seg, jax.random.normal(keys[3], q.shape)


def _run(q, k, v, pos, seg, cot, window, bound=None, traced=False, kernel=None):
    """Output and q/k/v cotangents of `self_attention` (blocked), or of `kernel(q, k, v, pos, seg, window)`, in one
    compiled program; `traced`: the window enters as a traced int32 (a scanned layer's)."""

    def run(q, k, v, cot, *traced_window):
        w = traced_window[0] if traced_window else window

        def f(*a):
            if kernel is not None:
                return kernel(*a, pos, seg, w)
            return attention.self_attention(*a, pos, seg, implementation="blocked", window=w, window_bound=bound)

        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(cot)

    return jax.jit(run)(q, k, v, cot, *([jnp.int32(window)] if traced else []))


def _reference(q, k, v, pos, seg, cot, window, softcap=None):
    """`_dense_reference`'s output and q/k/v cotangents in float64."""
    with jax.enable_x64(True):
        q64, k64, v64, cot64 = (jnp.asarray(np.asarray(x, np.float32), jnp.float64) for x in (q, k, v, cot))
        out, vjp = jax.vjp(lambda *a: _dense_reference(*a, pos, seg, window, softcap), q64, k64, v64)
        return np.asarray(out), [np.asarray(x) for x in vjp(cot64)]


def _assert_matches(got, want, seg, tol=1e-5, nonzero="qkv"):
    """`got` equals the reference `want` (value, q/k/v cotangents); padding queries are zero; the cotangents named
    in `nonzero` are not all small (a window of 1 leaves q and k none)."""
    (out, grads), (ref, ref_grads) = got, want
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=10 * tol, atol=tol)
    assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0)
    for name, g, w in zip("qkv", grads, ref_grads):
        assert np.abs(w).max() > 0.1 or name not in nonzero, name
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=10 * tol, atol=10 * tol, err_msg=name)


@pytest.mark.parametrize(
    "length,window,plan",
    [
        (1024, 70, (64, 2)),  # W not a multiple of the block: the band starts mid-window
        (1024, 64, (64, 1)),  # W a multiple of the block
        (1024, 1, (64, 0)),  # each query sees itself only
        (2048, 300, (64, 5)),  # L a multiple of 64, 128 and 256: the block follows W
        (2048, 512, (128, 4)),
        (1024, 5000, None),  # W larger than L: no band, the causal kernel masks (and the window is no window)
    ],
)
def test_static_window_matches_float64_reference(length, window, plan):
    """An all-sliding model's window (a Python int) on packed, padded GQA rows: values and q/k/v gradients."""
    assert attention.band_plan(length, window) == plan
    h, g = (2, 1) if length > 1024 else (4, 2)  # the long rows: fewer heads, to keep the float64 reference small
    q, k, v, pos, seg, cot = _rows(length + window, length, h, g)
    want = _reference(q, k, v, pos, seg, cot, window)
    full = _reference(q, k, v, pos, seg, cot, None)[0]
    assert (np.abs(full - want[0]).max() > 0.1) == (window < length)  # the window changes the answer on these rows
    _assert_matches(_run(q, k, v, pos, seg, cot, window), want, seg, nonzero="qkv" if window > 1 else "v")


@pytest.mark.parametrize("sliding", [True, False])
def test_traced_window_of_a_mixed_model_matches_float64_reference(sliding):
    """One jitted body for both layer kinds: a traced window with `window_bound` (a `lax.cond`) is the band kernel
    on a sliding layer and the causal log-sum-exp kernel on a full one (window int32 max = no window)."""
    length, bound = 1024, 70
    assert attention.band_plan(length, bound) is not None
    q, k, v, pos, seg, cot = _rows(7 + sliding, length)
    window = bound if sliding else _FULL
    want = _reference(q, k, v, pos, seg, cot, bound if sliding else None)
    _assert_matches(_run(q, k, v, pos, seg, cot, window, bound=bound, traced=True), want, seg)


def test_a_traced_window_below_its_bound_is_exact():
    """The band is cut for `window_bound`; a smaller traced window masks within it, a larger one takes the causal
    kernel: both exact."""
    length, bound = 1024, 100
    q, k, v, pos, seg, cot = _rows(3, length)
    for window in (37, 300):
        want = _reference(q, k, v, pos, seg, cot, window)
        _assert_matches(_run(q, k, v, pos, seg, cot, window, bound=bound, traced=True), want, seg)


def test_positions_with_gaps_are_exact():
    """Positions growing by 2 per index (packed rows, restarting per segment): a key is further back in positions
    than in indices, so skipping by index drops no visible key; the window (on positions) cuts at W / 2 indices."""
    length, window = 1024, 130
    q, k, v, pos, seg, cot = _rows(5, length)
    pos = 2 * pos
    want = _reference(q, k, v, pos, seg, cot, window)
    _assert_matches(_run(q, k, v, pos, seg, cot, window), want, seg)
    _assert_matches(_run(q, k, v, pos, seg, cot, window, bound=window, traced=True), want, seg)


@pytest.mark.parametrize("plan,window", [((256, 1), 200), ((128, 2), 257), ((64, 8), 600), ((32, 3), 90)])
def test_band_kernel_for_any_plan(plan, window):
    """The band kernel itself on short rows, for plans `band_plan` would not pick there: 256- and 128-row blocks,
    a band reaching before the row's start (window wider than the row), blocks of 32."""
    bq, behind = plan
    assert behind * bq >= window - 1 or behind * bq >= 512  # the band holds every key the window can see
    q, k, v, pos, seg, cot = _rows(bq + window, 512)

    def kernel(*a):
        return attention._band_attend(*a, plan) * (a[4] != 0)[:, :, None, None]  # zero padding queries

    want = _reference(q, k, v, pos, seg, cot, window)
    _assert_matches(_run(q, k, v, pos, seg, cot, window, kernel=kernel), want, seg)


def test_band_kernel_in_bfloat16():
    q, k, v, pos, seg, cot = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in _rows(11, 1024))
    want = _reference(q, k, v, pos, seg, cot, 70)
    out, grads = _run(q, k, v, pos, seg, cot, 70)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want[0], atol=3e-2)
    for name, g, w in zip("qkv", grads, want[1]):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=0.1, rtol=5e-2, err_msg=name)


def test_band_plan_keeps_every_visible_key():
    """For every (L, W) the band reaches at least W - 1 indices back from each block's first query (exact skipping),
    is cheaper than the causal kernel where it is used, and is refused where no block divides L."""
    for length in (256, 1024, 2048, 4096, 8192):
        n = attention.causal_blocks(length)
        for window in (1, 2, 63, 64, 65, 100, 256, 511, 512, 1000, 1024, 4096, 10_000):
            plan = attention.band_plan(length, window)
            if plan is None:
                continue
            bq, behind = plan
            assert length % bq == 0 and behind * bq >= window - 1 > (behind - 1) * bq, (length, window)
            assert (behind + 1) * bq < length * (n + 1) / (2 * n), (length, window)
    assert attention.band_plan(4096, 512) == (128, 4) and attention.band_plan(4096, 1024) == (256, 4)
    assert attention.band_plan(4096 + 32, 512) is None  # no block of 64, 128 or 256 divides L
    assert attention.band_plan(512, 256) is None  # the band would be most of the causal kernel's work


def test_sliding_layers_skip_by_index():
    """Where positions do not grow with the index (all 0 here: the documented assumption broken), the window on
    positions would see a whole segment's prefix, but the band drops the keys before it: both the static window and
    the traced one of a sliding layer really skip (and agree)."""
    length, window = 1024, 70
    q, k, v, _, seg, cot = _rows(13, length)
    pos = jnp.zeros_like(seg)
    dense = _reference(q, k, v, pos, seg, cot, window)[0]
    static = np.asarray(_run(q, k, v, pos, seg, cot, window)[0])
    traced = np.asarray(_run(q, k, v, pos, seg, cot, window, bound=window, traced=True)[0])
    np.testing.assert_allclose(traced, static, rtol=1e-5, atol=1e-6)
    assert np.abs(static - dense).max() > 0.1


@pytest.mark.parametrize(
    "layer_types,scan", [(("sliding_attention", "full_attention", "sliding_attention"), True), (None, False)]
)
def test_a_windowed_model_on_the_blocked_kernel_matches_xla(layer_types, scan):
    """The model's call site: a mixed model (Qwen3-shaped; its traced per-layer window with `window_bound` the
    model's, scanned) and an all-sliding one (a static window, unrolled) give the same loss and parameter gradients
    on the blocked kernel (skipping) as on the dense `xla` path, on packed rows longer than the window."""
    length = 1024
    assert attention.band_plan(length, 70) is not None
    seg = _rows(0, length)[4]
    tokens = jax.random.randint(jax.random.key(1), seg.shape, 0, 97)
    grads = {}
    for implementation in ("blocked", "xla"):
        cfg = ModelConfig(
            vocab_size=97, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48,
            max_seq_len=length, sliding_window=70, layer_types=layer_types, qk_norm=layer_types is not None,
            scan_layers=scan, attention=implementation,
        )  # fmt: skip
        graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))

        def loss(params, graphdef=graphdef):
            logits = nnx.merge(graphdef, params)(tokens, None, seg)
            return jnp.sum(jnp.where(seg[..., None] != 0, jax.nn.log_softmax(logits) ** 2, 0.0)) / seg.size

        grads[implementation] = jax.jit(jax.value_and_grad(loss))(params)
        if implementation == "blocked":  # the band; with layer_types the cond's other branch, the full layers' kernel
            kernels = set(re.findall(r"name=(_\w+_core)\b", str(jax.make_jaxpr(loss)(params))))
            assert kernels == ({"_band_core", "_causal_lse_core"} if layer_types else {"_band_core"})
    (got, got_grads), (want, want_grads) = grads["blocked"], grads["xla"]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-3, atol=1e-5)
