"""Checkpoints: the train state and the data iterator's position, saved together with orbax.

Each checkpoint is one orbax step directory with two items: `state` (StandardSave of the
TrainState, restored onto whatever mesh the target shardings name) and `data` (the iterator's
position: grain's own handler for grain iterators, JSON of `get_state()` for plain Python
iterators that define `get_state`/`set_state`). Saves are asynchronous; the manager keeps the
last `keep` checkpoints (a lowered `keep` deletes the oldest at the next save; a step a killed run was deleting,
at the end of the run that resumes it: `drop_old_steps`) and removes, when it opens, the unfinished steps of a
killed run. A restore onto arrays of other shapes or another tree (another model or
optimizer config) is refused before reading any array, naming one; one that fails on the files
says the checkpoint is damaged and what to delete, in one error: the reads it leaves in flight report
nothing (`_WithoutClosedLoopReports`, `_WithoutUnretrievedReads`).

In a multi-process run, plain-Python iterator state is written by process 0 only, so it must be
the same on every process; grain iterators are saved per process.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import sys

import grain
import jax
import orbax.checkpoint as ocp

from proxykd_jax.errors import CheckpointError, one_line
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


def _looks_damaged(e: Exception) -> bool:
    """Whether a restore failure comes from the files (damaged, truncated), not a bug. (Arrays of another
    config's shapes or tree are told apart before restoring, from the checkpoint's metadata.)"""
    if isinstance(e, (ValueError, KeyError, OSError, EOFError, TypeError)):
        return True
    text = str(e)
    return any(code in text for code in ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION", "INVALID_"))


def _leaf_shapes(tree) -> dict[str, tuple[int, ...] | None]:
    """{path: shape} of a tree's leaves, the path spelt the same for a restore target (attributes,
    dict keys, indices) and orbax's stored metadata of it (dict keys and indices): 'params/embedding/value'."""

    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): getattr(leaf, "shape", None) for path, leaf in leaves}


def _config_mismatch(stored_shapes: dict, target_shapes: dict) -> str | None:
    """How the stored arrays differ from the target's (one array named), or None when they agree."""
    for path, shape in target_shapes.items():
        if path not in stored_shapes:
            return f"it has no array {path}, which this config's train state has"
        if stored_shapes[path] is not None and shape is not None and tuple(stored_shapes[path]) != tuple(shape):
            return f"its {path} is {tuple(stored_shapes[path])} but this config's is {tuple(shape)}"
    for path in stored_shapes:
        if path not in target_shapes:
            return f"it has an array {path}, which this config's train state lacks"
    return None


class _WithoutClosedLoopReports:
    """A `sys.unraisablehook` that passes on everything but tensorstore's reports of reads that finished
    after orbax closed the event loop awaiting them.

    Orbax awaits tensorstore reads with `asyncio.gather` on a loop of its own and closes that loop as
    soon as one read fails (a damaged file). When a read still in flight finishes, tensorstore's
    `Future.__await__` callback calls the closed loop's `call_soon_threadsafe` from tensorstore's
    threads and hands the RuntimeError to `PyErr_WriteUnraisable` with no object: the default hook
    prints a bare `RuntimeError: Event loop is closed` traceback. Nothing waits for those reads; the
    restore's own error says what failed."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, unraisable) -> None:
        if not _is_closed_loop_report(unraisable):
            self.hook(unraisable)


def _is_closed_loop_report(unraisable) -> bool:
    """Whether `unraisable` is exactly tensorstore's closed-loop report: a RuntimeError('Event loop is
    closed') raised in asyncio's `call_soon_threadsafe` as called from native code, with no object."""
    if unraisable.object is not None or unraisable.err_msg is not None:
        return False
    if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != "Event loop is closed":
        return False
    tb = unraisable.exc_traceback
    if tb is None:
        return False
    frame = tb.tb_frame  # the outermost Python frame: the one native code called
    return frame.f_code.co_name == "call_soon_threadsafe" and frame.f_globals.get("__name__") == "asyncio.base_events"


def _route_closed_loop_reports() -> object | None:
    """Installs the hook above; returns the hook it wraps, or None when it was installed already."""
    previous = sys.unraisablehook
    if isinstance(previous, _WithoutClosedLoopReports):
        return None
    sys.unraisablehook = _WithoutClosedLoopReports(previous)
    return previous


_UNRETRIEVED = ("Future exception was never retrieved", "Task exception was never retrieved")


class _WithoutUnretrievedReads(logging.Filter):
    """A filter of the asyncio logger that drops its "exception was never retrieved" reports of reads in
    the `folders` of damaged checkpoint steps, and passes every other record.

    When one read of a restore fails, orbax's `asyncio.gather` stops awaiting the others and orbax closes
    its loop; the reads that fail after that are never retrieved, and asyncio reports each (with its
    traceback) when it is collected, maybe long after the restore raised. Tensorstore's message of each
    names the file it could not read, inside the step's folder."""

    def __init__(self):
        super().__init__()
        self.folders: set[str] = set()

    def watch(self, folder: str) -> bool:
        """Drops the reports about `folder` from now on, installed on the asyncio logger; True when it
        did not already."""
        logger = logging.getLogger("asyncio")
        if self not in logger.filters:
            logger.addFilter(self)
        new = folder not in self.folders
        self.folders.add(folder)
        return new

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.folders or not isinstance(record.msg, str) or not record.msg.startswith(_UNRETRIEVED):
            return True
        error = record.exc_info[1] if record.exc_info else None
        return error is None or not any(folder in str(error) for folder in self.folders)


