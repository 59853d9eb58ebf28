"""The one overwrite rule: the table of what each stage's artifact depends on, the rule itself
(reuse / resume / refuse naming the changed fields / replace beside and move into place), and the
cheap stages run twice through it (prepare, prior, collect). The other stages' runs are in their
own tests (distill, align, posterior, export, eval, demo)."""

from __future__ import annotations

import json
import pathlib

import pytest
from stage_helpers import run_stage

from proxykd_jax import config as config_lib
from proxykd_jax import context, stages
from proxykd_jax.context import artifacts
from proxykd_jax.context.artifacts import open_artifact
from proxykd_jax.context.records import read_record
from proxykd_jax.context.specs import ARTIFACTS, matches
from proxykd_jax.errors import ProxyKDError


def base(run_dir, **overrides):
    cfg = config_lib.base_config()
    cfg.run.dir = str(run_dir)
    for key, value in overrides.items():
        cfg = _changed(cfg, key, value)
    return cfg


# ------------------------------------------------------------------------------------ the table


@pytest.mark.parametrize("stage", list(stages.STAGES))
def test_every_stage_declares_its_artifact(stage):
    flat = artifacts.flatten(config_lib.base_config().to_dict())
    if stage == "serve":  # reads a model, writes nothing: no artifact and no lock
        assert stage not in ARTIFACTS
        return
    spec = ARTIFACTS[stage]
    for pattern in spec.fields + spec.ignore:  # each pattern names real fields
        assert any(matches(k, [pattern]) for k in flat), pattern
    fields = artifacts.depends_on(config_lib.base_config(), spec)
    assert fields and not any(matches(k, spec.ignore) for k in fields)
    assert "run.overwrite" not in fields and "run.dir" not in fields


def test_serve_takes_no_lock_and_the_writers_do(tmp_path):
    cfg = base(tmp_path / "run")
    with context.create(cfg, "serve", devices=None) as ctx:
        assert ctx.lock is None and not (tmp_path / "run").exists()
    with context.create(cfg, "prior") as ctx:
        assert ctx.lock.held and ctx.paths.lock.exists()
    assert not ctx.paths.lock.exists()


def _changed(cfg, key, value):
    cfg = cfg.copy_and_resolve_references()
    node = cfg
    *groups, field = key.split(".")
    for g in groups:
        node = node[g]
    node[field] = value
    return cfg


@pytest.mark.parametrize(
    "stage,changes,keeps",
    [
        ("collect", ("collect.temperature", 0.5), ("collect.concurrency", 64)),
        ("prepare", ("data.seq_len", 128), ("data.batch_size", 64)),
        ("prior", ("prior.ngram_order", 3), ("prior.kappa", 3.0)),
        ("align", ("align.beta", 0.2), ("align.checkpoint_every", 7)),
        ("posterior", ("posterior.n_max", 4.0), ("posterior.chunk_tokens", 64)),
        ("distill", ("distill.loss.alpha", 50.0), ("train.checkpoint_every", 7)),
        ("eval", ("eval.max_samples", 8), ("mesh.shape.fsdp", 2)),
        ("eval", ("proxy.param_dtype", "bfloat16"), ("proxy.remat", "full")),  # eval runs a proxy in its dtypes
        ("eval", ("model.dtype", "bfloat16"), ("model.remat", "full")),
        ("export", ("export.step", 3), ("export.out", "/elsewhere")),
        ("demo", ("demo.teacher_seed", 1), ("proxy.d_model", 128)),
    ],
)
def test_fields_that_change_results_change_the_hash(stage, changes, keeps, tmp_path):
    cfg = base(tmp_path)
    digest = lambda c: open_artifact(stage, c, context.RunPaths.from_config(c), overwrite=False).hash  # noqa: E731
    assert digest(_changed(cfg, *changes)) != digest(cfg)
    assert digest(_changed(cfg, *keeps)) == digest(cfg)


@pytest.mark.parametrize(
    "key,value",
    [
        ("collect.breaker_failures", 2),
        ("collect.breaker_no_success_s", 600.0),
        ("collect.requests_per_minute", 60),
        ("collect.tokens_per_minute", 10_000),
        ("collect.max_attempts", 3),
        ("collect.request_timeout_s", 5.0),
        ("collect.backoff_max_s", 1.0),
    ],
)
def test_how_collect_runs_is_not_what_it_collects(key, value, tmp_path):
    """Settings of how collect copes with the endpoint (limits, retries, when an outage stops it) leave the
    corpus's hash alone: resuming with a patient breaker after an outage needs no run.overwrite."""
    cfg = base(tmp_path)
    digest = lambda c: open_artifact("collect", c, context.RunPaths.from_config(c), overwrite=False).hash  # noqa: E731
    assert digest(_changed(cfg, key, value)) == digest(cfg)


