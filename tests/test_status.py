"""`proxykd status` on a real tiny run: each state where it belongs (finished, finished with other settings,
unfinished with its progress, not started), the lock's holder named without blocking, and nothing written."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from pipeline_fixtures import build_run
from stage_helpers import changed, interrupted_distill, run_stage

from proxykd_jax import cli, context, status
from proxykd_jax.bayes import pass1_log
from proxykd_jax.context.artifacts import open_artifact
from proxykd_jax.errors import ProxyKDError

REPO = pathlib.Path(__file__).resolve().parent.parent


def _sft(cfg):
    return changed(cfg, distill__loss__alpha=0.0)


class Stop(Exception):
    """The interruption the fixture injects (as a kill would leave the artifact, the lock released)."""


def _interrupted_posterior(cfg) -> None:
    """The posterior stage stopped in pass 1, after its second chunk (the proxy: the tiny run's proxy init)."""
    save, calls = pass1_log.Pass1Log.save, [0]

    def stopping_save(self, part):
        calls[0] += 1
        if calls[0] == 3:
            raise Stop
        return save(self, part)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Stop):
        mp.setattr(pass1_log.Pass1Log, "save", stopping_save)
        run_stage("posterior", cfg)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny run's config: prepared, prior and posterior finished (the proxy: the tiny run's proxy init),
    the SFT student stopped after its step-3 checkpoint; align, the Proxy-KD student, eval, export not started."""
    root = tmp_path_factory.mktemp("status")
    cfg, _ = build_run(root / "run")
    cfg = changed(cfg, posterior__proxy=str(root / "run" / "proxy_init"))
    for stage in ("prior", "posterior"):
        run_stage(stage, cfg)
    interrupted_distill(_sft(cfg), 5)  # stopped at its 5th step, after the step-3 checkpoint
    return cfg


def _rows(cfg) -> dict[str, status.Row]:
    return {row.artifact: row for row in status.stage_rows(cfg)}


def _detail(row: status.Row) -> str:
    return "; ".join(row.detail)


def test_each_stage_in_its_state(run):
    rows = _rows(run)
    assert [r.stage for r in rows.values()] == [
        "collect", "prepare", "prior", "align", "posterior", "distill", "distill", "eval", "export"
    ]  # fmt: skip
    samples = json.loads((pathlib.Path(run.run.dir) / "prepared" / "manifest.json").read_text())["counts"]["samples"]
    prepared = rows["prepared/"]
    assert (prepared.state, prepared.next, _detail(prepared)) == ("finished", "reuses", f"{samples} samples")
    assert (rows["prior/"].state, rows["prior/"].next) == ("finished", "reuses")
    post = rows["posterior/"]  # the tiny run's 49 distill samples
    assert (post.state, post.next) == ("finished", "reuses") and _detail(post).startswith("49 samples, kappa ")
    assert rows["corpus/teacher.jsonl"].state == "not used"  # data.corpus names the corpus
    assert (rows["proxy/"].state, rows["proxy/"].next) == ("not started", "starts")
    sft = rows["student_sft/"]
    assert (sft.state, sft.next, _detail(sft)) == ("unfinished", "resumes", "step 3 of 6 (last checkpoint)")
    assert (rows["student/"].state, rows["student/"].next) == ("not started", "starts")
    assert (rows["eval/"].state, rows["eval/"].next) == ("not started", "refuses")
    assert _detail(rows["eval/"]) == "waits on student_sft/ (unfinished)"
    assert rows["export/"].next == "refuses" and "run `proxykd distill` first" in _detail(rows["export/"])
    assert sft.size.endswith("KiB") and rows["proxy/"].size == "-"


def test_an_interrupted_posterior_shows_its_pass_1_and_stops_its_dependants(run, tmp_path):
    """The posterior stopped in pass 1 after its second chunk, in a run of its own (the prepared records and
    prior copied): 49 distill samples in batches of 8 are 7 batches, a chunk each."""
    cfg = changed(run, run__dir=str(tmp_path / "run"))
    for name in ("prepared", "prior"):
        shutil.copytree(pathlib.Path(run.run.dir) / name, tmp_path / "run" / name)
    _interrupted_posterior(cfg)
    rows = _rows(cfg)
    post = rows["posterior/"]
    assert (post.state, post.next, _detail(post)) == ("unfinished", "resumes", "pass 1: 2 of ~7 chunks")
    assert (rows["student/"].next, _detail(rows["student/"])) == ("refuses", "waits on posterior/ (unfinished)")


def test_a_changed_field_is_named_as_the_refusal_names_it(run):
    other = changed(run, prior__ngram_order=3)
    rows = _rows(other)
    prior = rows["prior/"]
    assert (prior.state, prior.next) == ("finished, other settings", "refuses")
    assert "changed: prior.ngram_order 4 -> 3" in _detail(prior)
    with pytest.raises(ProxyKDError, match="prior.ngram_order 4 -> 3"):  # the stage's own refusal, same words
        open_artifact("prior", other, context.RunPaths.from_config(other), overwrite=False)
    assert "upstream prior/ has other settings" in _detail(rows["posterior/"])
    assert rows["posterior/"].state == "finished"  # its record still matches the prior/ on disk
    assert _rows(changed(other, run__overwrite=True))["prior/"].next == "replaces"
    sft = _rows(_sft(changed(run, train__steps=8)))["student_sft/"]
    assert (sft.state, sft.next) == ("unfinished, other settings", "refuses")
    assert "step 3 of 8" in _detail(sft) and "train.steps 6 -> 8" in _detail(sft)


def _snapshot(root: pathlib.Path) -> dict:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def test_the_cli_entry_prints_the_table_and_writes_nothing(run, tmp_path, capsys):
    pickled = tmp_path / "cfg.pkl"
    pickled.write_bytes(pickle.dumps(run))
    root = pathlib.Path(run.run.dir).parent  # the run and its inputs outside it (corpus, proxy init, teacher)
    before = _snapshot(root)
    argv = [f"--config={REPO / 'tests' / 'pickled_config.py'}:{pickled}", "--config.prior.ngram_order=3"]
    with pytest.raises(SystemExit) as done:  # `proxykd status ...` as the shell runs it
        cli.main(["status", *argv])
    assert done.value.code == 0 and "status" in cli.USAGE
    out = capsys.readouterr().out
    assert out.startswith(f"run directory {run.run.dir}; lock: free")
    assert "prior.ngram_order 4 -> 3" in out and "step 3 of 6" in out
    assert _snapshot(root) == before
    assert status.main([argv[0], "--config.prior.ngram_ordr=3"], cli.load_config) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean --config.prior.ngram_order?" in err[0]


HOLD = """
import sys
from proxykd_jax.context.lock import RunLock
lock = RunLock(sys.argv[1], "distill")
lock.acquire()
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin
lock.release()
"""


def test_a_held_lock_is_named_without_blocking(run):
    lock = pathlib.Path(run.run.dir) / "proxykd.lock"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        holder = json.loads(lock.read_text())
        text = status.run(run)  # returns: it takes no lock
        assert f"lock: held by `distill`, pid {proc.pid} on this host since {holder['since']}" in text
        assert re.search(r"^distill +student_sft/ +unfinished +running now ", text, re.M), text
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    assert not lock.exists()
    lock.write_text(json.dumps(holder))  # as `kill -9` leaves it: its process is gone
    try:
        assert f"lock: stale: `distill`, pid {proc.pid} (since {holder['since']}) is gone" in status.run(run)
    finally:
        lock.unlink()


def test_progress_of_align_and_eval_from_their_folders(run, tmp_path):
    """align's phases (DONE markers, checkpoint step folders; an orbax temporary one does not count) and eval's
    scored models, laid out by the writers' own calls in a run of their own."""
    from proxykd_jax.align import phases

    cfg = changed(run, run__dir=str(tmp_path / "run"))
    paths = context.RunPaths.from_config(cfg)
    for name in ("eval", "align"):  # (eval first: an unfinished proxy/ stops it)
        open_artifact(name, cfg, paths, overwrite=False).begin()
    (paths.proxy / "sft").mkdir()
    phases.mark_done(paths.proxy / "sft", {"phase": "sft"})
    for step in ("2", "4.orbax-checkpoint-tmp-1712"):
        (paths.proxy / "round_000" / "checkpoints" / step).mkdir(parents=True)
    (paths.eval / "scored").mkdir()
    (paths.eval / "scored" / "proxy_before_align.json").write_text("{}")
    rows = _rows(cfg)
    assert (rows["proxy/"].state, rows["proxy/"].next) == ("unfinished", "resumes")
    assert _detail(rows["proxy/"]) == "1 of 2 phases done; round_000 at step 2 of ?"
    assert (rows["eval/"].state, rows["eval/"].next) == ("unfinished, other settings", "refuses")
    assert _detail(rows["eval/"]) == (  # begun before proxy/ was: the proxy is new to it
        "waits on proxy/ (unfinished); scored: proxy_before_align; changed: its input proxy/ is new"
    )


