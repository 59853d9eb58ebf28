"""Batched autoregressive sampling with a KV cache, jitted once per shape and static settings.

Prompts arrive left-aligned in `prompt_tokens_BxP` with `prompt_lengths_B` real tokens each (the
rest is padding, whatever ids it holds). The whole padded prompt is prefilled in one `Llama.decode` call with
padding slots given segment 0 (invisible) and id 0 (`_padding_as_zero`); every generated token of row b then
sits at position `prompt_lengths_B[b] + t` and cache slot `P + t`, so rows of different lengths decode together
and each gets exactly what it would get alone.

Stop tokens: a row stops after emitting one; the stop token is kept in `tokens_BxT` and counted in
`lengths_B`; later columns hold `pad_id` (log-probs 0). A row also stops at its own limit
(`limits_B`, a traced array: rows of one compiled shape may each end at another length). The loop
ends early once every row stopped.

On a mesh (the model's parameters laid out by `NamedSharding`s) the KV cache is sharded as the
logical axes say: rows over the `batch` mesh axes, key/value heads over the `kv_heads` axes
(`cache_shardings`); a dimension that does not split evenly over its axes stays whole.

Longrope (Phi-3's `rope_scaling`): a row rotates with the short factors while its positions stay below
original_max and with the long ones once it reaches past it. At the step whose fed token sits at position
original_max, that row alone is re-prefilled (`_recross`: its prompt and tokens so far rerun into a fresh cache row,
the next token's logits taken from that run), as transformers' Phi-3 `generate()` recomputes its cache there; the
code exists only where a row can cross (static: longrope and P + max_new_tokens > original_max).

Log-probs are those of the model's own distribution (log-softmax of the raw logits, i.e. at
temperature 1, before top-k/top-p), which is what an OpenAI-style `logprobs` field reports.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec


class GenerateOutput(NamedTuple):
    tokens_BxT: jax.Array  # int32 generated tokens; pad_id after a row stopped
    lengths_B: jax.Array  # int32 generated tokens per row, a final stop token included
    logprobs_BxT: jax.Array | None  # float32 log-prob of each chosen token (None unless asked)
    top_ids_BxTxN: jax.Array | None  # int32 ids of the N most likely tokens per step (None unless asked)
    top_logprobs_BxTxN: jax.Array | None  # float32 their log-probs


NUCLEUS_CANDIDATES = 256  # a row's likeliest tokens its nucleus is looked for among first (`_nucleus`)


def _nucleus(scaled_BxV, top_p_B):
    """`scaled_BxV` with -inf past each row's nucleus (rows of top_p 1 as they are): the likeliest tokens until their
    mass reaches top_p; equal logits in id order, so a tie at the boundary does not pull every tied token in
    (uniform logits keep ~top_p of the tokens).

    Sorting a row of the vocabulary is slow on a CPU (128 ms for 16 rows of 32,000), so the nucleus is first found
    among each row's `NUCLEUS_CANDIDATES` likeliest tokens (`_nucleus_among`); only where those strictly likelier than
    the last of them hold less than top_p of some row's mass is the whole vocabulary sorted."""
    if NUCLEUS_CANDIDATES >= scaled_BxV.shape[-1]:
        return _nucleus_sorted(scaled_BxV, top_p_B)
    among, exact = _nucleus_among(scaled_BxV, top_p_B, NUCLEUS_CANDIDATES)
    return jax.lax.cond(exact, lambda s, p, a: a, lambda s, p, a: _nucleus_sorted(s, p), scaled_BxV, top_p_B, among)


