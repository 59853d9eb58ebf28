"""models/attention.py: the blocked, XLA and Pallas splash paths agree with a float64 dense reference
(values and q/k/v gradients) on packed, padded grouped-query batches, and so do blocked, XLA and cuDNN masked
(on a GPU) under a sliding window, a traced one too; `auto` picks per platform. The splash kernel runs in Pallas'
interpreter here; its TPU lowering is checked in test_model_scan.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd_jax.models import attention
from proxykd_jax.models.llama import positions_from_segments


def _packed_batch(seed, b=3, length=64, h=4, g=2, e=8):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, length, h, e))
    k = jax.random.normal(keys[1], (b, length, g, e))
    v = jax.random.normal(keys[2], (b, length, g, e))
    seg = np.ones((b, length), np.int32)
    seg[1, length // 3 :] = 2  # two packed documents
    seg[2, : length // 4], seg[2, length // 4 : length - 7], seg[2, length - 7 :] = 1, 3, 0  # packed + padding
    seg = jnp.asarray(seg)
    cot = jax.random.normal(keys[3], q.shape)
    return q, k, v, positions_from_segments(seg), seg, cot


def _dense_reference(q, k, v, pos, seg, window=None, softcap=None):
    """Plain masked softmax attention (repeated k/v heads), zero on padding queries; with `window` a query sees
    only the keys less than `window` positions before its own (transformers' `sliding_window_overlay`); with
    `softcap` the scores s are softcap * tanh(s / softcap) before the mask (transformers' eager Gemma 2)."""
    r = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    s = jnp.einsum("blhe,bmhe->bhlm", q, k) / jnp.sqrt(q.shape[-1])
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    mask = attention.visible_mask(pos, seg)[:, None]
    if window is not None:
        mask = mask & (pos[:, None, :, None] - pos[:, None, None, :] < window)
    s = jnp.where(mask, s, -jnp.inf)
    s = jnp.where(jnp.any(mask, -1, keepdims=True), s, 0.0)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bhlm,bmhe->blhe", p, v)
    return jnp.where((seg != 0)[:, :, None, None], out, 0.0)


def _value_and_grads(implementation, q, k, v, pos, seg, cot, window=None):
    """`self_attention`'s output and q/k/v cotangents, as one compiled program (op-by-op dispatch of the
    custom VJP is slow); a `window` is passed traced (as a scanned layer's is)."""

    def run(q, k, v, cot, *window):
        def f(*a):
            return attention.self_attention(
                *a, pos, seg, implementation=implementation, window=window[0] if window else None
            )

        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(cot)

    return jax.jit(run)(q, k, v, cot, *([] if window is None else [jnp.int32(window)]))


@pytest.mark.parametrize("implementation", ["blocked", "xla", "pallas"])
@pytest.mark.parametrize("length", [64, 256])
def test_paths_match_float64_reference_in_value_and_grads(implementation, length):
    q, k, v, pos, seg, cot = _packed_batch(length, length=length)
    out, grads = _value_and_grads(implementation, q, k, v, pos, seg, cot)
    with jax.enable_x64(True):
        q64, k64, v64, cot64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, cot))
        ref, ref_vjp = jax.vjp(lambda *a: _dense_reference(*a, pos, seg), q64, k64, v64)
        ref_grads = [np.asarray(g) for g in ref_vjp(cot64)]
        ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0)  # padding queries are zero on every path
    for name, got, want in zip("qkv", grads, ref_grads):
        assert np.abs(want).max() > 0.1, name
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5, err_msg=name)


WINDOWED_PATHS = ["blocked", "xla", "cudnn_masked"]


@pytest.mark.parametrize("implementation", WINDOWED_PATHS)
@pytest.mark.parametrize("window", [2, 8])
def test_windowed_paths_match_float64_reference_in_value_and_grads(implementation, window):
    """A sliding window (a query sees the keys less than `window` positions back, per packed segment) on rows and
    segments longer than it, passed as a traced value; a traced window wider than any row is no window at all."""
    if implementation == "cudnn_masked" and jax.default_backend() != "gpu":
        pytest.skip("cuDNN runs on a GPU only")
    q, k, v, pos, seg, cot = _packed_batch(window + 11, length=128)
    dtype = jnp.bfloat16 if implementation == "cudnn_masked" else jnp.float32
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    q, k, v, cot = (x.astype(dtype) for x in (q, k, v, cot))
    out, grads = _value_and_grads(implementation, q, k, v, pos, seg, cot, window)
    with jax.enable_x64(True):
        q64, k64, v64, cot64 = (jnp.asarray(np.asarray(x, np.float32), jnp.float64) for x in (q, k, v, cot))
        ref, ref_vjp = jax.vjp(lambda *a: _dense_reference(*a, pos, seg, window), q64, k64, v64)
        ref_grads = [np.asarray(g) for g in ref_vjp(cot64)]
        ref, full = np.asarray(ref), np.asarray(_dense_reference(q64, k64, v64, pos, seg))
    assert np.abs(full - ref).max() > 0.1  # the window changes the answer on these rows
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, **tol)
    assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert np.abs(want).max() > 0.1, name
        np.testing.assert_allclose(np.asarray(got, np.float32), want, err_msg=name, **{**tol, "atol": 10 * tol["atol"]})
    if implementation != "cudnn_masked":
        wide, _ = _value_and_grads(implementation, q, k, v, pos, seg, cot, np.iinfo(np.int32).max)
        plain, _ = _value_and_grads(implementation, q, k, v, pos, seg, cot)
        np.testing.assert_allclose(np.asarray(wide), np.asarray(plain), rtol=1e-6, atol=1e-6)


