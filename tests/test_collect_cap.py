"""`collect.max_cost`: no request is sent that could take the corpus's cost past the cap, the run stops there
with one sentence, counts the answers of earlier runs when it resumes, and continues once the cap is raised
(the cap is no setting of the corpus: raising it never refuses the stage)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import io
import json
import pathlib
import random

import pytest
from stage_helpers import run_stage

from proxykd_jax import config as config_lib
from proxykd_jax.teacher import client as client_mod
from proxykd_jax.teacher import collector as collector_mod
from proxykd_jax.teacher import journal
from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.client import CollectError
from proxykd_jax.teacher.config import collect_config
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.prompts import read_prompts
from proxykd_jax.teacher.server import make_app

PRICE_IN, PRICE_OUT = 1e6, 3e6  # per million tokens: 1 and 3 currency units per token


def _prompts(path: pathlib.Path, n: int, rng: random.Random) -> pathlib.Path:
    rows = [{"id": f"q{i}", "prompt": f"question {i}: " + " ".join(["word"] * rng.randint(1, 12))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, base_url: str, prompts: pathlib.Path, **collect):
    cfg = config_lib.base_config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.collect.update(prompts=str(prompts), base_url=base_url, model="toy", max_tokens=8, progress=False)
    cfg.collect.update(price_input_per_mtok=PRICE_IN, price_output_per_mtok=PRICE_OUT, concurrency=4)
    cfg.collect.update(collect)
    return cfg


def _corpus_cost(tmp_path) -> float:
    lines = (tmp_path / "run" / "corpus" / "teacher.jsonl").read_text().splitlines()
    usage = [json.loads(line)["meta"]["usage"] for line in lines]
    return sum(u["prompt_tokens"] * PRICE_IN + u["completion_tokens"] * PRICE_OUT for u in usage) / 1e6


def _left(tmp_path, prompts: pathlib.Path) -> list[str]:
    """The prompts of `prompts` that the corpus holds no answer for."""
    stored = {
        json.loads(line)["id"] for line in (tmp_path / "run" / "corpus" / "teacher.jsonl").read_text().splitlines()
    }
    return [row["prompt"] for row in map(json.loads, prompts.read_text().splitlines()) if row["id"] not in stored]


def _worst(tmp_path, prompts: pathlib.Path, prompt: str) -> float:
    """The most a request for `prompt` may cost with the corpus as it is (`Collector._reserve`'s reckoning): its
    bytes, the endpoint's own tokens (the fewest prompt tokens an answer was billed, at least 64), max_tokens=8."""
    lines = (tmp_path / "run" / "corpus" / "teacher.jsonl").read_text().splitlines()
    own = max(64, min(json.loads(line)["meta"]["usage"]["prompt_tokens"] for line in lines))
    return ((len(prompt.encode()) + own) * PRICE_IN + 8 * PRICE_OUT) / 1e6


def test_the_cap_stops_the_run_before_it_is_passed_and_a_raised_cap_continues(tmp_path):
    rng = random.Random()
    n = rng.randint(12, 20)
    prompts = _prompts(tmp_path / "prompts.jsonl", n, rng)
    app = make_app(ToyBackend())
    with ServerThread(app) as server:
        uncapped = _cfg(tmp_path / "all", server.base_url, prompts)
        assert run_stage("collect", uncapped)["done"] == n
        full = _corpus_cost(tmp_path / "all")
        cap = round(full * rng.uniform(0.3, 0.6), 3)
        cfg = _cfg(tmp_path, server.base_url, prompts, max_cost=cap)
        with pytest.raises(CollectError, match=rf"collect.max_cost={cap:g} is reached: .*raise collect.max_cost"):
            run_stage("collect", cfg)
        first = _corpus_cost(tmp_path)
        done = len((tmp_path / "run" / "corpus" / "teacher.jsonl").read_text().splitlines())
        assert 0 < done < n and first <= cap, (done, first, cap)
        requests = len(app.state.requests)
        # the stop means nothing more fits: the cheapest request left may cost more than the room under the cap
        assert first + min(_worst(tmp_path, prompts, left) for left in _left(tmp_path, prompts)) > cap
        # the same command again: the earlier answers count, so nothing more is sent
        with pytest.raises(CollectError, match=rf"answers cost {first:.6g} \({first:.6g} of it before this run\)"):
            run_stage("collect", cfg)
        assert len(app.state.requests) == requests
        # a raised cap continues (not refused as a changed setting) and finishes every sample, each paid once
        cfg.collect.max_cost = full * 2
        stats = run_stage("collect", cfg)
    assert stats["already_done"] == done and stats["done"] == n - done
    assert stats["corpus_cost"] == pytest.approx(_corpus_cost(tmp_path)) and _corpus_cost(tmp_path) <= full * 2
    paid = collections.Counter(e["key"] for e in app.state.requests if e["outcome"] == "ok")
    assert max(paid.values()) == 2 and len(paid) == n  # each sample once here and once in the uncapped run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_request_over_the_cap_does_not_stop_the_run_while_a_shorter_one_fits(tmp_path, seed):
    """One at a time: after the first answer a long prompt no longer fits under the cap but a short one after it
    does; the run sends the short one, then stops naming what the long one may cost, and the same command again
    (concurrent) sends nothing. The cap is the first two requests' reservations, so it holds whatever they cost."""
    rng = random.Random(seed)
    first, long, short = (rng.randint(*span) for span in ((47, 90), (250, 400), (1, 20)))
    rows = [{"id": f"q{i}", "prompt": "w" * size} for i, size in enumerate((first, long, short))]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    own = first + len("user: \nassistant:")  # the fewest prompt tokens billed once the first answer came: over 64
    worst = lambda size, own: ((size + own) * PRICE_IN + 8 * PRICE_OUT) / 1e6  # noqa: E731
    cap = worst(first, 64) + worst(short, own)
    app = make_app(ToyBackend())
    with ServerThread(app) as server:
        cfg = _cfg(tmp_path, server.base_url, prompts, max_cost=cap, concurrency=1)
        left = rf"may cost up to {worst(long, 64):.6g} more \(the cheapest of the 1 left\)"  # the short one's own: 64
        with pytest.raises(CollectError, match=left + "; raise collect.max_cost"):
            run_stage("collect", cfg)
        assert _left(tmp_path, prompts) == [rows[1]["prompt"]]
        assert _corpus_cost(tmp_path) + worst(long, 64) > cap >= _corpus_cost(tmp_path)
        cfg.collect.concurrency = 4
        with pytest.raises(CollectError, match=left):
            run_stage("collect", cfg)
    assert len(app.state.requests) == 2


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(max_cost=5.0, price_input_per_mtok=0.0, price_output_per_mtok=0.0),
            "collect.max_cost is 5.0 but no price",
        ),
        (dict(max_cost=-1.0), "collect.max_cost is -1.0; it must be a number >= 0"),
        (dict(price_output_per_mtok=float("nan")), "collect.price_output_per_mtok is nan; it must be a number >= 0"),
    ],
)
def test_a_cap_without_prices_or_below_zero_is_one_sentence_before_any_request(tmp_path, fields, message):
    prompts = _prompts(tmp_path / "prompts.jsonl", 2, random.Random())
    app = make_app(ToyBackend())
    with ServerThread(app) as server:
        with pytest.raises(CollectError, match=message):
            run_stage("collect", _cfg(tmp_path, server.base_url, prompts, **fields))
    assert not app.state.requests and not (tmp_path / "run" / "corpus" / "teacher.jsonl").exists()


