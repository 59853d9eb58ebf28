"""The docs against the code (README.md and docs/*.md; docs/report/ is the report's own output): every path
they cite exists in the repository, every config field they name is one and every override they show parses,
the README's pipeline table has a row per stage, every supported architecture is named, the table of what each
artifact records is cited where it lives, and the help of `model.vocab_size` and `model.rope_scaling` says what
the code takes. Text and config checks only, no model is built."""

from __future__ import annotations

import pathlib
import re
import sys

import pytest

from proxykd_jax import cli
from proxykd_jax import config as config_lib
from proxykd_jax.context.artifacts import flatten
from proxykd_jax.errors import ConfigError
from proxykd_jax.models.config import ROPE_SCALING_FORMS
from proxykd_jax.models.hf_config import SUPPORTED
from proxykd_jax.stages import STAGES

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP = ("proxykd_jax", "configs", "launch", "tests", "benchmarks", "docs", "requirements")


def _text(path: pathlib.Path) -> str:
    return path.read_text(encoding="utf-8")


def _cited_paths(text: str) -> set[str]:
    """Repository paths a doc cites: markdown link targets, and paths under a top-level folder of the
    repository (a `:ARG` after a config file and a trailing `/` dropped)."""
    found = {m for m in re.findall(r"\]\(([^)#\s]+)\)", text) if not m.startswith(("http://", "https://"))}
    found |= set(re.findall(rf"(?<![\w/.])((?:{'|'.join(TOP)})/[\w./\-]*\w)", text))
    return found


def test_docs_cite_only_paths_in_the_repository():
    missing, outside, cited = [], [], 0
    for doc in DOCS:
        text = _text(doc)
        ups = re.findall(r"(?<![\w.])((?:\.\./)+[\w./\-]*)", text)  # `../README.md` from docs/ is in the repository
        outside += [f"{doc.name}: {m}" for m in ups if REPO not in (doc.parent / m).resolve().parents]
        missing += [f"{doc.name}: {m}" for m in ups if not (doc.parent / m).exists()]
        for path in sorted(_cited_paths(text)):
            cited += 1
            if not ((REPO / path).exists() or (doc.parent / path).exists()):
                missing.append(f"{doc.name}: {path}")
    assert missing == [] and outside == []
    assert cited > 50


def test_module_paths_cited_in_backticks_exist():
    """`models/attention.py`, `bayes/empirical.py`, ...: module paths given relative to the package."""
    paths = {(doc.name, p) for doc in DOCS for p in re.findall(r"`((?:[a-z_]+/)+[a-z_]+\.py)`", _text(doc))}
    assert len(paths) > 20
    assert [p for p in paths if not any((root / p[1]).exists() for root in (REPO, REPO / "proxykd_jax"))] == []


def test_config_fields_named_in_the_docs_exist():
    cfg = config_lib.base_config()
    fields = flatten(cfg.to_dict())

    def known(name: str) -> bool:
        return name in fields or any(f.startswith(name + ".") for f in fields)

    unknown = []
    for doc in DOCS:
        text = _text(doc)
        for name in re.findall(r"--config\.([a-z_][\w.]*\w)", text):
            if name != "FIELD" and not known(name):
                unknown.append(f"{doc.name}: --config.{name}")
        for group, rest in re.findall(r"`([a-z_]+)\.([a-z_][\w.]*\w)[`=\s]", text):
            if group in cfg and not rest.endswith(("md", "py", "json", "jsonl")) and not known(f"{group}.{rest}"):
                unknown.append(f"{doc.name}: {group}.{rest}")
    # module paths written with dots, not config fields
    assert [u for u in unknown if not u.endswith(("report.tables.report_markdown", "data.prepare.prepare"))] == []


def test_overrides_shown_in_the_docs_parse(monkeypatch):
    """Every `--config.FIELD=VALUE` the docs show, all at once on the demo config, as the CLI reads them."""
    overrides = []
    for doc in DOCS:
        for field, value in re.findall(r"--config\.([a-z_][\w.]*)=(\"[^\"]*\"|'[^']*'|[^\s`|\]\\)]+)", _text(doc)):
            if field != "FIELD":
                overrides.append(f"--config.{field}={value.strip(chr(34) + chr(39))}")
    assert len(overrides) > 30
    argv = ["--config=configs/demo.py", *overrides]
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["proxykd", "demo", *argv])  # ml_collections reads the overrides there
    cfg = cli.load_config("demo", argv)
    assert cfg.align.lora.targets == ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    assert cfg.collect.stop == ("END", "STOP")


def test_readme_pipeline_table_has_a_row_per_stage():
    rows = re.findall(r"^\| (\w+) \| `proxykd (\w+) ", _text(REPO / "README.md"), re.M)
    assert [name for name, command in rows if name != command] == []
    assert sorted(name for name, _ in rows) == sorted(STAGES)


def test_readme_documents_every_command():
    readme = _text(REPO / "README.md")
    assert [c for c in (*STAGES, *cli.COMMANDS) if f"proxykd {c} " not in readme] == []


def test_every_supported_architecture_is_named():
    """By its family (`Qwen3`) or class name (`Phi3ForCausalLM`), in the README and in CONTRACTS."""
    for doc in (REPO / "README.md", REPO / "docs" / "CONTRACTS.md"):
        text = _text(doc)
        assert [a for a in SUPPORTED if a not in text and a.removesuffix("ForCausalLM") not in text] == [], doc.name


def test_the_artifact_table_is_cited_where_it_lives():
    """The README and DATA_FORMATS send the reader to the table of the fields each artifact records."""
    cited = []
    for doc in (REPO / "README.md", REPO / "docs" / "DATA_FORMATS.md"):
        text = " ".join(_text(doc).split())
        cited += re.findall(r"(?:which fields, per stage:|the table in) `([\w/]+\.py)`", text)
    assert len(cited) == 2
    for path in cited:
        assert re.search(r"^ARTIFACTS\b", _text(REPO / path), re.M), path


def test_model_field_help_says_what_the_code_takes():
    docs = config_lib.field_docs()
    kinds = re.findall(r"\('(\w+)'", ROPE_SCALING_FORMS)
    assert sorted(kinds) == ["linear", "llama3", "longrope", "yarn"]
    assert [k for k in kinds if k not in docs["model.rope_scaling"]] == []
    # a padded embedding is accepted, fewer rows than tokens are not: the help says "at least"
    from proxykd_jax.data.pipeline import require_vocab

    class Prepared:
        manifest = {"tokenizer": {"vocab_size": 500}}
        root = "prepared"

    require_vocab(Prepared, 512, "model.vocab_size")
    with pytest.raises(ConfigError, match="at least 500"):
        require_vocab(Prepared, 499, "model.vocab_size")
    assert "at least" in docs["model.vocab_size"] and "must match" not in docs["model.vocab_size"]
