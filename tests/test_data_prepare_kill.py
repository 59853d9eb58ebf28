"""`proxykd prepare` killed with -9 at each point of its swap, and failing on bad input: the same command
then resumes (never "prepared exists but was not made by `proxykd prepare`"), the corrected command is
never refused, and no temporary folder is left behind."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import pickle
import subprocess
import sys

import pytest
from stage_helpers import run_stage

from proxykd_jax import config as config_lib
from proxykd_jax.context.records import read_record
from proxykd_jax.data import DataError
from proxykd_jax.models.tokenizer import build_word_tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
WORDS = "the a fox dog cat sat ran on mat far".split()

# Runs `proxykd prepare` with os._exit(9) (no cleanup runs, as with kill -9) at the point named by argv[1].
KILLER = r"""
import importlib, os, pathlib, shutil, sys
point = sys.argv.pop(1)
dp = importlib.import_module("proxykd_jax.data.prepare")  # the module (`proxykd_jax.data.prepare` is the function)
st = importlib.import_module("proxykd_jax.stages.prepare")

def die(*args, **kwargs):
    os._exit(9)

if point == "in_prepare":  # the end of the long _prepare_into, before the swap
    dp.coverage_line = die
elif point == "after_prepare":  # the folder swapped into place, before the record is marked finished
    prepare_corpus = st.prepare_corpus
    st.prepare_corpus = lambda *a, **k: (prepare_corpus(*a, **k), die())
elif point == "mid_swap":  # prepared/ renamed aside, the new folder not yet in its place
    rename = pathlib.Path.rename
    def renaming(self, target):
        out = rename(self, target)
        if self.name == "prepared":
            die()
        return out
    pathlib.Path.rename = renaming
elif point == "before_old_removed":  # the new folder in place, the old one not yet deleted
    rmtree = shutil.rmtree
    def removing(path, *a, **k):
        if pathlib.Path(path).name.startswith((".prepared.replaced", ".prepared.old")):
            die()
        return rmtree(path, *a, **k)
    shutil.rmtree = removing
sys.argv = ["proxykd"] + sys.argv[1:]
from proxykd_jax.cli import main
main()
"""


def _corpus(path: pathlib.Path, n: int, bad_line: str | None = None) -> pathlib.Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": "the fox", "responses": ["a dog sat", "the cat ran"]}) + "\n")
        if bad_line:
            f.write(bad_line + "\n")
    return path


def _cfg(tmp_path: pathlib.Path, corpus: pathlib.Path):
    if not (tmp_path / "tokenizer").exists():
        build_word_tokenizer(WORDS, tmp_path / "tokenizer")
    cfg = config_lib.base_config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.data.update(corpus=str(corpus), tokenizer=str(tmp_path / "tokenizer"), seq_len=32)
    return cfg


def _leftovers(run: pathlib.Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(".prepared"))


@pytest.mark.parametrize("point", ["in_prepare", "after_prepare", "mid_swap", "before_old_removed"])
def test_same_command_resumes_after_kill_and_leaves_no_temporary_folder(tmp_path, point):
    cfg = _cfg(tmp_path, _corpus(tmp_path / "c.jsonl", 6))
    pkl = tmp_path / "cfg.pkl"
    pkl.write_bytes(pickle.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-c", KILLER, point, "prepare", f"--config={REPO}/tests/pickled_config.py:{pkl}"]
    killed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-3000:]
    run, prepared = tmp_path / "run", tmp_path / "run" / "prepared"
    if prepared.exists():  # whenever prepared/ is there it carries its (unfinished) record
        assert read_record(prepared)["finished"] is False
    manifest = run_stage("prepare", cfg)  # the same command: resumes, is not refused
    assert manifest["counts"]["samples"] == 12
    assert read_record(prepared)["finished"] is True
    assert _leftovers(run) == []  # no `.prepared.tmp*` / `.prepared.old*` left to leak disk


def test_failed_prepare_leaves_nothing_that_refuses_the_corrected_command(tmp_path, monkeypatch):
    data_prepare = importlib.import_module("proxykd_jax.data.prepare")
    cfg = _cfg(tmp_path, _corpus(tmp_path / "bad.jsonl", 3))
    real = data_prepare._prepare_into

    def broken(*args, **kwargs):  # any failure on bad input, not only a DataError
        raise RuntimeError("unexpected")

    monkeypatch.setattr(data_prepare, "_prepare_into", broken)
    with pytest.raises(RuntimeError):
        run_stage("prepare", cfg)
    monkeypatch.setattr(data_prepare, "_prepare_into", real)
    assert not (tmp_path / "run" / "prepared").exists() and _leftovers(tmp_path / "run") == []
    fixed = _cfg(tmp_path, _corpus(tmp_path / "good.jsonl", 4))  # the corrected command: another data.corpus
    assert run_stage("prepare", fixed)["counts"]["samples"] == 8


def test_resumed_prepare_failing_on_bad_input_leaves_nothing_behind(tmp_path):
    bad = _corpus(tmp_path / "bad.jsonl", 3, bad_line='{"id": "z", "prompt": "x", "response": "a", "meta": "x"}')
    cfg = _cfg(tmp_path, bad)
    prepared = tmp_path / "run" / "prepared"
    from proxykd_jax.context.artifacts import open_artifact
    from proxykd_jax.context.paths import RunPaths

    open_artifact("prepare", cfg, RunPaths(tmp_path / "run"), overwrite=False).begin()  # as a killed run leaves it
    with pytest.raises(DataError, match="field 'meta'"):
        run_stage("prepare", cfg)
    assert not prepared.exists()
    fixed = _cfg(tmp_path, _corpus(tmp_path / "good.jsonl", 4))
    assert run_stage("prepare", fixed)["counts"]["samples"] == 8
