"""`proxykd demo` end to end on configs/demo.py shrunk to seconds: the teacher served over HTTP,
every stage, the results table; run again, every stage reuses its finished artifact; with another
teacher seed, the demo's own artifact refuses until run.overwrite is set."""

from __future__ import annotations

import json

import pytest
from stage_helpers import run_stage

from proxykd_jax.context.records import read_record
from proxykd_jax.errors import ProxyKDError
from tests.pipeline_fixtures import tiny_config


def demo_config(run_dir):
    """The tiny config with alignment cut to its SFT phase (the DPO rounds have their own tests)."""
    cfg = tiny_config(run_dir)
    cfg.align.rounds, cfg.align.sft_steps, cfg.train.steps = 0, 2, 3
    return cfg


def test_demo_runs_then_reuses_every_stage(tmp_path):
    cfg = demo_config(tmp_path / "run")
    metrics = run_stage("demo", cfg)
    run = tmp_path / "run"
    assert set(metrics["models"]) == {
        "proxy (before align)",
        "proxy (aligned)",
        "student (SFT, alpha=0)",
        "student (Proxy-KD)",
    }
    assert metrics["estimator_kl"]["positions"] > 0 and (run / "results.md").read_text().startswith("| model |")
    stages = ["demo", "corpus/teacher.jsonl", "prepared", "prior", "proxy", "posterior", "student", "student_sft"]
    records = {name: read_record(run / name) for name in stages + ["eval"]}
    assert all(r is not None and r["finished"] for r in records.values()), records
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "proxykd.lock"}

    again = run_stage("demo", demo_config(run))  # everything finished: reused, nothing recomputed
    assert json.loads(json.dumps(again)) == json.loads((run / "eval" / "metrics.json").read_text())
    changed = [p for p, t in stamps.items() if p.exists() and p.stat().st_mtime_ns != t]
    assert changed == [run / "results.md"]

    # `proxykd status` with the demo's config sees the settings the demo ran its stages with: all finished
    from proxykd_jax import status

    table = status.run(demo_config(run))
    rows = [line.split() for line in table.split("\n\n")[1].splitlines()[1:]]
    assert [r[0] for r in rows] == [*status.ORDER[:6], "distill", *status.ORDER[6:9]], table
    assert all(r[2:4] == ["finished", "reuses"] for r in rows[:-1]), table  # (the demo does not export)
    assert rows[-1][2:5] == ["not", "started", "starts"] and "1 phase," in table, table

    other = demo_config(run)
    other.demo.teacher_seed = 7
    with pytest.raises(ProxyKDError, match=r"demo \(finished\).*demo.teacher_seed 1234 -> 7"):
        run_stage("demo", other)
