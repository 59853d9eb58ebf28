"""Llama forward against a float64 numpy reference, packing, tying, dtypes, axis names."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from proxykd_jax.models import llama
from proxykd_jax.models.llama import Llama, ModelConfig

AXES = {"embed", "vocab", "mlp", "heads", "kv_heads", "head_dim", "layers"}


def small_cfg(**kw):
    base = dict(
        vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48, rope_theta=500.0
    )
    base.update(kw)
    return ModelConfig(**base)


def randomize(model, seed):
    """Replaces every parameter (norm scales and biases included) by fresh random values."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        (0.3 * jax.random.normal(k, x.shape) + (1.0 if x.ndim == 1 else 0.0)).astype(x.dtype)
        for k, x in zip(keys, leaves)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


@nnx.jit
def _forward(model, tokens_BxL, segment_ids_BxL=None):
    """Logits as one compiled program (found in the persistent cache on later runs): op by op, each forward of the
    tiny model costs seconds of dispatch, a compile per op and shape."""
    return model(tokens_BxL, segment_ids_BxL=segment_ids_BxL)


def np_params(model):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def ref_forward(p, cfg, tokens, positions):
    """Plain float64 numpy Llama math for one unpacked row [L]."""

    def rms(x, s):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_eps) * s

    inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    if cfg.rope_scaling is not None:  # Llama-3 rule written out per frequency
        _, f, lo, hi, orig = cfg.rope_scaling
        out = []
        for w in inv:
            wl = 2 * math.pi / w
            if wl < orig / hi:
                out.append(w)
            elif wl > orig / lo:
                out.append(w / f)
            else:
                s = (orig / wl - lo) / (hi - lo)
                out.append((1 - s) * w / f + s * w)
        inv = np.array(out)
    ang = positions[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # x [L, N, E]
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    L = len(tokens)
    x = p["embedding"][tokens]
    rep = cfg.num_heads // cfg.num_kv_heads
    for i in range(cfg.num_layers):  # stacked parameters [layers, ...]: layer i is index i
        lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
        a = lp["attn"]
        h = rms(x, lp["attn_norm"]["scale"])
        q = np.einsum("ld,dhe->lhe", h, a["wq"])
        k = np.einsum("ld,dge->lge", h, a["wk"])
        v = np.einsum("ld,dge->lge", h, a["wv"])
        if cfg.qkv_bias:
            q, k, v = q + a["bq"], k + a["bk"], v + a["bv"]
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("lhe,mhe->hlm", q, k) / math.sqrt(cfg.head_dim)
        s = np.where(np.tril(np.ones((L, L), bool))[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        o = np.einsum("hlm,mhe->lhe", s, v)
        x = x + np.einsum("lhe,hed->ld", o, a["wo"])
        m = lp["mlp"]
        h = rms(x, lp["mlp_norm"]["scale"])
        g = h @ m["w_gate"]
        x = x + ((g / (1 + np.exp(-g))) * (h @ m["w_up"])) @ m["w_down"]
    x = rms(x, p["final_norm"]["scale"])
    w = p["embedding"].T if cfg.tie_embeddings else p["lm_head"]
    return x @ w


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(qkv_bias=True),
        dict(rope_scaling=("llama3", 8.0, 1.0, 4.0, 32), rope_theta=10000.0),
        dict(tie_embeddings=True, num_kv_heads=1),
    ],
)
def test_forward_matches_float64_reference(kw):
    cfg = small_cfg(**kw)
    model = randomize(Llama(cfg, rngs=nnx.Rngs(1)), seed=7)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 20))
    logits = np.asarray(_forward(model, jnp.asarray(tokens)))
    p = np_params(model)
    for b in range(2):
        ref = ref_forward(p, cfg, tokens[b], np.arange(20, dtype=np.float64))
        np.testing.assert_allclose(logits[b], ref, rtol=2e-4, atol=2e-4)
        assert np.std(ref) > 0.5  # logits are far from constant: the comparison has teeth


def test_llama3_rope_scaling_changes_frequencies():
    plain = llama.rope_inv_freq(small_cfg(rope_theta=10000.0, head_dim=32))
    scaled = llama.rope_inv_freq(small_cfg(rope_theta=10000.0, head_dim=32, rope_scaling=("llama3", 8.0, 1.0, 4.0, 64)))
    assert scaled[0] == plain[0]  # highest frequency untouched
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0)  # lowest frequency divided by the factor
    assert np.any((scaled < plain) & (scaled > plain / 8.0))  # smoothed band in between


def test_packed_equals_separate():
    cfg = small_cfg()
    model = randomize(Llama(cfg, rngs=nnx.Rngs(2)), seed=9)
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 9)
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 7 + [2] * 9 + [0, 0]])
    logits = np.asarray(_forward(model, jnp.asarray(packed), jnp.asarray(seg)))
    alone_a = np.asarray(_forward(model, jnp.asarray(a[None])))[0]
    alone_b = np.asarray(_forward(model, jnp.asarray(b[None])))[0]
    np.testing.assert_allclose(logits[0, :7], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, 7:16], alone_b, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(logits))
    # explicit positions equal the ones derived from segment ids
    pos = np.concatenate([np.arange(7), np.arange(9), [0, 1]])[None]
    np.testing.assert_array_equal(np.asarray(llama.positions_from_segments(jnp.asarray(seg))), pos)


