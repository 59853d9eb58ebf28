"""Corpora users bring (docs/DATA_FORMATS.md section 1): OpenAI chat files, content parts, ShareGPT, Alpaca,
JSON arrays, top-level finish reasons; and the messages bad rows get (several at once, before tokenising).

Each accepted layout must give the very samples of the equivalent native row; each refusal is one sentence
naming `file:line` and the field.
"""

import collections
import hashlib
import json
import random
import re

import pytest
from test_data_common import make_rows, make_tokenizer, sentence, tiny_cfg, write_jsonl

from proxykd_jax.data import DataError, PreparedData, align, corpus, corpus_files, prepare
from proxykd_jax.teacher.prompts import canonical


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _samples(path, on_error="error"):
    return [s for row in corpus.iter_corpus(path, on_error, collections.Counter()) for s in row]


def _fields(s: corpus.Sample):
    return (s.record_id, s.response_index, s.prompt, s.messages, s.response, s.meta)


def _chat(rng, n_turns=1):
    """A random conversation ending with the assistant's answer."""
    messages = [{"role": "system", "content": sentence(rng, 3)}]
    for _ in range(n_turns):
        messages += [{"role": "user", "content": sentence(rng, 5)}, {"role": "assistant", "content": sentence(rng, 6)}]
    return messages


def _parts(text, rng):
    """`text` as OpenAI content parts, cut at random places."""
    cuts = sorted(rng.sample(range(1, len(text)), 2))
    return [{"type": "text", "text": t} for t in (text[: cuts[0]], text[cuts[0] : cuts[1]], text[cuts[1] :])]


def _refusal(tmp_path, row, needle, reason):
    path = write_jsonl(tmp_path / "c.jsonl", make_rows(2, responses=1) + [row])
    with pytest.raises(DataError, match=re.escape(needle)) as e:
        _samples(path)
    assert str(e.value).startswith(f"{path}:3: ") and "\n" not in str(e.value) and e.value.reason == reason
    return str(e.value)


def test_content_parts_are_joined_in_every_turn(tmp_path):
    rng = random.Random(1)
    plain = [{"id": f"c{i}", "messages": _chat(rng, n_turns=2)} for i in range(4)]
    parted = [
        {"id": r["id"], "messages": [{**m, "content": _parts(m["content"], rng)} for m in r["messages"]]} for r in plain
    ]
    want = _samples(write_jsonl(tmp_path / "plain.jsonl", plain))
    got = _samples(write_jsonl(tmp_path / "parts.jsonl", parted))
    assert [_fields(s) for s in got] == [_fields(s) for s in want]
    assert all(isinstance(m["content"], str) for s in got for m in s.messages)


@pytest.mark.parametrize("kind", ["image_url", "input_audio"])
def test_a_part_that_is_not_text_is_refused_naming_its_type(tmp_path, kind):
    parts = [{"type": "text", "text": "what is this?"}, {"type": kind, kind: {"url": "x"}}]
    row = {"id": "z", "messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "a cat"}]}
    message = _refusal(tmp_path, row, "'messages[0].content[1]'", "bad_field")
    assert repr(kind) in message


def test_null_content_is_refused_naming_the_message(tmp_path):
    row = {"id": "z", "messages": [{"role": "system", "content": "hi"}, {"role": "user", "content": None}]}
    _refusal(tmp_path, row | {"response": "the fox"}, "field 'messages[1].content' is null", "bad_field")


def test_an_empty_responses_list_is_refused_not_dropped(tmp_path):
    """The row gave nothing to train on and vanished without a word; with on_error=skip it is counted."""
    _refusal(
        tmp_path, {"id": "z", "prompt": "the fox", "responses": []}, "'responses' is an empty list", "empty_response"
    )
    path = write_jsonl(tmp_path / "s.jsonl", make_rows(2, responses=1) + [{"id": "z", "prompt": "a", "responses": []}])
    assert len(_samples(path, on_error="skip")) == 2


@pytest.mark.parametrize("field", ["response", "responses"])
def test_a_final_assistant_message_and_a_response_field_is_refused(tmp_path, field):
    chat = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "ANSWER_A"}]
    row = {"id": "z", "messages": chat, field: "ANSWER_B" if field == "response" else ["ANSWER_B"]}
    message = _refusal(tmp_path, row, "two answers", "ambiguous_response")
    assert "'messages[1]'" in message and f"'{field}'" in message


