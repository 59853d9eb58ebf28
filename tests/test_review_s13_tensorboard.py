"""TensorBoard rows of a killed run survive a resume whose writer opens in the same second (event files are named
by the second they were opened in, and a writer opening an existing name empties it)."""

from __future__ import annotations

import pathlib
import random
import struct

from proxykd_jax.train.metrics import TensorBoardEvents


def shown(folder: pathlib.Path, tag: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of `tag` as TensorBoard shows them: files in name order, a SessionLog START at step s hiding
    every earlier event of step >= s."""
    from tensorboardX.proto import event_pb2

    rows: list[tuple[int, float]] = []
    for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.name):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                rows = [r for r in rows if r[0] < event.step]
            rows += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return rows


def test_a_resume_in_the_same_second_keeps_the_killed_runs_rows(tmp_path):
    rng = random.Random()
    saved, killed_at, steps = rng.randint(2, 5), rng.randint(6, 8), 12
    losses = {s: round(rng.uniform(0.5, 5.0), 3) for s in range(1, steps + 1)}
    killed = TensorBoardEvents(tmp_path)
    for step in range(1, killed_at + 1):
        killed.write(step, {"loss": losses[step] + (step > saved)})  # steps past the checkpoint are lost anyway
        if step == saved:
            killed.flush()  # the checkpoint of step `saved`; a kill later (no close)
    resumed = TensorBoardEvents(tmp_path, resume_step=saved)  # within the same second as `killed`
    for step in range(saved + 1, steps + 1):
        resumed.write(step, {"loss": losses[step]})
    resumed.close()
    assert [(s, round(v, 3)) for s, v in shown(tmp_path)] == sorted(losses.items())
