"""The training loop shared by every stage: data -> global batch -> step, metrics, checkpoints.

The host never waits on the step it just dispatched: after dispatching step s it reads the
metrics of step s-1. It does wait at checkpoint steps, because a checkpoint is written only
after its own step's loss and gradient norm are known to be finite, so the newest checkpoint is
always a good one, and only after every metrics row up to its step (eval rows included) is on
disk: a resumed run starts after it and writes none of them again, and drops the rows the killed run
wrote past it (TensorBoard is told to hide them). A non-finite loss or gradient norm stops training
with `TrainingDiverged`. Re-running the same command resumes from the newest checkpoint (state and
data position).

With an eval step and `train.eval_every` > 0, every eval_every-th step's state is evaluated (`Loop.evaluate`)
right after that step: its `eval_*` row goes to metrics.jsonl and TensorBoard, `eval_loss` to the progress bar,
and an `EvalWatcher` (distill's `keep_best`) is told.

A logged row's tokens_per_s and mfu cover the steps since the previous row; both count every position
of the batch's rows (rows x its length, padding included: what the step computes, not the tokens it trains
on, which a step's own metrics report where it has them). They are timed per compiled call
(`CallTimer`): a call's time, from the previous call's metrics arriving on the host to its own
arriving (for the first call after start or resume: from its dispatch returning, after its
compile), is split evenly over its steps.

A loop given `row_lengths` (align's, whose batches are cut to their longest row) takes batches of any of those
lengths, with FLOPs per step a function of the length; the batches of a several-step call are padded to the
longest of them (`padded`), as one compiled program stacks them.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pathlib
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from proxykd_jax import progress
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.parallel import hosts
from proxykd_jax.parallel.sharding import global_batch, global_batches
from proxykd_jax.train.checkpoint import Checkpointer
from proxykd_jax.train.config import loop_config as default_config  # noqa: F401  (re-exported)
from proxykd_jax.train.metrics import MetricsWriter, measure_matmul_peak
from proxykd_jax.train.state import TrainState, abstract_like
from proxykd_jax.train.step import auto_steps_for_batch, make_multi_step, resolve_steps_per_call

log = logging.getLogger(__name__)


@functools.cache
def _measured_peak_per_device(dtype: str = "float32") -> float:
    """The matmul peak per device in `dtype`, measured once per process and dtype (each stage phase
    reuses it). A bfloat16 model's MFU is against a bfloat16 product: on a GPU a float32 one runs as
    TF32, about half the rate. 2048^3 on CPU, 4096^3 (100 MB in bfloat16) on an accelerator, where
    a 2048^3 product is over in tens of microseconds and its timing would be mostly launch latency.
    """
    cpu = jax.default_backend() == "cpu"
    per_device = (
        measure_matmul_peak(n=2048 if cpu else 4096, dtype=jnp.dtype(dtype), repeats=5 if cpu else 20)
        / jax.local_device_count()
    )
    log.info("measured %s matmul peak: %.3g FLOP/s per device", dtype, per_device)
    return per_device


def _steps_to_boundary(step: int, cfg) -> int:
    """Steps after `step` up to the next checkpoint step, eval step or the last step (0: `step` is one)."""
    ends = [cfg.steps]
    for every in (cfg.checkpoint_every, cfg.eval_every):
        if every > 0:
            ends.append(-(-step // every) * every)
    return min(ends) - step


class CallTimer:
    """Seconds per step of compiled calls whose metrics the host reads one call at a time, while the
    next call runs, and the tokens/s and steps/s of a logging window of steps. Clock readings are
    passed in.

    A call's time runs from the previous call's metrics arriving on the host to its own arriving,
    and is at least the time the host took to prepare its batches: when the host, not the device,
    is the bottleneck, each interval between arrivals holds the preparation of the next call, and
    the last call's metrics are ready as soon as they are asked for. The first call after start or
    resume is timed from its dispatch returning, its compile left out. A call's time is split
    evenly over its steps; a window's rates are its steps' tokens (and FLOPs) over their summed seconds.
    """

    def __init__(self):
        self.last: float | None = None  # the previous call's metrics arrived (or the first call was dispatched)
        self.tokens, self.flops, self.seconds = 0, 0.0, 0.0  # the window's steps

    def start(self, now: float) -> None:
        """The first call's dispatch returned (after its compile) at `now`."""
        self.last = now

    def arrived(self, now: float, steps: int, prep_seconds: float) -> float:
        """A call of `steps` steps, whose batches took `prep_seconds` to prepare, delivered its metrics
        at `now`: its seconds per step."""
        per_step = max(now - self.last, prep_seconds) / steps
        self.last = now
        return per_step

    def add(self, tokens: int, seconds: float, flops: float = 0.0) -> None:
        """One step of the window, of `tokens` and `flops`, with its seconds from `arrived`."""
        self.tokens, self.flops, self.seconds = self.tokens + tokens, self.flops + flops, self.seconds + seconds

    def take(self) -> tuple[float, float] | None:
        """(tokens/s, FLOP/s) of the window, or None when it took no measurable time; starts the next window."""
        rates = (self.tokens / self.seconds, self.flops / self.seconds) if self.seconds > 0 else None
        self.tokens, self.flops, self.seconds = 0, 0.0, 0.0
        return rates