def _nucleus_sorted(scaled_BxV, top_p_B):
    """`_nucleus` from each row's whole vocabulary in order (stable: equal logits in id order)."""
    order_BxV = jnp.argsort(-scaled_BxV, axis=-1, stable=True)
    probs_BxV = jax.nn.softmax(jnp.take_along_axis(scaled_BxV, order_BxV, axis=-1), axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_sorted_BxV = (mass_before_BxV < top_p_B[:, None]) | (jnp.arange(order_BxV.shape[-1]) == 0)
    return _keep(scaled_BxV, top_p_B, order_BxV, keep_sorted_BxV)


def _nucleus_among(scaled_BxV, top_p_B, k: int):
    """(`_nucleus` found among each row's k likeliest tokens, whether that is the nucleus of every row of top_p < 1).

    The tokens strictly likelier than a row's k-th are all among the k; where they hold top_p of its mass, every
    token after them in order has at least that mass before it, so the nucleus is among them, in the same order
    (by logit, then id) and with the same mass before each (that of the same tokens)."""
    top_BxK, ids_BxK = jax.lax.top_k(scaled_BxV, k)  # (equal logits in id order, as lax.top_k documents)
    probs_BxK = jnp.exp(top_BxK - jax.nn.logsumexp(scaled_BxV, axis=-1, keepdims=True))
    mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
    keep_BxK = (mass_before_BxK < top_p_B[:, None]) | (jnp.arange(k) == 0)
    # the k-th logit as the least of the k: indexing top_BxK[:, -1:] makes XLA:CPU sort the whole row for lax.top_k
    # (100 ms for 16 rows of 32,000 against 1 ms; its TopK rewrite wants slices from the start)
    kth_Bx1 = jnp.min(top_BxK, axis=-1, keepdims=True)
    likelier_B = jnp.sum(jnp.where(top_BxK > kth_Bx1, probs_BxK, 0.0), axis=-1)
    exact = jnp.all((likelier_B >= top_p_B) | (top_p_B >= 1.0))
    return _keep(scaled_BxV, top_p_B, ids_BxK, keep_BxK), exact


def _keep(scaled_BxV, top_p_B, ids_BxN, keep_BxN):
    """`scaled_BxV` with -inf but at the ids `ids_BxN` kept (`keep_BxN`), in the rows of top_p < 1."""
    rows_Bx1 = jnp.arange(ids_BxN.shape[0])[:, None]
    keep_BxV = jnp.zeros(scaled_BxV.shape, bool).at[rows_Bx1, ids_BxN].set(keep_BxN)
    nucleus = jnp.where(keep_BxV, scaled_BxV, -jnp.inf)
    return jnp.where((top_p_B < 1.0)[:, None], nucleus, scaled_BxV)


def sample_logits(logits_BxV, rng, temperature_B, top_p_B, *, top_k: int = 0) -> jax.Array:
    """Draws one token per row: greedy where temperature == 0, else softmax(logits / T) with
    top-k (k > 0; tokens tied with the k-th stay, as in transformers) and nucleus top-p (p < 1: the
    fewest likeliest tokens whose mass reaches p, equal logits taken in id order) truncation. `rng` is
    one key, or one key per row ([B]: each row's draw then depends only on its own key). Returns int32 [B]."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    scaled = logits_BxV / jnp.maximum(temperature_B, 1e-6)[:, None]
    if 0 < top_k < logits_BxV.shape[-1]:  # (k >= V keeps every token, as transformers' clamp does)
        kth_Bx1 = jnp.min(jax.lax.top_k(scaled, top_k)[0], axis=-1, keepdims=True)  # (not [:, -1:]: `_nucleus_among`)
        scaled = jnp.where(scaled < kth_Bx1, -jnp.inf, scaled)
    # the nucleus (`_nucleus`) costs a top-k of every row, or a sort: only for a call with a row that asks for it
    scaled = jax.lax.cond(jnp.any(top_p_B < 1.0), _nucleus, lambda s, p: s, scaled, top_p_B)
    if rng.ndim == 1:
        sampled_B = jax.vmap(lambda key, row: jax.random.categorical(key, row))(rng, scaled)
    else:
        sampled_B = jax.random.categorical(rng, scaled, axis=-1)
    return jnp.where(temperature_B == 0, greedy_B, sampled_B).astype(jnp.int32)


class CacheShardings(NamedTuple):
    kv: NamedSharding  # keys and values of one layer [B, C, G, E] (a stacked cache adds a whole layer axis)
    rows: NamedSharding  # slot positions and segments [B, C]


def _fit(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
    """`spec` with each dimension's mesh axes cut to the longest prefix that divides its size."""
    from proxykd_jax.parallel.sharding import spec_axes

    out = []
    for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = spec_axes(entry)
        while axes and size % int(np.prod([mesh.shape[a] for a in axes])):
            axes = axes[:-1]
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def cache_shardings(model, batch: int, length: int, rules=None) -> CacheShardings | None:
    """Shardings of `model`'s KV cache for `batch` rows of `length` slots on the mesh its parameters
    live on (None when they are not on a multi-device mesh). `rules`: the logical-axis rules
    (default: the standard table)."""
    from proxykd_jax.parallel.rules import LOGICAL_RULES, logical_to_pspec

    sharding = getattr(model.embedding[...], "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
        return None
    mesh, rules = sharding.mesh, rules or LOGICAL_RULES
    kv_shape = (batch, length, model.cfg.num_kv_heads, model.cfg.head_dim)
    kv = logical_to_pspec(("batch", "length", "kv_heads", "head_dim"), rules, mesh)
    rows = logical_to_pspec(("batch", "length"), rules, mesh)
    return CacheShardings(
        kv=NamedSharding(mesh, _fit(kv, kv_shape, mesh)),
        rows=NamedSharding(mesh, _fit(rows, (batch, length), mesh)),
    )


def _constrain(cache, shardings: CacheShardings | None):
    """The cache laid out by `shardings`: keys/values one [B, C, G, E] array per layer, or one
    stacked [layers, B, C, G, E] array (the layer axis stays whole)."""
    if shardings is None:
        return cache

    def kv(x):
        if isinstance(x, (tuple, list)):
            return type(x)(kv(layer) for layer in x)
        extra = (None,) * (x.ndim - len(shardings.kv.spec))
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(shardings.kv.mesh, PartitionSpec(*extra, *shardings.kv.spec))
        )

    return cache._replace(
        k=kv(cache.k),
        v=kv(cache.v),
        positions_BxC=jax.lax.with_sharding_constraint(cache.positions_BxC, shardings.rows),
        segment_ids_BxC=jax.lax.with_sharding_constraint(cache.segment_ids_BxC, shardings.rows),
    )


@functools.partial(
    jax.jit,
    static_argnums=0,
    static_argnames=(
        "max_new_tokens",
        "top_k",
        "stop_tokens",
        "pad_id",
        "return_logprobs",
        "top_logprobs",
        "suppress_tokens",
        "vocab",
        "cache_sharding",
        "recross",
    ),
)
def _generate(
    graphdef,
    state,
    prompt_BxP,
    prompt_lengths_B,
    rng,
    temperature_B,
    top_p_B,
    *,
    limits_B=None,
    max_new_tokens,
    top_k,
    stop_tokens,
    pad_id,
    return_logprobs,
    top_logprobs,
    suppress_tokens=(),
    vocab=0,
    cache_sharding=None,
    recross=True,
):
    """`generate`'s jitted loop. `recross` (static; False only to compare with the program without it): re-prefill
    a longrope row at the step it crosses original_max (see `_recross`)."""
    model = nnx.merge(graphdef, state)

    def tokens_only(logits_BxV):  # the ids of a padded embedding are no token: no probability
        if 0 < vocab < logits_BxV.shape[-1]:
            return jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab, logits_BxV, -jnp.inf)
        return logits_BxV

    b, p = prompt_BxP.shape
    t_max = max_new_tokens
    limits_B = jnp.full((b,), t_max, jnp.int32) if limits_B is None else limits_B
    cache = _constrain(model.init_cache(b, p + t_max), cache_sharding)
    positions_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    segments_BxP = (positions_BxP < prompt_lengths_B[:, None]).astype(jnp.int32)
    # each row's last prompt token's logits alone: [B, P, V] float32 is never held (16 GB at B 8, P 4096, V 128k)
    fed_BxP = _padding_as_zero(prompt_BxP, segments_BxP)
    logits_Bx1xV, cache = model.decode(fed_BxP, positions_BxP, segments_BxP, cache, logits_at_B=prompt_lengths_B - 1)
    cache = _constrain(cache, cache_sharding)
    last_BxV = tokens_only(logits_Bx1xV[:, 0])
    stop_S = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    n = max(top_logprobs, 1)
    scaling = model.cfg.rope_scaling
    # a row crosses at the step whose fed token sits at original_max: some prompt length in [1, P] and step in
    # [0, T) reach it only when P + T > original_max; every other model and shape keeps the program without it
    crossing = recross and scaling is not None and scaling[0] == "longrope" and p + t_max > scaling[1]

    carry = dict(
        t=jnp.zeros((), jnp.int32),
        logits=last_BxV,
        cache=cache,
        rng=rng,
        done=jnp.zeros((b,), bool),
        lengths=jnp.zeros((b,), jnp.int32),
        tokens=jnp.full((b, t_max), pad_id, jnp.int32),
        logprobs=jnp.zeros((b, t_max), jnp.float32),
        top_ids=jnp.zeros((b, t_max, n), jnp.int32),
        top_lp=jnp.zeros((b, t_max, n), jnp.float32),
    )

    def cond(c):
        return (c["t"] < t_max) & ~jnp.all(c["done"])

    def body(c):
        if c["rng"].ndim == 1:  # one key per row: draws independent of the batch's composition
            pairs = jax.vmap(jax.random.split)(c["rng"])
            rng, sub = pairs[:, 0], pairs[:, 1]
        else:
            rng, sub = jax.random.split(c["rng"])
        active_B = ~c["done"]
        sample_from = c["logits"]
        if suppress_tokens:  # never drawn; reported log-probs stay those of the model's distribution
            sample_from = sample_from.at[:, jnp.asarray(suppress_tokens, jnp.int32)].set(-jnp.inf)
        tok_B = sample_logits(sample_from, sub, temperature_B, top_p_B, top_k=top_k)
        tok_B = jnp.where(active_B, tok_B, pad_id)
        lengths_B = c["lengths"] + active_B.astype(jnp.int32)
        c = dict(
            c,
            rng=rng,
            tokens=c["tokens"].at[:, c["t"]].set(tok_B),
            lengths=lengths_B,
            done=c["done"] | jnp.any(tok_B[:, None] == stop_S[None, :], axis=-1) | (lengths_B >= limits_B),
        )
        if return_logprobs or top_logprobs:
            logp_BxV = jax.nn.log_softmax(c["logits"], axis=-1)
            chosen_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=1)[:, 0]
            c["logprobs"] = c["logprobs"].at[:, c["t"]].set(jnp.where(active_B, chosen_B, 0.0))
            if top_logprobs:
                top_lp, top_ids = jax.lax.top_k(logp_BxV, top_logprobs)
                c["top_ids"] = c["top_ids"].at[:, c["t"]].set(jnp.where(active_B[:, None], top_ids, pad_id))
                c["top_lp"] = c["top_lp"].at[:, c["t"]].set(jnp.where(active_B[:, None], top_lp, 0.0))
        positions_Bx1 = (prompt_lengths_B + c["t"])[:, None].astype(jnp.int32)
        logits_Bx1xV, cache = model.decode(tok_B[:, None], positions_Bx1, jnp.ones((b, 1), jnp.int32), c["cache"])
        t_next, logits_BxV = c["t"] + 1, tokens_only(logits_Bx1xV[:, 0])  # (in this order: the same program as ever)
        if crossing:  # rows still going whose fed token sits at original_max: rerun on the long factors
            crosses_B = ~c["done"] & (positions_Bx1[:, 0] == scaling[1])
            fed = (prompt_BxP, prompt_lengths_B, c["tokens"], c["t"])
            logits_BxV, cache = _recross(model, crosses_B, fed, logits_BxV, cache, tokens_only, cache_sharding)
        return dict(c, t=t_next, logits=logits_BxV, cache=_constrain(cache, cache_sharding))

    c = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(
        tokens_BxT=c["tokens"],
        lengths_B=c["lengths"],
        logprobs_BxT=c["logprobs"] if return_logprobs else None,
        top_ids_BxTxN=c["top_ids"] if top_logprobs else None,
        top_logprobs_BxTxN=c["top_lp"] if top_logprobs else None,
    )


