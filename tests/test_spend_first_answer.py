"""`collect.max_cost` and the first request into an empty corpus (docs/TEACHER.md, "A spend cap"): a request whose
worst cost (its prompt's bytes + 64 of the endpoint's own tokens at the input price, `max_tokens` at the output price)
is over the cap is never sent, even the first and only one, and the run stops with the cap's sentence; while the
corpus holds no answer, one request is in flight at a time, so only that first answer can pass its reservation (an
endpoint adding more than 64 tokens of its own), and nothing is sent after it once the cap is passed."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import random

import pytest
from test_review_s13_cap import HiddenSystemPrompt

from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.client import CollectError, collect
from proxykd_jax.teacher.config import collect_config
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.prompts import canonical
from proxykd_jax.teacher.server import make_app


def _setup(tmp_path: pathlib.Path, rng: random.Random, n: int, out_price: float | None = None):
    """`n` random chat prompts, random prices (`out_price`: the output price as a fraction of the input price) and
    max_tokens: (prompts, collect config without its endpoint, the worst cost of each prompt's request as the cap
    reckons it before the corpus holds an answer)."""
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": "w " * rng.randint(1, 30)}]} for i in range(n)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = collect_config()
    cfg.prompts, cfg.out = str(tmp_path / "prompts.jsonl"), str(tmp_path / "c.jsonl")
    cfg.model, cfg.progress = "toy", False
    cfg.max_tokens, cfg.concurrency = rng.randint(4, 16), rng.choice([1, 4, 8])
    cfg.price_input_per_mtok, cfg.price_output_per_mtok = rng.uniform(0.1, 5.0), rng.uniform(0.1, 15.0)
    if out_price is not None:
        cfg.price_output_per_mtok = cfg.price_input_per_mtok * out_price
    pin, pout = cfg.price_input_per_mtok, cfg.price_output_per_mtok
    worst = [((len(canonical(r["messages"]).encode()) + 64) * pin + cfg.max_tokens * pout) / 1e6 for r in rows]
    return rows, cfg, worst


def _collect(cfg) -> str | None:
    """Runs `collect`; the one sentence it stopped with, or None."""
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            collect(cfg)
        except CollectError as err:
            return str(err)
    return None


def _costs(cfg) -> list[float]:
    """What each stored answer cost, from its usage."""
    out = pathlib.Path(cfg.out)
    usage = [json.loads(line)["meta"]["usage"] for line in out.read_text().splitlines()] if out.exists() else []
    return [
        (u["prompt_tokens"] * cfg.price_input_per_mtok + u["completion_tokens"] * cfg.price_output_per_mtok) / 1e6
        for u in usage
    ]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_cap_below_every_request_sends_nothing_into_an_empty_corpus(tmp_path, seed):
    rng = random.Random(seed)
    rows, cfg, worst = _setup(tmp_path, rng, rng.randint(1, 4))
    cfg.max_cost = min(worst) * rng.uniform(0.01, 0.99)
    app = make_app(ToyBackend())
    with ServerThread(app) as server:
        cfg.base_url = server.base_url
        stop = _collect(cfg)
    assert app.state.requests == [] and _costs(cfg) == []
    assert stop is not None and f"collect.max_cost={cfg.max_cost:g} is reached: this corpus's answers cost 0 " in stop
    assert f"may cost up to {min(worst):.6g} more (the cheapest of the {len(rows)} left)" in stop


def test_only_the_first_answer_can_pass_its_reservation(tmp_path):
    """An endpoint whose hidden system prompt is longer than the 64 tokens a request reserves: a cap that the first
    request's reservation fits but its answer does not. That answer is the one request sent (alone, though the
    run may send several at once); the corpus then costs more than the cap and the run stops without another."""
    rng = random.Random()
    rows, cfg, worst = _setup(tmp_path, rng, rng.randint(3, 6), out_price=0.1)
    hidden = rng.randint(200, 400)  # billed as prompt tokens: far more than the 64 reserved (and 20% of the rest)
    cfg.max_cost = worst[0] * rng.uniform(1.0, 1.2)
    app = make_app(HiddenSystemPrompt(hidden))
    with ServerThread(app) as server:
        cfg.base_url = server.base_url
        stop = _collect(cfg)
    (cost,) = _costs(cfg)
    assert len(app.state.requests) == 1 and cost > cfg.max_cost
    assert stop is not None and f"this corpus's answers cost {cost:.6g}" in stop and "raise collect.max_cost" in stop
