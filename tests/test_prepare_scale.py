"""`prepare` on large corpora: the main bar's total from the checking pass, the teacher-head probe shown and held
to a batch, the buffer bound counting the teacher's alternatives, the chat template rendered once per prompt."""

import collections
import importlib
import random
import tracemalloc

import numpy as np
import pytest
from test_data_common import make_rows, make_tokenizer, teacher_logprobs, tiny_cfg, write_jsonl

from proxykd_jax.data import DataError, align, corpus, prepare

prepare_mod = importlib.import_module("proxykd_jax.data.prepare")  # (`data.prepare` is also the function)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _logprob_rows(tok, rng: random.Random, n: int, n_alts: int = 20) -> list[dict]:
    """`n` prompts of one response each, with `n_alts` alternatives per teacher token (as a top-20 API gives)."""
    rows = make_rows(n, responses=1, seed=rng.randrange(1 << 30), words=(8, 14))
    for row in rows:
        tokens, top = teacher_logprobs(tok, row["responses"][0], rng, n_alts=n_alts)
        row["tokens"], row["top_logprobs"] = [tokens], [top]
    return rows


def test_the_main_bar_has_the_total_the_check_counted(tok, tmp_path, capsys):
    rng = random.Random()
    n, k = rng.randint(5, 40), rng.randint(1, 4)
    path = write_jsonl(tmp_path / "c.jsonl", make_rows(n, responses=k, seed=rng.randrange(1 << 30)))
    prepare([path], tok, tmp_path / "o", tiny_cfg(), progress=True)
    bars = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prepare:")]
    main = [line for line in bars if "samples/s" in line or " samples" in line]
    assert main and f"{n * k}/{n * k}" in main[-1] and "100%" in main[-1], bars


def test_the_head_probe_shows_its_progress(tok, tmp_path, capsys):
    rng = random.Random()
    n = rng.randint(5, 30)
    path = write_jsonl(tmp_path / "c.jsonl", make_rows(n, responses=2, seed=rng.randrange(1 << 30)))
    head, evidence = prepare_mod.decide_head([path], tok, tiny_cfg(), progress=True, rows=n)
    assert head == "exact" and evidence["probe_samples"] == 0  # no log-probs: the whole corpus was read
    bars = [line for line in capsys.readouterr().err.splitlines() if "teacher head" in line]
    assert bars and f"{n}/{n}" in bars[-1] and "100%" in bars[-1], bars


def test_the_head_probe_holds_a_batch_not_all_its_samples(tok, tmp_path):
    """decide_head reads up to 2,000 samples with log-probs: encoded as they come, its memory does not grow with
    them (it held them all: 1.2 GB peak RSS on a corpus where 637 MB did without the probe)."""
    rng = random.Random()
    rows = _logprob_rows(tok, rng, 500)
    cfg = tiny_cfg(prepare_buffer_mb=0.25)
    prepare_mod.decide_head([write_jsonl(tmp_path / "w.jsonl", rows[:20])], tok, cfg)  # caches out of the way
    peaks, decisions = [], []
    for n in (100, 500):
        path = write_jsonl(tmp_path / f"c{n}.jsonl", rows[:n])
        tracemalloc.start()
        decisions.append(prepare_mod.decide_head([path], tok, cfg))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert [d[1]["probe_samples"] for d in decisions] == [100, 500]
    assert peaks[1] - peaks[0] < 1.5e6, peaks  # held all 500: +12 MB


def test_the_buffer_counts_the_teachers_alternatives(tok, tmp_path):
    """A sample with top-20 log-probs holds ~200 bytes per alternative; counting only its text, a batch of
    data.prepare_buffer_mb held 12 times that (1.41 GB peak RSS at the default 64 MB)."""
    rng = random.Random()
    rows = _logprob_rows(tok, rng, 400)
    plain = [{k: v for k, v in row.items() if k not in ("tokens", "top_logprobs")} for row in rows]
    budget_mb = 0.5
    cfg = tiny_cfg(prepare_buffer_mb=budget_mb, teacher_head="bytes", seq_len=128)
    prepare([write_jsonl(tmp_path / "w.jsonl", rows[:20])], tok, tmp_path / "w", cfg, progress=False)
    peaks = []
    for name, corpus_rows in (("plain", plain), ("logprobs", rows)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", corpus_rows)
        tracemalloc.start()
        prepare([path], tok, tmp_path / name, cfg, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] - peaks[0] < 2.5 * budget_mb * 2**20, peaks  # held ~6x the budget: +3 MB


_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system first') }}"
    "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% if m.get('name') %}({{ m['name'] }}){% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_the_chat_template_is_rendered_once_per_prompt(tok, monkeypatch):
    """The rows of one prompt (one per sample, as `collect` writes them) repeat its messages: rendered once per
    distinct conversation of a batch, with the same tokens, prompt lengths and refusals as one sample at a time."""
    rng = random.Random()
    words = "the fox dog cat sat ran far".split()
    convs = []
    for _ in range(rng.randint(3, 8)):
        msgs = [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 5)))}]
        kind = rng.random()
        if kind < 0.2:
            msgs.insert(0, {"role": "system", "content": "be brief"})
        elif kind < 0.35:
            msgs.append({"role": "system", "content": "late"})  # the template refuses it
        elif kind < 0.5:
            msgs[0]["name"] = rng.choice([1, 1.0, True, "1"])  # equal in Python, written apart by the template
        convs.append(msgs)
    rows, ids = [], {}
    for i in range(rng.randint(10, 40)):
        c = rng.randrange(len(convs))
        pid = ids.setdefault(c, f"q{c}") if rng.random() < 0.8 else f"r{i}"  # one id, or another id, per prompt
        rows.append({"id": pid, "messages": [dict(m) for m in convs[c]], "response": rng.choice(words)})
    samples = [
        corpus.samples_of_row({**row, "sample_index": i}, f"c.jsonl:{i + 1}", logprobs=False)[0]
        for i, row in enumerate(rows)
    ]
    tok.chat_template = _TEMPLATE
    try:
        encoder = align.SampleEncoder(tok, seq_len=64)
        alone = [encoder.encode_batch([s])[0] for s in samples]
        renders = collections.Counter()
        render = tok.apply_chat_template

        def counted(messages, **kw):
            renders["calls"] += 1
            return render(messages, **kw)

        monkeypatch.setattr(tok, "apply_chat_template", counted)
        batch = encoder.encode_batch(samples)
    finally:
        tok.chat_template = None
    distinct = {repr([[(k, type(v), v) for k, v in m.items()] for m in s.messages]) for s in samples}
    assert renders["calls"] == len(distinct), (len(samples), renders)
    for s, a, b in zip(samples, alone, batch):
        assert type(a) is type(b)
        if isinstance(a, DataError):  # each names its own line
            assert str(a) == str(b) and str(b).startswith(f"{s.where}: ") and b.reason == "bad_messages"
        else:
            np.testing.assert_array_equal(a.tokens_L, b.tokens_L)
            assert a.prompt_len == b.prompt_len and b.sample is s