def _padding_as_zero(tokens_BxL, segment_ids_BxL):
    """`tokens_BxL` with id 0 in its padding slots (segment 0). What a padding slot holds must not matter, but an id
    outside the embedding (a pad id past the model's vocabulary, -100) looks up NaN, and the attention's zero weight
    on a masked key still spreads its NaN value (0 * NaN) over the row's real tokens."""
    return jnp.where(segment_ids_BxL > 0, tokens_BxL, 0)


def _recross(model, crosses_B, fed, logits_BxV, cache, tokens_only, shardings: CacheShardings | None):
    """Re-prefills each row of `crosses_B`, one at a time (a `while_loop` over them: nothing runs at a step no row
    crosses): its prompt and tokens so far (`fed` = (prompt_BxP, prompt_lengths_B, tokens_BxT, step t); token t, the
    one just fed, at position original_max) rerun alone at positions 0..original_max into a fresh cache row, which
    thus rotates every key with the long factors, as transformers' Phi-3 recomputes its cache at that step. The row's
    cache slots and next-token logits (the fed token's, from that run) replace the cached step's; other rows keep
    theirs. Slot layout as `_generate`'s: prompt at [0, P), token j at P + j; the rerun covers P + min(T,
    original_max) slots, as a crossing row has fed at most original_max tokens."""
    prompt_BxP, prompt_lengths_B, tokens_BxT, t = fed
    p, slots = prompt_BxP.shape[1], cache.positions_BxC.shape[1]
    generated = min(tokens_BxT.shape[1], model.cfg.rope_scaling[1])
    row_sharding = None
    if shardings is not None:  # the batch axes cannot split one row; the others as the whole cache's
        kv_shape = (1, slots, model.cfg.num_kv_heads, model.cfg.head_dim)
        row_sharding = CacheShardings(
            kv=NamedSharding(shardings.kv.mesh, _fit(shardings.kv.spec, kv_shape, shardings.kv.mesh)),
            rows=NamedSharding(shardings.rows.mesh, _fit(shardings.rows.spec, (1, slots), shardings.rows.mesh)),
        )
    j_G = jnp.arange(generated, dtype=jnp.int32)

    def rerun(state):
        todo_B, logits_BxV, cache = state
        i = jnp.argmax(todo_B)  # the first row still to rerun
        length = jax.lax.dynamic_index_in_dim(prompt_lengths_B, i, keepdims=True)  # [1]
        prompt_1xP = jax.lax.dynamic_slice_in_dim(prompt_BxP, i, 1)
        tokens_1xG = jax.lax.dynamic_slice_in_dim(tokens_BxT, i, 1)[:, :generated]
        positions_1xP = jnp.arange(p, dtype=jnp.int32)[None]
        positions_1xW = jnp.concatenate([positions_1xP, length[:, None] + j_G[None]], axis=1)
        segments_1xW = jnp.concatenate([positions_1xP < length[:, None], (j_G <= t)[None]], axis=1).astype(jnp.int32)
        tokens_1xW = _padding_as_zero(jnp.concatenate([prompt_1xP, tokens_1xG], axis=1), segments_1xW)
        fresh = _constrain(model.init_cache(1, slots), row_sharding)
        at_1 = jnp.reshape(p + t, (1,)).astype(jnp.int32)  # the fed token's logits alone: [1, W, V] never held
        logits_1x1xV, fresh = model.decode(tokens_1xW, positions_1xW, segments_1xW, fresh, logits_at_B=at_1)
        fresh = _constrain(fresh, row_sharding)
        last_V = tokens_only(logits_1x1xV[0, 0])

        def put(old, new, axis):  # row i of `old` (its rows along `axis`) set to `new`'s one row
            return jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), i, axis)

        cache = cache._replace(
            k=jax.tree.map(lambda old, new: put(old, new, old.ndim - 4), cache.k, fresh.k),
            v=jax.tree.map(lambda old, new: put(old, new, old.ndim - 4), cache.v, fresh.v),
            positions_BxC=put(cache.positions_BxC, fresh.positions_BxC, 0),
            segment_ids_BxC=put(cache.segment_ids_BxC, fresh.segment_ids_BxC, 0),
        )
        return todo_B.at[i].set(False), logits_BxV.at[i].set(last_V), _constrain(cache, shardings)

    _, logits_BxV, cache = jax.lax.while_loop(lambda state: jnp.any(state[0]), rerun, (crosses_B, logits_BxV, cache))
    return logits_BxV, cache


