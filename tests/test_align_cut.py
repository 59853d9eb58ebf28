"""Align's rows cut to their batch's longest row (`align.cut_rows`): the SFT and DPO batches (`phases.row_batches`,
`rounds.round_batches`), the reference and held-out passes (`objectives.pass_batches`), and the train Loop, which
takes batches of `pipeline.lengths_of(seq_len)` and pads the batches of a several-step call to one length.

A cut batch holds the same rows, only without padding past its longest row, so training on it gives the same
parameters and a pass the same log-probs as at full length (rows of 1-31 positions in rows of 32: cuts to 4, 8, 16
and 32 positions)."""

import functools
import json

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from proxykd_jax.align import objectives, pairs, phases, rounds
from proxykd_jax.align.pairs import ROW_FIELDS
from proxykd_jax.data import pipeline
from proxykd_jax.models.llama import Llama, ModelConfig, flops_per_token
from proxykd_jax.parallel import LOGICAL_RULES, make_mesh

L = 32
CFG = ModelConfig(
    vocab_size=48, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, d_ff=24, max_seq_len=L
)


def _examples(rng, n: int, longest: int = L) -> list[pairs.Example]:
    """`n` examples of 1-4 prompt tokens and responses that fill rows of 2 to `longest` positions."""
    out = []
    for i in range(n):
        used = int(rng.integers(2, longest + 1))
        p = int(rng.integers(1, min(4, used) + 1))
        tokens = rng.integers(1, CFG.vocab_size, used + 1).tolist()
        out.append(pairs.Example(i, i, tuple(tokens[:p]), tuple(tokens[p:])))
    return out


def _sft_rows(rng, n: int) -> dict[str, np.ndarray]:
    """Mostly short rows (a batch of them cuts to 4 or 8 positions), a few long ones."""
    examples = _examples(rng, n - n // 4, longest=7) + _examples(rng, n // 4)
    return pairs.example_rows([examples[i] for i in rng.permutation(n)], L)


def _pair_rows(rng, n: int) -> dict[str, np.ndarray]:
    """Pairs of short rows (a batch of them cuts to 4 or 8 positions) but the third, whose rejected row is whole."""
    chosen = _examples(rng, n, longest=7)
    rejected = [tuple(rng.integers(1, CFG.vocab_size, int(rng.integers(1, 4))).tolist()) for _ in chosen]
    rejected[2] = tuple(rng.integers(1, CFG.vocab_size, L + 1 - len(chosen[2].prompt)).tolist())
    rows = pairs.pair_rows([(e.prompt, e.response, r) for e, r in zip(chosen, rejected)], L)
    rows["ref_chosen_logp"] = rng.normal(-30.0, 4.0, n).astype(np.float32)
    rows["ref_rejected_logp"] = rng.normal(-30.0, 4.0, n).astype(np.float32)
    return rows


def _used(batch: dict) -> int:
    return int(pairs.row_lengths(batch["segment_ids"]).max())


def test_row_lengths_are_the_positions_before_the_padding():
    seg = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert pairs.row_lengths(seg).tolist() == [3, 0, 4, 1]
    assert pairs.row_lengths(np.stack([seg, seg[::-1]], axis=1)).tolist() == [[3, 1], [0, 4], [4, 0], [1, 3]]


@pytest.mark.parametrize("kind", ["rows", "pairs"])
def test_cut_batches_hold_the_same_rows_without_the_padding_past_the_longest(kind):
    """Cut and uncut iterators of the same seed give the same rows; each cut batch is the uncut one's first
    `lengths_of(L)` positions that hold its longest row (of both rows of a pair), and nothing but padding is cut."""
    rng = np.random.default_rng(0)
    if kind == "rows":
        rows = _sft_rows(rng, 24)
        cut_it, whole_it = (phases.row_batches(rows, 4, seed=3, cut=c) for c in (True, False))
    else:
        rows = _pair_rows(rng, 12)
        cut_it, whole_it = (phases.pair_batches(rows, 2, seed=3, cut=c) for c in (True, False))
    seen = set()
    for _ in range(18):  # three epochs of rows, two and a half of pairs
        cut, whole = next(cut_it), next(whole_it)
        length = cut["tokens"].shape[1]
        seen.add(length)
        assert length == min(n for n in (4, 8, 16, 32) if n >= _used(whole))
        for k, v in whole.items():
            if k in ROW_FIELDS:
                np.testing.assert_array_equal(cut[k], v[:, :length], err_msg=k)
                assert not np.any(v[:, length:] if k != "tokens" else whole["segment_ids"][:, length:]), k
            else:
                np.testing.assert_array_equal(cut[k], v, err_msg=k)
        if kind == "pairs":
            assert length >= _used({"segment_ids": whole["segment_ids"][0::2]})  # chosen and rejected cut together
    assert len(seen) >= 2, seen


def test_every_process_cuts_its_rows_to_the_global_batchs_longest(monkeypatch):
    """Two processes, each its half of every global batch: both halves have the length of the global batch, which
    one process's rows alone may not need."""
    rows = _sft_rows(np.random.default_rng(1), 24)
    whole = phases.row_batches(rows, 4, seed=5, cut=True)
    halves = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for p in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        halves.append(phases.row_batches(rows, 4, seed=5, cut=True))
    shorter = 0
    for _ in range(12):
        one, a, b = next(whole), *(next(h) for h in halves)
        assert a["tokens"].shape == b["tokens"].shape == (2, one["tokens"].shape[1])
        for k in ROW_FIELDS:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), one[k], err_msg=k)
        shorter += min(_used(a), _used(b)) < pipeline.cut_length(0, L) or _used(a) != _used(b)
    assert shorter  # some half alone would have been cut shorter


