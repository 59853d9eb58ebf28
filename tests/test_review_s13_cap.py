"""`collect.max_cost` against an endpoint whose chat template adds more prompt tokens than the 64 a request
reserves beyond its prompt's bytes (a long hidden system prompt): the corpus's cost stays under the cap."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import random

import pytest

from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.client import CollectError, collect
from proxykd_jax.teacher.config import collect_config
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.prompts import canonical
from proxykd_jax.teacher.server import Faults, make_app

PRICE_IN, PRICE_OUT = 1e6, 3e6  # per million tokens: 1 and 3 currency units per token


class HiddenSystemPrompt(ToyBackend):
    """A teacher whose chat template puts `hidden` bytes (one token each) before every conversation."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.encode("s" * self.hidden) + super().chat_ids(messages)


def _corpus_cost(path: pathlib.Path) -> float:
    usage = [json.loads(line)["meta"]["usage"] for line in path.read_text().splitlines()] if path.exists() else []
    return sum(u["prompt_tokens"] * PRICE_IN + u["completion_tokens"] * PRICE_OUT for u in usage) / 1e6


def _run(cfg) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return collect(cfg)
        except CollectError as err:
            return err.stats


@pytest.mark.parametrize("concurrency", [8, 32])
def test_a_template_longer_than_the_allowance_does_not_pass_the_cap(tmp_path, concurrency):
    rng = random.Random()
    n, hidden = rng.randint(24, 40), rng.randint(150, 400)
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": "w " * rng.randint(1, 20)}]} for i in range(n)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    faults = Faults(fail_429_rate=0.1, retry_after_s=0.01, fail_500_rate=0.1, seed=rng.randint(0, 1000))
    with ServerThread(make_app(HiddenSystemPrompt(hidden), faults)) as server:
        cfg = collect_config()
        cfg.prompts, cfg.out = str(tmp_path / "prompts.jsonl"), str(tmp_path / "corpus.jsonl")
        cfg.base_url, cfg.model, cfg.max_tokens, cfg.progress = server.base_url, "toy", 8, False
        cfg.backoff_initial_s, cfg.max_attempts, cfg.concurrency = 0.01, 20, concurrency
        cfg.price_input_per_mtok, cfg.price_output_per_mtok = PRICE_IN, PRICE_OUT
        per_request = (hidden + 40) * PRICE_IN / 1e6 + 8 * PRICE_OUT / 1e6  # about what one answer costs
        cfg.max_cost = round(rng.uniform(0.2, 0.7) * n * per_request, 2)
        stats = _run(cfg)
        spent = _corpus_cost(pathlib.Path(cfg.out))
        assert spent <= cfg.max_cost and stats["corpus_cost"] == pytest.approx(spent), (spent, cfg.max_cost, hidden)
        # a resumed run whose cap leaves room for a request's bytes + 64 tokens but not for the template's own
        longest = max(len(canonical(r["messages"]).encode()) for r in rows)
        cfg.max_cost = spent + ((longest + 64) * PRICE_IN + 8 * PRICE_OUT) / 1e6 + 0.5
        stats = _run(cfg)
        assert _corpus_cost(pathlib.Path(cfg.out)) == spent and stats["done"] == 0, (stats, hidden)
        cfg.max_cost = spent + rng.uniform(0.2, 0.5) * n * per_request  # raised: it goes on, and stops in time
        stats = _run(cfg)
        assert spent < _corpus_cost(pathlib.Path(cfg.out)) <= cfg.max_cost, (stats, hidden)
    assert len(pathlib.Path(cfg.out).read_text().splitlines()) < n  # the cap, not the prompts, ended it