def test_an_endpoint_without_usage_counts_stops_a_capped_run_and_a_corpus_without_them_is_refused(
    tmp_path, monkeypatch
):
    """Without usage counts the cap could not be kept: the run stops at the first such answer (it is stored:
    paid for), and a capped run on a corpus holding such answers is refused before any request."""
    parse = collector_mod.parse_answer
    monkeypatch.setattr(collector_mod, "parse_answer", lambda *a, **kw: dataclasses.replace(parse(*a, **kw), usage={}))
    prompts = _prompts(tmp_path / "prompts.jsonl", 12, random.Random())
    app = make_app(ToyBackend())
    with ServerThread(app) as server:
        cfg = _cfg(tmp_path, server.base_url, prompts, max_cost=1e9, concurrency=2)
        with pytest.raises(CollectError, match=r"sent an answer without usage counts, so collect.max_cost cannot be"):
            run_stage("collect", cfg)
        stored = len((tmp_path / "run" / "corpus" / "teacher.jsonl").read_text().splitlines())
        assert 1 <= stored <= 2 and len(app.state.requests) == stored
        monkeypatch.setattr(collector_mod, "parse_answer", parse)  # an endpoint that sends usage from now on
        with pytest.raises(CollectError, match=rf"but {stored} answers in .* carry no usage counts"):
            run_stage("collect", cfg)
        assert len(app.state.requests) == stored
        cfg.collect.max_cost = 0.0  # uncapped, the same corpus finishes
        assert run_stage("collect", cfg)["done"] == 12 - stored


