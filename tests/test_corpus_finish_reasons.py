"""The corpora the report and the per-byte benchmarks sample straight from the known teacher record
each answer's finish reason, as `collect` does, so `prepare` puts an eos target only after the
answers the teacher stopped, none after those max_new_tokens cut."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from test_data_common import tiny_cfg

from proxykd_jax.data import PreparedData, prepare
from proxykd_jax.data.corpus import iter_corpus
from proxykd_jax.eval import per_byte
from proxykd_jax.report import runner
from proxykd_jax.teacher.known import KnownTeacher

MAX_NEW = 4  # short enough that many answers are cut; eos_rate high enough that many stop first


def _teacher(tmp_path, tokenizer: str) -> KnownTeacher:
    return KnownTeacher.create(
        3,
        vocab_size=36 if tokenizer == "char" else 64,
        d_model=32,
        num_layers=1,
        d_ff=64,
        max_seq_len=64,
        eos_rate=0.3,
        folder=tmp_path / "teacher_tok",
        tokenizer=tokenizer,
    )


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_finish_and_eos(teacher, corpus, tmp_path) -> None:
    """Every line says "length" exactly where the answer has MAX_NEW teacher tokens (else "stop"),
    both occur, and the prepared samples end with the eos exactly after the stopped answers."""
    lines = _lines(corpus)
    finish = {(str(r["id"]), r["sample_index"]): r["meta"]["finish_reason"] for r in lines}
    for r in lines:
        cut = len(teacher.encode(r["response"])) == MAX_NEW
        assert r["meta"]["finish_reason"] == ("length" if cut else "stop"), r
    assert sorted(set(finish.values())) == ["length", "stop"]
    prepare([corpus], teacher.tokenizer, tmp_path / "prepared", tiny_cfg(), progress=False)
    pd = PreparedData(tmp_path / "prepared")
    recs = [r for s in pd.manifest["splits"] for r in pd.iter_split(s)]
    assert len(recs) == len(lines)
    for rec in recs:
        ends_with_eos = int(rec["tokens"][-1]) == teacher.eos_id
        assert ends_with_eos == (finish[(rec["record_id"], rec["response_index"])] == "stop")


def test_report_corpus_records_finish_reasons_and_keeps_sample_ids(tmp_path):
    teacher = _teacher(tmp_path, "word")
    prompts = teacher.make_prompts(16, np.random.default_rng(0), min_words=3, max_words=8)
    rows = [{"id": f"q{i}", "prompt": p} for i, p in enumerate(prompts)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = tmp_path / "corpus" / "teacher.jsonl"
    runner.write_corpus(teacher, tmp_path / "prompts.jsonl", corpus, 3, MAX_NEW, seed=0)
    _check_finish_and_eos(teacher, corpus, tmp_path)
    # The samples (ids, so splits and everything downstream) are those of the `responses` form written before.
    old = tmp_path / "old.jsonl"
    with open(old, "w") as f:
        for r, group in zip(rows, teacher.sample(prompts, 3, MAX_NEW, seed=0)):
            if any(a.strip() for a in group):
                f.write(json.dumps(r | {"responses": [a for a in group if a.strip()]}) + "\n")

    def samples(path):
        return sorted(
            (s.sample_id, s.response) for row in iter_corpus(path, "error", collections.Counter()) for s in row
        )

    assert samples(corpus) == samples(old)


def test_per_byte_corpus_records_finish_reasons(tmp_path):
    teacher = _teacher(tmp_path, "char")
    prompts = teacher.make_prompts(16, np.random.default_rng(0))
    corpus = tmp_path / "teacher.jsonl"
    per_byte.write_corpus(teacher, prompts, corpus, samples=2, max_new_tokens=MAX_NEW, top=5, seed=0)
    assert all(len(r["top_logprobs"]) == len(teacher.encode(r["response"])) for r in _lines(corpus))
    _check_finish_and_eos(teacher, corpus, tmp_path)


@pytest.mark.parametrize("max_new_tokens", [1, MAX_NEW])
def test_sample_finished_matches_sample(tmp_path, max_new_tokens):
    """`sample` is `sample_finished` without the reasons (its other callers see the same text)."""
    teacher = _teacher(tmp_path, "word")
    prompts = teacher.make_prompts(8, np.random.default_rng(1))
    finished = teacher.sample_finished(prompts, 2, max_new_tokens, seed=5)
    assert teacher.sample(prompts, 2, max_new_tokens, seed=5) == [[t for t, _ in g] for g in finished]
    for text, reason in (a for g in finished for a in g):
        assert reason == ("length" if len(teacher.encode(text)) == max_new_tokens else "stop")
