"""The prepared manifest counts each prompt once per split whatever order its rows arrive in (one row
per response, rows shuffled), and the same corpus in any row order gives the same counts."""

from __future__ import annotations

import json
import random

import pytest
from test_data_common import make_rows, make_tokenizer, tiny_cfg, write_jsonl

from proxykd_jax.data import PreparedData, prepare
from proxykd_jax.data.split import assign_split, split_fractions


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _one_row_per_response(rows):
    return [
        {"id": r["id"], "prompt": r["prompt"], "response": resp, "sample_index": j}
        for r in rows
        for j, resp in enumerate(r["responses"])
    ]


@pytest.mark.parametrize("seed", [0, 1])
def test_prompt_counts_are_right_for_any_row_order(tok, tmp_path, seed):
    rows = _one_row_per_response(make_rows(40, responses=3, seed=seed))
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    cfg = tiny_cfg()
    fractions = split_fractions(cfg.split)
    want_prompts, want_samples = {}, {}
    for r in rows:
        name = assign_split(r["id"], fractions, cfg.split.salt)
        want_prompts.setdefault(name, set()).add(r["id"])
        want_samples[name] = want_samples.get(name, 0) + 1
    splits = {}
    for order, data in (("sorted", rows), ("shuffled", shuffled)):
        out = tmp_path / order
        prepare(write_jsonl(tmp_path / f"{order}.jsonl", data), tok, out, cfg, progress=False)
        splits[order] = PreparedData(out).manifest["splits"]
        for name, info in splits[order].items():
            assert info["prompts"] == len(want_prompts.get(name, ())), (order, name)
            assert info["samples"] == want_samples.get(name, 0), (order, name)
    strip = {
        n: {k: v for k, v in s.items() if k in ("prompts", "samples", "tokens")} for n, s in splits["sorted"].items()
    }
    assert strip == {
        n: {k: v for k, v in s.items() if k in ("prompts", "samples", "tokens")} for n, s in splits["shuffled"].items()
    }
    assert sum(len(p) for p in want_prompts.values()) == 40
    json.dumps(splits)  # the manifest stays plain JSON
