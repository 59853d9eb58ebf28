"""`proxykd choose` on a real tiny run: one trial run directory per candidate value, its posterior (for a
posterior field) and its student made there, the value of the lowest validation loss chosen; a killed trial
resumes and finished ones are reused, a candidate added later is one more trial, a distill field shares the run's
posterior, and bad choices are refused in one sentence before any work."""

from __future__ import annotations

import json
import pathlib

import pytest
from pipeline_fixtures import build_run
from stage_helpers import Stop, changed, interrupted_distill, run_stage

from proxykd_jax import config as config_lib
from proxykd_jax import stages, status
from proxykd_jax.context import preflight
from proxykd_jax.context.records import read_record
from proxykd_jax.errors import ConfigError, ProxyKDError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny run (6 distill steps) with prepared data, prior and posterior (the proxy: its init folder)."""
    root = tmp_path_factory.mktemp("choose")
    cfg, _ = build_run(root / "run")
    cfg = changed(cfg, posterior__proxy=str(root / "run" / "proxy_init"), choose__eval_every=3)
    for stage in ("prior", "posterior"):
        run_stage(stage, cfg)
    return cfg


def _eval_rows(student: pathlib.Path) -> list[dict]:
    rows = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


def _updated(folder: pathlib.Path) -> str:
    return read_record(folder, False)["updated"]


def _check_choice(choice: dict, folder: pathlib.Path, names: list[str]) -> None:
    """Every trial's lowest eval loss and step are its student's metrics', and the lowest of them is chosen."""
    assert [str(r["value"]) for r in choice["trials"]] == names
    for row, name in zip(choice["trials"], names):
        evals = _eval_rows(folder / name / "student")
        assert [r["step"] for r in evals] == [3, 6]  # choose.eval_every = 3, on the align split
        best = min(evals, key=lambda r: r["eval_loss"])
        assert (row["best_step"], row["best_eval_loss"]) == (best["step"], pytest.approx(best["eval_loss"], rel=1e-6))
        assert row["student"] == str(folder / name / "student")
    assert choice["chosen"] == min(choice["trials"], key=lambda r: r["best_eval_loss"])["value"]
    assert json.loads((folder / "choice.json").read_text()) == choice