# ------------------------------------------------------------------------------------ the rule


def _open(cfg, overwrite=False):
    return open_artifact("prior", cfg, context.RunPaths.from_config(cfg), overwrite=overwrite)


def _write(art, text):
    art.begin()
    (art.work / "tables.txt").write_text(text)


def test_reuse_resume_refuse_and_replace(tmp_path):
    cfg = base(tmp_path)
    art = _open(cfg)
    assert art.status == "new" and art.work == art.path == tmp_path / "prior"
    _write(art, "first")
    again = _open(cfg)
    assert again.status == "resume" and not again.done  # begun, never finished: the stage resumes
    art.finish({"tokens": 3})
    again = _open(cfg)
    assert again.done and again.summary == {"tokens": 3}

    other = _changed(cfg, "prior.ngram_order", 3)
    with pytest.raises(ProxyKDError, match=r"prior.ngram_order 4 -> 3.*run.overwrite=True"):
        _open(other)
    redo = _open(other, overwrite=True)
    assert redo.status == "replace" and redo.work == tmp_path / ".prior.new"
    _write(redo, "second")  # ... and the redo dies here: the finished artifact is untouched
    assert (tmp_path / "prior" / "tables.txt").read_text() == "first" and _open(cfg).done
    resumed = _open(other, overwrite=True)
    assert resumed.work == redo.work and (resumed.work / "tables.txt").read_text() == "second"
    resumed.begin()  # same settings: the partial redo is kept
    assert (resumed.work / "tables.txt").read_text() == "second"
    resumed.finish({"tokens": 4})
    assert (tmp_path / "prior" / "tables.txt").read_text() == "second" and not redo.work.exists()
    assert _open(other).done and read_record(tmp_path / "prior")["fields"]["prior.ngram_order"] == 3


def test_an_abandoned_redo_with_other_settings_is_discarded(tmp_path):
    cfg = base(tmp_path)
    art = _open(cfg)
    _write(art, "first")
    art.finish()
    _write(_open(_changed(cfg, "prior.ngram_order", 3), overwrite=True), "abandoned")
    redo = _open(_changed(cfg, "prior.ngram_order", 2), overwrite=True)
    redo.begin()
    assert not (redo.work / "tables.txt").exists()


def test_an_upstream_rebuild_makes_dependants_stale(tmp_path):
    cfg = base(tmp_path)
    paths = context.RunPaths.from_config(cfg)
    prepared = open_artifact("prepare", cfg, paths, overwrite=False)
    prepared.begin()
    prepared.finish()
    prior = _open(cfg)
    _write(prior, "tables")
    prior.finish()
    other = _changed(cfg, "data.seq_len", 64)
    rebuilt = open_artifact("prepare", other, paths, overwrite=True)
    rebuilt.begin()
    rebuilt.finish()
    with pytest.raises(ProxyKDError, match=r"its input prepared/ was rebuilt"):
        _open(other)


def test_a_folder_not_made_by_the_stage_is_refused(tmp_path):
    cfg = base(tmp_path)
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "mine.txt").write_text("user data")
    with pytest.raises(ProxyKDError, match=r"not made by `proxykd prior`"):
        _open(cfg)
    art = _open(cfg, overwrite=True)
    _write(art, "tables")
    art.finish()
    assert sorted(p.name for p in (tmp_path / "prior").iterdir()) == ["artifact.json", "tables.txt"]


def test_a_run_killed_while_writing_its_first_record_resumes(tmp_path):
    """`kill -9` between the first record's write and its rename leaves a folder with `artifact.json.tmp`
    alone (a partial one here): the same command starts the stage as new; it was refused as a folder
    not made by the stage. Anything else in the folder is still refused."""
    cfg = base(tmp_path)
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "artifact.json.tmp").write_text('{"stage": "prior", "ha')
    art = _open(cfg)
    assert art.status == "new"
    _write(art, "tables")
    art.finish()
    assert sorted(p.name for p in (tmp_path / "prior").iterdir()) == ["artifact.json", "tables.txt"]
    assert _open(cfg).done
    other = base(tmp_path / "other")
    (tmp_path / "other" / "prior").mkdir(parents=True)
    for name in ("artifact.json.tmp", "mine.txt"):
        (tmp_path / "other" / "prior" / name).write_text("user data")
    with pytest.raises(ProxyKDError, match=r"not made by `proxykd prior`"):
        _open(other)


