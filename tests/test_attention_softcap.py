"""models/attention.py's attention logit soft-capping (Gemma 2's `attn_logit_softcapping`: scores s become
cap * tanh(s / cap) before the mask and softmax): the blocked kernel (its causal, band and log-sum-exp forms), the
capped `xla` path, splash attention (in Pallas' interpreter) and the cache path `attend` equal a float64 reference
in value and q/k/v gradients on packed, padded grouped-query rows whose scores reach several times the cap, with a
static and a traced sliding window; cuDNN's paths are refused with a cap and `auto` avoids them; no cap changes
nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import _dense_reference, _packed_batch
from test_attention_window import _reference as _window_reference

from proxykd_jax.models import attention

CAP = 2.0  # with q scaled by `_SPREAD`, |scores| reach about 6x the cap on these rows
_SPREAD = 3.0
_FULL = int(np.iinfo(np.int32).max)  # a full layer's traced window (`llama.Attention`)


def _rows(seed, length):
    """`test_attention`'s packed batch (one segment; two; two and a padding tail; GQA 4 query heads on 2 kv heads,
    E 8), q spread so that the cap matters."""
    q, k, v, pos, seg, cot = _packed_batch(seed, length=length)
    return q * _SPREAD, k, v, pos, seg, cot


def _reference_vjp(q, k, v, pos, seg, cot, softcap, window=None):
    """The float64 reference (`test_attention._dense_reference`, the cap before the mask) and its q/k/v cotangents."""
    return _window_reference(q, k, v, pos, seg, cot, window, softcap)


def _max_score(q, k):
    r = q.shape[2] // k.shape[2]
    s = jnp.einsum("blhe,bmhe->bhlm", q, jnp.repeat(k, r, axis=2)) / np.sqrt(q.shape[-1])
    return float(jnp.abs(s).max())


def _run(implementation, q, k, v, pos, seg, cot, softcap=CAP, window=None, traced=False, bound=None):
    """`self_attention`'s output and q/k/v cotangents as one compiled program; `traced`: the window enters as a traced
    int32 (a scanned layer's), with `bound` its `window_bound`."""

    def run(q, k, v, cot, *traced_window):
        w = traced_window[0] if traced_window else window

        def f(*a):
            return attention.self_attention(
                *a, pos, seg, implementation=implementation, window=w, window_bound=bound, softcap=softcap
            )

        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(cot)

    return jax.jit(run)(q, k, v, cot, *([jnp.int32(window)] if traced else []))


def _assert_matches(got, want, uncapped, seg):
    """`got` (value, q/k/v cotangents) equals the capped reference `want`, which differs clearly from the `uncapped`
    one in value and in every gradient; padding queries are zero."""
    (out, grads), (ref, ref_grads) = got, want
    assert np.abs(ref - uncapped[0]).max() > 0.1  # the cap changes the answer on these rows
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0)  # padding queries are zero
    for name, g, w, u in zip("qkv", grads, ref_grads, uncapped[1]):
        assert np.abs(w).max() > 0.1 and np.abs(w - u).max() > 0.1, name
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("implementation", ["blocked", "xla", "pallas"])
def test_capped_paths_match_float64_reference_in_value_and_grads(implementation):
    """No window: the blocked kernel's causal form (2 query blocks at L 128), the capped dense `xla` path, and splash
    attention with its own `attn_logits_soft_cap`."""
    q, k, v, pos, seg, cot = _rows(1, 128)
    assert attention.causal_blocks(128) == 2
    assert _max_score(q, k) > 4 * CAP
    want = _reference_vjp(q, k, v, pos, seg, cot, CAP)
    uncapped = _reference_vjp(q, k, v, pos, seg, cot, None)
    _assert_matches(_run(implementation, q, k, v, pos, seg, cot), want, uncapped, seg)


WINDOW_CASES = {
    # (length, window, traced, window_bound, reference window): which blocked kernel runs
    "static-causal": (128, 8, False, None, 8),  # no band plan at L 128: the causal kernel masks the window
    "traced-causal": (128, 8, True, None, 8),  # a traced window without a bound: the causal kernel masks it
    "static-band": (512, 40, False, None, 40),  # the band kernel
    "traced-band": (512, 40, True, 40, 40),  # a sliding layer behind the lax.cond: the band kernel
    "traced-below-bound": (512, 23, True, 40, 23),  # the band cut for 40, masked to 23 within it
    "traced-full": (512, _FULL, True, 40, None),  # a full layer behind the cond: the log-sum-exp causal kernel
}