def test_pass_batches_visit_every_row_once_in_order_of_length_each_cut_to_its_longest():
    lengths = np.random.default_rng(2).integers(0, L + 1, 11)
    seen = []
    for idx, real, length in objectives.pass_batches(lengths, 3, L, cut=True):
        assert len(idx) == 3 and (real == 3 or np.all(idx[real:] == idx[0]))
        assert length == min(n for n in (4, 8, 16, 32) if n >= lengths[idx].max())
        seen += idx[:real].tolist()
    assert sorted(seen) == list(range(11))
    np.testing.assert_array_equal(lengths[seen], np.sort(lengths))
    plain = list(objectives.pass_batches(lengths, 3, L, cut=False))
    assert [i for idx, real, _ in plain for i in idx[:real].tolist()] == list(range(11))
    assert {length for _, _, length in plain} == {L}


def _model(seed: int) -> Llama:
    return Llama(CFG, rngs=nnx.Rngs(seed))


def test_reference_and_heldout_passes_cut_give_the_full_lengths_values():
    """Fresh random weights and rows; 7 pairs in batches of 3 (a short last batch)."""
    rng = np.random.default_rng(3)
    model = _model(4)
    rows = _pair_rows(rng, 7)
    want = objectives.reference_logprobs(model, (), rows, batch_size=3, chunk=8)
    got = objectives.reference_logprobs(model, (), rows, batch_size=3, chunk=8, cut=True)
    for g, w in zip(got, want):
        assert np.all(w < 0)
        np.testing.assert_allclose(g, w, rtol=1e-5)
    held = _sft_rows(rng, 9)
    want = objectives.heldout_nll(model, (), held, batch_size=4, chunk=8)
    got = objectives.heldout_nll(model, (), held, batch_size=4, chunk=8, cut=True)
    assert want > 1.0
    np.testing.assert_allclose(got, want, rtol=1e-6)


