"""Recorded settings that name paths count by what they name: a file named relative in one run and absolute in
the next is the same setting, a relative name re-run from another directory names another file (and says which
two), a record that kept the text still resumes, and a plain `proxykd export` after one with
`--config.model.init_from=F` is unchanged where the distill record names the same F."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from proxykd_jax import config as config_lib
from proxykd_jax import context
from proxykd_jax.context import artifacts, specs
from proxykd_jax.context.artifacts import open_artifact
from proxykd_jax.context.records import read_record, record_path
from proxykd_jax.errors import ProxyKDError


def _cfg(run: pathlib.Path, **fields):
    cfg = config_lib.base_config()
    cfg.run.dir = str(run)
    for key, value in fields.items():
        group, name = key.split("__")
        cfg[group][name] = value
    return cfg


def _open(stage: str, cfg):
    return open_artifact(stage, cfg, context.RunPaths.from_config(cfg), overwrite=False)


def _make(stage: str, cfg):
    art = _open(stage, cfg)
    art.begin()
    art.finish({})
    return art


def _prompts(folder: pathlib.Path, text: str | None = None) -> str:
    """A prompts file of random lines in `folder` (or `text`); returns that text."""
    folder.mkdir(parents=True, exist_ok=True)
    words = np.random.default_rng().integers(0, 10**9, size=3)
    text = text or "".join(json.dumps({"prompt": f"prompt {w}"}) + "\n" for w in words)
    (folder / "p.jsonl").write_text(text)
    return text


def test_a_path_named_relative_or_absolute_is_the_same_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _prompts(tmp_path / "in")
    _make("collect", _cfg(tmp_path / "run", collect__prompts=str(tmp_path / "in" / "p.jsonl")))
    assert _open("collect", _cfg(tmp_path / "run", collect__prompts="in/p.jsonl")).done
    assert _open("collect", _cfg(tmp_path / "run", collect__prompts="./in/../in/p.jsonl")).done
    _make("collect", _cfg(tmp_path / "run2", collect__prompts="in/p.jsonl"))  # relative first, absolute next
    assert _open("collect", _cfg(tmp_path / "run2", collect__prompts=str(tmp_path / "in" / "p.jsonl"))).done
    record = read_record(tmp_path / "run2" / "corpus" / "teacher.jsonl", True)
    assert record["fields"]["collect.prompts"] == str(tmp_path / "in" / "p.jsonl")  # what it names, not the text


def test_a_relative_path_from_another_directory_names_another_file(tmp_path, monkeypatch):
    """The same relative name from another working directory is another file, even one with the same bytes;
    the refusal names both resolved paths. A model folder the export reads is not identified by content at all."""
    text = _prompts(tmp_path / "a")
    _prompts(tmp_path / "b", text)
    monkeypatch.chdir(tmp_path / "a")
    _make("collect", _cfg(tmp_path / "run", collect__prompts="p.jsonl"))
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ProxyKDError, match="collect.prompts") as err:
        _open("collect", _cfg(tmp_path / "run", collect__prompts="p.jsonl"))
    assert str(tmp_path / "a" / "p.jsonl") in str(err.value) and str(tmp_path / "b" / "p.jsonl") in str(err.value)

    for where in ("a", "b"):
        (tmp_path / where / "m").mkdir()
        (tmp_path / where / "m" / "config.json").write_text(json.dumps({"model_type": where}))
    monkeypatch.chdir(tmp_path / "a")
    _make("distill", _cfg(tmp_path / "run"))
    _make("export", _cfg(tmp_path / "run", model__init_from="m"))
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ProxyKDError, match="model.init_from"):
        _open("export", _cfg(tmp_path / "run", model__init_from="m"))


def _as_old_version_wrote(path: pathlib.Path, is_file: bool, key: str, text: str) -> None:
    """Rewrites a record as the version that kept path fields as their text wrote it (field, input keys, hash)."""
    target = record_path(path, is_file)
    rec = json.loads(target.read_text())
    now = rec["fields"][key]
    rec["fields"][key] = text
    for ids in ("files", "models"):
        rec[ids] = {k.replace(f"{key} ({now})", f"{key} ({text})"): v for k, v in rec[ids].items()}
    rec["hash"] = artifacts._hash(rec["fields"], rec["inputs"], rec["files"], rec["models"])
    target.write_text(json.dumps(rec))


def test_an_old_record_that_kept_the_text_resumes_where_it_names_the_same_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / ".")
    _prompts(tmp_path / "in")
    corpus = tmp_path / "run" / "corpus" / "teacher.jsonl"
    art = _open("collect", _cfg(tmp_path / "run", collect__prompts="in/p.jsonl"))
    art.begin()  # interrupted: a resume
    _as_old_version_wrote(corpus, True, "collect.prompts", "in/p.jsonl")
    for named in ("in/p.jsonl", str(tmp_path / "in" / "p.jsonl")):
        assert _open("collect", _cfg(tmp_path / "run", collect__prompts=named)).status == "resume"
    other = _cfg(tmp_path / "run", collect__prompts="in/p.jsonl")
    other.collect.temperature = float(np.random.default_rng().uniform(0.1, 0.9))
    with pytest.raises(ProxyKDError) as err:  # another change: the path is not named as one
        _open("collect", other)
    assert "collect.temperature" in str(err.value) and "collect.prompts" not in str(err.value)

    (tmp_path / "in" / "q.jsonl").write_text((tmp_path / "in" / "p.jsonl").read_text())
    with pytest.raises(ProxyKDError, match="collect.prompts") as err:  # another file: both named, resolved
        _open("collect", _cfg(tmp_path / "run", collect__prompts="in/q.jsonl"))
    assert f'"in/p.jsonl" (here {tmp_path / "in" / "p.jsonl"}) -> "{tmp_path / "in" / "q.jsonl"}"' in str(err.value)
    # the text does not say where it was named from: it is read from here (another file there: its content)
    _prompts(tmp_path / "elsewhere" / "in")
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ProxyKDError, match="the content of its input collect.prompts"):
        _open("collect", _cfg(tmp_path / "run", collect__prompts="in/p.jsonl"))


def _model(folder: pathlib.Path) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": int(np.random.default_rng().integers(10**9))}))
    return str(folder)


def test_a_plain_export_after_one_with_init_from_is_unchanged(tmp_path, monkeypatch):
    """`proxykd distill $R --config.model.init_from=F`, `proxykd export $R --config.model.init_from=F`, then plain
    `proxykd export $R`: the same start folder (the distill record's), so the export is reused; one naming G is
    refused, naming both folders. And the other order: plain first, then naming F."""
    monkeypatch.chdir(tmp_path)
    first, other = _model(tmp_path / "F"), _model(tmp_path / "G")
    _make("distill", _cfg(tmp_path / "run", model__init_from=first))
    _make("export", _cfg(tmp_path / "run", model__init_from=first))
    assert _open("export", _cfg(tmp_path / "run")).done
    with pytest.raises(ProxyKDError, match="model.init_from") as err:
        _open("export", _cfg(tmp_path / "run", model__init_from=other))
    assert first in str(err.value) and other in str(err.value)

    _make("distill", _cfg(tmp_path / "run2", model__init_from="F"))
    _make("export", _cfg(tmp_path / "run2"))
    assert _open("export", _cfg(tmp_path / "run2", model__init_from=first)).done
    assert _open("export", _cfg(tmp_path / "run2", model__init_from="./F")).done


def test_a_plain_export_recorded_before_the_start_folder_was_recorded_is_reused(tmp_path, monkeypatch):
    """An export record of a plain run that kept `model.init_from` unset (the config's value) is still reused
    by the same plain command; refused for another folder (and, as before, for the one named in the config)."""
    monkeypatch.chdir(tmp_path)
    first, other = _model(tmp_path / "F"), _model(tmp_path / "G")
    _make("distill", _cfg(tmp_path / "run", model__init_from=first))
    _make("export", _cfg(tmp_path / "run"))
    assert read_record(tmp_path / "run" / "export")["fields"]["model.init_from"] == first  # what it started from
    _as_old_version_wrote(tmp_path / "run" / "export", False, "model.init_from", "")
    assert _open("export", _cfg(tmp_path / "run")).done
    with pytest.raises(ProxyKDError, match="model.init_from"):
        _open("export", _cfg(tmp_path / "run", model__init_from=other))


def test_every_path_field_is_in_the_list():
    """The config fields that name paths (config._INPUT_PATHS, the comma lists, the outputs) are all compared
    by what they name."""
    named = {field for _, field, _ in config_lib._INPUT_PATHS} | {"data.corpus", "collect.out", "export.out"}
    assert named <= set(specs.PATH_FIELDS)
    flat = artifacts.flatten(config_lib.base_config().to_dict())
    assert all(key in flat for key in specs.PATH_FIELDS)