def test_rows_without_id_get_the_prompt_hash_collect_gives(tmp_path):
    """Ids fix splits, sample ids and duplicates: a row without one gets collect's id for its prompt (the
    same prompt, the same id), and the rows of one prompt count as its samples 0, 1, ..."""
    rng = random.Random(2)
    chats = [_chat(rng) for _ in range(3)]
    order = [0, 1, 0, 2, 0, 1]
    rows = [{"messages": chats[i][:-1] + [{"role": "assistant", "content": sentence(rng, 4)}]} for i in order]
    rows.append({"prompt": "the fox", "response": "ran"})
    samples = _samples(write_jsonl(tmp_path / "c.jsonl", rows))
    want_ids = [hashlib.sha256(canonical(chats[i][:-1]).encode()).hexdigest()[:16] for i in order]
    want_ids.append(hashlib.sha256(canonical("the fox").encode()).hexdigest()[:16])
    assert [s.record_id for s in samples] == want_ids
    assert [s.response_index for s in samples] == [0, 0, 1, 0, 2, 1, 0]
    # read again (as eval re-reads the corpus), the same sample ids
    assert [s.sample_id for s in samples] == [s.sample_id for s in _samples(tmp_path / "c.jsonl")]


def test_rows_without_id_prepare_with_one_split_per_prompt(tok, tmp_path):
    rng = random.Random(3)
    prompts = [sentence(rng, 4) for _ in range(12)]
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": sentence(rng, 5)}]}
        for p in prompts
        for _ in range(3)
    ]
    m = prepare([write_jsonl(tmp_path / "c.jsonl", rows)], tok, tmp_path / "o", tiny_cfg(), progress=False)
    assert m["counts"]["samples"] == 36 and sum(s["prompts"] for s in m["splits"].values()) == 12


def test_an_empty_id_is_refused(tmp_path):
    _refusal(tmp_path, {"id": "", "prompt": "x", "response": "the fox"}, "field 'id' is empty", "bad_field")


def test_sharegpt_rows_are_chat_messages(tmp_path):
    rng = random.Random(4)
    native, share = [], []
    who = {"system": "system", "user": "human", "assistant": "gpt"}
    for i in range(5):
        chat = _chat(rng, n_turns=1 + i % 2)
        native.append({"id": f"g{i}", "messages": chat})
        share.append({"id": f"g{i}", "conversations": [{"from": who[m["role"]], "value": m["content"]} for m in chat]})
    want = _samples(write_jsonl(tmp_path / "native.jsonl", native))
    got = _samples(write_jsonl(tmp_path / "share.jsonl", share))
    assert [_fields(s) for s in got] == [_fields(s) for s in want]
    # ShareGPT's speaker names used as `messages` roles ('human', 'gpt') read as user and assistant turns
    named = [{"id": r["id"], "messages": [{**m, "role": who[m["role"]]} for m in r["messages"]]} for r in native]
    got = _samples(write_jsonl(tmp_path / "named.jsonl", named))
    assert [_fields(s) for s in got] == [_fields(s) for s in want]


@pytest.mark.parametrize(
    "turn,needle",
    [
        ({"from": "function_call", "value": "f()"}, "'conversations[1].from'"),
        ({"from": "gpt"}, "'conversations[1].value'"),
        ("gpt", "'conversations[1]'"),
    ],
)
def test_a_sharegpt_turn_that_is_not_text_chat_is_refused(tmp_path, turn, needle):
    row = {"id": "g", "conversations": [{"from": "human", "value": "hi"}, turn]}
    assert "ShareGPT" in _refusal(tmp_path, row, needle, "bad_field")


def test_alpaca_rows_are_one_user_message(tmp_path):
    rng = random.Random(5)
    alpaca, native = [], []
    for i in range(6):
        instruction, extra, output = sentence(rng, 4), sentence(rng, 3) if i % 2 else "", sentence(rng, 5)
        alpaca.append({"id": i, "instruction": instruction, "input": extra, "output": output})
        user = instruction + ("\n" + extra if extra else "")
        native.append({"id": i, "messages": [{"role": "user", "content": user}], "response": output})
    want = _samples(write_jsonl(tmp_path / "native.jsonl", native))
    got = _samples(write_jsonl(tmp_path / "alpaca.jsonl", alpaca))
    assert [_fields(s) for s in got] == [_fields(s) for s in want]
    _refusal(tmp_path, {"instruction": "x", "input": ""}, "missing field 'output' (Alpaca", "missing_field")


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_file_is_read_like_jsonl(tmp_path, indent):
    rows = make_rows(5, responses=2, seed=6)
    want = _samples(write_jsonl(tmp_path / "c.jsonl", rows))
    (tmp_path / "c.json").write_text(json.dumps(rows, indent=indent))
    got = _samples(tmp_path / "c.json")
    assert [_fields(s) for s in got] == [_fields(s) for s in want]
    assert got[2].where == f"{tmp_path / 'c.json'}:item 1"


def test_a_json_array_too_large_to_read_whole_is_refused(tmp_path, monkeypatch):
    (tmp_path / "c.json").write_text(json.dumps(make_rows(5, responses=1)))
    monkeypatch.setattr(corpus_files, "_MAX_JSON_ARRAY", 100)
    with pytest.raises(DataError, match=re.escape("is a JSON array") + ".*" + re.escape("one object per line (JSONL)")):
        _samples(tmp_path / "c.json", on_error="skip")