@pytest.mark.parametrize("implementation", ["blocked", "xla"])
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_capped_windowed_paths_match_float64_reference(implementation, case):
    """A sliding window with the cap, static and traced (with and without `window_bound`), on rows longer than it:
    every form of the blocked kernel, and the capped `xla` path."""
    length, window, traced, bound, ref_window = WINDOW_CASES[case]
    if implementation == "blocked" and case.endswith("band"):
        assert attention.band_plan(length, bound or window) is not None
    if case.endswith("causal"):
        assert attention.band_plan(length, window) is None
    q, k, v, pos, seg, cot = _rows(length + window % 97, length)
    want = _reference_vjp(q, k, v, pos, seg, cot, CAP, ref_window)
    uncapped = _reference_vjp(q, k, v, pos, seg, cot, None, ref_window)
    if ref_window is not None:
        assert np.abs(want[0] - _reference_vjp(q, k, v, pos, seg, cot, CAP)[0]).max() > 0.1  # the window matters
    got = _run(implementation, q, k, v, pos, seg, cot, window=window, traced=traced, bound=bound)
    _assert_matches(got, want, uncapped, seg)


def test_the_cache_path_caps_before_the_mask():
    """`attend` (decoding over cache slots) with the cap, with and without a window, equals the capped reference on
    the real queries (it leaves padding queries to its caller)."""
    q, k, v, pos, seg, _ = _rows(3, 48)
    real = np.asarray(seg) != 0
    with jax.enable_x64(True):
        q64, k64, v64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v))
        refs = {w: np.asarray(_dense_reference(q64, k64, v64, pos, seg, w, CAP)) for w in (None, 5)}
        uncapped = np.asarray(_dense_reference(q64, k64, v64, pos, seg))
    for window in (None, 5):
        got = np.asarray(attention.attend(q, k, v, pos, pos, seg, seg, window, CAP))
        np.testing.assert_allclose(got[real], refs[window][real], rtol=1e-5, atol=1e-5)
    assert np.abs(refs[None] - uncapped)[real].max() > 0.1
    traced = jax.jit(lambda w: attention.attend(q, k, v, pos, pos, seg, seg, w, softcap=CAP))(jnp.int32(5))
    np.testing.assert_allclose(np.asarray(traced)[real], refs[5][real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "implementation,window,bound",
    [("blocked", None, None), ("blocked", 40, None), ("blocked", 23, 40), ("xla", None, None), ("xla", 8, None)],
)
def test_no_softcap_changes_nothing(implementation, window, bound):
    """softcap=None is the call without the argument, bit for bit, in value and gradients (static and traced
    windows, the band kernel and the cond)."""
    q, k, v, pos, seg, cot = _rows(5, 512 if window and window > 8 else 128)
    traced = bound is not None
    plain = _run(implementation, q, k, v, pos, seg, cot, None, window, traced, bound)

    def run(q, k, v, cot, *traced_window):
        w = traced_window[0] if traced_window else window

        def f(*a):
            return attention.self_attention(*a, pos, seg, implementation=implementation, window=w, window_bound=bound)

        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(cot)

    before = jax.jit(run)(q, k, v, cot, *([jnp.int32(window)] if traced else []))
    for got, want in zip(jax.tree.leaves(plain), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    got = attention.attend(q, k, v, pos, pos, seg, seg, 5, None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(attention.attend(q, k, v, pos, pos, seg, seg, 5)))


def test_auto_resolution_and_refusals_with_a_cap():
    """cuDNN's fused attention has no soft-cap: `auto` takes the capped `xla` path on GPU (any dtype, with or without
    a window), splash attention (which takes the cap) on TPU, the blocked kernel on CPU; an explicit `cudnn` or
    `cudnn_masked` is refused in one sentence naming model.attention."""
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        for windowed in (False, True):
            assert attention.resolve("auto", dtype, "gpu", windowed=windowed, capped=True) == "xla"
            assert attention.resolve("auto", dtype, "cpu", windowed=windowed, capped=True) == "blocked"
    assert attention.resolve("auto", jnp.bfloat16, "tpu", capped=True) == "pallas"
    assert attention.resolve("auto", jnp.bfloat16, "tpu", windowed=True, capped=True) == "xla"
    assert attention.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"  # without a cap: unchanged
    for implementation in ("blocked", "xla", "pallas"):
        assert attention.resolve(implementation, jnp.bfloat16, "gpu", capped=True) == implementation
    for implementation in ("cudnn", "cudnn_masked"):
        for platform in ("gpu", "cpu"):
            with pytest.raises(ValueError, match=f"model.attention='{implementation}' cannot soft-cap") as e:
                attention.resolve(implementation, jnp.bfloat16, platform, capped=True)
            assert "\n" not in str(e.value) and "'xla'" in str(e.value)
        q, k, v, pos, seg, _ = _rows(0, 16)
        with pytest.raises(ValueError, match=f"model.attention='{implementation}' cannot soft-cap"):
            attention.self_attention(q, k, v, pos, seg, implementation=implementation, softcap=CAP)