# -- answers billed but not stored (declined, or lost to a disk error) count in later runs' spend ---------------


def _collect_cfg(tmp_path, base_url: str, prompts: pathlib.Path, **fields):
    cfg = collect_config()
    cfg.update(prompts=str(prompts), out=str(tmp_path / "corpus.jsonl"), base_url=base_url, model="toy", max_tokens=8)
    cfg.update(progress=False, price_input_per_mtok=PRICE_IN, price_output_per_mtok=PRICE_OUT, concurrency=1)
    cfg.update(fields)
    return cfg


def _quiet(cfg) -> tuple[dict, str]:
    """`collect(cfg)`'s stats and its error's sentence ("" when it finished)."""
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return client_mod.collect(cfg), ""
        except CollectError as err:
            return err.stats, str(err)


def _next_run(cfg) -> collector_mod.Collector:
    """The `Collector` the same command would run next (what it counts before its first request)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return collector_mod.Collector(cfg, read_prompts(cfg.prompts, cfg.api), "no-key")


def _cost(usage: dict) -> float:
    return (usage["prompt_tokens"] * PRICE_IN + usage["completion_tokens"] * PRICE_OUT) / 1e6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_declined_answers_count_against_the_cap_in_every_later_run(tmp_path, monkeypatch, seed):
    """Answers without usable text are billed but not stored: their usage goes into the failures file and counts
    in each later run's spend, so the same capped command run twice bills no more than the cap in all."""
    rng = random.Random(seed)
    decide, parse = random.Random(rng.random()), collector_mod.parse_answer
    declining = lambda *a, **kw: (lambda ans: dataclasses.replace(ans, text="") if decide.random() < 0.5 else ans)(  # noqa: E731
        parse(*a, **kw)
    )
    monkeypatch.setattr(collector_mod, "parse_answer", declining)
    n = rng.randint(14, 20)
    prompts = _prompts(tmp_path / "prompts.jsonl", n, rng)
    with ServerThread(make_app(ToyBackend())) as server:
        cfg = _collect_cfg(tmp_path, server.base_url, prompts, max_cost=round(n * 80 * rng.uniform(0.4, 0.6), 3))
        first, said = _quiet(cfg)
        assert "collect.max_cost" in said and "is reached" in said and sum(first["declined"].values()) > 0, said
        assert _next_run(cfg).spend.before == pytest.approx(first["cost"])  # every answer of run 1, stored or not
        second, _ = _quiet(cfg)
    assert second["corpus_cost"] - second["cost"] == pytest.approx(first["cost"])
    assert first["cost"] + second["cost"] <= cfg.max_cost
    stored = [json.loads(line)["meta"]["usage"] for line in pathlib.Path(cfg.out).read_text().splitlines()]
    failed = [json.loads(line) for line in pathlib.Path(cfg.out + ".failures.jsonl").read_text().splitlines()]
    assert all(row["final"] and row["max_tokens"] == 8 for row in failed)
    billed = stored + [row["usage"] for row in failed]
    assert sum(u["prompt_tokens"] for u in billed) == first["tokens_in"] + second["tokens_in"]
    assert sum(u["completion_tokens"] for u in billed) == first["tokens_out"] + second["tokens_out"]


