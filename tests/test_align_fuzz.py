"""Seeded fuzz of the align objectives and LoRA against float64 references written here from docs/METHOD.md
("Proxy alignment") and the align modules' docstrings, not from the library.

The reference is its own float64 forward of the Llama decoder (RMSNorm, rotate-half RoPE, grouped-query causal
attention, SwiGLU) in jnp under x64, run on each (prompt + response) sequence right-padded (causal attention: the
padding after a sequence changes none of its positions) and read at the response positions only, counted from
the (prompt, response) token lists, not from the rows' masks. From it: per-sequence log-likelihoods of chosen and
rejected responses (a response cut to the row's L + 1 tokens), the preference term (mean over pairs of
-log sigmoid(beta h), conservative DPO, IPO) with h = (pi_c - ref_c) - (pi_r - ref_r), the NLL term (the chosen
responses' token mean), and jax.grad of the float64 objective, against jax.grad of ours (float32). LoRA: the
reference merges W + (alpha / r) * A @ B per layer itself, with A and B random (B not zero).

Cases: random tiny models (1-3 layers, scanned or unrolled, tied or untied, grouped-query), pairs of different
lengths (responses cut at the row's end, chosen equal to rejected), pair counts the reference pass's batch size
does not divide, beta from 1e-8 to 2, log-ratios of |beta h| ~ 1e3. Pairs are never packed: a chosen and its
rejected response are two padded rows (`align.pairs`), interleaved in the step's batch (`phases.interleave_pairs`).
Also: a round's reference log-probs are the round-start policy's, LoRA trains the adapters only (float32 ones over a
bfloat16 base) and exports the merged policy. The seeded cases here are a fast subset of a longer fuzz run
outside the suite with these same references.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from proxykd_jax.align import lora, objectives, pairs, phases
from proxykd_jax.models.llama import Llama, ModelConfig

# ----------------------------------------------------------------------------- float64 reference


def _rms64(x, scale, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _weights64(flat: dict, adapters: dict | None = None, scale: float = 0.0) -> dict:
    """{dotted path: float64 weight}, with W + scale * A @ B per layer where `adapters` = {path: (A, B)}
    (A [layers, in..., r], B [layers, r, out...])."""
    w = {k: jnp.asarray(v, jnp.float64) for k, v in flat.items()}
    for key, (a, b) in (adapters or {}).items():
        a, b = jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)
        n_layers, rank = a.shape[0], a.shape[-1]
        delta = jnp.matmul(a.reshape(n_layers, -1, rank), b.reshape(n_layers, rank, -1))
        w[key] = w[key] + scale * delta.reshape(w[key].shape)
    return w


def _logits64(w: dict, cfg: ModelConfig, tokens_SxT) -> jax.Array:
    """float64 logits [S, T, V] of right-padded rows (positions from 0, causal attention only)."""
    _, t = tokens_SxT.shape
    e, rep = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    angles = np.arange(t)[:, None] * (1.0 / cfg.rope_theta ** (np.arange(0, e, 2) / e))[None, :]
    cos, sin = jnp.asarray(np.cos(angles))[None, :, None, :], jnp.asarray(np.sin(angles))[None, :, None, :]

    def rope(x):
        x1, x2 = x[..., : e // 2], x[..., e // 2 :]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    causal = np.tril(np.ones((t, t), bool))
    x = w["embedding"][jnp.asarray(tokens_SxT)]
    for i in range(cfg.num_layers):
        h = _rms64(x, w["layers.attn_norm.scale"][i], cfg.rms_eps)
        q = rope(jnp.einsum("std,dhe->sthe", h, w["layers.attn.wq"][i]))
        k = rope(jnp.einsum("std,dge->stge", h, w["layers.attn.wk"][i]))
        v = jnp.einsum("std,dge->stge", h, w["layers.attn.wv"][i])
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)  # query head j reads kv head j // rep
        scores = jnp.einsum("sthe,sche->shtc", q, k) / math.sqrt(e)
        probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        x = x + jnp.einsum("sthe,hed->std", jnp.einsum("shtc,sche->sthe", probs, v), w["layers.attn.wo"][i])
        h = _rms64(x, w["layers.mlp_norm.scale"][i], cfg.rms_eps)
        gate, up = h @ w["layers.mlp.w_gate"][i], h @ w["layers.mlp.w_up"][i]
        x = x + (jax.nn.silu(gate) * up) @ w["layers.mlp.w_down"][i]
    x = _rms64(x, w["final_norm.scale"], cfg.rms_eps)
    return x @ (w["embedding"].T if cfg.tie_embeddings else w["lm_head"])


def _scored(prompt, response, length: int) -> list[int]:
    """prompt + the part of the response a row of `length` positions holds (L + 1 tokens)."""
    return list(prompt) + list(response)[: length + 1 - len(prompt)]


def _sequence_logp64(w, cfg, prompts, responses, length: int):
    """(sum over the response tokens of log p(token | everything before it), per sequence; tokens scored)."""
    seqs = [_scored(p, r, length) for p, r in zip(prompts, responses)]
    t = max(len(s) for s in seqs) - 1
    tokens = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s) - 1] = s[:-1]
    logq = jax.nn.log_softmax(_logits64(w, cfg, tokens), axis=-1)
    rows, cols, ids, owner = [], [], [], []
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        for j in range(len(p), len(s)):  # token j is predicted at position j - 1
            rows.append(i), cols.append(j - 1), ids.append(s[j]), owner.append(i)
    terms = logq[np.asarray(rows), np.asarray(cols), np.asarray(ids)]
    logp = jax.ops.segment_sum(terms, np.asarray(owner), num_segments=len(seqs))
    return logp, np.asarray([len(s) - len(p) for s, p in zip(seqs, prompts)], np.float64)


def _preference64(h, beta, loss_type, eps):
    """Mean over pairs of -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), or of (h - 1 / (2 beta))^2."""
    if loss_type == "ipo":
        return jnp.mean(jnp.square(h - 1.0 / (2.0 * beta)))
    return jnp.mean((1.0 - eps) * jnp.logaddexp(0.0, -beta * h) + eps * jnp.logaddexp(0.0, beta * h))


def _objective64(w, cfg, pair_list, length, ref_c, ref_r, *, beta, nll_weight, loss_type="dpo", eps=0.0):
    """nll_weight * token-mean NLL of the chosen responses + the preference term: (loss, (pi_c, pi_r, n_c)),
    n_c the chosen responses' scored tokens."""
    prompts = [p for p, _, _ in pair_list]
    pc, n_c = _sequence_logp64(w, cfg, prompts, [c for _, c, _ in pair_list], length)
    pr, _ = _sequence_logp64(w, cfg, prompts, [r for _, _, r in pair_list], length)
    h = (pc - ref_c) - (pr - ref_r)
    return nll_weight * -jnp.sum(pc) / np.sum(n_c) + _preference64(h, beta, loss_type, eps), (pc, pr, n_c)


