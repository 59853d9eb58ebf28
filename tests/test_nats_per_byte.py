"""The report and the eval stage count nats per byte one way (eval/per_byte.py `text_bytes`): the
log-prob of a text's <eos>, where the text ended, in the numerator; no byte for it in the
denominator, which holds the text's UTF-8 bytes (a word tokenizer's spaces included)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from proxykd_jax.eval import metrics as metrics_lib
from proxykd_jax.eval import per_byte
from proxykd_jax.models.tokenizer import build_word_tokenizer
from proxykd_jax.report import metrics as report_metrics
from proxykd_jax.teacher.known import KnownTeacher

NLL = 0.5  # the stand-in model's NLL of every target


def _scorer(model, batch, *, full):
    return np.full(np.asarray(batch["targets"]).shape, -NLL), None


def _batch(tok, prompts: list[str], responses: list[str], ended: list[bool]) -> dict:
    """One sample per row as `pipeline.iter_samples` lays it out: targets are the tokens shifted by
    one, the loss on the response's targets (its eos where it ended), padding in segment 0."""
    rows = []
    for p, r, e in zip(prompts, responses, ended):
        p_ids, r_ids = tok.encode(p, add_special_tokens=False), tok.encode(r, add_special_tokens=False)
        rows.append((p_ids + r_ids + ([tok.eos_token_id] if e else []), len(p_ids)))
    width = max(len(t) for t, _ in rows) + 2
    out = {k: np.zeros((len(rows), width), np.int32) for k in ("targets", "loss_mask", "segment_ids")}
    for i, (tokens, prompt_len) in enumerate(rows):
        out["targets"][i, : len(tokens) - 1] = tokens[1:]
        out["loss_mask"][i, prompt_len - 1 : len(tokens) - 1] = 1
        out["segment_ids"][i, : len(tokens) - 1] = 1
    return out


def test_text_bytes_are_the_texts_utf8_bytes_and_the_eos_adds_none(tmp_path):
    tok = build_word_tokenizer(["w1", "w2", "wé"], tmp_path / "tok")
    ids = tok.encode("w1 wé w2", add_special_tokens=False)
    assert per_byte.text_bytes(ids, tok) == len("w1 wé w2".encode()) == 9
    assert per_byte.text_bytes(ids + [tok.eos_token_id], tok) == 9
    assert per_byte.text_bytes([tok.eos_token_id], tok) == 0


def test_report_and_eval_heldout_nats_per_byte_agree(tmp_path):
    tok = build_word_tokenizer([f"w{i}" for i in range(20)], tmp_path / "prepared" / "tokenizer")
    responses, ended = ["w1 w2 w3", "w10 w4", "w7"], [True, False, True]
    batch = _batch(tok, ["w5 w6", "w7", "w8 w9 w11"], responses, ended)
    targets = sum(len(r.split()) + e for r, e in zip(responses, ended))  # the eos is a target where it ended
    assert batch["loss_mask"].sum() == targets
    want = NLL * targets / sum(len(r.encode()) for r in responses)
    prepared = types.SimpleNamespace(root=tmp_path / "prepared")
    report = report_metrics.nats_per_byte(object(), prepared, [batch], _scorer)
    evaluated = per_byte.heldout_nats_per_byte({"m": object()}, [batch], tok, _scorer)["m"]
    assert report["bytes"] == sum(len(r.encode()) for r in responses)
    assert report["nats_per_byte"] == pytest.approx(want) and evaluated == pytest.approx(want)


def test_report_and_eval_generation_scores_agree(tmp_path):
    """The same model's answers, scored by the same teacher: the report's log-lik per byte (same
    tokenizer) is minus the eval's nats per byte, answers cut at max_new_tokens and stopped alike."""
    teacher = KnownTeacher.create(
        3, vocab_size=64, d_model=32, num_layers=1, d_ff=64, max_seq_len=64, eos_rate=0.3, folder=tmp_path / "t"
    )
    texts = teacher.make_prompts(12, np.random.default_rng(0), min_words=3, max_words=8)
    ids = [teacher.encode(p) for p in texts]
    answers = metrics_lib.sample_answers(
        teacher.model, ids, teacher.tokenizer, teacher.eos_id, max_new_tokens=4, seed=0
    )
    stopped = [bool(a) and a[-1] == teacher.eos_id for a in answers]
    assert any(stopped) and not all(stopped)  # both kinds of answer are scored
    report = report_metrics.generation_score(teacher.model, ids, teacher, max_new_tokens=4, seed=0)
    evaluated = per_byte.generation_nats_per_byte(
        {"m": teacher.model}, texts, teacher, teacher.tokenizer, max_new_tokens=4, seed=0
    )["m"]
    assert report == pytest.approx(-evaluated, rel=1e-5)