def test_collect_progress_counts_the_samples_asked_for(run, tmp_path):
    """A real collect that ended with failed samples (a teacher answering 500 to some): unfinished, with the
    samples in its corpus of those asked for; more samples per prompt asked is other settings."""
    from proxykd_jax.teacher.backends import ToyBackend
    from proxykd_jax.teacher.listen import ServerThread
    from proxykd_jax.teacher.server import make_app
    from proxykd_jax.teacher.wire import Faults

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"hello {i}"}) + "\n" for i in range(5)))
    with ServerThread(make_app(ToyBackend(), Faults(fail_500_rate=0.5, seed=1))) as server:
        cfg = changed(
            run,
            run__dir=str(tmp_path / "run"),
            data__corpus="",
            collect__prompts=str(prompts),
            collect__base_url=server.base_url,
            collect__model="toy",
            collect__api="completions",
            collect__samples_per_prompt=2,
            collect__max_tokens=8,
            collect__max_attempts=1,
            collect__progress=False,
        )
        with pytest.raises(ProxyKDError, match="failures"):
            run_stage("collect", cfg)
    corpus = tmp_path / "run" / "corpus" / "teacher.jsonl"
    stored = len(corpus.read_text().splitlines())
    assert 0 < stored < 10
    row = _rows(cfg)["corpus/teacher.jsonl"]
    assert (row.state, row.next, _detail(row)) == ("unfinished", "resumes", f"{stored} of 10 samples")
    more = _rows(changed(cfg, collect__samples_per_prompt=3))["corpus/teacher.jsonl"]
    assert more.state == "unfinished, other settings"
    assert _detail(more) == f"{stored} of 15 samples; changed: collect.samples_per_prompt 2 -> 3"