# ----------------------------------------------------------------------------- cases


def _random_config(rng, *, length: int, scan=None, tied=None) -> ModelConfig:
    """A tiny decoder (grouped-query or not, 1-3 layers) with rows of up to `length` tokens."""
    heads, kv_heads = [(4, 2), (2, 2), (4, 1), (3, 3), (6, 2)][int(rng.integers(5))]
    return ModelConfig(
        vocab_size=int(rng.integers(17, 70)),
        d_model=int(rng.choice([8, 12, 16])),
        num_layers=int(rng.integers(1, 4)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(rng.choice([4, 6, 8])),
        d_ff=int(rng.integers(8, 33)),
        rope_theta=float(rng.choice([100.0, 10000.0])),
        tie_embeddings=bool(rng.integers(2)) if tied is None else tied,
        scan_layers=bool(rng.integers(2)) if scan is None else scan,
        max_seq_len=length,
    )


def _random_model(cfg: ModelConfig, rng) -> Llama:
    """A Llama of `cfg` with random weights (std 1 / sqrt(fan-in)) and random norm scales (not the ones they start
    at), drawn by numpy onto an abstract model: no per-shape initialiser to compile."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    flat = []
    for path, var in nnx.to_flat_state(state):
        name, shape = path[-1], var.get_value().shape
        if name == "scale":
            value = rng.uniform(0.5, 1.5, shape)
        elif name == "embedding":
            value = rng.normal(0.0, cfg.d_model**-0.5 if cfg.tie_embeddings else 1.0, shape)
        else:  # stacked [layers, in..., out...] (lora.INPUT_AXES), or the output layer [D, V]
            fan_in = math.prod(shape[1 : 1 + lora.INPUT_AXES[name]]) if name in lora.INPUT_AXES else shape[0]
            value = rng.normal(0.0, fan_in**-0.5, shape)
        flat.append((path, var.replace(value=jnp.asarray(value, var.get_value().dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _flat(module) -> dict:
    """{dotted path: numpy value} of a module's parameters."""
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _random_pairs(rng, n: int, vocab: int, length: int) -> list[tuple]:
    """(prompt, chosen, rejected) token tuples: prompts of 1 to L - 1 tokens, responses of 1 to L + 3 (the long
    ones cut at the row's end), rejected ones equal to the chosen one, sharing a prefix with it, or unrelated."""
    out = []
    for _ in range(n):
        prompt = tuple(int(t) for t in rng.integers(0, vocab, int(rng.integers(1, length))))
        chosen = tuple(int(t) for t in rng.integers(0, vocab, int(rng.integers(1, length + 4))))
        kind = int(rng.integers(4))
        if kind == 0:
            rejected = chosen
        elif kind == 1:
            cut = int(rng.integers(0, len(chosen)))
            rejected = chosen[:cut] + tuple(int(t) for t in rng.integers(0, vocab, int(rng.integers(1, 6))))
        else:
            rejected = tuple(int(t) for t in rng.integers(0, vocab, int(rng.integers(1, length + 4))))
        out.append((prompt, chosen, rejected))
    return out


def _batch(pair_list, length, ref_c, ref_r) -> dict:
    """The train step's batch of `pair_list`: interleaved rows with the reference log-probs."""
    rows = pairs.pair_rows(pair_list, length)
    rows.update(ref_chosen_logp=np.asarray(ref_c, np.float32), ref_rejected_logp=np.asarray(ref_r, np.float32))
    return {k: jnp.asarray(v) for k, v in phases.interleave_pairs(rows).items()}


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("kwargs",))
def _loss_and_grad(graphdef, frozen_graphdef, state, frozen_state, batch, *, kwargs):
    """(loss, metrics), grads of `objectives.dpo_loss_fn` wrt the trainable state (float32, as the train step)."""
    frozen = () if frozen_graphdef is None else (nnx.merge(frozen_graphdef, frozen_state),)
    loss_fn = functools.partial(objectives.dpo_loss_fn, **dict(kwargs))
    return jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s), batch, *frozen), has_aux=True)(state)