def test_the_cache_path_applies_the_window():
    """`attend` (decoding over cache slots) with a window equals the windowed reference on packed rows."""
    q, k, v, pos, seg, _ = _packed_batch(3, length=48)
    real = np.asarray(seg) != 0  # (padding queries: `attend` leaves them to its caller)
    got = np.asarray(attention.attend(q, k, v, pos, pos, seg, seg, window=jnp.int32(5)))
    want, full = (np.asarray(_dense_reference(q, k, v, pos, seg, w)) for w in (5, None))
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert np.abs(got - full)[real].max() > 0.1


def test_blocked_and_xla_agree_in_bf16():
    q, k, v, pos, seg, _ = _packed_batch(5, length=128)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    a = attention.self_attention(q, k, v, pos, seg, implementation="blocked")
    b = attention.self_attention(q, k, v, pos, seg, implementation="xla")
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=3e-2)


def test_auto_resolution_and_errors():
    assert attention.resolve("auto", jnp.float32, "cpu") == "blocked"
    assert attention.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert attention.resolve("auto", jnp.float32, "gpu") == "xla"
    assert attention.resolve("auto", jnp.bfloat16, "tpu") == "pallas"
    assert attention.resolve("xla", jnp.float32, "cpu") == "xla"
    with pytest.raises(ValueError, match="model.attention must be one of"):
        attention.resolve("flash", jnp.float32)
    # a sliding window: the paths that take a traced one
    assert attention.resolve("auto", jnp.float32, "cpu", windowed=True) == "blocked"
    assert attention.resolve("auto", jnp.bfloat16, "gpu", windowed=True) == "cudnn_masked"
    assert attention.resolve("auto", jnp.float32, "gpu", windowed=True) == "xla"
    assert attention.resolve("auto", jnp.bfloat16, "tpu", windowed=True) == "xla"
    for implementation in ("cudnn", "pallas"):
        with pytest.raises(ValueError, match=f"model.attention='{implementation}' cannot apply a sliding") as e:
            attention.resolve(implementation, jnp.bfloat16, "gpu", windowed=True)
        assert "\n" not in str(e.value)


def _runs_reference(seg_row):
    """(lengths, starts) of one row's sequences in cuDNN's packed layout, in order: the runs of equal
    ids, a run of padding (0) joined to the run before it (one at the row's start is its own)."""
    starts = [i for i in range(len(seg_row)) if i == 0 or (seg_row[i] != seg_row[i - 1] and seg_row[i] != 0)]
    ends = starts[1:] + [len(seg_row)]
    return [e - s for s, e in zip(starts, ends)], starts


def _random_packed_rows(rng, b, length, max_docs):
    """Rows of 1..max_docs contiguous documents, some with a padding tail, some with leading padding."""
    seg = np.zeros((b, length), np.int32)
    for row in range(b):
        n_docs = rng.integers(1, max_docs + 1)
        cuts = np.sort(rng.choice(np.arange(1, length), n_docs, replace=False))
        first = cuts[0] if row % 4 == 3 else 0  # leading padding on every fourth row
        bounds = [first, *cuts[1:-1], cuts[-1] if rng.random() < 0.7 else length]
        for d in range(len(bounds) - 1):
            seg[row, bounds[d] : bounds[d + 1]] = d + 1
        # positions from bounds[-1] on stay 0: a padding tail (empty when bounds[-1] == length)
    return seg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_layout_matches_the_runs_of_each_row(seed):
    """cuDNN's packed description (lengths, offsets, -1 in unused slots) of random packed rows with
    padding; a padding tail takes no slot of its own (a row of `slots` documents and padding fits);
    a row with more sequences than slots is reported as not fitting."""
    rng = np.random.default_rng(seed)
    b, length, slots = 8, 96, 6
    seg = _random_packed_rows(rng, b, length, 9)  # up to 8 documents: some rows overflow 6 slots
    seg[0] = 0
    seg[0, : slots * 10] = np.repeat(np.arange(1, slots + 1), 10)  # exactly `slots` documents + padding
    seqlen, offsets, fits = (np.asarray(x) for x in attention.packed_layout(jnp.asarray(seg), slots))
    assert seqlen.shape == (b, slots) and offsets.shape == (b, slots + 1)
    assert fits[0] and list(seqlen[0]) == [10] * (slots - 1) + [length - 10 * (slots - 1)]
    for row in range(b):
        lengths, starts = _runs_reference(list(seg[row]))
        assert bool(fits[row]) == (len(lengths) <= slots)
        if len(lengths) <= slots:
            assert list(seqlen[row]) == lengths + [-1] * (slots - len(lengths))
            assert list(offsets[row]) == starts + [-1] * (slots + 1 - len(starts))
            assert sum(lengths) == length


