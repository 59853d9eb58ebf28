"""Optimizer, train loop, checkpoints (resume, other mesh), NaN stop, metrics — tiny Llama, 8 CPU devices."""

import dataclasses
import re
import types

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from parallel_helpers import BATCH, LENGTH, TINY, ce_loss, make_batch, mesh_cfg, optim_cfg

from proxykd_jax.errors import CheckpointError
from proxykd_jax.models.llama import Llama
from proxykd_jax.parallel import LOGICAL_RULES, batch_sharding, global_batch, make_mesh, replicated
from proxykd_jax.train import (
    Checkpointer,
    Loop,
    TrainingDiverged,
    abstract_like,
    create_train_state,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    metrics,
    read_metrics,
)
from proxykd_jax.train.loop import default_config as train_default_config

STEPS = 6


class Batches:
    """Deterministic batches by index, with get_state/set_state; raises after `crash_at` batches."""

    def __init__(self, crash_at=None, poison_at=None):
        self.index, self.crash_at, self.poison_at = 0, crash_at, poison_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.index == self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        batch = make_batch(seed=100 + self.index)
        batch["scale"] = np.full((BATCH,), np.nan if self.index == self.poison_at else 1.0, np.float32)
        self.index += 1
        return batch

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def scaled_ce(model, batch):
    loss, aux = ce_loss(model, batch)
    return loss * jnp.mean(batch["scale"]), aux


def grain_batches():
    """The same batches as `Batches` through a grain pipeline (a checkpointable DatasetIterator)."""

    def to_batch(i):
        batch = make_batch(seed=100 + int(i))
        batch["scale"] = np.ones((BATCH,), np.float32)
        return batch

    return iter(grain.MapDataset.range(1000).map(to_batch).to_iter_dataset())


def train_cfg(**overrides):
    cfg = train_default_config()
    cfg.update(
        dict(
            steps=STEPS,
            batch_size=BATCH,
            seq_len=LENGTH,
            checkpoint_every=2,
            keep_checkpoints=2,
            log_every=1,
            tensorboard=False,
            progress=False,
            peak_flops=1e9,
        ),
        **overrides,
    )
    return cfg


def setup(mesh, grad_accum=1, total_steps=STEPS, loss_fn=scaled_ce):
    ocfg = optim_cfg(grad_accum=grad_accum)
    optimizer = make_optimizer(ocfg, total_steps)
    graphdef, state, shardings = create_train_state(optimizer, mesh, LOGICAL_RULES, Llama, TINY, rngs=nnx.Rngs(0))
    bsh = batch_sharding(mesh, LOGICAL_RULES)
    step = make_train_step(
        loss_fn,
        graphdef,
        optimizer,
        state_shardings=shardings,
        batch_shardings=bsh,
        schedule=make_schedule(ocfg, total_steps),
        grad_accum=grad_accum,
    )
    eval_step = make_eval_step(loss_fn, graphdef, state_shardings=shardings, batch_shardings=bsh)
    return graphdef, state, shardings, step, eval_step


def make_loop(tmp_path, mesh=None, total_steps=STEPS, **cfg_overrides):
    """(loop, initial state, train step) on a fsdp 4 x tensor 2 mesh; the schedule spans `total_steps`."""
    mesh = mesh or make_mesh(mesh_cfg(fsdp=4, tensor=2))
    _, state, shardings, step, eval_step = setup(mesh, total_steps=total_steps)
    loop = Loop(
        train_cfg(**cfg_overrides),
        run_dir=tmp_path,
        mesh=mesh,
        rules=LOGICAL_RULES,
        train_step=step,
        state_shardings=shardings,
        eval_step=eval_step,
        flops_per_step=1e6,
    )
    return loop, state, step


def run_loop(tmp_path, data, mesh=None, total_steps=STEPS, **cfg_overrides):
    loop, state, _ = make_loop(tmp_path, mesh, total_steps, **cfg_overrides)
    return loop.run(state, data, eval_batches=lambda: [make_batch(seed=7) | {"scale": np.ones(BATCH, np.float32)}])