def _ours(trainable, frozen, batch, **kwargs):
    """(loss, metrics, {dotted path: grad}) of our objective."""
    graphdef, state = nnx.split(trainable)
    fg, fs = nnx.split(frozen[0]) if frozen else (None, None)
    (loss, metrics), grads = _loss_and_grad(graphdef, fg, state, fs, batch, kwargs=tuple(sorted(kwargs.items())))
    grads = {".".join(map(str, p)): np.asarray(v[...], np.float64) for p, v in nnx.to_flat_state(grads)}
    return float(loss), {k: float(v) for k, v in metrics.items()}, grads


_forward = jax.jit(lambda model, tokens_BxL: model(tokens_BxL))


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _assert_grads_close(got: dict, want: dict, rtol: float, what: str = ""):
    """Each leaf within rtol of the largest entry of the float64 gradient (over all leaves)."""
    assert sorted(got) == sorted(want), what
    top = max(float(np.max(np.abs(v))) for v in want.values())
    for key in want:
        err = float(np.max(np.abs(got[key] - np.asarray(want[key]))))
        assert err <= rtol * top, f"{what} {key}: |grad - float64| = {err:.3g}, largest float64 entry {top:.3g}"


# ----------------------------------------------------------------------------- the objective

OBJECTIVE_CASES = [  # seed, scan_layers, tied, loss_type, label_smoothing, beta, nll_weight, reference spread
    (0, True, False, "dpo", 0.0, 0.1, 1.0, 3.0),
    (1, False, True, "dpo", 0.2, 2.0, 0.3, 600.0),  # |beta h| ~ 1e3
    (2, False, False, "ipo", 0.0, 0.5, 0.0, 3.0),
]


