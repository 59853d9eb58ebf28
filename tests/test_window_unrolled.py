"""An unrolled mixed model (`scan_layers=False`; Gemma-3-like sliding and full layers) and a model whose layers all
slide give each layer its window as a Python int (`llama.run_layers`), so the blocked kernel picks the band or the
causal kernel at trace time instead of through a `lax.cond` per layer (`blocked_attention.self_attend`): the band
equals the cond's bit for bit, the unrolled model equals the scanned one (which keeps the cond)
and a float64 dense reference in value and gradients, and its jaxpr holds no cond."""

import dataclasses
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_attention_window import _FULL, _rows, _run

from proxykd_jax.models import attention
from proxykd_jax.models.llama import Llama, ModelConfig

LENGTH, WINDOW = 512, 50  # the band applies (`band_plan`: blocks of 64, one behind), W not a multiple of the block
MIXED = ("sliding_attention", "full_attention", "sliding_attention")


def _config(**kw) -> ModelConfig:
    """A 3-layer Gemma-3-shaped model (grouped-query attention, per-layer RoPE, sandwich norms) on the blocked kernel."""
    base = dict(
        vocab_size=61, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=48,
        max_seq_len=LENGTH, norm_plus_one=True, embed_scale=True, activation="gelu_tanh", sandwich_norms=True,
        qk_norm=True, query_pre_attn_scalar=20, rope_theta=3e4, rope_local_theta=50.0, layer_types=MIXED,
        sliding_window=WINDOW, tie_embeddings=True, attention="blocked",
    )  # fmt: skip
    return ModelConfig(**{**base, **kw})


@dataclasses.dataclass(frozen=True)
class _Float64Config(ModelConfig):
    """The reference's config: computes and stores in float64, which `ModelConfig` refuses (the checks run on
    float32; `dataclasses.replace` inside the model keeps the class)."""

    def __post_init__(self):
        object.__setattr__(self, "dtype", "float32")
        object.__setattr__(self, "param_dtype", "float32")
        super().__post_init__()
        object.__setattr__(self, "dtype", "float64")
        object.__setattr__(self, "param_dtype", "float64")


def _random_params(cfg: ModelConfig, seed: int):
    """Every parameter random (norm scales around 0, as Gemma's 1 + w norms are trained)."""
    params = nnx.state(Llama(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _batch(seed: int):
    """Two rows: two segments longer than the window and a padding tail; leading padding and one segment."""
    rng = np.random.default_rng(seed)
    seg = np.ones((2, LENGTH), np.int32)
    seg[0, 200:460], seg[0, 460:], seg[1, :30] = 2, 0, 0
    tokens = rng.integers(0, 61, seg.shape)
    return jnp.asarray(tokens), jnp.asarray(seg), rng.normal(size=(2, LENGTH, 32))


def _loss(cfg: ModelConfig, params, tokens, seg, cot):
    """Final hidden states weighted by the random cotangent `cot`, and those states."""
    hidden = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))), params).hidden(
        tokens, None, seg
    )
    return jnp.sum(hidden * cot), hidden


def _value_and_grads(cfg, params, tokens, seg, cot):
    (_, hidden), grads = jax.jit(jax.value_and_grad(lambda p: _loss(cfg, p, tokens, seg, cot), has_aux=True))(params)
    return np.asarray(hidden), [np.asarray(g) for g in jax.tree.leaves(grads)]