def test_tied_embeddings_share_weight():
    cfg = small_cfg(tie_embeddings=True)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    assert not hasattr(model, "lm_head")
    np.testing.assert_array_equal(np.asarray(model.unembedding()), np.asarray(model.embedding[...]).T)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == cfg.num_params()
    assert small_cfg().num_params() - cfg.num_params() == cfg.d_model * cfg.vocab_size


def test_bf16_compute_runs_close_to_float32():
    cfg32 = small_cfg()
    cfg16 = small_cfg(dtype="bfloat16")
    m32 = Llama(cfg32, rngs=nnx.Rngs(5))
    m16 = Llama(cfg16, rngs=nnx.Rngs(5))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg32.vocab_size, (2, 16)))
    l32, l16 = _forward(m32, tokens), _forward(m16, tokens)
    assert l16.dtype == jnp.float32 and jax.eval_shape(m16.hidden, tokens).dtype == jnp.bfloat16
    assert m16.unembedding().dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(l32 - l16))) < 0.15 * float(jnp.max(jnp.abs(l32)))
    m_p16 = Llama(small_cfg(param_dtype="bfloat16", dtype="bfloat16"), rngs=nnx.Rngs(5))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(m_p16, nnx.Param)))
    assert bool(jnp.all(jnp.isfinite(_forward(m_p16, tokens))))


def test_every_param_has_logical_axes():
    model = Llama(small_cfg(qkv_bias=True), rngs=nnx.Rngs(0))
    count = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var[...].ndim, path
        assert set(axes) <= AXES, (path, axes)
        assert (path[0] == "layers") == (axes[0] == "layers")  # every block parameter is stacked
        count += 1
    assert count == 1 + (2 + 4 + 3 + 3) + 1 + 1


def test_config_round_trip_and_errors():
    cfg = small_cfg(rope_scaling=("llama3", 8.0, 1.0, 4.0, 8192))
    cd = cfg.to_config()
    assert ModelConfig.from_config(cd) == cfg
    assert set(cd.keys()) == set(llama.default_config().keys())
    with pytest.raises(ValueError, match="num_kv_heads"):
        small_cfg(num_kv_heads=3)
    with pytest.raises(ValueError, match="Unknown model config"):
        ModelConfig.from_config(dict(cd.items(), bogus=1))


def test_flops_per_token_convention():
    cfg = small_cfg()
    mm = cfg.num_layers * (32 * 4 * 8 * 2 + 2 * 32 * 2 * 8 + 3 * 32 * 48) + 32 * 61
    fwd = llama.flops_per_token(cfg, 16, backward=False)
    assert fwd == 2 * mm + 2 * cfg.num_layers * 4 * 8 * 16
    assert llama.flops_per_token(cfg, 16) == 3 * fwd


@pytest.mark.parametrize("length,num_blocks", [(256, None), (96, 3), (40, 1)])
def test_self_attend_matches_dense_attention(length, num_blocks):
    """Block-causal self-attention (custom VJP) against the dense masked `attend` it replaces in
    training: values and q/k/v gradients on packed rows with padding and grouped-query heads."""
    b, h, g, e = 3, 4, 2, 8
    keys = jax.random.split(jax.random.key(length), 4)
    q = jax.random.normal(keys[0], (b, length, h, e))
    k = jax.random.normal(keys[1], (b, length, g, e))
    v = jax.random.normal(keys[2], (b, length, g, e))
    seg = np.ones((b, length), np.int32)
    seg[1, length // 3 :] = 2
    seg[2, length // 2 : length - 5], seg[2, length - 5 :] = 2, 0
    seg = jnp.asarray(seg)
    pos = llama.positions_from_segments(seg)
    real = np.asarray(seg) != 0
    cotangent = jax.random.normal(keys[3], q.shape) * jnp.asarray(real)[:, :, None, None]  # padding rows unused

    @jax.jit  # one compiled program (op-by-op dispatch of the custom VJP costs tens of seconds)
    def both(q, k, v, cotangent):
        blocked, blocked_vjp = jax.vjp(lambda *a: llama.self_attend(*a, pos, seg, num_blocks), q, k, v)
        dense, dense_vjp = jax.vjp(lambda *a: llama.attend(*a, pos, pos, seg, seg), q, k, v)
        return blocked, dense, blocked_vjp(cotangent), dense_vjp(cotangent)

    blocked, dense, blocked_grads, dense_grads = both(q, k, v, cotangent)
    np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(dense)[real], rtol=1e-5, atol=1e-5)
    for got, want in zip(blocked_grads, dense_grads):
        assert float(jnp.abs(want).max()) > 0.1
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if num_blocks is None:
        assert llama.causal_blocks(length) == 4  # the default path really is blocked at this length


def test_self_attend_rejects_blocks_that_do_not_divide_the_length():
    x = jnp.ones((1, 10, 2, 4))
    ones = jnp.ones((1, 10), jnp.int32)
    with pytest.raises(ValueError, match="3 query blocks do not divide the sequence length 10"):
        llama.self_attend(x, x, x, ones, ones, 3)