@pytest.mark.parametrize("seed,scan,tied,loss_type,eps,beta,nll_weight,spread", OBJECTIVE_CASES)
def test_objective_and_its_gradient_match_float64(seed, scan, tied, loss_type, eps, beta, nll_weight, spread):
    """Loss, metrics and the gradient wrt every weight of `dpo_loss_fn` (full fine-tuning), and the reference
    pass's sequence log-probs in batches of 3 over 7 pairs, against the float64 reference."""
    rng = np.random.default_rng([21, seed])
    length = 14
    cfg = _random_config(rng, length=length, scan=scan, tied=tied)
    model = _random_model(cfg, rng)
    pair_list = _random_pairs(rng, 7, cfg.vocab_size, length)
    rows = pairs.pair_rows(pair_list, length)
    got_c, got_r = objectives.reference_logprobs(model, (), rows, batch_size=3, chunk=5)
    ref_c = got_c.astype(np.float64) + rng.normal(0.0, spread, 7)  # the round's constants: any numbers will do
    ref_r = got_r.astype(np.float64) + rng.normal(0.0, spread, 7)
    with jax.enable_x64(True):
        kw = dict(beta=beta, nll_weight=nll_weight, loss_type=loss_type, eps=eps)
        (want, (pc, pr, n_c)), grads64 = jax.jit(
            jax.value_and_grad(lambda w: _objective64(w, cfg, pair_list, length, ref_c, ref_r, **kw), has_aux=True)
        )(_weights64(_flat(model)))
        want, pc, pr, n_c, grads64 = float(want), np.asarray(pc), np.asarray(pr), np.asarray(n_c), _numpy(grads64)
        h = (pc - ref_c) - (pr - ref_r)
        preference = float(_preference64(h, beta, loss_type, eps))
    np.testing.assert_allclose(got_c, pc, rtol=0, atol=2e-5 * length)
    np.testing.assert_allclose(got_r, pr, rtol=0, atol=2e-5 * length)
    loss, metrics, grads = _ours(
        model,
        (),
        _batch(pair_list, length, ref_c, ref_r),
        beta=beta,
        nll_weight=nll_weight,
        chunk=5,
        loss_type=loss_type,
        label_smoothing=eps,
    )
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], -pc.sum() / n_c.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["dpo_loss"], preference, rtol=1e-5)
    np.testing.assert_allclose(metrics["dpo/margin"], np.mean(beta * h), rtol=1e-4, atol=1e-6 * max(1, beta * spread))
    assert metrics["dpo/accuracy"] == pytest.approx(np.mean(h > 0))
    assert metrics["response_tokens"] == n_c.sum()
    _assert_grads_close(grads, grads64, 1e-4)