def test_a_file_artifact_moves_with_its_companions(tmp_path):
    cfg = base(tmp_path)
    paths = context.RunPaths.from_config(cfg)
    first = open_artifact("collect", cfg, paths, overwrite=False)
    first.begin()
    first.work.write_text("old corpus\n")
    first.work.with_name(first.work.name + ".failures.jsonl").write_text("old failure\n")
    first.finish()
    redo = open_artifact("collect", _changed(cfg, "collect.temperature", 0.5), paths, overwrite=True)
    assert redo.work == paths.corpus.with_name(".teacher.jsonl.new")
    redo.begin()
    redo.work.write_text("new corpus\n")
    redo.finish()
    assert paths.corpus.read_text() == "new corpus\n"
    assert sorted(p.name for p in paths.corpus.parent.iterdir()) == ["teacher.jsonl", "teacher.jsonl.artifact.json"]
    assert read_record(paths.corpus, True)["fields"]["collect.temperature"] == 0.5


# ------------------------------------------------------------------------------------ stages


def _word_corpus(root: pathlib.Path, n: int = 30) -> tuple[pathlib.Path, pathlib.Path]:
    import numpy as np

    from proxykd_jax.models.tokenizer import build_word_tokenizer

    words = [f"w{i}" for i in range(40)]
    rng = np.random.default_rng(0)
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(n):
            responses = [" ".join(rng.choice(words, rng.integers(2, 6))) for _ in range(2)]
            f.write(
                json.dumps({"id": f"p{i}", "prompt": " ".join(rng.choice(words, 3)), "responses": responses}) + "\n"
            )
    build_word_tokenizer(words, root / "tokenizer")
    return corpus, root / "tokenizer"


def test_prepare_and_prior_reuse_refuse_and_replace(tmp_path):
    corpus, tokenizer = _word_corpus(tmp_path)
    cfg = base(tmp_path / "run", **{"data.corpus": str(corpus), "data.tokenizer": str(tokenizer), "data.seq_len": 32})
    cfg.data.split.update(warmup=0.0, align=0.0, distill=1.0, heldout=0.0)
    cfg.prior.ngram_order = 2
    manifest = run_stage("prepare", cfg)
    prior = run_stage("prior", cfg)
    stamp = (tmp_path / "run" / "prepared" / "manifest.json").stat().st_mtime_ns
    assert run_stage("prepare", cfg) == manifest and run_stage("prior", cfg) == prior  # reused
    assert (tmp_path / "run" / "prepared" / "manifest.json").stat().st_mtime_ns == stamp
    longer = _changed(cfg, "data.seq_len", 48)
    with pytest.raises(ProxyKDError, match=r"data.seq_len 32 -> 48"):
        run_stage("prepare", longer)
    longer.run.overwrite = True
    assert run_stage("prepare", longer)["seq_len"] == 48
    assert not (tmp_path / "run" / ".prepared.new").exists()
    longer.run.overwrite = False
    with pytest.raises(
        ProxyKDError,
        match=r"prior \(finished\) was made from other settings or inputs: its input prepared/ was rebuilt",
    ):
        run_stage("prior", longer)


def test_collect_reuses_a_finished_corpus_without_a_request(tmp_path):
    from proxykd_jax.teacher.backends import ToyBackend
    from proxykd_jax.teacher.listen import ServerThread
    from proxykd_jax.teacher.server import make_app

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"hello {i}"}) + "\n" for i in range(5)))
    app = make_app(ToyBackend())
    with ServerThread(app) as server:
        cfg = base(
            tmp_path / "run",
            **{
                "collect.prompts": str(prompts),
                "collect.base_url": server.base_url,
                "collect.model": "toy",
                "collect.samples_per_prompt": 2,
                "collect.max_tokens": 8,
                "collect.progress": False,
            },
        )
        assert run_stage("collect", cfg)["done"] == 10
        requests = len(app.state.requests)
        assert run_stage("collect", cfg)["requested"] == 10  # the finished corpus is reused ...
        assert len(app.state.requests) == requests  # ... without one request (nothing paid twice)
        hotter = _changed(cfg, "collect.temperature", 0.5)
        with pytest.raises(ProxyKDError, match=r"collect.temperature 1.0 -> 0.5"):
            run_stage("collect", hotter)
        hotter.run.overwrite = True
        assert run_stage("collect", hotter)["done"] == 10
    corpus = (tmp_path / "run" / "corpus" / "teacher.jsonl").read_text().splitlines()
    assert len(corpus) == 10 and all(json.loads(line)["meta"]["temperature"] == 0.5 for line in corpus)


def test_a_changed_input_is_named_for_what_changed():
    """`export` of the SFT student over an export of the Proxy-KD one: student/ was not rebuilt, it stopped
    being the input (the refusal said "was rebuilt")."""
    changes = artifacts._changes({}, {}, {"student": "a", "prepared": "p"}, {"student_sft": "b", "prepared": "q"})
    assert changes == [
        "its input prepared/ was rebuilt",
        "it was made from student/, no longer an input",
        "its input student_sft/ is new",
    ]
