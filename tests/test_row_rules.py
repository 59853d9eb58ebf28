"""Activation rows follow `mesh.rules`, and the embedding lookup gathers no rows, on the 8 simulated CPU devices
(tests/conftest.py).

The input rows are placed by the rules' `batch` entry (`parallel.batch_sharding`); the model pinned its activation
rows to (data, fsdp) whatever the rules said, so a table mapping `batch` elsewhere had every layer's rows resharded
against it. Now `parallel.under_mesh` traces a step under the table its inputs follow (`rules.step_rules`, read back
from the shardings by `rules_of` where no table is given) and `models.attention.row_axes` reads its `batch` entry.

On data x fsdp meshes XLA looked the embedding up with the rows split over data only and D over fsdp, then gathered
all B rows onto every device ([B, L, D / fsdp]) before moving them to the rows' layout, and summed the whole
[vocab, D] table gradient; `Llama.embed` now pins that lookup layout (`llama.lookup_specs`).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parallel_helpers import mesh_cfg, optim_cfg

from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.parallel import LOGICAL_RULES, batch_sharding, global_batch, make_mesh, under_mesh
from proxykd_jax.parallel.rules import normalize_rules
from proxykd_jax.parallel.sharding import rules_of
from proxykd_jax.train import create_train_state, make_optimizer, make_train_step

B, L = 16, 8
CFG = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48,
                  scan_layers=False, max_seq_len=L)  # fmt: skip


def with_batch(axes) -> tuple:
    """The default rules with `batch` mapped to mesh `axes`."""
    return tuple((name, axes if name == "batch" else value) for name, value in LOGICAL_RULES)


def host_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, CFG.vocab_size, (B, L + 1)).astype(np.int32)
    return {
        "tokens": seq[:, :-1],
        "targets": seq[:, 1:],
        "segment_ids": np.where(np.arange(L) < rng.integers(L // 2, L + 1, (B, 1)), 1, 0).astype(np.int32),
        "loss_mask": (rng.random((B, L)) < 0.8).astype(np.float32),
    }


def sft_loss(model, batch, seen=None):
    """Masked next-token cross entropy; `seen` collects the sharding XLA gave the hidden states."""
    hidden = model.hidden(batch["tokens"], None, batch["segment_ids"])
    if seen is not None:
        jax.debug.inspect_array_sharding(hidden, callback=seen.append)
    logp = jax.nn.log_softmax(model.logits(hidden), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"] * (batch["segment_ids"] > 0)
    return (nll * mask).sum() / mask.sum(), {}


def run(mesh, rules, seen=None):
    """(logits, loss, grad norm, parameters after one step) of a fresh model on `mesh` under `rules`."""
    optimizer = make_optimizer(optim_cfg(), total_steps=10)
    graphdef, state, shardings = create_train_state(optimizer, mesh, rules, Llama, CFG, rngs=nnx.Rngs(0))
    batch = global_batch(host_batch(), mesh, rules)
    forward = under_mesh(jax.jit(lambda s, b: s.model(graphdef)(b["tokens"], None, b["segment_ids"])), mesh, rules)
    logits = forward(state, batch)
    step = make_train_step(
        lambda model, b: sft_loss(model, b, seen),
        graphdef,
        optimizer,
        state_shardings=shardings,
        batch_shardings=batch_sharding(mesh, rules),
    )
    state, metrics = step(state, batch)
    params = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    return logits, float(metrics["loss"]), float(metrics["grad_norm"]), params


@pytest.fixture(scope="module")
def one_device():
    logits, loss, norm, params = run(make_mesh(mesh_cfg(), jax.devices()[:1]), LOGICAL_RULES)
    return np.asarray(logits), loss, norm, params


def same_rows(sharding, shape, mesh, axes) -> bool:
    """Whether every device holds the rows it holds with dim 0 split over mesh `axes` (the rest as it may)."""
    want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes or None)).devices_indices_map(shape)
    got = sharding.devices_indices_map(shape)
    return all(got[d][0] == want[d][0] for d in mesh.devices.flat)


@pytest.mark.parametrize(
    "shape, axes",
    [((2, 4, 1), ("data",)), ((2, 4, 1), ("fsdp",)), ((2, 2, 2), ("data", "fsdp", "tensor"))],
    ids=["data", "fsdp", "data-fsdp-tensor"],
)
def test_activation_rows_follow_the_rules_batch_entry_and_equal_one_device(one_device, shape, axes):
    mesh, rules = make_mesh(mesh_cfg(*shape)), with_batch(axes)
    seen = []
    logits, loss, norm, params = run(mesh, rules, seen)
    assert same_rows(logits.sharding, logits.shape, mesh, axes), logits.sharding  # (was data x fsdp)
    assert seen and all(same_rows(s, (B, L, CFG.d_model), mesh, axes) for s in seen), seen
    want_logits, want_loss, want_norm, want_params = one_device
    assert np.std(want_logits) > 0.1
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([loss, norm], [want_loss, want_norm], rtol=1e-5)
    assert params.keys() == want_params.keys()
    for key, value in want_params.items():
        np.testing.assert_allclose(params[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_one_function_under_two_tables_is_traced_for_each():
    """The table is part of jit's cache key: a function traced under one is never reused under the other."""
    mesh = make_mesh(mesh_cfg(2, 4, 1))
    optimizer = make_optimizer(optim_cfg(), total_steps=10)
    graphdef, state, _ = create_train_state(optimizer, mesh, LOGICAL_RULES, Llama, CFG, rngs=nnx.Rngs(0))
    tokens = global_batch(host_batch(), mesh, LOGICAL_RULES)["tokens"]
    jitted = jax.jit(lambda s, t: s.model(graphdef).hidden(t))
    for axes in (("data",), ("data", "fsdp"), ("fsdp",)):
        hidden = under_mesh(jitted, mesh, with_batch(axes))(state, tokens)
        assert same_rows(hidden.sharding, hidden.shape, mesh, axes), (axes, hidden.sharding)