def test_preference_term_at_extreme_margins_and_as_beta_vanishes():
    """The preference term and d/d log pi, float32, against float64: |beta h| up to 1e4 (no overflow, no NaN:
    -log sigmoid(x) -> -x, its slope -> 1), and beta -> 0 (DPO's loss -> log 2, its slope -> -beta / 2)."""
    rng = np.random.default_rng(5)
    for beta in (2.0, 0.1, 1e-3, 1e-8):
        h = np.concatenate([rng.choice([-1.0, 1.0], 8) * 10.0 ** rng.uniform(2, 4, 8) / beta, rng.normal(0, 3, 8)])
        h = h.astype(np.float32).astype(np.float64)  # exact in float32: pi_c = h, the rest 0
        for loss_type, eps in (("dpo", 0.0), ("dpo", 0.25), ("ipo", 0.0)):
            fn = functools.partial(objectives.preference_loss, beta=beta, loss_type=loss_type, label_smoothing=eps)
            zeros = jnp.zeros(h.shape, jnp.float32)
            (loss, _), grad = jax.value_and_grad(lambda x: fn(x, zeros, zeros, zeros), has_aux=True)(  # noqa: B023
                jnp.asarray(h, jnp.float32)
            )
            with jax.enable_x64(True):
                want, want_grad = jax.value_and_grad(lambda x: _preference64(x, beta, loss_type, eps))(  # noqa: B023
                    jnp.asarray(h)
                )
            assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all(), (beta, loss_type)
            np.testing.assert_allclose(float(loss), float(want), rtol=1e-5, err_msg=f"{beta} {loss_type} {eps}")
            top = float(np.max(np.abs(want_grad)))
            np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-6 * top)
    h = rng.normal(0.0, 3.0, 16).astype(np.float32)
    for eps in (0.0, 0.25):  # beta -> 0: log 2 and a slope of -beta (1 - 2 eps) / 2 per pair
        fn = functools.partial(objectives.preference_loss, beta=1e-8, label_smoothing=eps)
        zeros = jnp.zeros(h.shape, jnp.float32)
        (loss, _), grad = jax.value_and_grad(lambda x: fn(x, zeros, zeros, zeros), has_aux=True)(jnp.asarray(h))  # noqa: B023
        assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)  # float32 rounding
        np.testing.assert_allclose(np.asarray(grad), -1e-8 * (1 - 2 * eps) / 2 / h.size, rtol=1e-5)


def test_pairs_with_equal_chosen_and_rejected_have_no_preference_gradient():
    """A pair whose rejected response equals the chosen one (as the rows hold them) has h = 0 however the policy
    moves: with equal reference log-probs its preference term is log 2, and its gradient cancels (to float32
    rounding; the same pairs with other rejected responses have a gradient of order 0.1)."""
    rng = np.random.default_rng(7)
    length = 12
    cfg = _random_config(rng, length=length, scan=False)
    model = _random_model(cfg, rng)
    other = _random_pairs(rng, 5, cfg.vocab_size, length)
    ref = rng.normal(-20.0, 5.0, 5)
    loss, metrics, grads = _ours(
        model, (), _batch([(p, c, c) for p, c, _ in other], length, ref, ref), beta=0.5, nll_weight=0.0, chunk=8
    )
    assert loss == pytest.approx(math.log(2.0), rel=1e-6) and metrics["dpo/margin"] == 0.0
    other = [(p, c, r if r != c else c + (1,)) for p, c, r in other]
    _, _, unequal = _ours(model, (), _batch(other, length, ref, ref), beta=0.5, nll_weight=0.0, chunk=8)
    top = max(float(np.max(np.abs(g))) for g in unequal.values())
    assert top > 0.01
    for key, g in grads.items():
        assert float(np.max(np.abs(g))) < 1e-6 * top, key


# ----------------------------------------------------------------------------- LoRA


def _random_adapters(base, rng, targets, rank: int, alpha: float) -> lora.LoraAdapters:
    """Adapters with random A and B (B not at its zero start)."""
    adapters = lora.LoraAdapters(base, rank=rank, alpha=alpha, targets=targets, rngs=nnx.Rngs(int(rng.integers(99))))
    for factor in (*adapters.a, *adapters.b):
        factor[...] = jnp.asarray(rng.normal(0.0, 0.5, factor[...].shape), factor[...].dtype)
    return adapters


def _adapter_dict(adapters) -> dict:
    return {
        ".".join(p): (np.asarray(a[...]), np.asarray(b[...])) for p, a, b in zip(adapters.paths, adapters.a, adapters.b)
    }


ALL_TARGETS = tuple(sorted(lora.INPUT_AXES))  # every weight name align.lora.targets may hold


def _lora_case(scan: bool):
    """(cfg, base, adapters on every target, pairs, reference log-probs, tokens): one seeded LoRA case."""
    rng = np.random.default_rng(9)  # the same weights scanned or not
    cfg = dataclasses.replace(_random_config(rng, length=12, scan=scan), num_layers=2)
    base = _random_model(cfg, rng)
    adapters = _random_adapters(base, rng, ALL_TARGETS, rank=2, alpha=3.0)
    pair_list = _random_pairs(rng, 5, cfg.vocab_size, 12)
    return cfg, base, adapters, pair_list, rng.normal(-25.0, 5.0, 5), rng.normal(-25.0, 5.0, 5)