def test_a_top_level_finish_reason_counts(tok, tmp_path):
    rows = [
        {"id": "cut", "prompt": "the fox", "response": "the dog sat", "finish_reason": "length"},
        {"id": "stop", "prompt": "the fox", "response": "the dog sat", "finish_reason": "stop"},
        {"id": "both", "prompt": "the fox", "response": "the dog sat", "finish_reason": "length"}
        | {"meta": {"finish_reason": "stop"}},
    ]
    prepare([write_jsonl(tmp_path / "c.jsonl", rows)], tok, tmp_path / "o", tiny_cfg(), progress=False)
    pd = PreparedData(tmp_path / "o")
    ends = {
        r["record_id"]: int(r["tokens"][-1]) == tok.eos_token_id
        for s in pd.manifest["splits"]
        for r in pd.iter_split(s)
    }
    assert ends == {"cut": False, "stop": True, "both": True}


def test_openai_content_entries_under_top_logprobs_say_where_they_belong(tmp_path):
    entries = [{"token": "the fox", "logprob": -0.1, "top_logprobs": [{"token": "the fox", "logprob": -0.1}]}]
    row = {"id": "z", "prompt": "x", "response": "the fox", "top_logprobs": entries}
    assert "'logprobs'" in _refusal(tmp_path, row, "field 'top_logprobs[0]' is an OpenAI", "bad_logprobs")


def test_malformed_json_message_reads_once(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_rows(1, responses=1))
    with open(path, "a") as f:
        f.write('{"id": "z", "prompt": "cut')  # a last line cut short
    with pytest.raises(
        DataError, match=re.escape(f"{path}:2: malformed JSON (Unterminated string starting at column 23);")
    ):
        _samples(path)


def test_skipped_rows_and_truncations_are_summed_up_on_one_line(tok, tmp_path, capsys):
    bad = ["{not json", '{"id": "z", "prompt": "x"}', "[1]", '{"id": "y", "response": "the dog"}']
    rows = make_rows(3, responses=1) + [{"id": "long", "prompt": "the fox", "response": "the dog sat " * 40}]
    path = write_jsonl(tmp_path / "c.jsonl", rows, extra_lines=bad)
    m = prepare([path], tok, tmp_path / "o", tiny_cfg(on_error="skip", truncate=True), progress=False)
    assert m["counts"]["skipped_total"] == 4 and m["counts"]["truncated"] == 1
    lines = capsys.readouterr().out.splitlines()
    skip = [line for line in lines if "data.on_error=skip" in line]
    assert len(skip) == 1 and skip[0].startswith("prepare: skipped 4 bad rows")
    assert f"{path}:5 (malformed_json)" in skip[0] and f"{path}:6 (missing_field)" in skip[0]
    cut = [line for line in lines if "data.truncate" in line]
    assert len(cut) == 1 and "cut 1 response" in cut[0] and f"{path}:4" in cut[0]


def test_a_prompt_too_long_to_truncate_gets_advice_that_applies(tok, tmp_path):
    rows = make_rows(2, responses=1) + [{"id": "long", "prompt": "the dog sat " * 40, "response": "the fox"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{path}:3: the prompt of sample 'long'/0")) as e:
        prepare([path], tok, tmp_path / "o", tiny_cfg(truncate=True), progress=False)
    assert "data.truncate=True" not in str(e.value) and "raise data.seq_len" in str(e.value)
    assert "shorten or drop the prompt" in str(e.value) and e.value.reason == "too_long"


def test_bad_lines_are_all_reported_before_any_tokenising(tok, tmp_path, monkeypatch):
    def no_tokenising(*args):
        raise AssertionError("tokenised before the corpus was checked")

    monkeypatch.setattr(align.SampleEncoder, "encode_batch", no_tokenising)
    bad = ["{not json", '{"id": "z", "prompt": "x"}', '{"id": "p0-1", "prompt": "x", "response": "the dog"}']
    bad += ['{"id": "y", "response": "the dog"}'] * 4
    rows = make_rows(3, responses=1, logprobs=True, tokenizer=tok)
    path = write_jsonl(tmp_path / "c.jsonl", rows, extra_lines=bad)
    with pytest.raises(DataError) as e:
        prepare([path], tok, tmp_path / "o", tiny_cfg(), progress=False)
    message = str(e.value)
    assert message.startswith("7 bad lines in the corpus (the first 5 listed)") and "\n" not in message
    for line, needle in [(4, "malformed JSON"), (5, "missing field 'response'"), (6, "duplicate sample")]:
        assert f"{path}:{line}: {needle}" in message
    assert f"{path}:8: " in message and f"{path}:9: " not in message
    assert not (tmp_path / "o").exists()


def test_one_bad_line_keeps_its_own_sentence(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_rows(3, responses=1), extra_lines=["{not json"])
    with pytest.raises(DataError, match=re.escape(f"{path}:4: malformed JSON (Expecting property name")):
        prepare([path], tok, tmp_path / "o", tiny_cfg(), progress=False)