def _count_conds(jaxpr) -> int:
    """`cond` primitives in a jaxpr and the jaxprs inside it (scan bodies, remat, custom VJPs)."""
    return sum(
        (eqn.primitive.name == "cond") + sum(_count_conds(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        for eqn in jaxpr.eqns
    )


def _jaxpr(cfg: ModelConfig, grad: bool = True):
    """The jaxpr of the loss's gradient (or of the loss)."""
    params = nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    tokens, seg, cot = _batch(0)
    loss = lambda p: _loss(cfg, p, tokens, seg, cot)[0]  # noqa: E731
    return jax.make_jaxpr(jax.grad(loss) if grad else loss)(params).jaxpr


@pytest.mark.parametrize("window", [WINDOW, 30, _FULL])
def test_a_static_window_with_its_bound_is_the_conds_branch(window):
    """A sliding layer's window and a smaller one: with `window_bound` a Python int takes the band the traced
    window's `lax.cond` takes, the same values and q/k/v gradients to the bit. A full layer's (int32 max) takes the
    causal kernel that saves its probabilities, where the cond takes its log-sum-exp form: equal to float32
    rounding."""
    assert attention.band_plan(LENGTH, WINDOW) is not None
    q, k, v, pos, seg, cot = _rows(window % 97, LENGTH)
    (out_s, grads_s), (out_t, grads_t) = (
        _run(q, k, v, pos, seg, cot, window, bound=WINDOW, traced=traced) for traced in (False, True)
    )
    same = np.testing.assert_array_equal
    if window == _FULL:
        same = lambda a, b, err_msg="": np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=err_msg)  # noqa: E731
    same(np.asarray(out_s), np.asarray(out_t))
    for name, a, b in zip("qkv", grads_s, grads_t):
        same(np.asarray(a), np.asarray(b), err_msg=name)


def test_unrolled_mixed_model_equals_scanned_and_float64_dense_reference():
    """The unrolled model (static windows) and the scanned one (traced windows, the cond) on the same random
    parameters and packed rows: equal hidden states and parameter gradients, and both equal the float64 model on
    the dense `xla` path."""
    cfg = _config(scan_layers=True)
    params = _random_params(cfg, seed=3)
    tokens, seg, cot = _batch(4)
    cot32 = jnp.asarray(cot, jnp.float32)
    scanned = _value_and_grads(cfg, params, tokens, seg, cot32)
    unrolled = _value_and_grads(dataclasses.replace(cfg, scan_layers=False), params, tokens, seg, cot32)
    with jax.enable_x64(True):
        ref_cfg = _Float64Config(**{**dataclasses.asdict(cfg), "attention": "xla", "scan_layers": False})
        params64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), params)
        reference = _value_and_grads(ref_cfg, params64, tokens, seg, jnp.asarray(cot, jnp.float64))
    assert reference[0].dtype == reference[1][0].dtype == np.float64 and np.abs(reference[0]).max() > 0.5
    np.testing.assert_allclose(unrolled[0], scanned[0], rtol=1e-5, atol=3e-5)  # measured: 3e-6 apart (max |h| 4.4)
    np.testing.assert_allclose(unrolled[0], reference[0], rtol=1e-5, atol=3e-5)
    for i, (u, s, r) in enumerate(zip(unrolled[1], scanned[1], reference[1])):
        assert np.abs(r).max() > 1e-2, i  # every parameter's gradient is exercised
        np.testing.assert_allclose(u, s, rtol=1e-4, atol=2e-5 * np.abs(r).max(), err_msg=str(i))  # measured 1.5e-6
        np.testing.assert_allclose(u, r, rtol=1e-4, atol=2e-5 * np.abs(r).max(), err_msg=str(i))


@pytest.mark.parametrize(
    "layer_types,scan,remat,conds",
    [
        (MIXED, False, "none", 0),  # unrolled: each layer's window static (the old code: one cond per layer, x2)
        (MIXED, False, "full", 0),  # the same under jax.checkpoint (the flag a static argument)
        (("sliding_attention",) * 3, True, "none", 0),  # scanned, every layer slides: one static window
        (MIXED, True, "none", 2),  # scanned mixed: the traced window's cond, forward and backward
    ],
)
def test_static_windows_leave_no_cond(layer_types, scan, remat, conds):
    """The gradient's jaxpr holds the window switch's `lax.cond` only where one scanned body serves both layer
    kinds; the unrolled mixed model still runs the band on its sliding layers and the causal kernel on its full one."""
    cfg = _config(layer_types=layer_types, scan_layers=scan, remat=remat)
    assert _count_conds(_jaxpr(cfg)) == conds
    kernels = set(re.findall(r"name=(_\w+_core)\b", str(_jaxpr(cfg, grad=False))))
    expected = (
        {"_band_core", "_causal_lse_core" if scan else "_causal_core"} if layer_types == MIXED else {"_band_core"}
    )
    assert kernels == expected
