"""Bad corpus content and unreadable corpus files: one DataError naming the file, line and field.

Each bad row fails `prepare` with a sentence naming `file:line` and the field (or is skipped and counted
with data.on_error=skip); a file that cannot be read at all (a cut-short or non-gzip `.jsonl.gz`, a
damaged parquet) is one DataError naming it, whatever data.on_error says.
"""

import gzip
import json
import math
import re

import pytest
from test_data_common import make_rows, make_tokenizer, tiny_cfg, write_jsonl

from proxykd_jax.data import DataError, prepare
from proxykd_jax.errors import ProxyKDError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _row(**fields):
    return json.dumps({"id": "z", "prompt": "x", "response": "the fox"} | fields)


ONE_ALT = [[{"token": "the fox", "logprob": -0.1}]]

BAD_ROWS = {
    "logprob-not-a-number": (
        _row(top_logprobs=[[{"token": "the", "logprob": "abc"}]]),
        "bad_logprobs",
        "field 'top_logprobs[0][0].logprob' is 'abc', not a number",
    ),
    "logprob-null-in-map": (_row(top_logprobs=[{"the": None}]), "bad_logprobs", "'top_logprobs[0]['the']' is None"),
    "logprob-positive": (
        _row(top_logprobs=[[{"token": "the", "logprob": 0.5}]]),
        "bad_logprobs",
        "log-prob 0.5, outside (-inf, 0]",
    ),
    "alternatives-summing-over-one": (  # log-probs rounded to one decimal: e^0 + e^-0.7 = 1.4966
        _row(
            tokens=["the fox"], top_logprobs=[[{"token": "the fox", "logprob": 0.0}, {"token": "the", "logprob": -0.7}]]
        ),
        "bad_logprobs",
        "teacher token 0 (its entry 0 of the top log-probs) have probabilities summing to 1.4966, more than 1",
    ),
    "position-not-a-list": (_row(top_logprobs=[5]), "bad_logprobs", "field 'top_logprobs[0]' is 5"),
    "top-logprobs-not-a-list": (_row(top_logprobs="x"), "bad_logprobs", "field 'top_logprobs' is 'x'"),
    "alternative-token-not-text": (
        _row(top_logprobs=[[{"token": 7, "logprob": -0.1}]]),
        "bad_logprobs",
        "'top_logprobs[0][0].token' is 7",
    ),
    "alternative-bytes-bad": (
        _row(top_logprobs=[[{"token": "the fox", "logprob": -0.1, "bytes": [256]}]]),
        "bad_logprobs",
        "'top_logprobs[0][0].bytes' is [256], not a list of byte values",
    ),
    "alternative-bytes-bool": (
        _row(top_logprobs=[[{"token": "the fox", "logprob": -0.1, "bytes": [True]}]]),
        "bad_logprobs",
        "'top_logprobs[0][0].bytes' is [True], not a list of byte values",
    ),
    "alternative-bytes-float": (
        _row(top_logprobs=[[{"token": "the fox", "logprob": -0.1, "bytes": [97, 1.5]}]]),
        "bad_logprobs",
        "'top_logprobs[0][0].bytes' is [97, 1.5], not a list of byte values",
    ),
    "alternative-bytes-negative": (
        _row(top_logprobs=[[{"token": "the fox", "logprob": -0.1, "bytes": [-1]}]]),
        "bad_logprobs",
        "'top_logprobs[0][0].bytes' is [-1], not a list of byte values",
    ),
    "alternative-bytes-text": (
        _row(top_logprobs=[[{"token": "the fox", "logprob": -0.1, "bytes": "abc"}]]),
        "bad_logprobs",
        "'top_logprobs[0][0].bytes' is 'abc', not a list of byte values",
    ),
    "tokens-not-a-list": (_row(top_logprobs=ONE_ALT, tokens=5), "bad_logprobs", "field 'tokens' is 5"),
    "tokens-wrong-length": (
        _row(top_logprobs=ONE_ALT, tokens=["the", " fox"]),
        "bad_logprobs",
        "'tokens' has 2 entries but 'top_logprobs' 1",
    ),
    "token-bytes-bad": (
        _row(top_logprobs=ONE_ALT, token_bytes=[["a"]]),
        "bad_logprobs",
        "'token_bytes[0]' is ['a'], not a list of byte values",
    ),
    "openai-entry-without-token": (
        _row(logprobs={"content": [{"tok": "the"}]}),
        "bad_logprobs",
        "'logprobs.content[0]' is {'tok': 'the'}; each entry needs 'token' and 'logprob'",
    ),
    "openai-logprob-not-a-number": (
        _row(logprobs={"content": [{"token": "the fox", "logprob": None}]}),
        "bad_logprobs",
        "'logprobs.content[0].logprob' is None",
    ),
    "openai-not-the-layout": (_row(logprobs={"content": 3}), "bad_logprobs", "'logprobs' must follow the OpenAI"),
    "openai-list-shorter-than-responses": (
        json.dumps(
            {
                "id": "z",
                "prompt": "x",
                "responses": ["the fox", "a dog"],
                "logprobs": [{"content": [{"token": "the fox", "logprob": -0.1}]}],
            }
        ),
        "bad_logprobs",
        "'logprobs' must be a list with one entry (or null) per response (2)",
    ),
    "top-logprobs-shorter-than-responses": (
        json.dumps({"id": "z", "prompt": "x", "responses": ["the fox", "a dog"], "top_logprobs": ONE_ALT}),
        "bad_logprobs",
        "'top_logprobs' must be a list with one entry (or null) per response (2)",
    ),
    "sample-index-not-an-integer": (_row(sample_index="x"), "bad_field", "field 'sample_index' is 'x'"),
    "meta-not-an-object": (_row(meta="x"), "bad_field", "field 'meta' is 'x', not an object"),
    "prompt-not-text": (_row(prompt=["x"]), "bad_field", "field 'prompt' is ['x'], not a string"),
    "chat-with-only-the-assistant": (
        json.dumps({"id": "z", "messages": [{"role": "assistant", "content": "the fox"}]}),
        "missing_field",
        "'messages' holds no message before the response",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_one_sentence_naming_line_and_field_or_skipped(tok, tmp_path, case):
    line, reason, needle = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "c.jsonl", make_rows(2, responses=1), extra_lines=[line])
    with pytest.raises(DataError, match=re.escape(needle)) as e:
        prepare([path], tok, tmp_path / "o", tiny_cfg(), progress=False)
    assert str(e.value).startswith(f"{path}:3: ") and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists() and len(list(tmp_path.iterdir())) == 1  # nothing left behind
    m = prepare([path], tok, tmp_path / "o", tiny_cfg(on_error="skip"), progress=False)
    assert m["counts"]["skipped"] == {reason: 1} and m["counts"]["samples"] == 2
    assert needle in m["counts"]["errors"][0]


def test_chat_template_refusal_is_a_row_error(tok, tmp_path):
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    try:
        rows = make_rows(2, responses=1) + [
            {"id": "z", "messages": [{"role": "user", "content": "hi"}], "response": "the fox"}
        ]
        path = write_jsonl(tmp_path / "c.jsonl", rows)
        with pytest.raises(DataError, match="roles must alternate") as e:
            prepare([path], tok, tmp_path / "o", tiny_cfg(), progress=False)
        assert str(e.value).startswith(f"{path}:3: the tokenizer's chat template cannot format")
        m = prepare([path], tok, tmp_path / "o", tiny_cfg(on_error="skip"), progress=False)
        assert m["counts"]["skipped"] == {"bad_messages": 1} and m["counts"]["samples"] == 2
    finally:
        tok.chat_template = None


def _cut_gzip(path):
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in make_rows(40, responses=1)))
    path.write_bytes(data[: len(data) * 2 // 3])


BAD_FILES = {
    "gzip-cut-short": ("c.jsonl.gz", _cut_gzip, "cannot be read as gzip after line"),
    "not-gzip": ("c.jsonl.gz", lambda p: p.write_text(_row() + "\n"), "cannot be read as gzip"),
    "empty-gzip-member": ("c.jsonl.gz", lambda p: p.write_bytes(b"\x1f\x8b"), "cannot be read as gzip"),
    "not-parquet": ("c.parquet", lambda p: p.write_bytes(b"not a parquet file"), "cannot be read as parquet"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("on_error", ["error", "skip"])
def test_unreadable_file_is_one_error_naming_it(tok, tmp_path, case, on_error):
    name, make, needle = BAD_FILES[case]
    make(tmp_path / name)
    with pytest.raises(ProxyKDError, match=re.escape(needle)) as e:
        prepare([tmp_path / name], tok, tmp_path / "o", tiny_cfg(on_error=on_error), progress=False)
    assert isinstance(e.value, DataError) and e.value.reason == "unreadable_file"
    assert str(e.value).startswith(f"{tmp_path / name}: ") and "data.corpus" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing left behind


def test_alternatives_a_rounding_past_one_are_kept(tok, tmp_path):
    """Top log-probs whose probabilities sum a little past 1 (an API's rounding: here 1.005) are read as given;
    past `align._MASS_SLACK` the row is refused (above)."""
    alts = [{"token": "the fox", "logprob": math.log(0.905)}, {"token": "the", "logprob": math.log(0.1)}]
    path = write_jsonl(tmp_path / "c.jsonl", [], extra_lines=[_row(tokens=["the fox"], top_logprobs=[alts])])
    m = prepare([path], tok, tmp_path / "o", tiny_cfg(), progress=False)
    assert m["counts"]["samples"] == 1 and not m["counts"].get("skipped")