LORA_LOSS = dict(beta=0.3, nll_weight=1.0)


@functools.cache
def _lora_reference64():
    """float64 logits of 3 random rows and the DPO objective's gradient wrt A and B ({"a.i" / "b.i": grad}) of
    `_lora_case` (the same numbers scanned or not), by the reference's own merge."""
    cfg, base, adapters, pair_list, ref_c, ref_r = _lora_case(False)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, cfg.max_seq_len))
    keys = [".".join(p) for p in adapters.paths]
    with jax.enable_x64(True):
        ad = jax.tree.map(lambda x: np.asarray(x, np.float64), _adapter_dict(adapters))
        logits = jax.jit(lambda w, a: _logits64(_weights64(w, a, 1.5), cfg, tokens))(_flat(base), ad)
        grads = jax.jit(
            jax.grad(
                lambda a: _objective64(
                    _weights64(_flat(base), a, 1.5), cfg, pair_list, cfg.max_seq_len, ref_c, ref_r, **LORA_LOSS
                )[0]
            )
        )(ad)
    grads = {f"{ab}.{i}": np.asarray(grads[k][j]) for i, k in enumerate(keys) for j, ab in enumerate("ab")}
    return np.asarray(logits), grads


def test_lora_merges_every_target_as_w_plus_scaled_a_b():
    """`lora.merged` adds (alpha / r) * A @ B (contracting the weight's input axes, layer by layer) to each target
    weight (every name align.lora.targets allows) and leaves every other parameter as it is."""
    cfg, base, adapters, *_ = _lora_case(False)
    ad = _adapter_dict(adapters)
    assert sorted(k.split(".")[-1] for k in ad) == sorted(ALL_TARGETS)
    graphdef, state = nnx.split((base, adapters))
    merged = jax.jit(lambda s: nnx.state(lora.merged(*nnx.merge(graphdef, s)), nnx.Param))(state)
    got = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(merged)}
    before = _flat(base)
    assert sorted(got) == sorted(before)
    for name, value in got.items():
        if name not in ad:
            np.testing.assert_array_equal(value, before[name], err_msg=name)
            continue
        a, b = ad[name]
        assert a.shape[0] == b.shape[0] == cfg.num_layers and a.shape[-1] == b.shape[1] == 2
        n_in = lora.INPUT_AXES[name.split(".")[-1]]
        for layer in range(cfg.num_layers):
            delta = np.tensordot(a[layer].astype(np.float64), b[layer].astype(np.float64), axes=([n_in], [0]))
            want = before[name][layer] + 1.5 * delta
            np.testing.assert_allclose(value[layer], want, rtol=1e-6, atol=1e-6, err_msg=f"{name} layer {layer}")


@pytest.mark.parametrize("scan", [True, False])
def test_lora_forward_and_gradients_match_float64(scan):
    """Adapters on every target weight, layers scanned or unrolled: the LoRA forward equals the float64 forward of
    the base with W + (alpha / r) A @ B merged (by the reference itself), and the DPO objective's gradient wrt A
    and B equals the float64 one."""
    cfg, base, adapters, pair_list, ref_c, ref_r = _lora_case(scan)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, cfg.max_seq_len))
    got = np.asarray(_forward(objectives.policy_of(adapters, (base,)), jnp.asarray(tokens)))
    want, grads64 = _lora_reference64()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(want - np.asarray(_forward(base, jnp.asarray(tokens)))).max() > 0.1  # the adapters do something
    _, _, grads = _ours(adapters, (base,), _batch(pair_list, cfg.max_seq_len, ref_c, ref_r), chunk=7, **LORA_LOSS)
    _assert_grads_close(grads, grads64, 1e-4, "lora")