class _Shapes:
    """The row lengths of the batches an iterator gives."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.lengths.append(batch["tokens"].shape[1])
        return batch


@pytest.mark.parametrize("phase,steps_per_call", [("sft", 1), ("sft", 3), ("dpo", 2)])
def test_training_on_cut_rows_gives_the_full_lengths_parameters(tmp_path, phase, steps_per_call):
    """6 steps through `PhaseTrainer` (AdamW, the train Loop) with `align.cut_rows` on and off: the same parameters,
    far from the start; several steps per call stack batches of unequal lengths (padded to the longest)."""
    from proxykd_jax.align import config as align_config
    from proxykd_jax.train import optim
    from proxykd_jax.train.loop import default_config as train_default_config

    rng = np.random.default_rng(4)
    rows = _sft_rows(rng, 24) if phase == "sft" else _pair_rows(rng, 12)
    if phase == "sft":
        loss_fn = functools.partial(objectives.sft_loss_fn, chunk=8)
    else:
        loss_fn = functools.partial(objectives.dpo_loss_fn, beta=0.3, nll_weight=1.0, chunk=8)
    mesh = make_mesh(ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": 1, "tensor": 1}}), jax.devices()[:1])
    tcfg = train_default_config()
    tcfg.update(log_every=1, tensorboard=False, progress=False, peak_flops=1e9, steps_per_call=steps_per_call)
    params, lengths = {}, {}
    for cut in (False, True):
        acfg = align_config.default_config()
        acfg.update(warmup_steps=0, checkpoint_every=0, cut_rows=cut)
        trainer = rounds.PhaseTrainer(acfg, optim.default_config(), tcfg, mesh, LOGICAL_RULES, seq_len=L)
        if phase == "sft":
            data = _Shapes(phases.row_batches(rows, 4, 7, cut=cut))
        else:
            data = _Shapes(rounds.round_batches(rows, 2, 7, 1, cut=cut))
        trained = trainer.train(tmp_path / str(cut), _model(5), (), loss_fn, data, steps=6, lr=3e-2, rows_per_step=4)
        params[cut] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.state(trained, nnx.Param))])
        lengths[cut] = data.lengths
    assert set(lengths[False]) == {L} and len(set(lengths[True])) >= 2 and sum(lengths[True]) < L * 6, lengths
    if steps_per_call == 1:  # each logged row is one step: its mfu counts the FLOPs of the step's own length
        logged = [json.loads(line) for line in (tmp_path / "True" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logged] == list(range(1, 7))
        for row, length in zip(logged, lengths[True]):
            per_token = flops_per_token(CFG, length, backward=True)
            assert row["mfu"] * 1e9 * jax.device_count() / row["tokens_per_s"] == pytest.approx(per_token, rel=1e-6)
    moved = np.abs(
        params[False] - np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.state(_model(5), nnx.Param))])
    )
    assert moved.max() > 1e-2
    np.testing.assert_allclose(params[True], params[False], rtol=1e-4, atol=1e-4 * moved.max())


def test_the_loop_refuses_a_length_it_was_not_given(tmp_path):
    from proxykd_jax.train.loop import Loop
    from proxykd_jax.train.loop import default_config as train_default_config

    tcfg = train_default_config()
    tcfg.update(batch_size=2, seq_len=L)
    loop = Loop(tcfg, run_dir=tmp_path, mesh=None, rules=None, train_step=None, state_shardings=None,
                row_lengths=pipeline.lengths_of(L))  # fmt: skip
    assert loop._check_batch({"tokens": np.zeros((2, 8), np.int32)}) == (16, 8)
    with pytest.raises(ValueError, match=r"\[2 global rows, 12\]"):
        loop._check_batch({"tokens": np.zeros((2, 12), np.int32)})
    plain = Loop(tcfg, run_dir=tmp_path, mesh=None, rules=None, train_step=None, state_shardings=None)
    with pytest.raises(ValueError, match=r"\[2 global rows, 8\]"):
        plain._check_batch({"tokens": np.zeros((2, 8), np.int32)})


def test_padded_fills_the_position_fields_with_padding():
    from proxykd_jax.train.loop import padded

    rng = np.random.default_rng(5)
    batch = {
        "tokens": rng.integers(1, 9, (2, 8)).astype(np.int32),
        "loss_mask": np.ones((2, 8), np.float32),
        "per_token": rng.normal(size=(2, 8, 3)).astype(np.float32),
        "ref_logp": rng.normal(size=(2,)).astype(np.float32),
    }
    out = padded(batch, 16)
    assert {k: v.shape for k, v in out.items()} == {
        "tokens": (2, 16), "loss_mask": (2, 16), "per_token": (2, 16, 3), "ref_logp": (2,)
    }  # fmt: skip
    for k in ("tokens", "loss_mask", "per_token"):
        np.testing.assert_array_equal(out[k][:, :8], batch[k])
        assert not out[k][:, 8:].any()
    np.testing.assert_array_equal(out["ref_logp"], batch["ref_logp"])
