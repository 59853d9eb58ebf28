"""DPO rounds with optim.grad_accum = k > 1: the one optimizer update of k micro-batches equals one step on their
concatenation (`objectives.UpdateTokenBatches`, `rounds.round_batches`).

The accumulating optimizer averages the k micro-batch gradients with equal weights; the NLL term of
`objectives.dpo_loss_fn` is a token mean, so micro-batches with unequal chosen response tokens need the whole
update's count (before the fix each used its own, and an update moved 36-55% away from the whole batch's:
/tmp/s21/h1_probe.py). The phases run through `rounds.PhaseTrainer` (its AdamW, train Loop and batches) with
optim.eps = 1e3: Adam's first update is lr * g / (|g| + eps), about lr / eps * g here, so it follows the gradient's
scale, not only its sign (the default eps makes it lr * sign(g), blind to a micro-batch weighted wrong).
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from proxykd_jax.align import lora, objectives, pairs, phases, rounds
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.parallel import LOGICAL_RULES, make_mesh

L = 16  # row length
P = 2  # pairs per micro-batch
CFG = ModelConfig(
    vocab_size=40, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, d_ff=24, max_seq_len=L
)


def _random_model(rng) -> Llama:
    """A Llama of CFG with random weights (std 1 / sqrt(fan-in)) and norm scales, drawn by numpy (nothing compiled)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0))))
    flat = []
    for path, var in nnx.to_flat_state(state):
        name, shape = path[-1], var.get_value().shape
        if name == "scale":
            value = rng.uniform(0.5, 1.5, shape)
        elif name in lora.INPUT_AXES:  # stacked [layers, in..., out...]
            value = rng.normal(0.0, math.prod(shape[1 : 1 + lora.INPUT_AXES[name]]) ** -0.5, shape)
        else:  # the embedding [V, D] or the output layer [D, V]
            value = rng.normal(0.0, shape[0] ** -0.5 if name != "embedding" else 1.0, shape)
        flat.append((path, var.replace(value=jnp.asarray(value, var.get_value().dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _trainable(seed: int, use_lora: bool):
    """(trainable, frozen): the model itself, or random adapters (B not zero) on wq and w_up of a frozen base."""
    rng = np.random.default_rng([7, seed])
    base = _random_model(rng)
    if not use_lora:
        return base, ()
    adapters = lora.LoraAdapters(base, rank=2, alpha=4.0, targets=("wq", "w_up"), rngs=nnx.Rngs(1))
    for factor in (*adapters.a, *adapters.b):
        factor[...] = jnp.asarray(rng.normal(0.0, 0.5, factor[...].shape), factor[...].dtype)
    return adapters, (base,)


def _round_rows(rng, k: int, seed: int) -> dict[str, np.ndarray]:
    """k * P pairs whose chosen responses hold 1-2 tokens in the first micro-batch the round's shuffle makes,
    3-5 in the second, ... (unequal counts per micro-batch), with random reference log-probs."""
    ids = {"i": np.repeat(np.arange(k * P)[:, None], 2, axis=1)}
    order = [b["i"][:, 0] for b, _ in zip(phases.row_batches(ids, P, seed), range(k))]
    micro_batch = {int(i): j for j, idx in enumerate(order) for i in idx}
    pair_list = []
    for i in range(k * P):
        n = int(rng.integers(1 + 3 * micro_batch[i], 3 + 3 * micro_batch[i]))
        prompt, rejected = rng.integers(0, CFG.vocab_size, 3), rng.integers(0, CFG.vocab_size, rng.integers(1, 8))
        pair_list.append((tuple(prompt.tolist()), tuple(rng.integers(0, CFG.vocab_size, n).tolist()), tuple(rejected)))
    rows = pairs.pair_rows(pair_list, L)
    rows["ref_chosen_logp"] = rng.normal(-30.0, 4.0, k * P).astype(np.float32)
    rows["ref_rejected_logp"] = rng.normal(-30.0, 4.0, k * P).astype(np.float32)
    return rows


def _one_update(tmp_path, rows, k: int, pairs_per_batch: int, seed: int, use_lora: bool, loss_fn) -> np.ndarray:
    """The parameters (flattened) after one optimizer update of a round of k steps of `pairs_per_batch` pairs."""
    from proxykd_jax.align import config as align_config
    from proxykd_jax.train import optim
    from proxykd_jax.train.loop import default_config as train_default_config

    acfg = align_config.default_config()
    acfg.update(warmup_steps=0, checkpoint_every=0)
    ocfg = optim.default_config()
    ocfg.update(grad_accum=k, eps=1e3, weight_decay=0.0, clip_norm=0.0)
    tcfg = train_default_config()
    tcfg.update(log_every=1, tensorboard=False, progress=False, peak_flops=1e9)
    mesh = make_mesh(ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": 1, "tensor": 1}}), jax.devices()[:1])
    trainer = rounds.PhaseTrainer(acfg, ocfg, tcfg, mesh, LOGICAL_RULES, seq_len=L)
    trainable, frozen = _trainable(seed, use_lora)
    trained = trainer.train(
        tmp_path / f"accum{k}",
        trainable,
        frozen,
        loss_fn,
        rounds.round_batches(rows, pairs_per_batch, seed, k),
        steps=k,
        lr=1e3,  # lr / optim.eps = 1: the update is about the gradient itself
        rows_per_step=2 * pairs_per_batch,
    )
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.state(trained, nnx.Param))])


CASES = [  # seed, loss_type, LoRA, nll_weight, grad_accum values (each case: one more trace per value)
    (0, "dpo", False, 1.0, (4,)),
    (1, "ipo", True, 0.7, (2,)),
    (2, "dpo", True, 0.0, (4,)),
]


@pytest.mark.parametrize("seed,loss_type,use_lora,nll_weight,accums", CASES)
def test_accumulated_dpo_update_equals_one_step_on_the_whole_batch(
    tmp_path, seed, loss_type, use_lora, nll_weight, accums
):
    """k * P pairs, whose chosen responses hold 1-2, 3-5, ... tokens by micro-batch of P: grad_accum = k micro-batches
    (a second value of `accums` divides k) vs one step of grad_accum = 1 on all of them: the parameters after the
    update agree, and the update is no small one."""
    loss_fn = functools.partial(objectives.dpo_loss_fn, beta=0.3, nll_weight=nll_weight, chunk=8, loss_type=loss_type)
    before = np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.state(_trainable(seed, use_lora)[0], nnx.Param))])
    rows = _round_rows(np.random.default_rng(seed), accums[0], seed)
    n_pairs = accums[0] * P
    whole = _one_update(tmp_path, rows, 1, n_pairs, seed, use_lora, loss_fn)
    step = np.abs(whole - before)
    assert step.max() > 1e-2, "the update barely moved the parameters"
    for k in accums:
        accumulated = _one_update(tmp_path, rows, k, n_pairs // k, seed, use_lora, loss_fn)
        np.testing.assert_allclose(accumulated, whole, rtol=1e-5, atol=1e-5 * step.max(), err_msg=f"grad_accum={k}")


def test_update_tokens_count_the_update_and_resume_in_the_middle_of_one():
    """Each micro-batch's `update_tokens` sum over its chosen rows to the update's chosen response tokens / k; a
    state saved after any micro-batch (through JSON, as the Loop's checkpoints) resumes to the same batches."""
    k, seed = 3, 11
    rng = np.random.default_rng(seed)
    rows = _round_rows(rng, 2 * k, seed)  # two updates' worth; the iterator is endless (epochs reshuffle)
    it = rounds.round_batches(rows, P, seed, k)
    states, batches = [], []
    for _ in range(3 * k):
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    assert len({float(b["loss_mask"][0::2].sum()) for b in batches[:k]}) == k  # unequal micro-batches
    for u in range(3):
        group = batches[u * k : (u + 1) * k]
        n_update = sum(float(b["loss_mask"][0::2].sum()) for b in group)
        for b in group:
            np.testing.assert_allclose(b[objectives.UPDATE_TOKENS][0::2].sum(), n_update / k, rtol=1e-6)
    for i in (1, k, k + 2):
        resumed = rounds.round_batches(rows, P, seed, k)
        resumed.set_state(states[i])
        for want in batches[i:]:
            got = next(resumed)
            assert sorted(got) == sorted(want)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"resumed at {i}: {name}")
    assert objectives.UPDATE_TOKENS not in next(rounds.round_batches(rows, P, seed, 1))  # grad_accum = 1: as before
