"""A long run's hygiene: what kills and resumes leave on disk and in the logs.

The train Loop (test_train.py's tiny Llama on 8 CPU devices): TensorBoard shows each step once after a resume,
and its rows up to a checkpoint are on disk when the checkpoint is taken (a `kill -9` later cannot lose them: the
resumed run never writes them again); a checkpoint folder a kill left half-written is removed even where the
resumed run never saves that step (another `train.checkpoint_every`); an eval row of a checkpoint step outlives
a kill. The align stage (test_align_stage.py's tiny run): a finished phase keeps no checkpoints (its `params/`
is what a resume reads), and `proxy/metrics.jsonl` holds each phase's summary once.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import struct

import jax
import numpy as np
import pytest
from stage_helpers import run_stage
from test_align_stage import build_prepared, make_config, new_run
from test_train import BATCH, Batches, Checkpointer, make_batch, make_loop, read_metrics, run_loop


def _events(folder: pathlib.Path):
    """The TensorBoard events under `folder/tensorboard`, file by file in creation order (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    for path in sorted((folder / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.name):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            if i + 12 + n + 4 > len(data):  # a record cut short by a kill
                break
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            yield event


def shown_steps(folder: pathlib.Path, tag: str = "loss") -> list[int]:
    """The steps of `tag` TensorBoard shows: events in file order, a SessionLog START at step s hiding every
    earlier event of step >= s (TensorBoard's purge of a restarted run's orphaned events)."""
    from tensorboardX.proto import event_pb2

    shown: list[int] = []
    for event in _events(folder):
        if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
            shown = [s for s in shown if s < event.step]
        shown += [event.step for value in event.summary.value if value.tag == tag]
    return shown


class KilledAt(Batches):
    """`Batches` that stops the run at batch `crash_at`, noting first which steps' TensorBoard rows are on
    disk then: what a `kill -9` at that moment would leave (no writer is closed or flushed by a kill)."""

    def __init__(self, crash_at: int, folder: pathlib.Path):
        super().__init__(crash_at=crash_at)
        self.folder, self.on_disk = folder, None

    def __next__(self):
        if self.index == self.crash_at:
            self.on_disk = shown_steps(self.folder)
        return super().__next__()


def test_tensorboard_keeps_rows_to_the_checkpoint_and_shows_each_step_once_after_resume(tmp_path):
    data = KilledAt(5, tmp_path)
    with pytest.raises(KeyboardInterrupt):  # dies fetching step 6's batch; the checkpoint is step 3's
        run_loop(tmp_path, data, checkpoint_every=3, tensorboard=True)
    assert Checkpointer(tmp_path / "checkpoints", 2).all_steps() == [3]
    assert {1, 2, 3} <= set(data.on_disk)  # the resumed run starts at step 4: these are never written again
    run_loop(tmp_path, Batches(), checkpoint_every=3, tensorboard=True)
    assert shown_steps(tmp_path) == [1, 2, 3, 4, 5, 6]  # the killed run's step 4 (and 5) hidden, not shown twice
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_left_half_written_by_a_kill_is_removed(tmp_path):
    run_loop(tmp_path, Batches(), steps=2, checkpoint_every=2)  # a run that reached its step-2 checkpoint
    partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"  # and was killed writing step 4's
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "shard").write_bytes(np.random.default_rng(0).bytes(1 << 16))
    run_loop(tmp_path, Batches(), checkpoint_every=3)  # resumed with another interval: step 4 is never saved
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]


def test_the_eval_row_of_a_checkpoint_step_outlives_a_kill(tmp_path):
    calls = [0]

    def eval_batches():
        calls[0] += 1
        if calls[0] == 2:  # killed evaluating step 4
            raise KeyboardInterrupt("simulated kill")
        return [make_batch(seed=7) | {"scale": np.ones(BATCH, np.float32)}]

    for _ in range(2):  # killed, then the same command again
        loop, state, _ = make_loop(tmp_path, checkpoint_every=2, eval_every=2)
        try:
            loop.run(state, Batches(), eval_batches=eval_batches)
        except KeyboardInterrupt:
            assert calls[0] == 2
    assert [r["step"] for r in read_metrics(tmp_path) if "eval_loss" in r] == [2, 4, 6]


class Stop:
    """Replaces `module.name` with a function that stops the run (a simulated kill) at its `at`-th call."""

    def __init__(self, module, name: str, at: int = 1):
        self.module, self.name, self.at, self.calls = module, name, at, 0
        self.real = getattr(module, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt("simulated kill")
        return self.real(*args, **kwargs)

    def __enter__(self):
        setattr(self.module, self.name, self)

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.real)


@pytest.fixture(scope="module")
def interrupted_align(tmp_path_factory):
    """An align run (the SFT warm-up) stopped before the warm-up had a checkpoint (after the initial proxy's
    summary), then stopped again after the warm-up was DONE (before the export) with a warm-up checkpoint put
    back (as a kill between its DONE marker and their removal leaves it), then run to the end: (run, cfg)."""
    from proxykd_jax.align import phases, rounds

    prepared = build_prepared(tmp_path_factory.mktemp("long_align_data"))
    run = new_run(prepared, tmp_path_factory.mktemp("long_align") / "run")
    cfg = make_config(run, rounds=0)
    cfg.mesh.shape.update(data=1, fsdp=1, tensor=1)
    devices = jax.devices()[:1]
    for module, name in ((phases, "train_state_from"), (rounds, "export_final")):
        with Stop(module, name), pytest.raises(KeyboardInterrupt):
            run_stage("align", cfg, devices=devices)
    leftover = run / "proxy" / "sft" / "checkpoints" / "4"
    assert phases.is_done(leftover.parent.parent)
    (leftover / "state").mkdir(parents=True, exist_ok=True)
    (leftover / "state" / "leftover").write_bytes(b"x" * 1024)
    run_stage("align", cfg, devices=devices)
    return run, cfg


def test_align_summarises_each_phase_once_across_kills(interrupted_align):
    run, _ = interrupted_align
    rows = [json.loads(line) for line in (run / "proxy" / "metrics.jsonl").read_text().splitlines() if line]
    assert [r["phase"] for r in rows] == ["init", "sft"]
    counts = collections.Counter(r["phase"] for r in rows)
    assert max(counts.values()) == 1


def test_finished_align_phases_keep_no_checkpoints(interrupted_align):
    run, cfg = interrupted_align
    from proxykd_jax.align import phases

    for name in phases.phase_names(cfg.align.rounds):
        folder = run / "proxy" / name
        assert phases.is_done(folder) and (folder / "params").is_dir()
        assert not (folder / "checkpoints").exists(), name