def test_running_now_is_only_the_student_the_lock_holder_writes(tmp_path):
    """A distill writing student_c/ holds the lock: student_c/ is running now, while student_b/ (stopped
    earlier, unfinished too) is what the next run with its config resumes; the header names the folder."""
    from pipeline_fixtures import tiny_config

    cfgs = {name: changed(tiny_config(tmp_path / "run"), distill__output=name) for name in ("student_b", "student_c")}
    for cfg in cfgs.values():
        open_artifact("distill", cfg, context.RunPaths.from_config(cfg), overwrite=False).begin()
    with context.create(cfgs["student_c"], "distill", on_mesh=False):
        text = status.run(cfgs["student_b"])
        assert re.search(r"^distill +student_b/ +unfinished +resumes ", text, re.M), text
        assert "lock: held by `distill` writing student_c/, pid " in text
        assert re.search(r"^distill +student_c/ +unfinished +running now ", status.run(cfgs["student_c"]), re.M)


def test_a_run_dir_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    """run.dir naming a file, or a folder under one: status and the stages say so in one line (exit 2)
    instead of reporting a run directory that does not exist yet, or failing on mkdir."""
    from pipeline_fixtures import tiny_config

    (tmp_path / "afile").write_text("not a folder")
    for run_dir in (tmp_path / "afile", tmp_path / "afile" / "run"):
        pickled = tmp_path / "cfg.pkl"
        pickled.write_bytes(pickle.dumps(tiny_config(run_dir)))
        argv = [f"--config={REPO / 'tests' / 'pickled_config.py'}:{pickled}"]
        assert status.main(argv, cli.load_config) == 2
        with pytest.raises(SystemExit) as done:
            cli.main(["prior", *argv])
        assert done.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        want = f"{tmp_path / 'afile'} is a file, not a folder"
        assert len(err) == 2 and all(want in line for line in err), err


def test_a_finished_align_names_its_last_phase_held_out_nll(tmp_path):
    """artifact.json sorts the summary's keys ("round_000" < "round_001" < "sft"): the detail named the SFT
    warm-up's NLL as the last one."""
    nll = {"init": 3.5, "sft": 3.1, "round_000": 3.0, "round_001": 2.9}
    rec = {"summary": {k: {"heldout_nll": v} for k, v in sorted(nll.items())}}
    assert status.summary("align", rec, None, tmp_path) == "3 phases, held-out NLL 3.500 -> 2.900"
    rec = {"summary": {k: {"heldout_nll": nll[k]} for k in ("init", "sft")}}  # align.rounds=0
    assert status.summary("align", rec, None, tmp_path) == "1 phase, held-out NLL 3.500 -> 3.100"


def test_collect_says_it_refuses_what_the_stage_refuses(tmp_path):
    """collect.prompts empty, or collect.model: `proxykd collect` refuses before it writes anything, and status
    says so with the same sentence (it said `starts`); a prompts file and a model name: it starts."""
    from pipeline_fixtures import tiny_config

    cfg = changed(tiny_config(tmp_path / "run"), data__corpus="", collect__model="teacher-model")
    prompts = tmp_path / "prompts.jsonl"
    words = np.random.default_rng().choice(1000, 6, replace=False)  # (a repeated prompt is refused)
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in words))
    for fields in ({}, {"collect__model": ""}):
        refusing = changed(cfg, **fields)
        row = _rows(refusing)["corpus/teacher.jsonl"]
        with pytest.raises(ProxyKDError) as refused:
            run_stage("collect", refusing)
        assert (row.state, row.next, _detail(row)) == ("not started", "refuses", str(refused.value))
    row = _rows(changed(cfg, collect__prompts=str(prompts)))["corpus/teacher.jsonl"]
    assert (row.state, row.next, _detail(row)) == ("not started", "starts", "")
