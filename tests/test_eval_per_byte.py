"""The per-byte eval's teacher floor is measured on exactly the held-out samples the models are scored
on: all of them with eval.max_samples=0, and the whole eval batches when max_samples is not a multiple
of eval.batch_size; and on a sample that data.truncate cut, only on the text its tokens cover."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from pipeline_fixtures import build_run

from proxykd_jax.context import RunPaths
from proxykd_jax.data.corpus import iter_corpus
from proxykd_jax.data.records import PreparedData
from proxykd_jax.eval import metrics as metrics_lib
from proxykd_jax.eval import per_byte


class _Teacher:
    """Records what it is asked to score; every response costs 1 nat."""

    def __init__(self):
        self.scored, self.ended = [], []

    def text_logprob(self, prompts, responses, ended=None):
        self.scored.extend(zip(prompts, responses))
        self.ended.extend([True] * len(responses) if ended is None else ended)
        return -np.ones(len(responses)), np.asarray([len(r.encode()) for r in responses], np.float64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg, _ = build_run(tmp_path_factory.mktemp("per_byte") / "run")
    return cfg, PreparedData(RunPaths.from_config(cfg).prepared)


@pytest.mark.parametrize("max_samples", [0, 3])
def test_teacher_floor_uses_the_samples_the_models_are_scored_on(run, max_samples):
    cfg, prepared = run
    cfg = cfg.copy_and_resolve_references()
    cfg.eval.max_samples, cfg.eval.batch_size, cfg.eval.generate_prompts = max_samples, 2, 0
    batches = metrics_lib.eval_batches(prepared, "heldout", cfg.data, batch_size=2, limit=max_samples)
    scored_ids = {int(i) for b in batches for i in np.asarray(b["sample_ids"]).reshape(-1) if i >= 0}
    total = prepared.num_samples("heldout")
    assert total > 4 and len(scored_ids) == (total if max_samples == 0 else 4)  # 3 rounds up to two batches of 2
    teacher = _Teacher()
    per_byte.teacher_nats_per_byte(teacher, *per_byte.heldout_texts(prepared, cfg, batches))  # the eval stage's floor
    corpus = {
        s.sample_id: (s.prompt, s.response) for row in iter_corpus(cfg.data.corpus, "error", Counter()) for s in row
    }
    assert sorted(teacher.scored) == sorted(corpus[i] for i in scored_ids)


def test_teacher_floor_stops_where_a_truncated_sample_stops(run, tmp_path):
    """With data.truncate, a held-out response cut at data.seq_len is scored by the teacher up to where
    its tokens stop, without an eos (the teacher went on writing); the others whole, with their eos."""
    from proxykd_jax.data.prepare import prepare
    from proxykd_jax.models.tokenizer import load_tokenizer

    cfg, full = run
    cfg = cfg.copy_and_resolve_references()
    cfg.data.truncate, cfg.data.seq_len = True, 12
    cfg.eval.max_samples, cfg.eval.generate_prompts = 0, 0
    tok = load_tokenizer(cfg.data.tokenizer)
    manifest = prepare(cfg.data.corpus, tok, tmp_path / "prepared", cfg.data, progress=False)
    tok.save_pretrained(str(tmp_path / "prepared" / "tokenizer"))  # as the prepare stage does
    prepared = PreparedData(tmp_path / "prepared")
    records = {int(r["sample_id"]): r for r in prepared.iter_split("heldout")}
    cut = {i: r for i, r in records.items() if "response_chars" in r}
    assert manifest["counts"]["truncated"] > 0 and 0 < len(cut) < len(records)
    batches = metrics_lib.eval_batches(prepared, "heldout", cfg.data, batch_size=2, limit=0)
    teacher = _Teacher()
    per_byte.teacher_nats_per_byte(teacher, *per_byte.heldout_texts(prepared, cfg, batches))  # the eval stage's floor
    corpus = {s.sample_id: s for row in iter_corpus(cfg.data.corpus, "error", Counter()) for s in row}
    by_text = {}
    for (prompt, text), ended in zip(teacher.scored, teacher.ended):
        by_text.setdefault(prompt, []).append((text, ended))
    for i, r in records.items():
        s = corpus[i]
        scored = by_text[s.prompt]
        if i in cut:
            text = s.response[: int(r["response_chars"])]
            assert (text, False) in scored  # the whole text where only its eos did not fit
            # the text scored is the text of the record's response tokens
            assert tok.decode(r["tokens"][int(r["prompt_len"]) :]).strip() == text.strip()
        else:
            assert (s.response, True) in scored
    assert len(teacher.scored) == len(records)
    assert any(len(corpus[i].response[: int(r["response_chars"])]) < len(corpus[i].response) for i, r in cut.items())