def test_the_rules_are_read_back_from_a_steps_shardings():
    mesh = make_mesh(mesh_cfg(2, 4, 1))
    rules = tuple((k, ("fsdp",) if k == "batch" else None if k == "embed" else v) for k, v in LOGICAL_RULES)
    optimizer = make_optimizer(optim_cfg(), total_steps=10)
    _, _, shardings = create_train_state(optimizer, mesh, rules, Llama, CFG, rngs=nnx.Rngs(0))
    assert dict(rules_of(batch_sharding(mesh, rules), shardings.params)) == dict(normalize_rules(rules))
    assert dict(rules_of()) == dict(normalize_rules(LOGICAL_RULES))


# ----------------------------------------------------------------------------------------------
# The embedding lookup on data x fsdp meshes (compiled HLO)
# ----------------------------------------------------------------------------------------------

_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%\S+ = (\([^)]*\)|\S+) (all-gather|all-reduce|all-to-all)(?:-start)?\(")


def collectives(text: str) -> list[tuple[str, list[tuple[int, ...]], str]]:
    """(kind, result shapes, op names) of each collective of compiled HLO text."""
    out = []
    for line in text.splitlines():
        m = _COLLECTIVE.match(line)
        if m:
            dims = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
            names = " ".join(re.findall(r'op_name="([^"]*)"', line))
            out.append((m.group(2), [tuple(int(d) for d in s.split(",") if d) for s in dims], names))
    return out


@pytest.mark.parametrize("shape", [(2, 4, 1), (4, 2, 1)], ids=["2x4x1", "4x2x1"])
def test_the_embedding_lookup_gathers_no_rows_and_no_whole_table(shape):
    """(Before: data 2 x fsdp 4 all-gathered a [16, 8, 8] lookup, all B rows, and all-reduced the whole [96, 32]
    table gradient; data 4 x fsdp 2 all-gathered the whole [96, 32] table for the lookup.)"""
    mesh = make_mesh(mesh_cfg(*shape))
    optimizer = make_optimizer(optim_cfg(), total_steps=10)
    graphdef, state, shardings = create_train_state(optimizer, mesh, LOGICAL_RULES, Llama, CFG, rngs=nnx.Rngs(0))
    batch = global_batch(host_batch(), mesh, LOGICAL_RULES)
    forward = under_mesh(jax.jit(lambda s, b: s.model(graphdef).hidden(b["tokens"], None, b["segment_ids"])), mesh)
    step = make_train_step(
        sft_loss, graphdef, optimizer, state_shardings=shardings, batch_shardings=batch_sharding(mesh, LOGICAL_RULES)
    )
    table = (CFG.vocab_size, CFG.d_model)
    for name, fn in (("forward", forward), ("sft step", step)):
        found = collectives(fn.lower(state, batch).compile().as_text())
        lookup = [(kind, shapes) for kind, shapes, names in found if "_take" in names]  # the lookup's, its gradient's
        assert any(kind == "all-gather" for kind, _, _ in found), name  # (the parameters' FSDP gathers)
        rows = [(k, s) for k, s, _ in found if k == "all-gather" and any(len(d) == 3 and d[0] == B for d in s)]
        assert not rows, (name, rows)
        assert not [(k, s) for k, s in lookup if table in s], (name, lookup)