def test_lora_train_step_moves_the_adapters_only_and_exports_the_merged_policy(tmp_path):
    """One train step (SGD) of the DPO objective moves A and B by -lr times its gradient and leaves the frozen base
    as it was; `rounds.export_final`'s Hugging Face folder (the merged weights) reads back to the LoRA forward, and
    its adapters file holds A and B."""
    import ml_collections
    import optax
    from safetensors.numpy import load_file

    from proxykd_jax.align import rounds
    from proxykd_jax.models import hf
    from proxykd_jax.parallel import LOGICAL_RULES, make_mesh
    from proxykd_jax.parallel import sharding as sharding_lib
    from proxykd_jax.train.step import make_train_step

    cfg, base, adapters, pair_list, ref_c, ref_r = _lora_case(False)
    batch = _batch(pair_list, cfg.max_seq_len, ref_c, ref_r)
    _, _, grads = _ours(adapters, (base,), batch, chunk=7, **LORA_LOSS)  # float64-checked above
    mesh = make_mesh(ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": 1, "tensor": 1}}), jax.devices()[:1])
    lr, base_before, adapters_before = 1e-2, _flat(base), _flat(adapters)
    optimizer = optax.sgd(lr)
    graphdef, state, shardings = phases.train_state_from(adapters, optimizer, mesh, LOGICAL_RULES)
    step = make_train_step(
        functools.partial(objectives.dpo_loss_fn, chunk=7, **LORA_LOSS),
        graphdef,
        optimizer,
        state_shardings=shardings,
        batch_shardings=sharding_lib.batch_sharding(mesh, LOGICAL_RULES),
        frozen_shardings=(sharding_lib.shardings_of(base),),
        accum_weight=None,
    )
    state, _ = step(state, batch, base)
    moved = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params)}
    _assert_grads_close({k: (adapters_before[k] - v) / lr for k, v in moved.items()}, grads, 1e-3, "step")
    for name, value in _flat(base).items():
        np.testing.assert_array_equal(value, base_before[name], err_msg=name)

    trained = nnx.merge(graphdef, state.params, state.rest)
    rounds.export_final(trained, (base,), cfg, tmp_path / "final", ALL_TARGETS, mesh)
    _, exported = hf.load_hf(tmp_path / "final", run={"scan_layers": cfg.scan_layers})
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (3, cfg.max_seq_len)))
    np.testing.assert_allclose(
        np.asarray(_forward(exported, tokens)),
        np.asarray(_forward(objectives.policy_of(trained, (base,)), tokens)),
        rtol=0,
        atol=1e-5,
    )
    saved = load_file(str(tmp_path / "lora" / "adapters.safetensors"))
    for i, path in enumerate(trained.paths):
        np.testing.assert_array_equal(saved[".".join(path) + ".lora_a"], moved[f"a.{i}"])
        np.testing.assert_array_equal(saved[".".join(path) + ".lora_b"], moved[f"b.{i}"])


def test_lora_adapters_of_a_bfloat16_base_keep_small_updates():
    """Over a base stored in bfloat16 (model.param_dtype) the adapters are float32: two Adam steps at
    align.dpo_lr = 1e-5 move every entry of A (stored in bfloat16, A's ~0.1-sized entries rounded nearly all of
    them away: 2% moved), and the merged weight is the base's dtype."""
    import optax

    cfg = dataclasses.replace(_random_config(np.random.default_rng(10), length=12), param_dtype="bfloat16")
    base = _random_model(cfg, np.random.default_rng(11))
    adapters = lora.LoraAdapters(base, rank=4, alpha=8.0, targets=("wq", "w_up"), rngs=nnx.Rngs(1))
    merged = _flat(lora.merged(base, adapters))
    assert {merged[".".join(p)].dtype for p in adapters.paths} == {np.dtype(jnp.bfloat16)}
    rows = pairs.pad_rows([(5, 6, 7), (3, 4)], [(8, 9, 10, 11, 2), (1, 2)], 12)
    rows = {k: jnp.asarray(v) for k, v in rows.items()}
    graphdef, state = nnx.split(adapters)
    optimizer = optax.adam(1e-5)

    @jax.jit
    def step(state, opt_state):
        grads = jax.grad(lambda s: objectives.sft_loss_fn(nnx.merge(graphdef, s), rows, base, chunk=8)[0])(state)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state

    before = [np.asarray(f[...], np.float32) for f in adapters.a]
    new_state, opt_state = step(state, optimizer.init(state))
    new_state, _ = step(new_state, opt_state)
    after = nnx.merge(graphdef, new_state)
    for old, new in zip(before, after.a):
        assert np.mean(np.asarray(new[...], np.float32) != old) > 0.99


