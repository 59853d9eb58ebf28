"""`proxykd eval` at real scale: one model in memory at a time, each loaded in its group's dtypes (a proxy as
the proxy group says, a student as the model group says), scored for everything it takes part in, its scores
written to its own file in the artifact's work folder and released before the next is loaded; a killed eval
reuses the files of the models it finished, scores a damaged one again, and writes the metrics.json of an
uninterrupted run."""

from __future__ import annotations

import gc
import json
import pathlib
import shutil
import weakref

import jax
import pytest
from flax import nnx
from pipeline_fixtures import build_run
from stage_helpers import run_stage

from proxykd_jax.context import RunContext, RunPaths
from proxykd_jax.eval import benchmark
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig

ORDER = ["proxy_init", "proxy/final", "student_sft/final", "student/final"]  # as eval scores them


class Killed(Exception):
    """Stands in for kill -9 at a model's load."""


class Loads:
    """Wraps `RunContext.load_model`: which folders load, in which dtypes, and how many models loaded
    before are still alive (a weak reference to each of their parameters) when the next one loads."""

    def __init__(self, monkeypatch, kill_at: int = 0):
        self.folders, self.alive, self.dtypes, self.refs = [], [], [], []
        real = RunContext.load_model

        def load(ctx, folder, **kw):
            if len(self.folders) + 1 == kill_at:
                raise Killed(folder)
            self.alive.append(self.still_alive())
            folder = pathlib.Path(folder)
            self.folders.append(f"{folder.parent.name}/final" if folder.name == "final" else folder.name)
            model_cfg, model = real(ctx, folder, **kw)
            leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
            self.refs.append([weakref.ref(x) for x in leaves])
            self.dtypes.append({str(x.dtype) for x in leaves})
            return model_cfg, model

        monkeypatch.setattr(RunContext, "load_model", load)

    def still_alive(self) -> int:
        return sum(any(r() is not None for r in refs) for refs in self.refs)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny run with the four models eval scores (the proxy before and after alignment, both students),
    the prior and the posterior store (the estimator's part) and the known teacher; eval not yet run."""
    cfg, teacher = build_run(tmp_path_factory.mktemp("one_model") / "run")
    with cfg.unlocked():
        cfg.posterior.proxy = cfg.proxy.init_from
    run_stage("prior", cfg)
    run_stage("posterior", cfg)
    paths = RunPaths.from_config(cfg)
    benchmark.perturbed_proxy(teacher, paths.proxy / "final", 0.1, 11)
    student = ModelConfig.from_config(cfg.model)
    for seed, name in ((1, "student"), (2, "student_sft")):
        hf.save_hf(Llama(student, rngs=nnx.Rngs(seed)), student, paths.student(name) / "final")
    return cfg


def _copy(base, dest: pathlib.Path):
    shutil.copytree(base.run.dir, dest, ignore=shutil.ignore_patterns("proxykd.lock"))
    cfg = base.copy_and_resolve_references()
    cfg.run.dir = str(dest)
    return cfg


@pytest.fixture(scope="module")
def whole(base, tmp_path_factory):
    """metrics.json of an eval that ran through."""
    cfg = _copy(base, tmp_path_factory.mktemp("whole") / "run")
    run_stage("eval", cfg)
    return (pathlib.Path(cfg.run.dir) / "eval" / "metrics.json").read_text()


def test_one_model_in_memory_at_a_time_in_its_group_dtypes(base, tmp_path, monkeypatch):
    cfg = _copy(base, tmp_path / "run")
    cfg.model.param_dtype = "bfloat16"  # the students' parameters as distill keeps them; the proxies' float32
    loads = Loads(monkeypatch)
    gc.disable()  # a model kept only by reference cycles (a module graph) is freed by the stage, not by chance
    try:
        metrics = run_stage("eval", cfg)
    finally:
        gc.enable()
    assert loads.folders == ORDER and set(metrics["models"]) == {
        "proxy (before align)",
        "proxy (aligned)",
        "student (SFT, alpha=0)",
        "student (Proxy-KD)",
    }
    assert metrics["estimator_kl"]["positions"] > 0  # the proxies took part in the estimator's scores too
    assert all("teacher_loglik_of_generations" in metrics["models"][k] for k in metrics["models"] if "student" in k)
    assert loads.alive == [0, 0, 0, 0]  # every model released before the next one loads
    gc.collect()
    assert loads.still_alive() == 0  # nothing (a jit cache, a dict) keeps the last one
    assert loads.dtypes == [{"float32"}, {"float32"}, {"bfloat16"}, {"bfloat16"}]


@pytest.mark.parametrize("damage", [None, "torn", "not scores"])
def test_a_killed_eval_scores_only_the_models_it_had_not_finished(base, whole, tmp_path, monkeypatch, damage):
    root = tmp_path / "run"
    cfg = _copy(base, root)
    with monkeypatch.context() as patch:
        Loads(patch, kill_at=3)  # killed as the third model loads: two are finished
        with pytest.raises(Killed):
            run_stage("eval", cfg)
    assert not (root / "eval" / "metrics.json").exists()
    first = root / "eval" / "scored" / "proxy_before_align.json"
    if damage == "torn":
        first.write_text(first.read_text()[:40])
    elif damage == "not scores":
        first.write_text('["a list"]')
    loads = Loads(monkeypatch)
    run_stage("eval", cfg)
    assert loads.folders == (ORDER[2:] if damage is None else [ORDER[0]] + ORDER[2:])
    assert (root / "eval" / "metrics.json").read_text() == whole


def test_a_reused_eval_prints_and_returns_its_models_in_the_order_it_scored_them(base, tmp_path, capsys):
    """The rerun that reuses a finished eval prints the table of the run that made it (the record's summary is
    stored with sorted keys: it listed 'proxy (aligned)' before 'proxy (before align)')."""
    cfg = _copy(base, tmp_path / "run")
    first = run_stage("eval", cfg)
    printed = capsys.readouterr().out
    again = run_stage("eval", cfg)
    assert capsys.readouterr().out == printed
    scored = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert list(again["models"]) == list(first["models"]) == list(scored["models"])