@pytest.mark.parametrize("seed", [0, 1])
def test_failure_rows_with_usage_bound_the_next_run_and_rows_without_usage_count_nothing(tmp_path, seed):
    """A new run counts the usage of the failures file's billed rows (declined, or not stored) in what the corpus
    cost and in the fewest prompt tokens an answer was billed; old rows and failures without an answer count
    nothing; a billed row past its limit, or one whose endpoint sent no usage, refuses a capped run as a corpus
    record does."""
    rng = random.Random(seed)
    prompts = _prompts(tmp_path / "prompts.jsonl", 3, rng)
    cfg = _collect_cfg(tmp_path, "http://127.0.0.1:9/v1", prompts, max_cost=1e9)
    usage = lambda low: {"prompt_tokens": rng.randint(low, low + 50), "completion_tokens": rng.randint(1, 8)}  # noqa: E731
    corpus = [{"key": f"c{i}", "meta": {"max_tokens": 8, "usage": usage(120)}} for i in range(rng.randint(2, 6))]
    billed = [
        {"key": f"d{i}", "reason": "no_content", "final": i % 2 == 0, "usage": usage(65), "max_tokens": 8}
        for i in range(rng.randint(2, 6))
    ]
    unbilled = [{"key": "old", "reason": "content_filter", "final": True}, {"key": "x", "reason": "http_400"}]
    pathlib.Path(cfg.out).write_text("".join(json.dumps(row) + "\n" for row in corpus))
    fails = pathlib.Path(cfg.out + ".failures.jsonl")
    write = lambda rows: fails.write_text("".join(json.dumps(row) + "\n" for row in rows))  # noqa: E731
    write(billed + unbilled)
    collector = _next_run(cfg)
    every = [row["meta"]["usage"] for row in corpus] + [row["usage"] for row in billed]
    assert collector.spend.before == pytest.approx(sum(map(_cost, every)))
    assert collector.spend.fewest_prompt_tokens == min(row["usage"]["prompt_tokens"] for row in billed)  # under 120
    write(
        billed
        + unbilled
        + [{"key": "r", "final": True, "usage": {"prompt_tokens": 9, "completion_tokens": 9}, "max_tokens": 8}]
    )
    with pytest.raises(CollectError, match=r"collect.max_cost is set but 1 answers in .* more completion tokens"):
        _next_run(cfg)
    write(billed + unbilled + [{"key": "u", "final": True, "usage": {}, "max_tokens": 8}])
    with pytest.raises(CollectError, match=r"collect.max_cost is set but 1 answers in .* carry no usage counts"):
        _next_run(cfg)


@pytest.mark.parametrize("failures_too", [False, True])
def test_an_answer_lost_to_a_disk_error_counts_later_or_the_stop_says_it_was_billed(
    tmp_path, monkeypatch, failures_too
):
    """An answer the corpus could not take (a full disk) is kept with its usage in the failures file, counted by
    the next run and asked again there; where that file cannot be written either, the stop sentence says what was
    billed this run and stored nowhere."""
    rng = random.Random(7 + failures_too)
    n, ok = rng.randint(6, 10), rng.randint(1, 4)
    prompts = _prompts(tmp_path / "prompts.jsonl", n, rng)
    append, written = journal.DurableAppender.append, collections.Counter()

    async def full_disk(self, record):
        corpus = not self.path.name.endswith(".failures.jsonl")
        written[corpus] += 1
        if (corpus and written[corpus] > ok) or (not corpus and failures_too):
            raise OSError(errno.ENOSPC, "No space left on device")
        await append(self, record)

    monkeypatch.setattr(journal.DurableAppender, "append", full_disk)
    with ServerThread(make_app(ToyBackend())) as server:
        cfg = _collect_cfg(tmp_path, server.base_url, prompts, max_cost=1e9)
        first, said = _quiet(cfg)
    monkeypatch.setattr(journal.DurableAppender, "append", append)
    assert first["lost"] == 1 and first["done"] == ok and "No space left on device" in said
    stored = sum(_cost(json.loads(line)["meta"]["usage"]) for line in pathlib.Path(cfg.out).read_text().splitlines())
    lost = first["cost"] - stored
    collector = _next_run(cfg)
    assert len(collector.todo) == n - ok  # the lost answer is asked again
    if failures_too:
        assert f"1 answers billed this run (cost {lost:.6g}) are stored nowhere" in said, said
        assert collector.spend.before == pytest.approx(stored)
    else:
        assert "stored nowhere" not in said
        assert collector.spend.before == pytest.approx(first["cost"])