def params_np(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = optim_cfg(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    schedule = make_schedule(cfg, total_steps=100)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(55)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), rel=1e-5)
    assert float(schedule(100)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optim.warmup_steps"):
        make_schedule(optim_cfg(warmup_steps=10), total_steps=10)


def test_matmul_peak_is_the_fastest_timed_run(monkeypatch):
    """A slow moment in the timing must not lower the peak (and so raise an MFU): the best run counts."""
    durations = iter([0.4, 0.1, 0.3, 0.25, 0.5])
    clock = {"t": 0.0, "running": False}

    def perf_counter():  # every second call ends a timed run of the next duration
        if clock["running"]:
            clock["t"] += next(durations)
        clock["running"] = not clock["running"]
        return clock["t"]

    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=perf_counter))
    n = 64
    peak = metrics.measure_matmul_peak(n=n, repeats=5)
    assert peak == pytest.approx(2 * jax.local_device_count() * n**3 / 0.1)


def test_loop_measures_the_peak_in_the_model_compute_dtype(tmp_path, monkeypatch):
    """With train.peak_flops = 0 a bfloat16 model's MFU is against a bfloat16 product (once per dtype)."""
    from proxykd_jax.train import loop as loop_lib

    calls = []

    def fake_peak(n, dtype, repeats):
        calls.append((n, jnp.dtype(dtype).name))
        return 3e12 * jax.local_device_count()

    monkeypatch.setattr(loop_lib, "measure_matmul_peak", fake_peak)
    loop_lib._measured_peak_per_device.cache_clear()
    try:
        cfg = train_default_config()
        assert cfg.peak_flops == 0.0
        mesh = make_mesh(mesh_cfg(fsdp=8))
        peaks = [
            Loop(
                cfg,
                run_dir=tmp_path,
                mesh=mesh,
                rules=LOGICAL_RULES,
                train_step=None,
                state_shardings=None,
                compute_dtype=dtype,
            )._peak_flops()
            for dtype in ("bfloat16", "float32", jnp.bfloat16)
        ]
    finally:
        loop_lib._measured_peak_per_device.cache_clear()
    assert calls == [(2048, "bfloat16"), (2048, "float32")]
    assert peaks == [3e12 * jax.device_count()] * 3