# ----------------------------------------------------------------------------- the round's reference


def test_round_reference_log_probs_are_the_round_start_policys(tmp_path, monkeypatch):
    """With LoRA: a round's reference log-probs (computed once, when its pairs are made) are the float64 ones of
    the policy at the round's start (base + its adapters, a copy saved in the round's `reference/`), so the
    round's first step sees h = 0 on every pair; they stay the round's constants when the policy moves and the
    round resumes from its saved pairs."""
    from proxykd_jax.align import config as align_config
    from proxykd_jax.align import rounds

    rng = np.random.default_rng(12)
    length = 12
    cfg = _random_config(rng, length=length, scan=True)
    base = _random_model(cfg, rng)
    adapters = _random_adapters(base, rng, ("wq", "wo", "w_down"), rank=2, alpha=4.0)
    examples = [
        pairs.Example(i, i, tuple(int(t) for t in rng.integers(3, cfg.vocab_size, 1 + i % 3)), response)
        for i, response in enumerate([(5, 6, 7, 2), (8, 2), (9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 2), (4, 2), (7, 2)])
    ]
    sampled = [(5, 6, 2), (8, 2), (9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 2), (4, 4, 4, 2), (3,)]
    monkeypatch.setattr(rounds.pairs_lib, "sample_responses", lambda *args, **kwargs: list(sampled))
    acfg = align_config.default_config()
    acfg.update(max_new_tokens=8, eval_batch_size=2, logprob_chunk=5)
    data = rounds.AlignData(warmup=[], align=examples, heldout=[], pad_id=0, stop_tokens=(2,), root=tmp_path)
    phase_dir = tmp_path / "round_000"
    phase_dir.mkdir()
    rows, dropped = rounds._round_pairs(adapters, (base,), data, acfg, phase_dir, 0, 0, length, None)
    kept = [  # the third sample differs from its response past the row's end only
        (e.prompt, e.response, s)
        for e, s in zip(examples, sampled)
        if _scored(e.prompt, s, length) != _scored(e.prompt, e.response, length)
    ]
    assert dropped == 2 and rows["chosen_tokens"].shape[0] == len(kept) == 3  # 3 pairs in batches of 2
    with jax.enable_x64(True):
        zeros = np.zeros(len(kept))
        _, (want_c, want_r, _) = jax.jit(
            lambda w, a: _objective64(_weights64(w, a, 2.0), cfg, kept, length, zeros, zeros, beta=1.0, nll_weight=0.0)
        )(_flat(base), _numpy(_adapter_dict(adapters)))
        want_c, want_r = np.asarray(want_c), np.asarray(want_r)
    np.testing.assert_allclose(rows["ref_chosen_logp"], want_c, rtol=0, atol=2e-4)
    np.testing.assert_allclose(rows["ref_rejected_logp"], want_r, rtol=0, atol=2e-4)
    saved = phases.restore_params(adapters, phase_dir / "reference")
    for key, value in _flat(saved).items():
        np.testing.assert_array_equal(value, _flat(adapters)[key], err_msg=key)
    batch = {k: jnp.asarray(v) for k, v in phases.interleave_pairs(rows).items()}
    _, metrics, _ = _ours(adapters, (base,), batch, beta=0.5, nll_weight=1.0, chunk=5)
    assert abs(metrics["dpo/margin"]) < 1e-5 and metrics["dpo_loss"] == pytest.approx(math.log(2.0), rel=1e-5)
    adapters.b[0][...] = adapters.b[0][...] + 0.5  # the policy moves; the round's constants do not
    again, _ = rounds._round_pairs(adapters, (base,), data, acfg, phase_dir, 0, 0, length, None)
    np.testing.assert_array_equal(again["ref_chosen_logp"], rows["ref_chosen_logp"])
    _, moved, _ = _ours(adapters, (base,), batch, beta=0.5, nll_weight=1.0, chunk=5)
    assert abs(moved["dpo/margin"]) > 1e-3
