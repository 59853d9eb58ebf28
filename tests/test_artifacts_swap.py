"""Moving a finished redo into place: a file artifact moves with its own companions only (a user's
`corpus.jsonl.bak` beside it stays), and a redo killed at any point of the move is completed by the
next run instead of being started again (for `collect`: paid again)."""

from __future__ import annotations

import pathlib
import shutil

import pytest

from proxykd_jax import config as config_lib
from proxykd_jax import context
from proxykd_jax.context.artifacts import open_artifact
from proxykd_jax.context.records import read_record


class Killed(BaseException):
    """kill -9 at one filesystem operation (not an Exception: nothing may catch it)."""


def _cfg(tmp_path, stage: str, setting: float):
    cfg = config_lib.base_config()
    cfg.run.dir = str(tmp_path / "run")
    if stage == "collect":
        cfg.collect.out = str(tmp_path / "data" / "corpus.jsonl")
        cfg.collect.temperature = setting
    else:
        cfg.prior.ngram_order = int(setting)
    return cfg


def _make(tmp_path, stage: str, setting: float, text: str, overwrite=False, failures=True):
    cfg = _cfg(tmp_path, stage, setting)
    art = open_artifact(stage, cfg, context.RunPaths.from_config(cfg), overwrite=overwrite)
    art.begin()
    if stage == "collect":
        art.work.write_text(text)
        if failures:
            art.work.with_name(art.work.name + ".failures.jsonl").write_text(text + " failures")
    else:
        (art.work / "tables.txt").write_text(text)
    return art


def _content(path: pathlib.Path) -> str:
    return path.read_text() if path.is_file() else (path / "tables.txt").read_text()


USER_FILES = ("corpus.jsonl.bak", "corpus.jsonl.gz", "corpus.jsonl.notes.txt", ".corpus.jsonl.swp")


def test_a_file_artifact_replaced_keeps_the_users_files_beside_it(tmp_path):
    first = _make(tmp_path, "collect", 1.0, "old")
    first.finish()
    folder = first.path.parent
    for name in USER_FILES:
        (folder / name).write_text(f"user's {name}")
    redo = _make(tmp_path, "collect", 0.5, "new", overwrite=True, failures=False)
    redo.finish()
    assert first.path.read_text() == "new"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(USER_FILES + ("corpus.jsonl", "corpus.jsonl.artifact.json"))  # old failures gone
    assert all((folder / n).read_text() == f"user's {n}" for n in USER_FILES)


def _count_ops(monkeypatch, kill_at: int | None) -> list[str]:
    """Counts (and at `kill_at` stops at) renames, record replacements, unlinks and tree removals."""
    ops = []

    def wrap(name, fn):
        def op(*args, **kwargs):
            if kill_at is not None and len(ops) == kill_at:
                raise Killed(name)
            ops.append(name)
            return fn(*args, **kwargs)

        return op

    for name in ("rename", "replace", "unlink"):
        monkeypatch.setattr(pathlib.Path, name, wrap(name, getattr(pathlib.Path, name)))
    monkeypatch.setattr(shutil, "rmtree", wrap("rmtree", shutil.rmtree))
    return ops


@pytest.mark.parametrize("stage", ["collect", "prior"])
def test_a_redo_killed_while_moving_into_place_is_completed_by_the_next_run(tmp_path, monkeypatch, stage):
    with monkeypatch.context() as m:  # how many filesystem operations one whole finish takes
        _make(tmp_path / "count", stage, 1.0, "old").finish()
        redo = _make(tmp_path / "count", stage, 2.0, "new", overwrite=True)
        total = _count_ops(m, None)
        redo.finish()
    assert len(total) >= 4
    for kill_at in range(len(total) + 1):
        root = tmp_path / f"kill{kill_at}"
        _make(root, stage, 1.0, "old").finish()
        if stage == "collect":
            (root / "data" / "corpus.jsonl.bak").write_text("user's backup")
        redo = _make(root, stage, 2.0, "new", overwrite=True)
        with monkeypatch.context() as m:
            _count_ops(m, kill_at)
            try:
                redo.finish()
            except Killed:
                pass
        cfg = _cfg(root, stage, 2.0)
        paths = context.RunPaths.from_config(cfg)
        again = open_artifact(stage, cfg, paths, overwrite=True)  # the same command again
        if kill_at == 0:  # killed before its finished record was written: the redo resumes
            assert again.status == "replace" and again.work == redo.work
            again.begin()
            again.finish()
        else:
            assert again.done, f"killed at operation {kill_at} ({total[kill_at - 1]} done last)"
        assert _content(again.path) == "new" and read_record(again.path)["fields"] == redo.fields
        assert open_artifact(stage, _cfg(root, stage, 2.0), paths, overwrite=False).done
        folder = again.path.parent
        left = sorted(p.name for p in folder.iterdir() if p.name != "proxykd.lock")
        if stage == "collect":
            expected = ["corpus.jsonl", "corpus.jsonl.artifact.json", "corpus.jsonl.bak", "corpus.jsonl.failures.jsonl"]
            assert left == expected, kill_at
            assert (folder / "corpus.jsonl.failures.jsonl").read_text() == "new failures"
            assert (folder / "corpus.jsonl.bak").read_text() == "user's backup"
        else:
            assert left == ["prior"], kill_at
