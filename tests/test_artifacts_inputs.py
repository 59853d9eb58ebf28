"""What an artifact is made from: an upstream artifact that is not finished is refused (not read in
part and then reused as if whole), and an input file or folder is identified by its content, so one
changed in place counts as changed; a file artifact's refusals name its real record."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
from stage_helpers import run_stage

from proxykd_jax import config as config_lib
from proxykd_jax import context
from proxykd_jax.context import artifacts
from proxykd_jax.context.artifacts import open_artifact, read_record, record_path
from proxykd_jax.errors import ProxyKDError


def _cfg(tmp_path, **data):
    cfg = config_lib.base_config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.data.update(data)
    return cfg


def _open(name, cfg, overwrite=False):
    return open_artifact(name, cfg, context.RunPaths.from_config(cfg), overwrite=overwrite)


def _unfinished_corpus(cfg) -> pathlib.Path:
    art = _open("collect", cfg)  # as `collect` left it when it exited 2 after some of the samples
    art.begin()
    art.work.write_text(json.dumps({"id": "q0", "prompt": "hi", "response": "a", "key": "k0"}) + "\n")
    return art.path


def test_an_unfinished_upstream_artifact_is_refused_naming_it_and_its_command(tmp_path):
    (tmp_path / "tok").mkdir()
    cfg = _cfg(tmp_path, tokenizer=str(tmp_path / "tok"))
    corpus = _unfinished_corpus(cfg)
    refusal = r"corpus/teacher.jsonl is not finished .*re-run that `proxykd collect` command to finish it"
    with pytest.raises(ProxyKDError, match=refusal):
        context.preflight(cfg, "prepare")  # the CLI: before the run directory is locked
    with pytest.raises(ProxyKDError, match=refusal):
        run_stage("prepare", cfg)
    assert not (tmp_path / "run" / "prepared").exists()
    finished = _open("collect", cfg)
    assert finished.status == "resume"
    finished.finish({"done": 1})
    assert _open("prepare", cfg).status == "new" and corpus.exists()  # finished: prepare may read it now


def test_an_unfinished_upstream_makes_a_finished_dependant_stale_rather_than_reused(tmp_path):
    cfg = _cfg(tmp_path)
    prepared = _open("prepare", cfg)
    prepared.begin()  # prepare killed part-way: prior must not be made from part of it
    with pytest.raises(ProxyKDError, match=r"prepared is not finished .*`proxykd prepare`"):
        _open("prior", cfg)
    prepared.finish()
    assert _open("prior", cfg).status == "new"


def _prepared(cfg):
    art = _open("prepare", cfg)
    art.begin()
    art.finish({"samples": 1})
    return art


def test_a_corpus_or_tokenizer_changed_in_place_counts_as_changed(tmp_path):
    corpus, tok = tmp_path / "corpus.jsonl", tmp_path / "tok"
    corpus.write_text('{"prompt": "a", "response": "b"}\n')
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"v": 1}')
    (tok / "model.safetensors").write_bytes(b"weights")
    cfg = _cfg(tmp_path, corpus=str(corpus), tokenizer=str(tok))
    _prepared(cfg)
    assert _open("prepare", cfg).done
    (tok / "model.safetensors").write_bytes(b"other weights")  # not the tokenizer: still the same input
    assert _open("prepare", cfg).done
    with corpus.open("a") as f:
        f.write('{"prompt": "c", "response": "d"}\n')
    with pytest.raises(ProxyKDError, match=r"the content of its input data.corpus \(.*corpus.jsonl\) changed"):
        _open("prepare", cfg)
    redo = _open("prepare", cfg, overwrite=True)
    redo.begin()
    redo.finish()
    assert _open("prepare", cfg).done
    (tok / "tokenizer.json").write_text('{"v": 2}')
    with pytest.raises(ProxyKDError, match=r"the content of its input data.tokenizer \(.*tok\) changed"):
        _open("prepare", cfg)


def test_an_unchanged_input_file_is_not_read_again(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"prompt": "a", "response": "b"}\n')
    old = 1_000_000_000_000_000_000  # an mtime well in the past (2001): the stamp is trusted
    os.utime(corpus, ns=(old, old))
    cfg = _cfg(tmp_path, corpus=str(corpus))
    _prepared(cfg)
    stamp = read_record(tmp_path / "run" / "prepared")["stamps"][str(corpus.absolute())]
    assert stamp[:2] == [corpus.stat().st_size, old]
    read = []
    monkeypatch.setattr(artifacts, "open", lambda *a, **k: read.append(a) or open(*a, **k), raising=False)
    assert _open("prepare", cfg).done and read == []  # the recorded size and mtime_ns stand for the digest
    with corpus.open("a") as f:
        f.write("\n")
    with pytest.raises(ProxyKDError, match=r"data.corpus .* changed"):
        _open("prepare", cfg)
    assert read == [(corpus, "rb")]


def test_a_record_from_before_input_files_were_recorded_is_still_reused(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"prompt": "a", "response": "b"}\n')
    cfg = _cfg(tmp_path, corpus=str(corpus))
    art = _prepared(cfg)
    rec = read_record(art.path)
    for key in ("files", "stamps"):
        del rec[key]
    rec["hash"] = artifacts._hash(rec["fields"], rec["inputs"])
    record_path(art.path, False).write_text(json.dumps(rec))
    assert _open("prepare", cfg).done  # and the dependants' inputs (its hash) are unchanged


def test_a_file_not_made_by_collect_names_its_record(tmp_path):
    cfg = config_lib.base_config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.collect.out = str(tmp_path / "mine.jsonl")
    (tmp_path / "mine.jsonl").write_text("my own corpus\n")
    with pytest.raises(ProxyKDError, match=r"it has no .*mine\.jsonl\.artifact\.json\)"):
        _open("collect", cfg)
