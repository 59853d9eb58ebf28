"""The record files of the stages' artifacts: reading them, writing them, and moving a finished redo into place.

A stage's output (its *artifact*: a folder, or the corpus file) carries a record, `artifact.json` in the folder
(`<file>.artifact.json` beside a file): the settings it was made with and their hash (`context/artifacts.py` says
which, and what a re-run does with them), and whether it is finished. `Artifact` writes it: `begin()` when the
stage starts, so an interrupted stage is known too, `finish(summary)` at the end. A redo (`.<name>.new` beside the
artifact) is moved into place when finished (`swap_into_place`), the old artifact removed only after that; the move is
resumable from any point (`artifacts.settle` completes it). A file artifact is the file and its companions
(`<name>.failures.jsonl`, the record); nothing else beside it is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Sequence

from proxykd_jax.errors import ProxyKDError

RECORD = "artifact.json"


def record_path(path: pathlib.Path, is_file: bool) -> pathlib.Path:
    return path.with_name(path.name + "." + RECORD) if is_file else path / RECORD


def read_record(path: pathlib.Path, is_file: bool | None = None) -> dict | None:
    """The record of the artifact at `path` (None when it has none or it is unreadable)."""
    candidates = [is_file] if is_file is not None else [False, True]
    for kind in candidates:
        try:
            rec = json.loads(record_path(path, kind).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict):
            return rec
    return None


@dataclasses.dataclass
class Artifact:
    """One stage's artifact and what to do with it: status is new, resume, done or replace.

    `work` is where the stage writes: the artifact itself, or `.<name>.new` beside it when
    replacing. Call `begin()` before writing and `finish(summary)` when done.
    """

    name: str
    path: pathlib.Path
    work: pathlib.Path
    status: str
    fields: dict
    inputs: dict
    hash: str
    is_file: bool
    summary: dict | None = None  # of a finished artifact being reused
    sync: Callable[[str], None] = lambda name: None
    writer: bool = True  # this process writes records (process 0)
    files: dict = dataclasses.field(default_factory=dict)  # content ids of the input files
    models: dict = dataclasses.field(default_factory=dict)  # model_id of the input model folders
    stamps: dict = dataclasses.field(default_factory=dict)  # their sizes and mtimes (not hashed)
    companions: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        return self.status == "done"

    def _record(self, finished: bool, summary=None) -> dict:
        rec = {"stage": self.name, "hash": self.hash, "finished": finished, "fields": self.fields}
        rec.update(inputs=self.inputs, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        rec.update(files=self.files, models=self.models, stamps=self.stamps)
        if finished and self.is_file:  # which companions the swap moves (context: _swap_file)
            rec["companions"] = [s for s in ("",) + self.companions if _part(self.work, s).exists()]
        if summary is not None:
            rec["summary"] = summary
        return rec

    def _write_record(self, where: pathlib.Path, rec: dict) -> None:
        target = record_path(where, self.is_file)
        tmp, created = target.with_name(target.name + ".tmp"), not target.parent.exists()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(rec, indent=1, sort_keys=True, default=repr))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            tmp.replace(target)
        except OSError as e:  # a full disk, a read-only folder: the record stays as it was
            tmp.unlink(missing_ok=True)
            if created:
                shutil.rmtree(target.parent, ignore_errors=True)
            raise ProxyKDError(
                f"cannot write {target} ({e.strerror or e}); free space or fix the folder's permissions, then "
                "re-run the same command."
            ) from None

    def stale_work(self) -> bool:
        """Whether `work` is an abandoned redo made with other settings (or without a record), which
        `begin()` removes; only when replacing."""
        if self.status != "replace":
            return False
        rec = read_record(self.work, self.is_file)
        return rec is None or rec.get("hash") != self.hash

    def begin(self) -> None:
        """Marks the artifact as being made (before the stage writes anything into `work`)."""
        if self.done:
            raise RuntimeError(f"{self.path} is finished; a stage reuses it instead of calling begin().")
        self.sync(f"artifact {self.name}: decided")
        if self.writer:
            if self.stale_work():
                _remove(self.work, self.is_file, self.companions)
            if not self.is_file:
                self.work.mkdir(parents=True, exist_ok=True)
            self._write_record(self.work, self._record(False))
        self.sync(f"artifact {self.name}: begun")

    def finish(self, summary: dict | None = None) -> None:
        """Records the artifact as finished (with `summary`) and, when replacing, moves it into place."""
        self.sync(f"artifact {self.name}: finishing")
        if self.writer:
            self._write_record(self.work, self._record(True, summary))
            if self.work != self.path:
                swap_into_place(self.work, self.path, self.is_file, self.companions)
        self.status, self.work, self.summary = "done", self.path, summary
        self.sync(f"artifact {self.name}: finished")


def _part(path: pathlib.Path, suffix: str) -> pathlib.Path:
    """The companion `suffix` of the file artifact `path` ("" is the file itself)."""
    return path.with_name(path.name + suffix)


def _old(p: pathlib.Path) -> pathlib.Path:
    return p.with_name(".old." + p.name)


def _file_parts(path: pathlib.Path, companions: Sequence[str]) -> list[pathlib.Path]:
    """Every file that belongs to the file artifact `path`: itself, its companions, its record (and a
    record being written). Only these: other files whose names start with `path`'s are the user's."""
    rec = record_path(path, True)
    return [_part(path, s) for s in ("",) + tuple(companions)] + [rec, rec.with_name(rec.name + ".tmp")]


def _remove(path: pathlib.Path, is_file: bool, companions: Sequence[str] = ()) -> None:
    if is_file:
        for p in _file_parts(path, companions):
            p.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def swap_into_place(work: pathlib.Path, path: pathlib.Path, is_file: bool, companions: Sequence[str] = ()) -> None:
    """Moves the finished `work` into `path`; the old artifact is removed only after that.

    Resumable from any point: while it runs, `path` has no record (a folder: `path` is missing), and
    `open_artifact` calls it again when it finds that state next to a finished `work`."""
    if is_file:
        _swap_file(work, path, companions)
        return
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    work.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _swap_file(work: pathlib.Path, path: pathlib.Path, companions: Sequence[str]) -> None:
    """The file version of `swap_into_place`. The old record goes first and the new record comes last, so a record
    at `path` always describes a whole artifact; the finished record lists which parts it has."""
    suffixes = ("",) + tuple(companions)
    rec_target, rec_work = record_path(path, True), record_path(work, True)
    moving = (read_record(work, True) or {}).get("companions")
    if moving is None:  # a record written before companions were listed
        moving = [s for s in suffixes if _part(work, s).exists()]
    if rec_target.exists():
        rec_target.rename(_old(rec_target))
    for s in suffixes:
        target, source = _part(path, s), _part(work, s)
        if s in moving and not source.exists():
            continue  # moved before an interruption
        if target.exists():  # the old artifact's: kept aside until the new one is in place
            target.rename(_old(target))
        if s in moving:
            source.rename(target)
    rec_work.rename(rec_target)
    tidy(path, True, companions)
    _file_parts(work, companions)[-1].unlink(missing_ok=True)


def tidy(path: pathlib.Path, is_file: bool, companions: Sequence[str]) -> None:
    """Removes what a swap killed after the new artifact was in place left behind (the old artifact)."""
    if is_file:
        for p in _file_parts(path, companions)[:-1]:
            _old(p).unlink(missing_ok=True)
    else:
        shutil.rmtree(path.with_name(f".{path.name}.old"), ignore_errors=True)
