"""`collect` under the one overwrite rule never pays twice: a redo with more samples per prompt or a
grown prompts file (its content is part of the corpus's identity) requests only the new samples,
and a bad config leaves nothing behind that would make the corrected command refused."""

from __future__ import annotations

import collections
import json
import pathlib

import openai
import pytest
from stage_helpers import run_stage

from proxykd_jax import config as config_lib
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.server import make_app


def _prompts(path: pathlib.Path, n: int) -> pathlib.Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"hello {i}"}) + "\n" for i in range(n)))
    return path


def _cfg(tmp_path, base_url: str, prompts: pathlib.Path, **collect):
    cfg = config_lib.base_config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.collect.update(prompts=str(prompts), base_url=base_url, model="toy", max_tokens=8, progress=False)
    cfg.collect.update(collect)
    return cfg


def _corpus(tmp_path) -> list[dict]:
    lines = (tmp_path / "run" / "corpus" / "teacher.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _paid(app) -> collections.Counter:
    return collections.Counter(e["key"] for e in app.state.requests)


def test_more_samples_per_prompt_requests_only_the_new_samples(tmp_path):
    prompts = _prompts(tmp_path / "prompts.jsonl", 4)
    app = make_app(ToyBackend())
    with ServerThread(app) as server:
        cfg = _cfg(tmp_path, server.base_url, prompts, samples_per_prompt=1)
        assert run_stage("collect", cfg)["done"] == 4
        more = _cfg(tmp_path, server.base_url, prompts, samples_per_prompt=2)
        with pytest.raises(ProxyKDError, match=r"collect.samples_per_prompt 1 -> 2.*kept, not paid again"):
            run_stage("collect", more)
        more.run.overwrite = True
        stats = run_stage("collect", more)
    assert (stats["already_done"], stats["done"]) == (4, 4)
    paid = _paid(app)
    assert len(paid) == 8 and max(paid.values()) == 1  # every sample paid exactly once
    assert sorted((r["id"], r["sample_index"]) for r in _corpus(tmp_path)) == [
        (f"q{i}", s) for i in range(4) for s in range(2)
    ]


def test_a_grown_prompts_file_is_a_changed_input_and_only_its_new_prompts_are_requested(tmp_path):
    prompts = _prompts(tmp_path / "prompts.jsonl", 3)
    app = make_app(ToyBackend())
    with ServerThread(app) as server:
        cfg = _cfg(tmp_path, server.base_url, prompts)
        assert run_stage("collect", cfg)["done"] == 3
        with prompts.open("a") as f:  # the same path, one more prompt
            f.write(json.dumps({"id": "q3", "prompt": "hello 3"}) + "\n")
        with pytest.raises(ProxyKDError, match=r"the content of its input collect.prompts \(.*prompts.jsonl\) changed"):
            run_stage("collect", cfg)
        cfg.run.overwrite = True
        stats = run_stage("collect", cfg)
        assert (stats["already_done"], stats["done"]) == (3, 1)
        cfg.run.overwrite = False
        assert run_stage("collect", cfg)["requested"] == 4  # finished with the grown file: reused
    paid = _paid(app)
    assert len(paid) == 4 and max(paid.values()) == 1
    assert sorted(r["id"] for r in _corpus(tmp_path)) == ["q0", "q1", "q2", "q3"]


def test_a_bad_collect_config_writes_nothing_and_the_corrected_command_runs(tmp_path, monkeypatch):
    prompts = _prompts(tmp_path / "prompts.jsonl", 2)
    app = make_app(ToyBackend())
    with ServerThread(app) as server:
        cfg = _cfg(tmp_path, server.base_url, prompts, model="")
        with pytest.raises(ProxyKDError, match=r"collect.model is empty"):
            run_stage("collect", cfg)
        assert not (tmp_path / "run" / "corpus").exists()
        remote = _cfg(tmp_path, "http://teacher.invalid/v1", prompts, api_key_env="PROXYKD_TEST_NO_SUCH_KEY")
        monkeypatch.delenv("PROXYKD_TEST_NO_SUCH_KEY", raising=False)
        with pytest.raises(ProxyKDError, match=r"no API key for http://teacher.invalid/v1"):
            run_stage("collect", remote)
        assert not (tmp_path / "run" / "corpus").exists()
        assert run_stage("collect", _cfg(tmp_path, server.base_url, prompts))["done"] == 2  # not refused


def test_a_redo_that_stopped_then_a_redo_with_other_settings_pays_no_sample_twice(tmp_path, monkeypatch):
    """A redo (3 samples per prompt) stops part-way; the next redo (2 per prompt) has other settings, so
    `begin()` removes the first one's file: the samples it paid for that the second wants are kept first."""
    from proxykd_jax.teacher import collector as client

    prompts = _prompts(tmp_path / "prompts.jsonl", 4)
    app = make_app(ToyBackend())
    with ServerThread(app) as server:
        assert run_stage("collect", _cfg(tmp_path, server.base_url, prompts, concurrency=1))["done"] == 4
        request = client.Collector._request
        limit = len(app.state.requests) + 4

        async def quota_runs_out(self, prompt, key, http):  # the account's quota ends after 4 more samples
            if len(app.state.requests) >= limit:
                response = client._http.Response(429, request=client._http.Request("POST", server.base_url))
                raise openai.RateLimitError("quota", response=response, body={"code": "insufficient_quota"})
            return await request(self, prompt, key, http)

        monkeypatch.setattr(client.Collector, "_request", quota_runs_out)
        first = _cfg(tmp_path, server.base_url, prompts, samples_per_prompt=3, concurrency=1)
        first.run.overwrite = True
        with pytest.raises(ProxyKDError, match="out of quota"):
            run_stage("collect", first)
        monkeypatch.setattr(client.Collector, "_request", request)
        second = _cfg(tmp_path, server.base_url, prompts, samples_per_prompt=2, concurrency=1)
        second.run.overwrite = True
        stats = run_stage("collect", second)
    paid = _paid(app)
    assert len(paid) == 4 + 4 + 2 and max(paid.values()) == 1  # 4 before, 4 by the first redo, 2 new
    assert (stats["already_done"], stats["done"]) == (6, 2)
    assert sorted((r["id"], r["sample_index"]) for r in _corpus(tmp_path)) == [
        (f"q{i}", s) for i in range(4) for s in range(2)
    ]
    assert sorted(p.name for p in (tmp_path / "run" / "corpus").iterdir() if "kept" in p.name) == []
