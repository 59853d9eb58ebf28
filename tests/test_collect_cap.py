"""`collect.max_cost`: no request is sent that could take the corpus's cost past the cap, the run stops there
with one sentence, counts the answers of earlier runs when it resumes, and continues once the cap is raised
(the cap is no setting of the corpus: raising it never refuses the stage)."""

from __future__ import annotations

import collections
import json
import pathlib
import random

import pytest
from stage_helpers import run_stage

from proxykd_jax import config as config_lib
from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.client import CollectError
from proxykd_jax.teacher.listen import ServerThread
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
    import dataclasses

    from proxykd_jax.teacher import client as client_mod

    parse = client_mod.parse_answer
    monkeypatch.setattr(client_mod, "parse_answer", lambda *a, **kw: dataclasses.replace(parse(*a, **kw), usage={}))
    prompts = _prompts(tmp_path / "prompts.jsonl", 12, random.Random())
    app = make_app(ToyBackend())
    with ServerThread(app) as server:
        cfg = _cfg(tmp_path, server.base_url, prompts, max_cost=1e9, concurrency=2)
        with pytest.raises(CollectError, match=r"sent an answer without usage counts, so collect.max_cost cannot be"):
            run_stage("collect", cfg)
        stored = len((tmp_path / "run" / "corpus" / "teacher.jsonl").read_text().splitlines())
        assert 1 <= stored <= 2 and len(app.state.requests) == stored
        monkeypatch.setattr(client_mod, "parse_answer", parse)  # an endpoint that sends usage from now on
        with pytest.raises(CollectError, match=rf"but {stored} answers in .* carry no usage counts"):
            run_stage("collect", cfg)
        assert len(app.state.requests) == stored
        cfg.collect.max_cost = 0.0  # uncapped, the same corpus finishes
        assert run_stage("collect", cfg)["done"] == 12 - stored