def _same(value: float, length: int) -> float:
    """A step's FLOPs whatever its row length (a loop whose rows are never cut)."""
    return value


def padded(host_batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """`host_batch` with its position fields (axis 1 as long as `tokens`'s) padded with zeros to `length` positions:
    padding in the batch contract (segment id 0, loss mask 0), which changes no real position's loss."""
    have = np.shape(host_batch["tokens"])[1]

    def pad(v):
        if v.ndim < 2 or v.shape[1] != have:
            return v
        return np.pad(v, [(0, 0), (0, length - have)] + [(0, 0)] * (v.ndim - 2))

    return {k: pad(np.asarray(v)) for k, v in host_batch.items()}


class TrainingDiverged(FloatingPointError):
    """Raised when a step's loss or gradient norm is NaN or infinite."""


class EvalWatcher:
    """What `Loop.run` tells of its evaluations (distill's `keep_best` keeps the best step's student); these
    methods do nothing."""

    def resumed(self, step: int) -> None:
        """Training goes on after `step` (0: from the start; train.steps: nothing is left to train)."""

    def evaluated(self, step: int, metrics: dict[str, float], state: TrainState, resume_step: int | None) -> None:
        """Step `step` was evaluated: `metrics` as `Loop.evaluate` gives them, `state` after the step (donated to
        the next step once this returns). `resume_step`: the step a run killed now resumes after (its newest
        finished checkpoint, 0 before one); None when the loop writes no checkpoints (a killed run starts over)."""


BEST_RECORD = "best.json"  # in each kept folder: {"step", "eval_loss", "eval": the step's eval metrics}


def _remove(path: pathlib.Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class BestKeeper(EvalWatcher):
    """Keeps the model of the evaluated step of the lowest eval loss (ties: the earliest), as the folder
    `<folder>/<step>/` that `save(state, folder)` writes (collectively) with its `BEST_RECORD`: written beside it
    (`<step>.tmp`) and renamed into place when a step beats the best so far. A resumed run removes the folders past
    the step it resumes after (a killed run's, of evaluations it makes again) and goes on from the newest one left;
    a folder is removed once a newer one is kept at or before a finished checkpoint (no run resumes before that).
    Process 0 moves the files; every process decides alike, from the replicated eval metrics. (distill.keep_best)"""

    def __init__(self, folder: pathlib.Path, save: Callable[[TrainState, pathlib.Path], None]):
        self.folder, self.save = pathlib.Path(folder), save
        self.step, self.value = 0, math.inf

    def _kept(self) -> list[int]:
        """The steps of the kept folders, oldest first (process 0's view)."""
        if not self.folder.is_dir():
            return []
        return sorted(int(p.name) for p in self.folder.iterdir() if p.name.isdigit() and (p / BEST_RECORD).is_file())

    def _prune(self, upto: int) -> None:
        """Removes the folders older than the newest one at or before step `upto` (process 0)."""
        kept = self._kept()
        base = max((s for s in kept if s <= upto), default=None)
        for s in kept:
            if base is not None and s < base:
                _remove(self.folder / str(s))

    def resumed(self, step: int) -> None:
        text = "null"
        if jax.process_index() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for path in self.folder.iterdir():  # a half-written folder, or one past `step`: its step runs again
                if not path.name.isdigit() or int(path.name) > step or not (path / BEST_RECORD).is_file():
                    _remove(path)
            kept = self._kept()
            text = (self.folder / str(kept[-1]) / BEST_RECORD).read_text() if kept else text
        best = json.loads(hosts.broadcast_text(text))
        self.step, self.value = (int(best["step"]), float(best["eval_loss"])) if best else (0, math.inf)
        if best:
            log.info(
                "resuming with the model of step %d kept in %s (eval loss %.6g)", self.step, self.folder, self.value
            )

    def evaluated(self, step: int, metrics: dict[str, float], state: TrainState, resume_step: int | None) -> None:
        value = float(metrics["loss"])
        if not value < self.value:  # a tie (or NaN) keeps the earlier step
            return
        tmp, path = self.folder / f"{step}.tmp", self.folder / str(step)
        if jax.process_index() == 0:
            _remove(tmp)
        hosts.sync("keep best: tmp cleared")
        self.save(state, tmp)
        if jax.process_index() == 0:
            record = {"step": step, "eval_loss": value, "eval": {k: float(v) for k, v in metrics.items()}}
            (tmp / BEST_RECORD).write_text(json.dumps(record, sort_keys=True) + "\n")
            tmp.rename(path)
            self._prune(step if resume_step is None else resume_step)
        hosts.sync("keep best: kept")
        self.step, self.value = step, value

    def finish(self) -> pathlib.Path:
        """The kept model's folder, once training is over (its checkpoints finished): the older ones removed."""
        if not math.isfinite(self.value):
            raise ProxyKDError(
                f"no evaluated step had a finite eval loss, so {self.folder} keeps no model; check the eval data "
                "(train.eval_every, the eval split), or stop keeping the best step."
            )
        if jax.process_index() == 0:
            self._prune(self.step)
        hosts.sync("keep best: pruned")
        return self.folder / str(self.step)


class Loop:
    """Runs `train_step` over a data iterator with metrics, evaluation and checkpoints.

    `train_step(state, batch, *frozen) -> (state, metrics)` and `eval_step(state, batch, *frozen)
    -> metrics` come from `train.step`; `state_shardings` is the TrainState of NamedShardings they
    were jitted with. `flops_per_step` (model FLOPs of one step, see `metrics.step_flops`) enables
    MFU; 0 leaves it out. `compute_dtype` (the model's) picks the matmul whose measured peak MFU is
    against when `train.peak_flops` is 0. `clock` times the calls (see `CallTimer`).
    """

    def __init__(
        self,
        train_cfg,
        *,
        run_dir: str | pathlib.Path,
        mesh: Mesh,
        rules,
        train_step: Callable,
        state_shardings: TrainState,
        eval_step: Callable | None = None,
        flops_per_step: float | Callable[[int], float] = 0.0,
        compute_dtype="float32",
        clock: Callable[[], float] = time.perf_counter,
        row_lengths: Sequence[int] = (),
    ):
        """`flops_per_step`: a step's FLOPs, or a function of its batch's row length (with `row_lengths`).
        `row_lengths`: the lengths a batch's rows may have besides train.seq_len (`pipeline.lengths_of`)."""
        self.cfg, self.mesh, self.rules = train_cfg, mesh, rules
        self.run_dir = pathlib.Path(run_dir)
        self.train_step, self.eval_step = train_step, eval_step
        self.state_shardings = state_shardings
        self.flops_at = flops_per_step if callable(flops_per_step) else functools.partial(_same, float(flops_per_step))
        self.row_lengths = {int(train_cfg.seq_len), *map(int, row_lengths)}
        self.compute_dtype = jnp.dtype(compute_dtype).name
        self.clock = clock

    def _peak_flops(self) -> float:
        if self.cfg.peak_flops > 0:
            return self.cfg.peak_flops * jax.device_count()
        return _measured_peak_per_device(self.compute_dtype) * jax.device_count()

    def _check_batch(self, host_batch: dict[str, np.ndarray]) -> tuple[int, int]:
        """Validates the batch shape against train.batch_size / seq_len (or `row_lengths`); returns (global tokens,
        row length)."""
        if "tokens" not in host_batch:
            raise ValueError(f"a train batch needs a 'tokens' field; got fields {sorted(host_batch)}.")
        local_rows, length = np.shape(host_batch["tokens"])
        rows = local_rows * jax.process_count()
        if rows != self.cfg.batch_size or length not in self.row_lengths:
            raise ValueError(
                f"batch 'tokens' is [{rows} global rows, {length}] but train.batch_size={self.cfg.batch_size}, "
                f"train.seq_len={self.cfg.seq_len}; make the data pipeline and the train config agree."
            )
        return rows * length, length

    def _next_batch(self, data_iter, step: int) -> dict[str, np.ndarray]:
        try:
            return next(data_iter)
        except StopIteration:
            raise ProxyKDError(
                f"the training data ran out after {step - 1} of train.steps={self.cfg.steps} steps (batches of "
                f"train.batch_size={self.cfg.batch_size} rows x train.seq_len={self.cfg.seq_len} tokens; a split "
                "that packs into fewer rows than one batch gives none); set data.num_epochs=0 (repeat the data) "
                "or raise it, lower train.steps or train.batch_size, or give more data."
            ) from None

    def evaluate(self, state: TrainState, batches: Iterable[dict[str, np.ndarray]], frozen: Sequence[Any] = ()):
        """The eval step's metrics over `batches` (host-local numpy dicts), as floats: when the step
        reports `tokens`, its per-token means weighted by their batch's tokens (the mean over all of
        them) and `tokens` summed; otherwise the mean over batches."""
        totals: dict[str, float] = {}
        count, weight = 0, 0.0
        for host_batch in batches:
            metrics = jax.device_get(self.eval_step(state, global_batch(host_batch, self.mesh, self.rules), *frozen))
            w = float(metrics["tokens"]) if "tokens" in metrics else 1.0
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value) * (1.0 if name == "tokens" else w)
            count, weight = count + 1, weight + w
        if count == 0:
            raise ValueError("the eval batches are empty; give at least one batch or set train.eval_every = 0.")
        weight = weight or 1.0  # no tokens at all: every per-token sum is 0
        return {name: total if name == "tokens" else total / weight for name, total in totals.items()}

    def run(
        self,
        state: TrainState,
        data_iter: Iterator[dict[str, np.ndarray]],
        *,
        frozen: Sequence[Any] = (),
        eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None,
        watcher: EvalWatcher | None = None,
    ) -> TrainState:
        """Trains from `state` (or the newest checkpoint in run_dir) to `train.steps`; returns the state.
        `eval_batches()` gives the batches of each evaluation; `watcher` is told where training starts and
        of each evaluation."""
        cfg = self.cfg
        ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.keep_checkpoints) if cfg.checkpoint_every > 0 else None
        start, writer = 0, None
        try:
            if ckpt is not None and ckpt.latest_step() is not None:
                start = ckpt.latest_step()
                state = ckpt.restore(abstract_like(state, self.state_shardings), data_iter, start)
                log.info("resumed from step %d in %s", start, ckpt.directory)
            # rows past `start` come from a run killed after that checkpoint: they are written again
            writer = MetricsWriter(self.run_dir, cfg.tensorboard, resume_step=start)
            if watcher is not None:
                watcher.resumed(start)
            if start >= cfg.steps:
                if ckpt is not None:  # killed after its last save: maybe while orbax removed the steps past `keep`
                    ckpt.drop_old_steps()
                return state
            peak = self._peak_flops() if self.flops_at(int(cfg.seq_len)) > 0 else 0.0
            bar = progress.bar(
                total=cfg.steps,
                initial=start,
                desc="train",
                unit="step",
                disable=not cfg.progress or jax.process_index() != 0,
            )
            timer = CallTimer()
            shown_eval: dict[str, str] = {}  # the last evaluation's loss, on the progress bar

            def report_all(first: int, metrics, shapes: list[tuple[int, int]], prep_seconds: float) -> None:
                """Reads one call's metrics (waits for that call only): one value per step, or [n] each.
                `shapes`: each step's (tokens, row length)."""
                host = jax.device_get(metrics)
                seconds = timer.arrived(self.clock(), len(shapes), prep_seconds)
                for i, (step_tokens, length) in enumerate(shapes):
                    values = {k: (v[i] if len(shapes) > 1 else v) for k, v in host.items()}
                    report(first + i, values, step_tokens, self.flops_at(length), seconds)

            def report(step: int, host_metrics, tokens: int, flops: float, seconds: float) -> None:
                """Checks one step's metrics and logs them; `seconds`: the step's share of its call's time."""
                values = {k: float(v) for k, v in host_metrics.items()}
                bad = [k for k in ("loss", "grad_norm") if k in values and not math.isfinite(values[k])]
                if bad:
                    last = ckpt.latest_step() if ckpt is not None else None
                    where = (
                        f"the last good checkpoint is step {last} in {ckpt.directory}"
                        if last is not None
                        else "no checkpoint was written"
                    )
                    raise TrainingDiverged(
                        f"{bad[0]} is {values[bad[0]]} at step {step}; training stopped and {where}. "
                        "Lower optim.lr, tighten optim.clip_norm or check the data of this step."
                    )
                timer.add(tokens, seconds, flops)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    rates = timer.take()
                    if rates is not None:  # a window that took no measurable time has no meaningful rate
                        values["tokens_per_s"] = rates[0]
                        if peak > 0:
                            values["mfu"] = rates[1] / peak
                    writer.write(step, values)
                    shown = {k: f"{values[k]:.4g}" for k in ("loss", "tokens_per_s", "mfu") if k in values}
                    bar.set_postfix(shown | shown_eval)
                bar.update(step - bar.n)

            # Several steps per call need the step's pure function (`make_train_step`); a wrapped step
            # (a test's, a profiler's) runs one step per call.
            auto = not cfg.get("steps_per_call", 0)
            per_call = resolve_steps_per_call(cfg.get("steps_per_call", 0), self.state_shardings, cfg.steps)
            if not hasattr(self.train_step, "step_fn"):
                per_call = 1
            pending = None
            step = start + 1
            while step <= cfg.steps:
                prep_start = self.clock()
                host_batches = [self._next_batch(data_iter, step)]
                if auto and step == start + 1:  # auto: capped by the first batch's size (at full length)
                    per_call = auto_steps_for_batch(per_call, padded(host_batches[0], int(cfg.seq_len)))
                # Several steps per call (`make_multi_step`) unless that would cross a checkpoint or eval
                # step or the end: those steps run one at a time, so every boundary ends a call.
                n = per_call if per_call > 1 and _steps_to_boundary(step, cfg) >= per_call - 1 else 1
                host_batches += [self._next_batch(data_iter, step + i) for i in range(1, n)]
                shapes = [self._check_batch(b) for b in host_batches]
                if n > 1 and len({length for _, length in shapes}) > 1:  # one program: stacked at one length
                    host_batches = [padded(b, max(length for _, length in shapes)) for b in host_batches]
                    shapes = [self._check_batch(b) for b in host_batches]
                if n > 1:
                    multi = make_multi_step(self.train_step, self.state_shardings)
                    batches = global_batches(host_batches, self.mesh, self.rules)
                    prep_seconds = self.clock() - prep_start
                    state, metrics = multi(state, batches, *frozen)
                else:
                    batch = global_batch(host_batches[0], self.mesh, self.rules)
                    prep_seconds = self.clock() - prep_start
                    state, metrics = self.train_step(state, batch, *frozen)
                if step == start + 1:
                    timer.start(self.clock())  # the first call is compiled and dispatched: its time starts here
                if pending is not None:
                    report_all(*pending)
                last = step + n - 1
                pending = (step, metrics, shapes, prep_seconds)
                saves = ckpt is not None and (last % cfg.checkpoint_every == 0 or last == cfg.steps)
                if saves:
                    report_all(*pending)
                    pending = None
                if (
                    eval_batches is not None
                    and self.eval_step is not None
                    and cfg.eval_every > 0
                    and last % cfg.eval_every == 0
                ):
                    evaluated = self.evaluate(state, eval_batches(), frozen)
                    writer.write(last, {f"eval_{k}": v for k, v in evaluated.items()})
                    if "loss" in evaluated:
                        shown_eval["eval_loss"] = f"{evaluated['loss']:.4g}"
                    if watcher is not None:  # a killed run resumes after its newest finished checkpoint
                        resume_step = (ckpt.finished_step() or 0) if ckpt is not None else None
                        watcher.evaluated(last, evaluated, state, resume_step)
                if saves:  # after every row up to its step is on disk: a resumed run writes none of them again
                    writer.flush()
                    ckpt.save(last, state, data_iter)
                step = last + 1
            if pending is not None:
                report_all(*pending)
            bar.close()
            if ckpt is not None:
                ckpt.drop_old_steps()
            return state
        finally:
            if writer is not None:
                writer.close()
            if ckpt is not None:
                ckpt.close()
