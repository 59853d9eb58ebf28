"""Checkpoints: the train state and the data iterator's position, saved together with orbax.

Each checkpoint is one orbax step directory with two items: `state` (StandardSave of the
TrainState, restored onto whatever mesh the target shardings name) and `data` (the iterator's
position: grain's own handler for grain iterators, JSON of `get_state()` for plain Python
iterators that define `get_state`/`set_state`). Saves are asynchronous; the manager keeps the
last `keep` checkpoints.

In a multi-process run, plain-Python iterator state is written by process 0 only, so it must be
the same on every process; grain iterators are saved per process.
"""

from __future__ import annotations

import logging
import pathlib

import grain
import orbax.checkpoint as ocp

from proxykd_jax.train.state import TrainState

log = logging.getLogger(__name__)

_GRAIN_ITERATORS = (grain.DatasetIterator, grain.DataLoaderIterator)


def _data_kind(data_iter) -> str | None:
    """'grain', 'json' or None (no resumable position)."""
    if data_iter is None:
        return None
    if isinstance(data_iter, _GRAIN_ITERATORS):
        return "grain"
    if callable(getattr(data_iter, "get_state", None)) and callable(getattr(data_iter, "set_state", None)):
        return "json"
    return None


class Checkpointer:
    """An orbax CheckpointManager over `directory` for TrainState + data iterator position."""

    def __init__(self, directory: str | pathlib.Path, keep: int):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}.")
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._warned = False

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_iter=None) -> None:
        """Starts an asynchronous save (device arrays are copied before this returns)."""
        items = {"state": ocp.args.StandardSave(state)}
        kind = _data_kind(data_iter)
        if kind == "grain":
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        elif kind == "json":
            items["data"] = ocp.args.JsonSave(data_iter.get_state())
        elif data_iter is not None and not self._warned:
            log.warning(
                "data iterator %s has no get_state/set_state: a resumed run restarts its data from the beginning",
                type(data_iter).__name__,
            )
            self._warned = True
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, target: TrainState, data_iter=None, step: int | None = None) -> TrainState:
        """Restores checkpoint `step` (default latest) onto `target`'s shapes and shardings.

        `target` is a TrainState of arrays or ShapeDtypeStructs with `.sharding` (see
        `state.abstract_like`); the mesh may differ from the one that saved. The data iterator,
        when given and saved, is moved to the saved position.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory} to restore.")
        items = {"state": ocp.args.StandardRestore(target)}
        kind = _data_kind(data_iter)
        saved = set(self.manager.item_metadata(step).keys()) if kind else set()
        if kind and "data" not in saved:
            log.warning(
                "checkpoint %d in %s has no data iterator state; data restarts from the beginning", step, self.directory
            )
            kind = None
        if kind == "grain":
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        elif kind == "json":
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if kind == "json":
            data_iter.set_state(restored["data"])
        return restored["state"]

    def wait(self) -> None:
        """Blocks until in-flight saves are finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