def test_a_posterior_field_gets_a_posterior_and_student_per_value_resumes_and_reuses(run, monkeypatch):
    """posterior.own_token over leave_out and count: a student in each trial, the stores the value asks for (the run's
    own for leave_out, its value: linked, not made again), the run's prepared and prior linked; the count trial
    killed in its distill resumes from its checkpoint and the leave_out trial is reused; a third value later trains
    that one trial only."""
    cfg = changed(run, choose__field="posterior.own_token", choose__candidates="leave_out,count")
    folder = pathlib.Path(cfg.run.dir) / "choose" / "posterior.own_token"
    real = stages.run_stage

    def killed_once(name, ctx, **kwargs):  # the count trial's student stopped after its step-3 checkpoint
        if name == "distill" and ctx.paths.root.name == "count" and not (ctx.paths.root / "student").exists():
            interrupted_distill(ctx.cfg, 5)
            raise Stop
        return real(name, ctx, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(stages, "run_stage", killed_once)
        with pytest.raises(Stop):
            run_stage("choose", cfg)
    first = _updated(folder / "leave_out" / "student")
    assert (folder / "count" / "student" / "checkpoints").exists() and not (folder / "choice.json").exists()
    choice = run_stage("choose", cfg)
    _check_choice(choice, folder, ["leave_out", "count"])
    assert _updated(folder / "leave_out" / "student") == first  # reused, not trained again
    for name, counted in (("leave_out", False), ("count", True)):
        trial = folder / name
        for link in ("prepared", "prior"):
            assert (trial / link).is_symlink() and (trial / link).resolve() == (pathlib.Path(cfg.run.dir) / link)
        # leave_out is the run's own value, whose posterior the run has: linked and reused, not made again
        assert (trial / "posterior").is_symlink() is (name == "leave_out")
        estimate = json.loads((trial / "posterior" / "estimate.json").read_text())
        assert estimate["count_own_token"] is counted
        assert read_record(trial / "posterior", False)["fields"]["posterior.own_token"] == name
    assert read_record(folder, False)["summary"] == {"chosen": choice["chosen"], "values": 2}

    before = {name: _updated(folder / name / "student") for name in ("leave_out", "count")}
    more = run_stage("choose", changed(cfg, choose__candidates="leave_out,count,0.5"))
    _check_choice(more, folder, ["leave_out", "count", "0.5"])
    assert more["trials"][:2] == choice["trials"]
    assert {name: _updated(folder / name / "student") for name in before} == before
    assert json.loads((folder / "0.5" / "posterior" / "estimate.json").read_text())["own_weight"] == 0.5
    rows = {row.artifact: row for row in status.stage_rows(changed(cfg, choose__candidates="leave_out,count,0.5"))}
    row = rows["choose/posterior.own_token/"]
    assert (row.state, row.next) == ("finished", "reuses")
    assert "; ".join(row.detail) == f"posterior.own_token={more['chosen']} chosen of 3 values"


def test_a_distill_field_shares_the_runs_posterior(run):
    """distill.loss.alpha over 0.3 and 1.0: no posterior of their own (the run's, linked), a student each; the
    run's own student, distilled with alpha 1.0 and the trials' scoring, is that trial's (linked, not trained)."""
    cfg = changed(run, choose__field="distill.loss.alpha", choose__candidates="0.3,1.0")
    own = changed(
        run, distill__loss__alpha=1.0, train__eval_every=3, distill__eval_split="align", distill__keep_best=True
    )
    run_stage("distill", own)
    folder = pathlib.Path(cfg.run.dir) / "choose" / "distill.loss.alpha"
    choice = run_stage("choose", cfg)
    assert (folder / "1.0" / "student").is_symlink() and not (folder / "0.3" / "student").is_symlink()
    _check_choice(choice, folder, ["0.3", "1.0"])
    assert [r["value"] for r in choice["trials"]] == [0.3, 1.0]  # the field's type
    for name, alpha in (("0.3", 0.3), ("1.0", 1.0)):
        trial = folder / name
        assert (trial / "posterior").is_symlink()
        assert (trial / "posterior").resolve() == pathlib.Path(cfg.run.dir) / "posterior"
        assert read_record(trial / "student", False)["fields"]["distill.loss.alpha"] == alpha


def test_an_align_field_aligns_a_proxy_in_each_trial(run):
    """align.sft_steps over 2 and 4 (no DPO round): each trial aligns its own proxy, makes its posterior from it and
    its student; only the prepared data and the prior are the run's."""
    cfg = changed(run, posterior__proxy="", align__rounds=0, choose__field="align.sft_steps", choose__candidates="2,4")
    folder = pathlib.Path(cfg.run.dir) / "choose" / "align.sft_steps"
    choice = run_stage("choose", cfg)
    _check_choice(choice, folder, ["2", "4"])
    for name, steps in (("2", 2), ("4", 4)):
        trial = folder / name
        assert sorted(p.name for p in trial.iterdir() if p.is_symlink()) == ["prepared", "prior"]
        assert read_record(trial / "proxy", False)["fields"]["align.sft_steps"] == steps
        assert (trial / "proxy" / "final" / "config.json").exists()
        # its posterior read its own aligned proxy
        assert read_record(trial / "posterior", False)["inputs"]["proxy"] == read_record(trial / "proxy", False)["hash"]


@pytest.mark.parametrize(
    "fields, expect",
    [
        (dict(choose__field="posterior.nope"), "config.choose.field='posterior.nope' is not a config field"),
        (dict(choose__field="posterior.proxy"), "config.choose.field='posterior.proxy' cannot be chosen"),
        (dict(choose__field="run.seed"), "config.choose.field='run.seed' cannot be chosen"),
        (dict(choose__field="distill.eval_split"), "config.choose.field='distill.eval_split' cannot be chosen"),
        (dict(choose__field="data.seq_len"), "changes the prepared data, which every trial shares"),
        (dict(choose__field="posterior.chunk_tokens"), "changes no result of prior, align, posterior or distill"),
        (dict(choose__field="align.rounds"), "makes each trial align its own proxy, but posterior.proxy names"),
        (dict(choose__field="align.lora.targets"), "holds a tuple; choose tries settings that take one"),
        (dict(choose__candidates="count"), "must name at least two different values of posterior.own_token"),
        (dict(choose__candidates="count, count"), "must name at least two different values"),
        (dict(choose__candidates="leave_out,bogus"), "with posterior.own_token=bogus: config.posterior.own_token="),
        (dict(choose__field="distill.loss.alpha", choose__candidates="0.5,abc"), "'abc' is not a value of"),
        (dict(choose__field="distill.loss.alpha", choose__candidates="0.5,-1"), "distill.loss.alpha=-1"),
        (dict(choose__field="posterior.use_weights", choose__candidates="true,maybe"), "takes true or false"),
        (dict(choose__candidates="leave_out,../up"), "names the trial's folder"),
        (dict(choose__eval_every=7), "config.choose.eval_every=7 must be between 1 and train.steps=6"),
        (dict(choose__eval_every=0), "config.choose.eval_every=0"),
        (dict(choose__eval_split="distill"), "is the split the students train on (distill.split)"),
        (dict(choose__eval_split="valid"), "config.choose.eval_split='valid' must be one of warmup, align, distill"),
    ],
)
def test_bad_choices_are_refused_before_any_work(run, fields, expect):
    cfg = changed(run, **fields)
    with pytest.raises(ConfigError, match=None) as e:
        config_lib.validate(cfg, "choose")
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_missing_inputs_are_named_before_any_work(run, tmp_path):
    """Before any work: without prepared data, `prepare` is named; without the run's posterior a distill field names
    the posterior stage; without an aligned proxy a posterior field names align; a split the prepared data does not
    have names choose.eval_split (the stage called as a library, without the config's checks). Nothing is
    written."""
    with pytest.raises(ProxyKDError, match=r"the prepared data is missing; run `proxykd prepare` first"):
        preflight(changed(run, run__dir=str(tmp_path / "none")), "choose")
    bare = tmp_path / "bare"  # the run's prepared data and prior, nothing else
    bare.mkdir()
    for name in ("prepared", "prior"):
        (bare / name).symlink_to(pathlib.Path(run.run.dir) / name)
    bare_cfg = changed(run, run__dir=str(bare), posterior__proxy="")
    with pytest.raises(ProxyKDError, match=r"the posterior store is missing; run `proxykd posterior` first"):
        preflight(changed(bare_cfg, choose__field="distill.loss.alpha", choose__candidates="0.5,1.0"), "choose")
    with pytest.raises(ProxyKDError, match=r"the aligned proxy is missing; run `proxykd align` first"):
        preflight(bare_cfg, "choose")
    with pytest.raises(ProxyKDError, match=r"config.choose.eval_split='nosuch' is not a split of .*; choose one of"):
        run_stage(
            "choose",
            changed(run, choose__field="posterior.n_max", choose__candidates="4,8", choose__eval_split="nosuch"),
        )
    assert sorted(p.name for p in bare.iterdir()) == ["prepared", "prior"] and not (tmp_path / "none").exists()
    assert not (pathlib.Path(run.run.dir) / "choose" / "posterior.n_max").exists()


def test_the_batch_sizes_of_the_stages_its_trials_run_must_split_over_the_mesh(run):
    """On 8 devices (fsdp 8) a batch of 7 rows does not split: refused for the stages the field's trials run
    (train.batch_size for any field, posterior.batch_size for a posterior field), not for a stage they skip."""
    mesh = dict(mesh__shape__data=1, mesh__shape__fsdp=8, mesh__shape__tensor=1)
    cfg = changed(run, train__batch_size=7, **mesh)
    with pytest.raises(ConfigError, match=r"train\.batch_size=7"):
        config_lib.validate(cfg, "choose", num_devices=8)
    posterior = changed(run, posterior__batch_size=7, **mesh)
    with pytest.raises(ConfigError, match=r"posterior\.batch_size=7"):
        config_lib.validate(posterior, "choose", num_devices=8)
    alpha = changed(posterior, choose__field="distill.loss.alpha", choose__candidates="0.5,1.0")
    config_lib.validate(alpha, "choose", num_devices=8)  # (its trials run no posterior)
