"""Longrope generation that crosses original_max_position_embeddings within one `generate` call: transformers' Phi-3
`generate()` recomputes its whole cache at the step whose fed token sits at original_max (the long factors from
there on), and so does `sampling._generate`, per row. Greedy per-step log-probs (the whole distribution) equal
transformers' on a tiny random Phi-3 (original 16), alone and in a padded batch (each row against transformers on that
row alone; also with the cache sharded on 4 devices); rows that start past the crossing or never reach it compute what
the program without the re-prefill computes, and models or shapes where no row can cross keep that program."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import AxisType
from test_phi3 import VOCAB, _longrope, _phi3, _tokens

from proxykd_jax.models import hf, sampling
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.sampling import generate
from proxykd_jax.parallel import LOGICAL_RULES, MESH_AXES, place_model

ORIGINAL, NEW = 16, 14


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """(transformers' tiny Phi-3 with random longrope factors, original 16; our import of it)."""
    ref = _phi3(**_longrope(ORIGINAL))
    path = tmp_path_factory.mktemp("phi3")
    ref.save_pretrained(path)
    cfg, model = hf.load_hf(path, run={"scan_layers": False})
    assert cfg.rope_scaling[:2] == ("longrope", ORIGINAL)
    return ref, model


def _ours(model, prompts, monkeypatch=None, recross=True, rules=None):
    """Greedy `generate` of NEW tokens after each prompt (left-aligned): tokens [B, T], log-probs [B, T, V]."""
    width = max(len(x) for x in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    if not recross:  # the program without the re-prefill: what generate computed before it
        monkeypatch.setattr(sampling, "_generate", functools.partial(sampling._generate, recross=False))
    out = generate(
        model, tokens, np.array([len(x) for x in prompts]), jax.random.key(0), max_new_tokens=NEW, temperature=0,
        top_logprobs=VOCAB, rules=rules,
    )  # fmt: skip
    if not recross:
        monkeypatch.undo()
    logprobs = np.zeros((len(prompts), NEW, VOCAB), np.float32)
    np.put_along_axis(logprobs, np.asarray(out.top_ids_BxTxN), np.asarray(out.top_logprobs_BxTxN), axis=-1)
    assert (np.asarray(out.lengths_B) == NEW).all()
    return np.asarray(out.tokens_BxT), logprobs


def _theirs(ref, prompt):
    """transformers' greedy `generate` of NEW tokens after `prompt` alone: tokens [T], log-probs [T, V]."""
    with torch.no_grad():
        ids = torch.tensor(prompt[None])
        out = ref.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    logprobs = torch.log_softmax(torch.stack(out.logits, dim=1)[0].float(), dim=-1).numpy()
    return out.sequences[0, len(prompt) :].numpy(), logprobs


def _matches(ours, theirs):
    (tokens, logprobs), (their_tokens, their_logprobs) = ours, theirs
    np.testing.assert_array_equal(tokens, their_tokens)
    np.testing.assert_allclose(logprobs, their_logprobs, atol=1e-4, rtol=1e-4)


def test_one_row_crossing_matches_transformers(phi3):
    """A 12-token prompt feeds position 16 at step 4: the steps after it are transformers' only with the re-prefill."""
    ref, model = phi3
    prompt = _tokens(1, 12)[0]
    tokens, logprobs = _ours(model, [prompt])
    _matches((tokens[0], logprobs[0]), _theirs(ref, prompt))


def test_padded_rows_cross_at_their_own_steps(phi3, monkeypatch):
    """Rows of 10 (two: crossing at the same step, 6) and 16 (at step 0, right after the prefill) cross; 20 starts
    past original_max, 2 never feeds position 16 and 3 feeds it at its last step (nothing after to change).
    Each row is transformers' for that row alone; the rows that do not cross compute what the program without the
    re-prefill computes, which differs from transformers on the rows that do. On a mesh (fsdp 2 x tensor 2: rows and
    kv heads split) the same."""
    ref, model = phi3
    lengths = (10, 16, 20, 3, 10, 2)
    prompts = [_tokens(1, n)[0] for n in lengths]
    tokens, logprobs = _ours(model, prompts)
    for row, prompt in enumerate(prompts):
        _matches((tokens[row], logprobs[row]), _theirs(ref, prompt))
    old_tokens, old_logprobs = _ours(model, prompts, monkeypatch, recross=False)
    steady = [row for row, n in enumerate(lengths) if n > ORIGINAL or n + NEW - 1 <= ORIGINAL]
    np.testing.assert_array_equal(tokens[steady], old_tokens[steady])
    np.testing.assert_array_equal(logprobs[steady], old_logprobs[steady])
    for row in (
        row for row in range(len(lengths)) if row not in steady
    ):  # (the row's step after the crossing: the long factors' keys, or the short's)
        after = ORIGINAL - lengths[row] + 1
        assert np.abs(old_logprobs[row, after] - logprobs[row, after]).max() > 1e-1, row

    rules = tuple((name, None if name == "vocab" else axes) for name, axes in LOGICAL_RULES)
    mesh = jax.make_mesh((1, 2, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:4])
    sharded = nnx.merge(*place_model(model, mesh, rules))
    cache = sampling.cache_shardings(sharded, len(prompts), max(lengths) + NEW, rules)
    assert cache.kv.spec[0] is not None and cache.kv.spec[2] is not None  # rows and kv heads split
    sharded_tokens, sharded_logprobs = _ours(sharded, prompts, rules=rules)
    np.testing.assert_array_equal(sharded_tokens, tokens)
    np.testing.assert_allclose(sharded_logprobs, logprobs, atol=1e-4, rtol=1e-4)


def _jaxpr(model, width: int, new: int, recross: bool) -> str:
    graphdef, state = nnx.split(model)
    rows = 2
    static = dict(max_new_tokens=new, top_k=0, stop_tokens=(), pad_id=0, return_logprobs=True, top_logprobs=2)
    args = (jnp.zeros((rows, width), jnp.int32), jnp.full((rows,), width, jnp.int32), jax.random.key(0))
    run = functools.partial(sampling._generate, graphdef, **static, recross=recross)
    return str(jax.make_jaxpr(run)(state, *args, jnp.ones(rows), jnp.ones(rows)))


def test_no_re_prefill_where_no_row_can_cross(phi3):
    """The re-prefill (a second while loop in the step) is built only for longrope with P + max_new_tokens past
    original_max: a Llama, or the Phi-3 on shapes within it, trace the program without it, op for op."""
    _, phi = phi3
    llama = Llama(
        ModelConfig(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48),
        rngs=nnx.Rngs(0),
    )
    assert _jaxpr(llama, 6, 40, True) == _jaxpr(llama, 6, 40, False)
    assert _jaxpr(phi, 6, ORIGINAL - 6, True) == _jaxpr(phi, 6, ORIGINAL - 6, False)
    crossing, without = _jaxpr(phi, 6, ORIGINAL - 5, True), _jaxpr(phi, 6, ORIGINAL - 5, False)
    assert (crossing.count(" while["), without.count(" while[")) == (2, 1)
