"""`proxykd report` at a tiny size: one setting x two seeds x every variant, the table and PNGs,
resume after `kill -9` of a real process (same table), the specialised teacher and bad input."""

from __future__ import annotations

import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from stage_helpers import run_stage

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.report import runner as runner_lib
from tests.pipeline_fixtures import tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent


def report_config_for(run_dir, settings="perturbed", seeds="0,1"):
    cfg = tiny_config(run_dir)
    with cfg.unlocked():
        cfg.report.settings, cfg.report.seeds = settings, seeds
        cfg.report.general_prompts, cfg.report.pretrain_steps, cfg.report.style_words = 24, 4, 8
        cfg.align.sft_steps, cfg.align.rounds = 2, 1
        cfg.train.steps = 4
        cfg.eval.generate_prompts = 4
    return cfg


def small(run_dir):
    """One seed, the variants that exercise every kind of artifact, alignment cut to SFT."""
    cfg = report_config_for(run_dir, seeds="0")
    with cfg.unlocked():
        cfg.report.variants = "sft,proxykd,prior_only"
        cfg.align.rounds, cfg.align.sft_steps, cfg.train.steps = 0, 2, 3
        cfg.demo.num_prompts = 32
    return cfg


def _cli(cfg, tmp_path):
    pkl = tmp_path / "cfg.pkl"
    pkl.write_bytes(pickle.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return [sys.executable, "-m", "proxykd_jax", "report", f"--config={REPO}/tests/pickled_config.py:{pkl}"], env


def _table_rows(md: str) -> dict:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 5 and "±" in cells[2]:
            rows[cells[0]] = [float(c.split("±")[0]) for c in cells[2:5]]
    return rows


def test_report_writes_table_and_plots_and_resumes_after_kill_9(tmp_path):
    import matplotlib.image

    run = tmp_path / "run"
    argv, env = _cli(small(run), tmp_path)
    first_result = run / "report" / "results" / "perturbed" / "seed0" / "sft.json"
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not first_result.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first_result.exists(), proc.communicate()[0][-3000:]
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: the other variants are not done
    finally:
        proc.kill()
        proc.wait()
    assert not (run / "report" / "report.md").exists()
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "1/3 perturbed seed 0 sft" in again.stdout and "(reused;" in again.stdout
    md = (run / "report" / "report.md").read_text()
    rows = _table_rows(md)
    assert len(rows) >= 3 and all(np.isfinite(v).all() for v in rows.values()), md
    for name in ("ablation", "curves", "alignment"):
        image = matplotlib.image.imread(run / "report" / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"({name}.png)" in md
    # Scoring every finished student again from scratch gives the same table: the killed run left
    # nothing half-written behind.
    (run / "report" / "report.md").unlink()
    for path in (run / "report" / "results").rglob("*.json"):
        path.unlink()
    run_stage("report", small(run))
    assert _table_rows((run / "report" / "report.md").read_text()) == rows


def test_bad_report_input_is_one_sentence(tmp_path):
    cfg = small(tmp_path / "run")
    with cfg.unlocked():
        cfg.report.variants = "sft,nope"
    with pytest.raises(ProxyKDError, match=r"config.report.variants: unknown nope; choose from sft, proxykd"):
        run_stage("report", cfg)
    with cfg.unlocked():
        cfg.report.variants, cfg.report.seeds = "", "0,x"
    with pytest.raises(ProxyKDError, match="comma-separated integers"):
        run_stage("report", cfg)
    # a report directory from before corpora recorded finish reasons: refused before any work
    with cfg.unlocked():
        cfg.report.seeds = "0"
    corpus = tmp_path / "run" / "perturbed" / "seed0" / "corpus" / "teacher.jsonl"
    corpus.parent.mkdir(parents=True)
    corpus.write_text('{"id": "q0", "prompt": "a", "responses": ["b c", "d"]}\n')
    with pytest.raises(
        ProxyKDError, match=r"teacher.jsonl was written by an older proxykd_jax .* new --config.run.dir"
    ):
        run_stage("report", cfg)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["perturbed"]  # nothing else written
    corpus.write_text('{"id": "q0", "prompt": "a", "response": "b c", "meta": {"finish_reason": "length"}}\n')
    assert runner_lib._older_report(tmp_path / "run") is None


def test_own_token_variants_run_only_when_named():
    """ "" runs every variant but the opt-in own-token ones (under the default they repeat Proxy-KD's posterior or
    measure the old default); named, they run, and each sets posterior.own_token."""
    from proxykd_jax.report.variants import DEFAULT_VARIANTS, VARIANTS, posterior_overrides

    everything = runner_lib._names("", VARIANTS, "variants", DEFAULT_VARIANTS)
    assert "proxykd" in everything and not {"no_own_token", "half_own_token", "own_token"} & set(everything)
    assert len(everything) == len(VARIANTS) - 3
    assert runner_lib._names("sft,own_token", VARIANTS, "variants", everything) == ["sft", "own_token"]
    owns = {
        n: posterior_overrides(VARIANTS[n].posterior, None) for n in ("no_own_token", "half_own_token", "own_token")
    }
    assert owns == {
        "no_own_token": {"posterior.own_token": "leave_out"},
        "half_own_token": {"posterior.own_token": "0.5"},
        "own_token": {"posterior.own_token": "auto"},
    }


def test_specialised_teacher_is_a_different_model_of_the_same_family(tmp_path):
    from proxykd_jax.report.settings import kl_between
    from proxykd_jax.teacher.known import KnownTeacher

    general = KnownTeacher.create(5, vocab_size=64, d_model=32, num_layers=1, d_ff=64, folder=tmp_path / "tok")
    teacher = general.specialise(6, noise=0.3, style_words=8, style_boost=3.0)
    same = general.specialise(6, noise=0.0, style_words=8, style_boost=0.0)
    rng = np.random.default_rng(0)
    contexts = [rng.integers(4, 64, 12).tolist() for _ in range(16)]
    assert kl_between(general, same, contexts) < 1e-6  # no noise, no style: the same model
    assert kl_between(teacher, general, contexts) > 0.05
    p_t, p_g = teacher.distributions(contexts), general.distributions(contexts)
    blocked = [i for i in range(4) if i != teacher.eos_id]
    assert p_t[..., blocked].max() < 1e-6  # pad, bos, unk stay impossible
    # the style: the favoured words (largest bias change) gain probability mass
    bias = np.asarray(teacher.model.lm_head[...])[0] - np.asarray(general.model.lm_head[...])[0]
    words = np.argsort(-bias)[:8]
    assert p_t[..., words].sum(-1).mean() > 1.5 * p_g[..., words].sum(-1).mean()


def test_chartok_setting_reports_per_byte_scores_and_na_where_tokenizers_differ(tmp_path):
    """A character-level teacher, our byte-level BPE: nats/byte and the teacher's score of the
    generations are numbers, KL and the white-box ceiling are "n/a (tokenizers differ)"."""
    cfg = report_config_for(tmp_path / "run", settings="chartok", seeds="0")
    with cfg.unlocked():
        cfg.report.variants = "sft,proxykd,white_box"
        cfg.report.chartok_sft_steps, cfg.report.chartok_max_chars = 3, 16
        cfg.align.rounds, cfg.train.steps = 0, 3
        cfg.proxy.vocab_size = cfg.model.vocab_size = 288
        cfg.proxy.max_seq_len = cfg.model.max_seq_len = 96
        cfg.data.seq_len = cfg.train.seq_len = 64
        cfg.demo.num_prompts, cfg.demo.samples_per_prompt = 32, 2
    run_stage("report", cfg)
    run = tmp_path / "run"
    manifest = (run / "chartok" / "seed0" / "prepared" / "manifest.json").read_text()
    assert '"teacher_head": "bytes"' in manifest
    md = (run / "report" / "report.md").read_text()
    cells = {}
    for line in md.splitlines():
        row = [c.strip() for c in line.strip("|").split("|")]
        if len(row) >= 5 and row[0] in ("SFT student (alpha = 0)", "Proxy-KD (full)") or row[0].startswith("white-box"):
            cells[row[0]] = row
    assert set(cells) == {
        "SFT student (alpha = 0)",
        "Proxy-KD (full)",
        "white-box ceiling (teacher's true distributions)",
    }
    na = "n/a (tokenizers differ)"
    for name in ("SFT student (alpha = 0)", "Proxy-KD (full)"):
        row = cells[name]
        nats, kl, loglik = row[2:5]
        assert 0.1 < float(nats.split("±")[0]) < 20.0 and kl == na and float(loglik.split("±")[0]) < 0.0, row
        assert row[1] == "1"
    assert cells["white-box ceiling (teacher's true distributions)"][2:5] == [na] * 3
    assert "| proxy (before align) |" in md and "| proxy (full) |" in md and "κ = " in md
    import matplotlib.image

    assert matplotlib.image.imread(run / "report" / "ablation.png").shape[0] > 100
    from proxykd_jax.report.runner import variants_for

    assert variants_for("chartok", ["proxykd", "no_head"]) == ["proxykd", "no_head"]
    assert variants_for("perturbed", ["proxykd", "no_head"]) == ["proxykd"]  # its corpus has no top log-probs
    cfg_small = report_config_for(tmp_path / "bad", settings="chartok", seeds="0")  # the tiny vocabulary: 96
    with pytest.raises(ProxyKDError, match="at least 260"):
        run_stage("report", cfg_small)