@pytest.mark.parametrize("short", [False, True], ids=["equal-tokens", "107-and-26-tokens"])
def test_gradient_accumulation_equals_one_step_on_the_whole_batch(short):
    """Two accumulated micro-batches make the update of one step on both at once (the per-token mean over
    all their tokens), with equal token counts and with 107 and 26 (the mean of the two micro-batch means,
    optax.MultiSteps', gave the second's tokens four times the weight: parameters 0.02 apart)."""
    mesh = make_mesh(mesh_cfg(fsdp=8))
    b1, b2 = make_batch(seed=11), make_batch(seed=12)
    if short:
        b2["loss_mask"][:, 4:] = 0.0
        assert b1["loss_mask"].sum() > 3 * b2["loss_mask"].sum() > 0
    else:
        b1["loss_mask"][:] = 1.0
        b2["loss_mask"][:] = 1.0
    _, acc_state, _, acc_step, _ = setup(mesh, grad_accum=2, total_steps=4, loss_fn=ce_loss)
    for b in (b1, b2):
        acc_state, _ = acc_step(acc_state, global_batch(b, mesh, LOGICAL_RULES))
    # the same schedule (2 optimizer updates), one step on both halves at once
    _, big_state, _, big_step, _ = setup(mesh, grad_accum=1, total_steps=2, loss_fn=ce_loss)
    both = {k: np.concatenate([b1[k], b2[k]]) for k in b1}
    big_state, _ = big_step(big_state, global_batch(both, mesh, LOGICAL_RULES))
    for a, b in zip(params_np(acc_state), params_np(big_state)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    fresh = [np.asarray(x) for x in jax.tree.leaves(nnx.state(Llama(TINY, rngs=nnx.Rngs(0)), nnx.Param))]
    assert max(np.abs(a - b).max() for a, b in zip(params_np(acc_state), fresh)) > 1e-3


def test_accumulate_emits_the_token_weighted_mean_gradient_every_k_micro_batches():
    """`optim.accumulate` over SGD(lr=1) against the float64 weighted mean of random gradients: zero
    updates inside a window, -Σ w_i g_i / Σ w_i at its end, and a fresh window after it."""
    from proxykd_jax.train.optim import accumulate

    rng = np.random.default_rng(0)
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    opt = accumulate(optax.sgd(1.0), 3)
    state = opt.init(params)
    for _ in range(2):  # two windows: the second starts from an emptied accumulator
        grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(3)]
        weights = rng.uniform(1.0, 50.0, size=3)
        for i, (g, w) in enumerate(zip(grads, weights)):
            g32 = {k: jnp.asarray(v, jnp.float32) for k, v in g.items()}
            updates, state = opt.update(g32, state, params, weight=jnp.float32(w))
            if i < 2:
                assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates))
        for k in params:
            expected = -sum(w * g[k] for g, w in zip(grads, weights)) / weights.sum()
            np.testing.assert_allclose(np.asarray(updates[k]), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    return run_dir, params_np(run_loop(run_dir, Batches()))


def test_loop_writes_metrics_and_checkpoints(uninterrupted):
    run_dir, _ = uninterrupted
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["mfu"] > 0 and "lr" in r for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert Checkpointer(run_dir / "checkpoints", 2).all_steps() == [4, 6]


@pytest.mark.parametrize("kind", ["json", "grain"])
def test_resume_after_a_kill_gives_the_same_final_params(tmp_path, uninterrupted, kind):
    _, expected = uninterrupted
    if kind == "json":
        with pytest.raises(KeyboardInterrupt):
            run_loop(tmp_path, Batches(crash_at=3))  # dies during step 4, after the step-2 checkpoint
        assert Checkpointer(tmp_path / "checkpoints", 2).latest_step() == 2
        final = run_loop(tmp_path, Batches())  # the same command again
    else:
        run_loop(tmp_path, grain_batches(), steps=2)  # a run stopped after its step-2 checkpoint
        final = run_loop(tmp_path, grain_batches())
    assert int(final.step) == STEPS
    for a, b in zip(params_np(final), expected):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_metrics_keep_one_row_per_step_after_a_kill_and_resume(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_loop(tmp_path, Batches(crash_at=5), checkpoint_every=3)  # dies during step 6, checkpoint at 3
    killed = {r["step"]: r["loss"] for r in read_metrics(tmp_path) if "loss" in r}
    assert sorted(killed) == [1, 2, 3, 4]  # step 4 was logged after the step-3 checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and the kill tore the next line
    run_loop(tmp_path, Batches(), checkpoint_every=3)  # resumes from step 3: steps 4-6 again
    train = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(train[3]["loss"], killed[4], rtol=1e-6)  # the redone step 4 is the same step


def test_several_steps_per_call_equal_one_step_per_call(tmp_path):
    """train.steps_per_call = 4 against 1 over 10 steps with checkpoints at 6 and 10: calls of steps
    1-4 and 7-10, steps 5 and 6 alone (a call never crosses a checkpoint); the same losses, checkpoints
    and final parameters. Then a kill inside the second 4-step group resumes from step 6 to the same end."""
    runs = {}
    for per_call in (1, 4):
        run_dir = tmp_path / f"per_call_{per_call}"
        loop, state, step = make_loop(run_dir, total_steps=10, steps=10, checkpoint_every=6, steps_per_call=per_call)
        final = loop.run(state, Batches())
        losses = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
        runs[per_call] = (params_np(final), losses, Checkpointer(run_dir / "checkpoints", 2).all_steps(), step)
    (p1, l1, c1, step1), (p4, l4, c4, step4) = runs[1], runs[4]
    assert getattr(step1, "multi", None) is None and step4.multi is not None  # built for its first call only
    assert sorted(l4) == list(range(1, 11)) and c4 == c1 == [6, 10]
    np.testing.assert_allclose([l4[s] for s in range(1, 11)], [l1[s] for s in range(1, 11)], rtol=1e-5)
    for a, b in zip(p4, p1):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):  # dies fetching step 9's batch, inside the 7-10 group
        run_loop(killed, Batches(crash_at=8), total_steps=10, steps=10, checkpoint_every=6, steps_per_call=4)
    assert Checkpointer(killed / "checkpoints", 2).latest_step() == 6
    final = run_loop(killed, Batches(), total_steps=10, steps=10, checkpoint_every=6, steps_per_call=4)
    for a, b in zip(params_np(final), p1):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


class FakeClock:
    """A clock that moves only when a test moves it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowBatches(Batches):
    """`Batches` that each take `seconds` to fetch on `clock`."""

    def __init__(self, clock: FakeClock, seconds: float):
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def __next__(self):
        self.clock.now += self.seconds
        return super().__next__()


def test_tokens_per_s_and_mfu_of_rows_that_split_calls(tmp_path):
    """4 steps per call, a row every 3 steps, each batch 0.25 s to fetch on the loop's clock (the
    device is instant next to it): every row, inside one call or spanning two, the first call's
    included, has the rate of 0.25 s per step; the last call's metrics, ready as soon as they are
    asked for, do not make its rows instant. The old loop logged near-zero seconds for rows inside
    a call (MFU far above 1) and the whole call for the next row."""
    clock = FakeClock()
    loop, state, _ = make_loop(tmp_path, total_steps=12, steps=12, checkpoint_every=0, steps_per_call=4, log_every=3)
    loop.clock = clock
    loop.run(state, SlowBatches(clock, 0.25))
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(BATCH * LENGTH / 0.25)
        assert r["mfu"] == pytest.approx(1e6 / 0.25 / (1e9 * jax.device_count()))


def test_steps_per_call_auto():
    """0 (auto): 16 on CPU for runs of 1,000 steps or more, else 1, lowered so that one call's stacked
    batches stay under 256 MiB; a set value is kept."""
    from proxykd_jax.train.step import auto_steps_for_batch, resolve_steps_per_call

    _, _, shardings, _, _ = setup(make_mesh(mesh_cfg(fsdp=8)))
    assert [resolve_steps_per_call(0, shardings, n) for n in (10, 999, 1000, 50_000)] == [1, 1, 16, 16]
    assert resolve_steps_per_call(2, shardings, 10) == 2
    small = {"tokens": np.zeros((8, 256), np.int32), "targets": np.zeros((8, 256), np.int32)}
    # a distill batch of 64 rows x 2048 tokens with K = 64 teacher ids and log-probs: 67 MB
    large = {"kd_ids": np.zeros((64, 2048, 64), np.int32), "kd_logprobs": np.zeros((64, 2048, 64), np.float32)}
    assert auto_steps_for_batch(16, small) == 16
    assert auto_steps_for_batch(16, large) == 4
    assert auto_steps_for_batch(16, {"x": np.zeros(2**29, np.uint8)}) == 1


def test_auto_steps_per_call_follows_the_batch_size(tmp_path, monkeypatch):
    """The loop caps auto's steps per call by its first batch's size: with auto's minimum run lowered
    to 5 steps and a budget of 2.5 batches, a 7-step run holds 2 steps in every call but the last."""
    from proxykd_jax.train import loop as loop_lib
    from proxykd_jax.train import step as step_lib

    calls = []
    multi = step_lib.make_multi_step

    def counting_multi(train_step, shardings):
        fn = multi(train_step, shardings)
        return lambda state, batches, *frozen: (calls.append(batches["tokens"].shape[0]), fn(state, batches, *frozen))[
            1
        ]

    nbytes = sum(v.nbytes for v in next(Batches()).values())
    monkeypatch.setattr(step_lib, "_AUTO_STACK_BYTES", int(2.5 * nbytes))
    monkeypatch.setattr(step_lib, "_AUTO_MIN_STEPS", 5)
    monkeypatch.setattr(loop_lib, "make_multi_step", counting_multi)
    run_loop(tmp_path, Batches(), total_steps=7, steps=7, checkpoint_every=0, steps_per_call=0)
    assert calls == [2, 2, 2]  # steps 1-6 in pairs, step 7 (the end) alone


def test_nan_inside_a_several_step_call_names_its_step(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3; .*no checkpoint was written"):
        run_loop(tmp_path, Batches(poison_at=2), checkpoint_every=0, steps_per_call=4)  # steps 1-4 in one call


@pytest.mark.parametrize("target", ["2x4", "1 device"])
def test_restore_onto_a_different_mesh(tmp_path, target):
    mesh = make_mesh(mesh_cfg(fsdp=8))
    _, state, _, step, _ = setup(mesh)
    state, _ = step(
        state, global_batch(make_batch(seed=5) | {"scale": np.ones(BATCH, np.float32)}, mesh, LOGICAL_RULES)
    )
    ckpt = Checkpointer(tmp_path, keep=1)
    ckpt.save(1, state)
    ckpt.wait()
    saved = jax.tree.map(np.asarray, state)
    new_mesh = make_mesh(mesh_cfg(data=2, fsdp=4)) if target == "2x4" else make_mesh(mesh_cfg(), jax.devices()[:1])
    _, fresh, new_shardings, _, _ = setup(new_mesh)
    restored = ckpt.restore(abstract_like(fresh, new_shardings))
    ckpt.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-5, rtol=0)
        assert a.sharding.mesh.shape == new_mesh.shape
    assert int(restored.step) == 1
    wq = restored.params["layers"]["attn"]["wq"][...]
    assert wq.sharding.spec == new_shardings.params["layers"]["attn"]["wq"].get_value().spec


def test_a_checkpoint_of_another_model_or_optimizer_is_not_called_damaged(tmp_path):
    """Restoring onto another d_ff or another optimizer chain names the array and the config, and
    never advises deleting the (good) checkpoint, which still restores with its own config."""
    mesh = make_mesh(mesh_cfg(fsdp=8))
    _, state, shardings, _, _ = setup(mesh)
    ckpt = Checkpointer(tmp_path / "train_state", keep=1)
    ckpt.save(1, state)
    ckpt.wait()

    def target(model_cfg, ocfg):
        _, fresh, fresh_shardings = create_train_state(
            make_optimizer(ocfg, STEPS), mesh, LOGICAL_RULES, Llama, model_cfg, rngs=nnx.Rngs(0)
        )
        return abstract_like(fresh, fresh_shardings)

    other_model = dataclasses.replace(TINY, d_ff=2 * TINY.d_ff)
    d, f = TINY.d_model, TINY.d_ff
    cases = [
        (
            target(other_model, optim_cfg()),
            rf"its params/layers/mlp/w_down/value is \(1, {f}, {d}\) but this config's is \(1, {2 * f}, {d}\)",
        ),
        (target(TINY, optim_cfg(clip_norm=0.0)), r"it has no array opt_state/0/0/count"),  # no clipping stage
    ]
    for abstract, detail in cases:
        with pytest.raises(CheckpointError, match="written with another model or optimizer config") as info:
            ckpt.restore(abstract)
        message = str(info.value)
        assert re.search(detail, message) and "run with the model and optim settings" in message
        assert "delete" not in message and "overwrite" not in message and "damaged" not in message
    restored = ckpt.restore(abstract_like(state, shardings))
    assert int(restored.step) == 0
    ckpt.close()

    single = Checkpointer(tmp_path / "single", keep=1)  # the reviewer's case: one array of another shape
    single.save(1, {"w": jnp.zeros((4, 3))})
    single.wait()
    with pytest.raises(CheckpointError, match=r"its w is \(4, 3\) but this config's is \(5, 3\)\); run with") as info:
        single.restore({"w": jax.ShapeDtypeStruct((5, 3), jnp.float32, sharding=replicated(mesh))}, step=1)
    assert "delete" not in str(info.value)
    single.close()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5; .*last good checkpoint is step 4"):
        run_loop(tmp_path, Batches(poison_at=4), checkpoint_every=1)
    ckpt = Checkpointer(tmp_path / "checkpoints", 2)
    assert ckpt.latest_step() == 4
    mesh = make_mesh(mesh_cfg(fsdp=4, tensor=2))
    _, fresh, shardings, _, _ = setup(mesh)
    good = ckpt.restore(abstract_like(fresh, shardings))
    assert all(np.isfinite(x).all() for x in params_np(good))


def test_eval_metrics_and_no_donation(tmp_path):
    run_loop(tmp_path, Batches(), steps=2, eval_every=2, checkpoint_every=0)
    evals = [r for r in read_metrics(tmp_path) if "eval_loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2 and np.isfinite(evals[0]["eval_loss"])
    mesh = make_mesh(mesh_cfg(fsdp=8))
    _, state, _, _, eval_step = setup(mesh)
    batch = global_batch(make_batch(seed=7) | {"scale": np.ones(BATCH, np.float32)}, mesh, LOGICAL_RULES)
    first = eval_step(state, batch)["loss"]
    assert float(eval_step(state, batch)["loss"]) == float(first)  # state still alive: nothing donated


def test_eval_averages_over_tokens_not_batches(tmp_path):
    """Eval batches of 102 and 29 loss tokens: eval_loss is the per-token mean over all 131 (a float64 sum
    of the per-token losses), not the mean of the two batch means; `tokens` is their total."""
    mesh = make_mesh(mesh_cfg(fsdp=8))
    graphdef, state, shardings, step, eval_step = setup(mesh)
    loop = Loop(
        train_cfg(),
        run_dir=tmp_path,
        mesh=mesh,
        rules=LOGICAL_RULES,
        train_step=step,
        state_shardings=shardings,
        eval_step=eval_step,
    )
    b1, b2 = make_batch(seed=21), make_batch(seed=22)
    b2["loss_mask"][:, 4:] = 0.0
    nll_sum, n = 0.0, 0.0
    for b in (b1, b2):
        b["scale"] = np.ones(BATCH, np.float32)
        logits = np.asarray(jax.device_get(state.model(graphdef)(b["tokens"])), np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
        nll_sum, n = nll_sum + (nll * b["loss_mask"]).sum(), n + b["loss_mask"].sum()
    got = loop.evaluate(state, [b1, b2])
    assert got["tokens"] == n == 131
    assert got["loss"] == pytest.approx(nll_sum / n, rel=1e-5)


def test_batch_shape_must_match_the_train_config(tmp_path):
    with pytest.raises(ValueError, match="train.batch_size=16"):
        run_loop(tmp_path, Batches(), batch_size=16, checkpoint_every=0)


def test_frozen_inputs_are_passed_through_and_not_donated():
    from proxykd_jax.parallel import create_sharded_model, shardings_of

    mesh = make_mesh(mesh_cfg(fsdp=4, tensor=2))
    ref = create_sharded_model(Llama, mesh, LOGICAL_RULES, TINY, rngs=nnx.Rngs(9))
    ref_graphdef, ref_state = nnx.split(ref)
    before = [np.asarray(x) for x in jax.tree.leaves(ref_state)]

    def distance_to_ref(model, batch, frozen_state):
        ref_logits = jax.lax.stop_gradient(nnx.merge(ref_graphdef, frozen_state)(batch["tokens"]))
        return jnp.mean((model(batch["tokens"]) - ref_logits) ** 2), {}

    optimizer = make_optimizer(optim_cfg(), STEPS)
    graphdef, state, shardings = create_train_state(optimizer, mesh, LOGICAL_RULES, Llama, TINY, rngs=nnx.Rngs(0))
    step = make_train_step(
        distance_to_ref,
        graphdef,
        optimizer,
        state_shardings=shardings,
        batch_shardings=batch_sharding(mesh, LOGICAL_RULES),
        frozen_shardings=(shardings_of(ref_state),),
    )
    host = make_batch(seed=3)
    expected = float(jnp.mean((state.model(graphdef)(host["tokens"]) - ref(host["tokens"])) ** 2))
    batch = global_batch(host, mesh, LOGICAL_RULES)
    state, metrics = step(state, batch, ref_state)
    state, metrics2 = step(state, batch, ref_state)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics2["loss"]) < float(metrics["loss"])  # the student moves towards the reference
    for a, b in zip(jax.tree.leaves(ref_state), before):  # still alive and unchanged
        np.testing.assert_array_equal(np.asarray(a), b)


def test_cpu_steps_use_the_memory_optimised_schedule_with_the_same_results():
    from proxykd_jax.train.step import default_compiler_options

    mesh = make_mesh(mesh_cfg(fsdp=4, tensor=2))
    optimizer = make_optimizer(optim_cfg(), STEPS)
    graphdef, state, shardings = create_train_state(optimizer, mesh, LOGICAL_RULES, Llama, TINY, rngs=nnx.Rngs(0))
    assert default_compiler_options(shardings) == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    batch = global_batch(make_batch(seed=5) | {"scale": np.ones(BATCH, np.float32)}, mesh, LOGICAL_RULES)
    results = []
    for options in (None, {}):  # the CPU default, and XLA's own schedule
        step = make_train_step(
            scaled_ce,
            graphdef,
            optimizer,
            state_shardings=shardings,
            batch_shardings=batch_sharding(mesh, LOGICAL_RULES),
            compiler_options=options,
        )
        fresh = jax.tree.map(jnp.copy, state)  # the step donates its input state
        new_state, metrics = step(fresh, batch)
        results.append((float(metrics["loss"]), params_np(new_state)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="no_such_option"):
        bad = make_train_step(
            scaled_ce,
            graphdef,
            optimizer,
            state_shardings=shardings,
            batch_shardings=batch_sharding(mesh, LOGICAL_RULES),
            compiler_options={"xla_cpu_no_such_option": "1"},
        )
        bad(jax.tree.map(jnp.copy, state), batch)


@pytest.mark.parametrize("qk", ["bias", "norm"])
def test_weight_decay_spares_norm_scales_and_biases(qk):
    """AdamW's decoupled decay shrinks weight matrices and embeddings only. A decoder layer's norm scales and
    attention biases are stacked over the layers (rank 2-3, like matrices): they were decayed too."""
    rng = np.random.default_rng()
    extra = {"qkv_bias": True} if qk == "bias" else {"qk_norm": True}
    model = Llama(dataclasses.replace(TINY, **extra), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype), nnx.state(model, nnx.Param))
    tx = make_optimizer(optim_cfg(lr=0.1, weight_decay=0.5, clip_norm=0.0), total_steps=10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    after = optax.apply_updates(params, updates)
    spared, decayed = [], []
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(after)):
        name = jax.tree_util.keystr(path)
        is_weight = not any(k in name for k in ("scale", "'bq'", "'bk'", "'bv'"))
        (decayed if is_weight else spared).append(name)
        want = old * (1 - 0.1 * 0.5) if is_weight else old
        np.testing.assert_allclose(np.asarray(new), np.asarray(want), rtol=1e-6, atol=1e-7, err_msg=name)
    assert any("attn_norm" in n for n in spared) and any(f"'{w}'" in n for n in decayed for w in ("wq", "w_up"))
    assert any(("q_norm" if qk == "norm" else "'bq'") in n for n in spared), spared
