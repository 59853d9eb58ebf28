"""The students' generations, in `eval` and `report`: `eval.generate_prompts` distinct held-out prompts
(a prompt's several teacher responses count once), and no generations, not a traceback, without
prompts or with `eval.max_new_tokens=0`."""

from __future__ import annotations

import numpy as np
import pytest
from pipeline_fixtures import build_run

from proxykd_jax.context import RunPaths
from proxykd_jax.data.records import PreparedData
from proxykd_jax.eval import metrics as metrics_lib
from proxykd_jax.eval import per_byte
from proxykd_jax.report import metrics as report_metrics
from proxykd_jax.report import tables
from proxykd_jax.teacher.known import KnownTeacher


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg, teacher = build_run(tmp_path_factory.mktemp("generations") / "run")
    return cfg, PreparedData(RunPaths.from_config(cfg).prepared), teacher


def test_generation_prompts_are_the_distinct_prompts_of_the_split(run):
    cfg, prepared, _ = run
    records = list(prepared.iter_split("distill"))
    keys = list(dict.fromkeys(int(r["prompt_key"]) for r in records))  # in split order
    assert len(records) > len(keys) >= 3  # several responses per prompt
    prompt_of = {int(r["prompt_key"]): r["tokens"][: int(r["prompt_len"])].tolist() for r in records}
    for limit in (2, len(keys), len(records)):
        got = [p.tolist() for p in metrics_lib.heldout_prompts(prepared, cfg.data, "distill", limit)]
        assert got == [prompt_of[k] for k in keys[:limit]]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return KnownTeacher.create(
        3,
        vocab_size=64,
        d_model=32,
        num_layers=1,
        d_ff=64,
        max_seq_len=64,
        eos_rate=0.3,
        folder=tmp_path_factory.mktemp("teacher") / "t",
    )


def test_no_prompts_or_no_new_tokens_mean_no_generations(teacher):
    texts = teacher.make_prompts(3, np.random.default_rng(0), min_words=3, max_words=6)
    ids = [teacher.encode(p) for p in texts]
    students = {"student": teacher.model}
    for prompts, prompt_texts, n in ((ids, texts, 0), ([], [], 4)):
        assert metrics_lib.generation_metrics(students, prompts, teacher, max_new_tokens=n, seed=0) == {}
        assert report_metrics.generation_score(teacher.model, prompts, teacher, max_new_tokens=n, seed=0) is None
        got = per_byte.generation_nats_per_byte(
            students, prompt_texts, teacher, teacher.tokenizer, max_new_tokens=n, seed=0
        )
        assert got == {}
    # with both, a number; and the report shows a variant without one as "-"
    assert metrics_lib.generation_metrics(students, ids, teacher, max_new_tokens=2, seed=0)["student"] < 0
    rows = [
        {"setting": "perturbed", "seed": s, "variant": v, "nats_per_byte": 1.0 + s, "kl_to_teacher": 2.0}
        | {"teacher_loglik_per_byte": None}
        for s in (0, 1)
        for v in ("sft", "proxykd")
    ]
    line = [ln for ln in tables.variant_table(rows).splitlines() if ln.startswith("| Proxy-KD")][0]
    assert [c.strip() for c in line.strip("|").split("|")][2:5] == ["1.5000 ± 0.7071", "2.0000 ± 0.0000", "-"]