_UNRETRIEVED_READS = _WithoutUnretrievedReads()


class Checkpointer:
    """An orbax CheckpointManager over `directory` for TrainState + data iterator position."""

    def __init__(self, directory: str | pathlib.Path, keep: int):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}.")
        self.directory, self.keep = pathlib.Path(directory).absolute(), int(keep)
        # a step a killed run left half-written (`<step>.orbax-checkpoint-tmp`) is removed here: the run that
        # resumes may never save that step again (another train.checkpoint_every)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        # orbax removes those in a thread that only its first save waits for: a stage that reads a checkpoint
        # and exits (export, a refused resume) would race interpreter shutdown, which prints a traceback
        cleanup = getattr(self.manager, "_cleanup_tmp_directory_future", None)
        if cleanup is not None:
            try:
                cleanup.result()
            except OSError as e:  # a folder this process may read but not write: export of another's run
                log.warning(
                    "could not remove the half-written checkpoint steps (*.orbax-checkpoint-tmp-*) in %s (%s); they "
                    "are skipped, delete them where the folder is writable",
                    self.directory,
                    one_line(e),
                )
            self.manager._cleanup_tmp_directory_future = None  # waited for: orbax's first save must not raise it again
        self._warned = False

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def finished_step(self) -> int | None:
        """The newest step whose save is finished, or None: the step a run killed now resumes after (orbax
        lists a step from the start of its save, and starts a save only once the previous one is finished)."""
        steps = self.all_steps()
        if steps and self.manager.is_saving_in_progress():
            steps = steps[:-1]
        return steps[-1] if steps else None

    def save(self, step: int, state: TrainState, data_iter=None) -> None:
        """Starts an asynchronous save (device arrays are copied before this returns). A save whose write
        fails (a full disk) leaves tensorstore reporting to a closed loop, as a failed restore does."""
        _route_closed_loop_reports()
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
        when given and saved, is moved to the saved position. A restore that fails leaves
        `sys.unraisablehook` wrapped in `_WithoutClosedLoopReports` and the step's folder watched by
        `_WithoutUnretrievedReads`: reads it left in flight may finish later.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory} to restore.")
        previous = _route_closed_loop_reports()  # reads of a damaged checkpoint may outlive a failed restore
        folder = f"{self.directory / str(step)}{os.sep}"
        watched = _UNRETRIEVED_READS.watch(folder)
        restored = self._restore(step, target, data_iter)
        hook = sys.unraisablehook  # every read finished: put back the hook this restore wrapped
        if previous is not None and isinstance(hook, _WithoutClosedLoopReports) and hook.hook is previous:
            sys.unraisablehook = previous
        if watched:
            _UNRETRIEVED_READS.folders.discard(folder)
        return restored

    def _restore(self, step: int, target: TrainState, data_iter) -> TrainState:
        mismatch = self._mismatch(step, target)
        if mismatch is not None:  # a good checkpoint of another model or optimizer: never advise deleting it
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} was written with another model or optimizer config "
                f"({mismatch}); run with the model and optim settings it was trained with."
            )
        items = {"state": ocp.args.StandardRestore(target)}
        kind = _data_kind(data_iter)
        # the items a step holds are its folders (orbax's item_metadata logs a warning per item it has no handler for)
        saved = {p.name for p in (self.directory / str(step)).iterdir() if p.is_dir()} if kind else set()
        if kind and "data" not in saved:
            log.warning(
                "checkpoint %d in %s has no data iterator state; data restarts from the beginning", step, self.directory
            )
            kind = None
        if kind == "grain":
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        elif kind == "json":
            items["data"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # tensorstore, orbax and JSON failures of damaged files share no base class
            if not _looks_damaged(e):
                raise
            reason = one_line(str(e).split("[tensorstore_spec")[0])[:160]
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: {reason}); it is "
                f"damaged: delete {self.directory / str(step)} to resume from the checkpoint before it, or re-run "
                "with --config.run.overwrite=True to start over."
            ) from None
        if kind == "json":
            data_iter.set_state(restored["data"])
        return restored["state"]

    def _mismatch(self, step: int, target) -> str | None:
        """How the arrays checkpoint `step` stores differ from `target`'s (from its metadata, reading no
        array); None when they agree, or when the metadata cannot be read: the restore reports that damage."""
        handler = ocp.StandardCheckpointHandler()
        try:
            stored = _leaf_shapes(handler.metadata(self.directory / str(step) / "state").tree)
        except Exception:  # unreadable metadata (tensorstore, orbax and JSON failures share no base class)
            return None
        finally:
            handler.close()
        return _config_mismatch(stored, _leaf_shapes(target)) if stored else None

    def wait(self) -> None:
        """Blocks until in-flight saves are finished."""
        self.manager.wait_until_finished()

    def drop_old_steps(self) -> None:
        """Removes the steps older than the newest `keep`, once the saves in flight are finished (process 0). Orbax
        removes them after each save; a run killed while it did leaves one half removed, which nothing removes
        when no save follows (the kill came after the last step's save): the run that trains here calls this at
        its end (not an export, which may only read the folder)."""
        self.wait()
        if jax.process_index() == 0:
            steps = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
            for step in steps[: -self.keep]:
                shutil.rmtree(self.directory / str(step), ignore_errors=True)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