def _packed_sequences_attention(q, k, v, seg, slots):
    """What cuDNN's packed layout computes, from `packed_layout` alone: causal attention within each
    sequence [offset, offset + length) of a row; tokens in no sequence get zeros (cuDNN writes nothing
    there), then padding queries are zeroed as `self_attention` does."""
    seqlen, offsets, fits = attention.packed_layout(seg, slots)
    assert bool(jnp.all(fits))
    idx = jnp.arange(seg.shape[1])
    in_seq = (idx[None, None] >= offsets[:, :-1, None]) & (idx[None, None] < offsets[:, :-1, None] + seqlen[..., None])
    seq_of = jnp.where(jnp.any(in_seq, 1), jnp.argmax(in_seq, 1), -1)  # [B, L]: the token's sequence
    mask = (seq_of[:, :, None] == seq_of[:, None, :]) & (seq_of[:, :, None] >= 0) & (idx[None, None] <= idx[:, None])
    r = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    s = jnp.einsum("blhe,bmhe->bhlm", q, k) / jnp.sqrt(q.shape[-1])
    s = jnp.where(mask[:, None], s, -jnp.inf)
    s = jnp.where(jnp.any(mask[:, None], -1, keepdims=True), s, 0.0)
    out = jnp.einsum("bhlm,bmhe->blhe", jax.nn.softmax(s, axis=-1), v)
    out = jnp.where((seq_of >= 0)[:, :, None, None], out, 0.0)
    return jnp.where((seg != 0)[:, :, None, None], out, 0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_layout_sequences_give_the_masked_attention(seed):
    """Attention within `packed_layout`'s sequences (padding joined to the document before it) equals
    the segment-masked reference in value and q/k/v gradients, in float64, on random packed rows with
    padding tails, leading padding and GQA: joining the padding changes nothing a real token sees."""
    rng = np.random.default_rng(seed)
    b, length, slots = 8, 48, 8
    seg = jnp.asarray(_random_packed_rows(rng, b, length, 8))
    assert int(jnp.sum(seg == 0)) > 0
    pos = positions_from_segments(seg)
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(seed), 4)
        q = jax.random.normal(keys[0], (b, length, 4, 8), jnp.float64)
        k = jax.random.normal(keys[1], (b, length, 2, 8), jnp.float64)
        v = jax.random.normal(keys[2], (b, length, 2, 8), jnp.float64)
        cot = jax.random.normal(keys[3], q.shape, jnp.float64)
        got, got_vjp = jax.vjp(lambda *a: _packed_sequences_attention(*a, seg, slots), q, k, v)
        want, want_vjp = jax.vjp(lambda *a: _dense_reference(*a, pos, seg), q, k, v)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)
        for name, g, w in zip("qkv", got_vjp(cot), want_vjp(cot)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("implementation", ["blocked", "xla", "pallas"])
def test_an_id_that_comes_back_is_a_segment_of_its_own(implementation):
    """A row repeating a segment id after another one (or after padding) attends as cuDNN's packed
    layout reads it: each run is its own document. Every path agrees with attention within the runs
    (the emulated packed layout, float64), in value and q/k/v gradients; the raw ids' mask differs."""
    length = 64
    q, k, v, _, _, cot = _packed_batch(7, length=length)
    seg = np.ones((3, length), np.int32)
    seg[0, 20:40] = 2  # 1, 2, 1
    seg[1, 10:30], seg[1, 30:36] = 2, 0  # 1, 2, padding, 1
    seg[2, 30:] = 1  # one run (unchanged)
    seg = jnp.asarray(seg)
    pos = positions_from_segments(seg)
    runs = attention.contiguous_segments(seg)
    assert np.asarray(runs)[:, -1].tolist() == [3, 3, 1]

    out, grads = _value_and_grads(implementation, q, k, v, pos, seg, cot)
    with jax.enable_x64(True):
        q64, k64, v64, cot64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, cot))
        want, want_vjp = jax.vjp(lambda *a: _packed_sequences_attention(*a, seg, 8), q64, k64, v64)
        raw = np.asarray(_dense_reference(q64, k64, v64, pos, seg))
        assert np.abs(raw - np.asarray(want)).max() > 0.1  # the raw ids' mask lets run 3 see run 1
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
        for name, got, w in zip("qkv", grads, want_vjp(cot64)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=name)
