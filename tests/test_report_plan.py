"""A report re-run in the same run directory with a smaller plan (fewer settings, seeds or variants) tables,
plots and averages exactly its own plan's results: the earlier ones stay on disk untouched, left out, and
the report says so in one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from stage_helpers import run_stage

from proxykd_jax.report import plots
from proxykd_jax.report import runner as runner_lib
from proxykd_jax.report.settings import SETTINGS
from proxykd_jax.report.variants import VARIANTS
from tests.pipeline_fixtures import tiny_config


def _cfg(run_dir, seeds, variants):
    cfg = tiny_config(run_dir)
    with cfg.unlocked():
        cfg.report.settings, cfg.report.seeds, cfg.report.variants = "perturbed", seeds, variants
    return cfg


def _stand_ins(monkeypatch) -> dict:
    """Stages stand-ins: each variant's result is a fresh random score, kept once written (as the real one);
    each seed's estimates cover the alignments of the plan that first wrote them (a later plan reuses them,
    as the real file follows the aligned proxies on disk). Returns {(seed, variant): its nats/byte}."""
    rng, scores = np.random.default_rng(11), {}

    def post_init(self):
        self.spec = SETTINGS[self.setting]
        self.results = self.runner.out / "results" / self.setting / f"seed{self.seed}"

    def variant(self, name):
        path = self.results / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text()), True
        v = scores[self.seed, name] = float(rng.uniform(1.0, 3.0))
        res = {"setting": self.setting, "seed": self.seed, "variant": name, "label": VARIANTS[name].label}
        res |= {"nats_per_byte": v, "kl_to_teacher": v / 2, "teacher_loglik_per_byte": -v, "curve": [(1, v)]}
        self.runner.ctx.write_json(path, res)
        return res, False

    def estimates(self):
        path = self.results / "estimates.json"
        if path.exists():
            return json.loads(path.read_text())
        names = runner_lib.variants_for(self.setting, self.runner.plan()[2])
        aligns = sorted({VARIANTS[n].align for n in names})
        out = {"setting": self.setting, "seed": self.seed, "covers": aligns}
        out["estimator_kl"] = {"prior": float(rng.uniform()), **{f"proxy ({a})": float(rng.uniform()) for a in aligns}}
        out["phases"] = {a: {"init": 1.0, "sft": float(rng.uniform())} for a in aligns}
        out["eb"] = {"kappa": 1.0, "n_max": 2.0, "heldout_loglik": {}, "eb_search": []}
        self.runner.ctx.write_json(path, out)
        return out

    monkeypatch.setattr(runner_lib.SeedRun, "__post_init__", post_init)
    monkeypatch.setattr(runner_lib.SeedRun, "variant", variant)
    monkeypatch.setattr(runner_lib.SeedRun, "estimates", estimates)
    monkeypatch.setitem(SETTINGS, "perturbed", dataclasses.replace(SETTINGS["perturbed"], build=lambda r, f: None))
    return scores


def _row(md: str, label: str) -> list[str] | None:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells
    return None


def test_a_smaller_plan_tables_only_its_own_results(tmp_path, monkeypatch):
    scores = _stand_ins(monkeypatch)
    drawn = []
    write_plots = plots.write_plots
    monkeypatch.setattr(
        plots, "write_plots", lambda out, res, est: drawn.append((res, est)) or write_plots(out, res, est)
    )
    run = tmp_path / "run"
    results = run / "report" / "results"
    run_stage("report", _cfg(run, "0,1,2", "proxykd,nll_rounds"))
    assert "left out" not in (run / "report" / "report.md").read_text()
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    assert len(before) == 3 * 3  # per seed: two variants and the estimates

    returned = run_stage("report", _cfg(run, "0,1", "proxykd"))
    md = (run / "report" / "report.md").read_text()
    # the table: seeds 0 and 1 of proxykd only (n = 2, their mean and sample std), no nll_rounds row
    kd = _row(md, VARIANTS["proxykd"].label)
    mine = [scores[s, "proxykd"] for s in (0, 1)]
    assert kd[1] == "2", md
    assert kd[2] == f"{np.mean(mine):.4f} ± {np.std(mine, ddof=1):.4f}", md
    assert _row(md, VARIANTS["nll_rounds"].label) is None, md
    # the estimates: seeds 0 and 1, the plan's alignment only (the files also hold nll's, from the first plan)
    assert _row(md, "proxy (full)") is not None and _row(md, "proxy (nll)") is None, md
    assert _row(md, "nll") is None and "- seed 1:" in md and "- seed 2:" not in md, md
    # the left-out line: one line, naming what is out of the plan
    note = [line for line in md.splitlines() if "left out" in line]
    assert len(note) == 1 and "5 result files" in note[0], md
    assert "seeds 2" in note[0] and "files nll_rounds.json" in note[0] and "alignment nll" in note[0], note
    # the plots and the returned results: the same plan's results
    res, est = drawn[-1]
    assert sorted((r["seed"], r["variant"]) for r in res) == [(0, "proxykd"), (1, "proxykd")]
    assert sorted(e["seed"] for e in est) == [0, 1] and all(set(e["phases"]) == {"full"} for e in est)
    assert sorted((r["seed"], r.get("variant", "")) for r in returned) == sorted(
        (r["seed"], r.get("variant", "")) for r in res + est
    )
    # nothing already written is lost or changed
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before

    # the larger plan again: everything back in, nothing left out
    run_stage("report", _cfg(run, "0,1,2", "proxykd,nll_rounds"))
    md = (run / "report" / "report.md").read_text()
    assert _row(md, VARIANTS["proxykd"].label)[1] == "3" and _row(md, "proxy (nll)") is not None
    assert "left out" not in md


def test_a_plan_without_a_setting_or_the_estimated_posterior_leaves_them_out(tmp_path, monkeypatch):
    _stand_ins(monkeypatch)
    monkeypatch.setitem(SETTINGS, "specialised", dataclasses.replace(SETTINGS["specialised"], build=lambda r, f: None))
    run = tmp_path / "run"
    cfg = _cfg(run, "0", "proxykd")
    with cfg.unlocked():
        cfg.report.settings = "specialised,perturbed"
    run_stage("report", cfg)
    assert "## Setting: specialised" in (run / "report" / "report.md").read_text()
    assert (run / "report" / "alignment.png").exists()
    assert json.loads((run / "report" / "artifact.json").read_text())["summary"] == {"results": 2}
    # white_box distils from no posterior: the seed's estimates (of the full eb posterior) are not its plan's
    returned = run_stage("report", _cfg(run, "0", "white_box"))
    md = (run / "report" / "report.md").read_text()
    assert "## Setting: specialised" not in md and _row(md, VARIANTS["proxykd"].label) is None, md
    assert _row(md, VARIANTS["white_box"].label)[1] == "1" and _row(md, "prior") is None and "κ" not in md, md
    assert [r["variant"] for r in returned] == ["white_box"]
    # no estimates in this plan: the earlier alignment plot is gone, not left beside a report that no longer shows it
    assert not (run / "report" / "alignment.png").exists() and (run / "report" / "ablation.png").exists()
    assert json.loads((run / "report" / "artifact.json").read_text())["summary"] == {"results": 1}
    note = [line for line in md.splitlines() if "left out" in line]
    assert len(note) == 1 and "4 result files (settings specialised; files proxykd.json, estimates.json)" in note[0]
