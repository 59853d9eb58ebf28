"""Fixes users asked for in `eval` and `prepare`:

- eval refuses a known teacher whose tokenizer is not the prepared data's (and not character-level)
  before any work, and metrics.json never holds NaN/Infinity (not JSON);
- prepare ends with one line on what it wrote (samples per split, tokens, the folder);
- a sample given twice names both places, and across two corpus files says ids must be unique across them;
- a chat template that refuses many rows says how many and the first few, with the fix.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import random

import numpy as np
import pytest
from pipeline_fixtures import build_run, tiny_config
from stage_helpers import run_stage
from test_data_common import make_rows, make_tokenizer, sentence, tiny_cfg, write_jsonl

from proxykd_jax.context import RunPaths
from proxykd_jax.data import DataError, prepare
from proxykd_jax.data.records import PreparedData
from proxykd_jax.errors import ConfigError
from proxykd_jax.stages import eval as eval_stage
from proxykd_jax.teacher.known import KnownTeacher

CHAT = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
NO_SYSTEM = (  # Gemma / Mistral style: a system message is refused
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHAT
)


@pytest.fixture(scope="module")
def known_run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("user_fixes") / "run")


@pytest.fixture()
def tok(tmp_path):
    return make_tokenizer(tmp_path / "tok")


# ---------------------------------------------------------------------------------------------- eval


def test_eval_refuses_a_known_teacher_with_another_tokenizer_before_work(known_run, tmp_path):
    cfg, _ = known_run
    other = KnownTeacher.create(
        5, vocab_size=80, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32, folder=tmp_path / "tok"
    )
    other.save(str(tmp_path / "other"))
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.eval.known_teacher = str(tmp_path / "other")
    eval_dir = pathlib.Path(cfg.run.dir) / "eval"
    prepared = PreparedData(RunPaths.from_config(cfg).prepared)
    with pytest.raises(ConfigError) as e:
        run_stage("eval", cfg)
    message = str(e.value)
    assert f"eval.known_teacher={tmp_path / 'other'}" in message
    assert "80 tokens" in message and prepared.tokenizer_hash in message
    assert "character-level" in message and "leave eval.known_teacher unset" in message
    assert not eval_dir.exists()
    with cfg.unlocked():  # the run's own teacher (its tokenizer) passes, its metrics finite JSON numbers
        cfg.eval.known_teacher = known_run[0].eval.known_teacher
    run_stage("eval", cfg)
    text = (eval_dir / "metrics.json").read_text()
    assert math.isfinite(json.loads(text)["models"]["proxy (before align)"]["kl_to_teacher"])
    assert "NaN" not in text and "Infinity" not in text


def test_non_finite_metrics_are_written_as_null_and_said(caplog):
    rng = np.random.default_rng()
    nll = float(rng.uniform(1, 3))
    metrics = {
        "models": {"proxy": {"heldout_nll": nll, "kl_to_teacher": float("nan")}},
        "estimator_kl": {"posterior (store)": float("inf"), "prior": nll / 2, "positions": 7},
    }
    with caplog.at_level(logging.WARNING, logger=eval_stage.metrics_lib.__name__):
        safe = eval_stage.metrics_lib.finite_or_null(metrics)
    text = json.dumps(safe, allow_nan=False)  # valid JSON
    assert json.loads(text) == {
        "models": {"proxy": {"heldout_nll": nll, "kl_to_teacher": None}},
        "estimator_kl": {"posterior (store)": None, "prior": nll / 2, "positions": 7},
    }
    said = caplog.text
    assert "models.proxy.kl_to_teacher" in said and "estimator_kl.posterior (store)" in said and "null" in said
    assert math.isnan(metrics["models"]["proxy"]["kl_to_teacher"])  # the caller's dict is left as it was
    assert "nan" in eval_stage.metrics_lib.format_table(
        eval_stage.metrics_lib.nulls_as_nan(safe)
    )  # a stored null still prints


# ------------------------------------------------------------------------------------------- prepare


def test_prepare_ends_with_a_line_on_what_it_wrote(tmp_path, caplog):
    tokdir = tmp_path / "tok"
    make_tokenizer(tokdir)
    corpus = write_jsonl(tmp_path / "c.jsonl", make_rows(30, responses=2, seed=random.randrange(100)))
    cfg = tiny_config(tmp_path / "run")
    with cfg.unlocked():
        cfg.data.corpus, cfg.data.tokenizer = str(corpus), str(tokdir)
        cfg.data.truncate = True  # random rows may run past seq 40; the closing line is what is tested
    with caplog.at_level(logging.INFO, logger="proxykd_jax.stages.prepare"):
        manifest = run_stage("prepare", cfg)
    last = [r.getMessage() for r in caplog.records if r.name == "proxykd_jax.stages.prepare"][-1]
    splits = manifest["splits"]
    tokens = sum(s["tokens"] for s in splits.values())
    per_split = ", ".join(f"{name} {s['samples']}" for name, s in splits.items())
    assert last == (
        f"prepare: {manifest['counts']['samples']} samples ({per_split}), {tokens} tokens -> "
        f"{RunPaths.from_config(cfg).prepared}"
    )


def _chat_and_completions(tmp_path, n=6):
    """One prompts file collected twice, with the same ids: chat `messages` rows and completion `prompt` rows."""
    rng = random.Random()
    prompts = [sentence(rng, 4) for _ in range(n)]
    chat = [
        {"id": f"p{i}", "messages": [{"role": "user", "content": p}], "response": sentence(rng, 3), "sample_index": 0}
        for i, p in enumerate(prompts)
    ]
    comp = [
        {"id": f"p{i}", "prompt": p, "response": sentence(rng, 3), "sample_index": 0} for i, p in enumerate(prompts)
    ]
    return write_jsonl(tmp_path / "chat.jsonl", chat), write_jsonl(tmp_path / "comp.jsonl", comp)


def test_duplicate_ids_across_two_corpus_files_name_both_places(tok, tmp_path):
    tok.chat_template = CHAT
    chat, comp = _chat_and_completions(tmp_path)
    with pytest.raises(DataError) as e:
        prepare([chat, comp], tok, tmp_path / "o", tiny_cfg(), progress=False)
    message = str(e.value)
    assert (
        f"(1) {comp}:1: duplicate sample: prompt id 'p0' response 0 was given before, at {chat}:1 in another" in message
    )
    assert (
        f"(5) {comp}:5: duplicate sample: prompt id 'p4' response 0 was given before, at {chat}:5 in another" in message
    )
    assert "prompt ids must be unique across the data.corpus files" in message and "sample_index" not in message
    m = prepare([chat, comp], tok, tmp_path / "o", tiny_cfg(on_error="skip"), progress=False)
    assert m["counts"]["skipped"] == {"duplicate_id": 6}
    assert all(f"given before, at {chat}:" in err and "unique across" in err for err in m["counts"]["errors"])


def test_duplicate_sample_in_one_file_names_both_lines(tok, tmp_path):
    rows = make_rows(4, responses=1, seed=random.randrange(100))
    path = write_jsonl(tmp_path / "c.jsonl", rows + [rows[1]])
    with pytest.raises(DataError) as e:
        prepare([path], tok, tmp_path / "o", tiny_cfg(), progress=False)
    assert str(e.value) == (
        f"{path}:5: duplicate sample: prompt id {rows[1]['id']!r} response 0 was given before, at {path}:2 (give "
        "each line of a prompt its own `sample_index`, or list all responses in one row)."
    )


def test_a_template_refusing_many_rows_says_how_many_and_the_fix(tok, tmp_path):
    tok.chat_template = NO_SYSTEM
    rng = random.Random()
    rows = [
        {
            "id": f"q{i}",
            "messages": ([{"role": "system", "content": "be brief"}] if i % 3 == 0 else [])
            + [{"role": "user", "content": sentence(rng, 4)}],
            "response": sentence(rng, 3),
        }
        for i in range(60)
    ]
    path = write_jsonl(tmp_path / "sys.jsonl", rows)
    with pytest.raises(DataError) as e:
        prepare([path], tok, tmp_path / "o", tiny_cfg(), progress=False)
    message = str(e.value)
    assert message.startswith("20 of 60 rows of the corpus have 'messages' the tokenizer's chat template refuses")
    assert "(System role not supported)" in message
    assert f"{path}:1, {path}:4, {path}:7, {path}:10, {path}:13, ..." in message
    assert "data.on_error=skip" in message and "merge each system message's text into the first user message" in message
    m = prepare([path], tok, tmp_path / "o", tiny_cfg(on_error="skip"), progress=False)
    assert m["counts"]["skipped"] == {"bad_messages": 20} and m["counts"]["samples"] == 40


def test_per_byte_generations_prompt_as_prepare_trained(monkeypatch):
    """The students answer plain prompts tokenised as prepare tokenised them for training: with the
    tokenizer's special tokens (a bos where its post-processor adds one), not without."""
    import random

    from test_data_common import sentence
    from tokenizers import processors

    from proxykd_jax.data import align
    from proxykd_jax.data.corpus import Sample
    from proxykd_jax.eval import per_byte
    from proxykd_jax.models import sampling
    from proxykd_jax.models.tokenizer import build_bpe_tokenizer

    rng = random.Random(11)
    tok = build_bpe_tokenizer([sentence(rng, 12) for _ in range(200)], 300)
    bos = tok.convert_tokens_to_ids("<bos>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    prompt = sentence(rng, 5)
    trained = align.SampleEncoder(tok, seq_len=128).encode_batch(
        [Sample("t:1", "r", 0, prompt, None, " a", None, None, {})]
    )
    seen = {}

    def fake_generate(model, tokens, lengths, rng, **kw):
        seen["prompt"] = np.asarray(tokens)[0, : int(lengths[0])].tolist()
        return sampling.GenerateOutput(
            np.asarray([[tok.eos_token_id]], np.int32), np.asarray([1], np.int32), None, None, None
        )

    monkeypatch.setattr(sampling, "generate", fake_generate)

    class Model:
        cfg = type("Cfg", (), {"vocab_size": len(tok)})

    class Teacher:
        def text_logprob(self, prompts, texts, ended):
            return np.zeros(len(texts)), np.ones(len(texts))

    per_byte.generation_nats_per_byte({"s": Model()}, [prompt], Teacher(), tok, max_new_tokens=2, seed=0)
    assert seen["prompt"][0] == bos
    assert seen["prompt"] == trained[0].tokens_L[: len(seen["prompt"])].tolist()


def test_eval_refuses_a_known_teacher_shorter_than_the_rows_before_work(known_run, tmp_path):
    """The known teacher scores rows of data.seq_len: one of a shorter context is refused before anything is written
    (its forward refused them inside the scoring, after the artifact had begun)."""
    import shutil

    cfg, _ = known_run
    short = tmp_path / "short"
    shutil.copytree(cfg.eval.known_teacher, short)
    spec = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**spec, "max_position_embeddings": cfg.data.seq_len // 2}))
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.eval.known_teacher, cfg.run.overwrite = str(short), True
    with pytest.raises(ConfigError, match=f"data.seq_len={cfg.data.seq_len} exceeds the max_seq_len "):
        run_stage("eval", cfg)
    assert not (pathlib.Path(cfg.run.dir) / ".eval.new").exists()