def generate(
    model,
    prompt_tokens_BxP,
    prompt_lengths_B,
    rng,
    *,
    max_new_tokens: int,
    temperature=1.0,
    top_k: int = 0,
    top_p=1.0,
    stop_tokens=(),
    pad_id: int = 0,
    return_logprobs: bool = False,
    top_logprobs: int = 0,
    suppress_tokens=(),
    vocab: int = 0,
    rules=None,
    limits_B=None,
) -> GenerateOutput:
    """Samples up to `max_new_tokens` tokens after each left-aligned prompt.

    `temperature` and `top_p` may be scalars or per-row [B] arrays (temperature 0 = greedy) and do
    not trigger recompilation; `max_new_tokens`, `top_k`, `stop_tokens`, `pad_id`,
    `return_logprobs`, `top_logprobs` (N, the number of alternatives per step) and
    `suppress_tokens` (ids never sampled, e.g. pad/bos/unk) are static. `vocab` (static; 0 = the
    model's) is the tokenizer's size where the model's embedding is padded past it: the ids from
    `vocab` on get no probability, neither sampled nor among the reported log-probs, which are then
    those of the model's distribution over the tokenizer's ids. `rng` is one key, or a
    [B] array of keys, one per row: then each row's tokens depend only on its own key and prompt,
    not on which other rows share the call (how `serve` honours per-request seeds). On a mesh the KV
    cache is sharded by `rules` (default: the standard logical-axis table; see `cache_shardings`).

    Longrope (Phi-3): a row that crosses original_max during the call is re-prefilled at the step whose fed token
    sits there, its whole sequence rerun on the long factors and the next token's logits taken from that run, so its
    tokens and log-probs past the crossing are those of transformers' `generate()` for that row alone (a step that
    costs one prefill of the row).

    `limits_B`: each row's own limit on new tokens, in [1, max_new_tokens] (traced: one compiled shape
    serves rows and calls of other limits; None: `max_new_tokens` for every row). With it, what must fit
    `model.max_seq_len` is each row's prompt length plus its limit (the positions it reaches), not P +
    `max_new_tokens` (the cache's slots): a padded shape may then hold more slots than the context.
    """
    prompt_BxP = jnp.asarray(prompt_tokens_BxP, jnp.int32)
    if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] == 0:
        raise ValueError(f"prompt_tokens_BxP must be a non-empty [B, P] array, got shape {prompt_BxP.shape}.")
    b, p = prompt_BxP.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if top_k < 0 or top_logprobs < 0:
        raise ValueError(f"top_k and top_logprobs must be >= 0, got {top_k} and {top_logprobs}.")
    if vocab < 0 or vocab > model.cfg.vocab_size:
        raise ValueError(f"vocab={vocab} must be in [0, the model's vocab_size {model.cfg.vocab_size}].")
    if top_logprobs > (vocab or model.cfg.vocab_size):
        raise ValueError(
            f"top_logprobs={top_logprobs} exceeds the model's vocabulary of {vocab or model.cfg.vocab_size} tokens."
        )
    if not isinstance(prompt_lengths_B, jax.core.Tracer):
        lengths = np.asarray(prompt_lengths_B)
        if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > p:
            raise ValueError(f"prompt_lengths_B must be {b} values in [1, {p}], got {lengths.tolist()}.")
    if not isinstance(temperature, jax.core.Tracer) and np.any(np.asarray(temperature) < 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if not isinstance(top_p, jax.core.Tracer) and np.any((np.asarray(top_p) <= 0) | (np.asarray(top_p) > 1)):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) or rng.shape not in ((), (b,)):
        raise ValueError(
            f"rng must be one typed key (jax.random.key) or {b} of them, got dtype {rng.dtype} and shape {rng.shape}."
        )
    limit = model.cfg.max_seq_len
    if limits_B is None and p + max_new_tokens > limit:
        raise ValueError(f"prompt length {p} + max_new_tokens {max_new_tokens} exceeds model.max_seq_len {limit}.")
    if limits_B is not None and not isinstance(limits_B, jax.core.Tracer):
        caps = np.asarray(limits_B)
        if caps.shape != (b,) or caps.min() < 1 or caps.max() > max_new_tokens:
            raise ValueError(f"limits_B must be {b} values in [1, {max_new_tokens}], got {caps.tolist()}.")
        if not isinstance(prompt_lengths_B, jax.core.Tracer):
            reach = np.asarray(prompt_lengths_B) + caps
            if reach.max() > limit:
                row = int(reach.argmax())
                raise ValueError(
                    f"row {row}: prompt length {int(np.asarray(prompt_lengths_B)[row])} + limit {int(caps[row])} "
                    f"exceeds model.max_seq_len {limit}."
                )
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        prompt_BxP,
        jnp.asarray(prompt_lengths_B, jnp.int32),
        rng,
        jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,)),
        jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,)),
        limits_B=None if limits_B is None else jnp.asarray(limits_B, jnp.int32),
        max_new_tokens=int(max_new_tokens),
        top_k=int(top_k),
        stop_tokens=tuple(int(s) for s in stop_tokens),
        pad_id=int(pad_id),
        return_logprobs=bool(return_logprobs),
        top_logprobs=int(top_logprobs),
        suppress_tokens=tuple(sorted({int(t) for t in suppress_tokens})),
        vocab=int(vocab),
        cache_sharding=cache_shardings(model, b, p + max_new_tokens, rules),
    )
