"""Teacher-corpus readers: JSONL (optionally gzipped), parquet and local Hugging Face folders.

A corpus row is one prompt with one or more teacher responses (see docs/DATA_FORMATS.md). Readers
stream rows one at a time and turn each into `Sample`s, one per response; ShareGPT (`conversations`)
and Alpaca (`instruction`, `input`, `output`) rows are read as chat `messages`, and a `.json` file
holding a JSON array as its items. Bad rows raise `DataError` naming the file and line; with
`on_error="skip"` they are counted in a `Counter` and skipped instead.
"""

import collections
import dataclasses
import functools
import gzip
import hashlib
import itertools
import json
import math
import os
import pathlib
import zlib
from collections.abc import Iterator
from typing import Any

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.teacher.prompts import canonical

_INT63 = (1 << 63) - 1
_MAX_JSON_ARRAY = 64 << 20  # a `.json` file holding a JSON array is read whole (several times its size in memory)


class DataError(ProxyKDError):
    """Bad input data; the message names the file and the line or sample id."""

    def __init__(self, message: str, reason: str = "bad_row"):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class Sample:
    """One teacher response to one prompt, before tokenisation."""

    where: str  # "file:line" for messages
    record_id: str  # the corpus row's `id` (the prompt id)
    response_index: int  # which response of the row
    prompt: str | None  # plain-text prompt, or None when `messages` is given
    messages: list | None  # chat messages before the response, or None
    response: str
    teacher_tokens: list[str] | None  # the teacher's sampled token strings, when given
    teacher_alts: list[list[tuple[str, float]]] | None  # per teacher token: (token, logprob) alternatives
    meta: dict
    # The true bytes of each teacher token and of each alternative (parallel to the above; None where
    # the corpus gives none: then the strings' bytes are used, `bytes:\xNN` spellings read as bytes).
    teacher_token_bytes: list[bytes | None] | None = None
    teacher_alt_bytes: list[list[bytes | None]] | None = None

    @property
    def prompt_key(self) -> int:
        return stable_int63(self.record_id)

    @property
    def sample_id(self) -> int:
        return stable_int63(f"{self.record_id}\x00{self.response_index}")


def stable_int63(text: str) -> int:
    """A stable non-negative int64 from a string (blake2b), the same on every host and run."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _INT63


def _is_hf_folder(path: pathlib.Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists()
    )


def expand_paths(paths) -> list[pathlib.Path]:
    """Files and folders to read, in a stable order; plain folders contribute their corpus files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in map(pathlib.Path, paths):
        if not p.exists():
            raise DataError(
                f"{p}: corpus path does not exist; pass JSONL, parquet or a datasets folder.", "missing_file"
            )
        if p.is_dir() and not _is_hf_folder(p):
            found = sorted(q for q in p.rglob("*") if q.is_file() and _corpus_kind(q))
            if not found:
                raise DataError(
                    f"{p}: folder holds no .jsonl/.jsonl.gz/.parquet files nor a datasets folder.", "missing_file"
                )
            out.extend(found)
        else:
            out.append(p)
    return out


def _corpus_kind(path: pathlib.Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def _unreadable(path: pathlib.Path, err: BaseException, after: str = "") -> DataError:
    detail = " ".join(str(err).split()) or type(err).__name__
    return DataError(
        f"{path}: the file cannot be read{after} ({detail}); re-create or re-download it, or remove it from "
        "data.corpus.",
        "unreadable_file",
    )


def iter_rows(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
    """Yields (where, row dict or DataError) for every row of one corpus file or datasets folder.

    A file that cannot be read (not gzip, cut short, not parquet) raises one DataError naming it."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel

    if _is_hf_folder(path):
        import datasets  # pylint: disable=import-outside-toplevel

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001  # datasets raises many kinds for a damaged folder
            raise _unreadable(path, e) from None
        parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [("", ds)]
        try:
            for part, d in parts:
                for i, row in enumerate(d):
                    yield f"{path}{'/' + part if part else ''}:row {i}", row
        except (OSError, pa.ArrowException) as e:
            raise _unreadable(path, e) from None
        return
    kind = _corpus_kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

        i = 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    yield f"{path}:row {i}", row
                    i += 1
        except (OSError, pa.ArrowException) as e:
            raise _unreadable(path, e, f" as parquet after row {i - 1}" if i else " as parquet") from None
        return
    if kind != "jsonl":
        raise DataError(
            f"{path}: unknown corpus format; use .jsonl, .jsonl.gz, .parquet or a datasets folder.", "missing_file"
        )
    if _is_json_array(path):
        yield from _json_array_rows(path)
        return
    lines = [0]  # lines read so far, for the message when the file breaks off
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            yield from _jsonl_rows(path, f, lines)
    except (OSError, EOFError, zlib.error) as e:  # not gzip, cut short, unreadable
        how = " as gzip" if path.suffix == ".gz" else ""
        raise _unreadable(path, e, f"{how} after line {lines[0]}" if lines[0] else how) from None


def _is_json_array(path: pathlib.Path) -> bool:
    """Whether a `.json` file holds a JSON array (a JSONL file's lines are objects)."""
    if not path.name.lower().endswith(".json"):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False  # reported by the JSONL reader
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")


def _json_array_rows(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
    """(where, row or DataError) of each item of a `.json` file holding a JSON array, read whole."""
    size = path.stat().st_size
    if size > _MAX_JSON_ARRAY:
        raise DataError(
            f"{path}: the file is a JSON array of {size / (1 << 20):.0f} MiB, too large to read whole; write "
            f"one object per line (JSONL), e.g. `jq -c '.[]' {path.name} > {path.stem}.jsonl`.",
            "malformed_json",
        )
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: byte 0x{e.object[e.start]:02x} at byte offset {e.start} is not UTF-8 text; save the file as "
            "UTF-8.",
            "bad_encoding",
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: malformed JSON in the file's JSON array ({_json_problem(e)}); fix it, or write "
            "one object per line (JSONL).",
            "malformed_json",
        ) from None
    for i, row in enumerate(items):
        where = f"{path}:item {i}"
        if not isinstance(row, dict):
            yield where, DataError(f"{where}: an item of a corpus JSON array must be a JSON object.", "malformed_json")
            continue
        yield where, row


def _json_problem(e: json.JSONDecodeError) -> str:
    # json's messages end in "at" where it gives the position ("Unterminated string starting at")
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _jsonl_rows(path: pathlib.Path, f, lines: list[int]) -> Iterator[tuple[str, Any]]:
    offset = 0  # byte offset of the line's start (in the decompressed stream for .gz)
    for n, raw in enumerate(f, start=1):
        lines[0] = n
        start, offset = offset, offset + len(raw)
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            yield (
                where,
                DataError(
                    f"{where}: byte 0x{raw[e.start]:02x} at byte offset {start + e.start} is not UTF-8 text; "
                    "save the file as UTF-8, or fix or remove the line, or set data.on_error=skip.",
                    "bad_encoding",
                ),
            )
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield (
                where,
                DataError(
                    f"{where}: malformed JSON ({_json_problem(e)}); fix or remove the line, or set data.on_error=skip.",
                    "malformed_json",
                ),
            )
            continue
        if not isinstance(row, dict):
            yield where, DataError(f"{where}: a corpus line must be a JSON object.", "malformed_json")
            continue
        yield where, row


_FIX = "fix or remove the line, or set data.on_error=skip"


def without_advice(message: str) -> str:
    """A bad row's sentence without the advice each one ends with (for a list of several)."""
    return message.removesuffix(f"; {_FIX}.").rstrip(".") + "."


def _show(value) -> str:
    """A short description of a bad value for a message."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _bad(where: str, field: str, problem: str, reason: str = "bad_logprobs") -> DataError:
    return DataError(f"{where}: field '{field}' {problem}; {_FIX}.", reason)


_MAX_LOGPROB = 1e-4  # log-probs up to this are accepted (rounding in an API's output)


def _logprob(value, where: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(where, field, f"is {_show(value)}, not a number (a log-probability)")
    value = float(value)
    if math.isnan(value) or value > _MAX_LOGPROB:
        raise _bad(where, field, f"holds the log-prob {value}, outside (-inf, 0]")
    return value


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, field, f"is {_show(value)}, not a string (a token's text)")
    return value


def _raw_bytes(value, where: str, field: str) -> bytes | None:
    """A token's true bytes (a list of ints 0-255), or None when not given."""
    if value is None:
        return None
    try:  # bytes() checks every value is an int in 0-255 (in C: one of these per teacher alternative)
        if not isinstance(value, list) or bool in set(map(type, value)):
            raise TypeError
        return bytes(value)
    except (TypeError, ValueError):
        raise _bad(where, field, f"is {_show(value)}, not a list of byte values 0-255") from None


def _list(value, where: str, field: str, what: str) -> list:
    if not isinstance(value, list):
        raise _bad(where, field, f"is {_show(value)}; it must be a list {what}")
    return value


def _alts_of(entries, where: str, field: str) -> tuple[list[tuple[str, float]], list[bytes | None]]:
    """One position's alternatives and their true bytes (None where not given), from a list of
    {token, logprob, bytes?} or a {token: logprob} map."""
    if entries is None:
        return [], []
    if isinstance(entries, dict):
        alts = [(_text(t, where, field), _logprob(lp, where, f"{field}[{t!r}]")) for t, lp in entries.items()]
        return alts, [None] * len(alts)
    _list(entries, where, field, "of {token, logprob} objects or a {token: logprob} object")
    fast = _well_formed_alts(entries)
    if fast is not None:
        return fast
    alts, raws = [], []
    for j, e in enumerate(entries):
        if not isinstance(e, dict) or "token" not in e or "logprob" not in e:
            raise _bad(where, f"{field}[{j}]", f"is {_show(e)}; each alternative needs 'token' and 'logprob'")
        alts.append(
            (_text(e["token"], where, f"{field}[{j}].token"), _logprob(e["logprob"], where, f"{field}[{j}].logprob"))
        )
        raws.append(_raw_bytes(e.get("bytes"), where, f"{field}[{j}].bytes"))
    return alts, raws


def _well_formed_alts(entries: list) -> tuple[list[tuple[str, float]], list[bytes | None]] | None:
    """`_alts_of` for a list of alternatives that pass a few whole-list checks (each a dict with a string
    token, a float log-prob in range and bytes absent or a list of byte values); None when any may be
    malformed: then `_alts_of` checks them one by one and names the first problem. (A position of a
    corpus with top-20 log-probs has 20 alternatives; checked one by one they took a third of prepare.)"""
    if set(map(type, entries)) != {dict}:
        return None
    try:
        texts = [e["token"] for e in entries]
        logprobs = [e["logprob"] for e in entries]
    except KeyError:
        return None
    if (
        set(map(type, texts)) != {str}
        or set(map(type, logprobs)) != {float}
        or any(map(math.isnan, logprobs))
        or max(logprobs) > _MAX_LOGPROB
    ):
        return None
    lists = [e.get("bytes") for e in entries]
    kinds = set(map(type, lists))
    if kinds == {type(None)}:
        return list(zip(texts, logprobs)), lists
    if not kinds <= {list, type(None)}:
        return None
    try:
        raws = [None if r is None else bytes(r) for r in lists]
    except (TypeError, ValueError):
        return None
    # bytes() reads False and True as 0 and 1, which _raw_bytes refuses: looked for where those bytes occur.
    given = b"".join(filter(None, raws))
    if b"\x00" in given or b"\x01" in given:
        values = itertools.chain.from_iterable(filter(None, lists))
        if bool in set(map(type, values)):
            return None
    return list(zip(texts, logprobs)), raws


@dataclasses.dataclass
class _TeacherLogprobs:
    tokens: list[str] | None
    token_bytes: list[bytes | None] | None
    alts: list[list[tuple[str, float]]]
    alt_bytes: list[list[bytes | None]]


def _openai_logprobs(content, where: str, field: str) -> _TeacherLogprobs:
    content = content.get("content") if isinstance(content, dict) else content
    if not isinstance(content, list):
        raise _bad(where, field, "must follow the OpenAI layout {'content': [{token, logprob, top_logprobs}, ...]}")
    tokens, token_bytes, alts, alt_bytes = [], [], [], []
    for i, c in enumerate(content):
        at = f"{field}.content[{i}]"
        if not isinstance(c, dict) or "token" not in c or "logprob" not in c:
            raise _bad(where, at, f"is {_show(c)}; each entry needs 'token' and 'logprob'")
        token, logprob = _text(c["token"], where, f"{at}.token"), _logprob(c["logprob"], where, f"{at}.logprob")
        raw = _raw_bytes(c.get("bytes"), where, f"{at}.bytes")
        pos, pos_bytes = _alts_of(c.get("top_logprobs"), where, f"{at}.top_logprobs")
        if not pos:
            pos, pos_bytes = [(token, logprob)], [raw]
        tokens.append(token)
        token_bytes.append(raw)
        alts.append(pos)
        alt_bytes.append(pos_bytes)
    return _TeacherLogprobs(tokens, token_bytes, alts, alt_bytes)


def _per_response(row: dict, key: str, idx: int, n_resp: int, where: str):
    """(field name, value) of `key` for response `idx`: with `responses`, the list's entry `idx`."""
    value = row.get(key)
    if "responses" not in row or value is None:
        return key, value
    if not isinstance(value, list) or len(value) != n_resp:
        raise _bad(
            where, key, f"must be a list with one entry (or null) per response ({n_resp}) when 'responses' is given"
        )
    return f"{key}[{idx}]", value[idx]


def _logprobs_of(row: dict, idx: int, n_resp: int, where: str) -> _TeacherLogprobs | None:
    """The teacher's tokens, their bytes and alternatives for response `idx` (None when not given),
    from either accepted layout."""
    lp = row.get("logprobs")
    if lp is not None and not isinstance(lp, (dict, list)):
        raise _bad(where, "logprobs", f"is {_show(lp)}; it must follow the OpenAI layout {{'content': [...]}}")
    if lp:
        if "responses" in row and isinstance(lp, list):
            field, content = _per_response(row, "logprobs", idx, n_resp, where)
            return None if content is None else _openai_logprobs(content, where, field)
        return _openai_logprobs(lp, where, "logprobs")
    field, top = _per_response(row, "top_logprobs", idx, n_resp, where)
    if top is None:
        return None
    _list(top, where, field, "with one entry per teacher token")
    alts, alt_bytes = [], []
    for i, pos in enumerate(top):
        if isinstance(pos, dict) and "token" in pos and "logprob" in pos:  # not a {token: logprob} map
            raise _bad(
                where,
                f"{field}[{i}]",
                "is an OpenAI `logprobs.content` entry {token, logprob, top_logprobs}: put that list under "
                "'logprobs' as {'content': [...]} ('top_logprobs' holds one list of alternatives per teacher token)",
            )
        a, b = _alts_of(pos, where, f"{field}[{i}]")
        alts.append(a)
        alt_bytes.append(b)
    per_token = functools.partial(_per_token, row, idx, n_resp, where, field, len(alts))
    tokens = per_token("tokens", _text, "of token strings")
    token_bytes = per_token("token_bytes", _raw_bytes, "of byte lists")
    return _TeacherLogprobs(tokens, token_bytes, alts, alt_bytes)


def _per_token(row: dict, idx: int, n_resp: int, where: str, field: str, n: int, key: str, parse, what: str):
    """`key`'s list for response `idx`, one entry per teacher token (as many as `field` has, `n`), each
    read by `parse(value, where, field)`; None when the row does not give it."""
    kfield, values = _per_response(row, key, idx, n_resp, where)
    if values is None:
        return None
    _list(values, where, kfield, f"{what}, parallel to 'top_logprobs'")
    out = [parse(v, where, f"{kfield}[{i}]") for i, v in enumerate(values)]
    if len(out) != n:
        raise _bad(where, kfield, f"has {len(out)} entries but '{field}' {n}")
    return out


# ShareGPT's speakers (`from`) as chat roles
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _as_chat(row: dict, where: str) -> dict:
    """A ShareGPT (`conversations`) or Alpaca (`instruction`, `input`, `output`) row in the native layout,
    its turns as chat `messages`; any other row as it is."""
    if "conversations" in row and "messages" not in row and "prompt" not in row:
        turns = row["conversations"]
        if not isinstance(turns, list):
            raise _bad(where, "conversations", f"is {_show(turns)}, not a list of ShareGPT turns", "bad_field")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise _bad(
                    where, f"conversations[{i}]", f"is {_show(turn)}, not a ShareGPT turn {{from, value}}", "bad_field"
                )
            speaker = turn.get("from")
            if not isinstance(speaker, str) or speaker not in _SHAREGPT_ROLES:
                raise _bad(
                    where,
                    f"conversations[{i}].from",
                    f"is {_show(speaker)}; a ShareGPT turn is from 'system', 'human' or 'gpt'",
                    "bad_field",
                )
            if not isinstance(turn.get("value"), str):
                raise _bad(
                    where,
                    f"conversations[{i}].value",
                    f"is {_show(turn.get('value'))}, not a ShareGPT turn's text",
                    "bad_field",
                )
            messages.append({"role": _SHAREGPT_ROLES[speaker], "content": turn["value"]})
        return {**row, "messages": messages}
    if "instruction" in row and not {"prompt", "messages", "conversations"} & row.keys():
        if "output" not in row:
            raise DataError(
                f"{where}: missing field 'output' (Alpaca rows give 'instruction', 'input' and 'output').",
                "missing_field",
            )
        for key in ("instruction", "input", "output"):
            if (key != "input" or row.get(key) is not None) and not isinstance(row.get(key), str):
                raise _bad(where, key, f"is {_show(row.get(key))}, not a string", "bad_field")
        user = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
        return {**row, "messages": [{"role": "user", "content": user}], "response": row["output"]}
    return row


def _text_of(content, where: str, field: str) -> str:
    """A message's text: a string, or OpenAI content parts `[{"type": "text", "text": ...}]` joined as
    `serve` joins them (teacher/api.py)."""
    if isinstance(content, str):
        return content
    what = "not the message's text (a string or a list of text parts)"
    if not isinstance(content, list):
        raise _bad(where, field, f"is {'null' if content is None else _show(content)}, {what}", "bad_field")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind not in (None, "text"):
            raise _bad(where, f"{field}[{j}]", f"is a {kind!r} part; only text can be trained on", "bad_field")
        else:
            raise _bad(
                where,
                f"{field}[{j}]",
                f"is {_show(part)}, not a text part {{'type': 'text', 'text': ...}}",
                "bad_field",
            )
    return "".join(texts)


def _messages_of(messages, where: str) -> list:
    """`messages` checked, each content as its text (a new list where any content was not a string)."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages
    ):
        raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects.", "missing_field")
    out = messages
    for i, m in enumerate(messages):
        role = _SHAREGPT_ROLES.get(m["role"], m["role"])
        if not isinstance(m["content"], str) or role != m["role"]:  # ShareGPT's speaker names as roles: read as such
            out = list(out) if out is messages else out
            out[i] = {**m, "role": role, "content": _text_of(m["content"], where, f"messages[{i}].content")}
    return out


def _prompt_id(prompt, messages: list | None) -> str:
    """The id `collect` gives a prompt without one (teacher/prompts.py): a hash of the prompt, so the rows of
    one prompt share it (one split, one prompt key)."""
    content = str(prompt) if messages is None else [{"role": m["role"], "content": m["content"]} for m in messages]
    return hashlib.sha256(canonical(content).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _sample_index(row: dict, where: str) -> int:
    value = row.get("sample_index")
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():  # parquet written from pandas: ints with nulls are floats
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(where, "sample_index", f"is {_show(value)}, not a non-negative integer", "bad_field")
    return value


def samples_of_row(row: dict, where: str, logprobs: bool = True) -> list[Sample]:
    """Turns one corpus row into samples (one per response); raises DataError on a bad row. With
    `logprobs=False` the teacher's log-probs are neither read nor checked (half the time of a row with them)."""
    row = _as_chat(row, where)
    rid = row.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int, type(None))):
        raise DataError(
            f"{where}: field 'id' is a {type(rid).__name__}; a prompt id must be a string or an integer.", "bad_field"
        )
    if rid == "":
        raise _bad(
            where,
            "id",
            "is empty; give the prompt id, or leave the field out for one made from the prompt",
            "bad_field",
        )
    messages, prompt = row.get("messages"), row.get("prompt")
    if messages is not None:
        messages = _messages_of(messages, where)
    answer = bool(messages) and messages[-1]["role"] == "assistant"
    given = next((key for key in ("responses", "response") if row.get(key) is not None), None)
    if answer and given:
        raise DataError(
            f"{where}: the row gives two answers, the final assistant message 'messages[{len(messages) - 1}]' and "
            f"'{given}'; keep one of them, or set data.on_error=skip.",
            "ambiguous_response",
        )
    if given == "responses":
        responses, resp_field = row["responses"], "responses[{}]"
        if not isinstance(responses, list):
            raise DataError(f"{where}: 'responses' must be a list of strings.", "missing_field")
        if not responses:  # a row that gives nothing to train on: said, not silently dropped
            raise DataError(
                f"{where}: 'responses' is an empty list; give the prompt's responses, or remove the line, or set "
                "data.on_error=skip.",
                "empty_response",
            )
    elif given == "response":
        responses, resp_field = [row["response"]], "response"
    elif answer:
        responses, messages = [messages[-1]["content"]], messages[:-1]
        resp_field = f"messages[{len(messages)}].content"
    else:
        raise DataError(
            f"{where}: missing field 'response' (or 'responses', or a final assistant message).", "missing_field"
        )
    if messages is None and prompt is None:
        raise DataError(f"{where}: missing field 'prompt' (or chat 'messages').", "missing_field")
    if messages is not None and not messages:
        if prompt is None:  # a chat template cannot format an empty conversation
            raise DataError(
                f"{where}: 'messages' holds no message before the response; add the prompt (a user message) "
                "before it, or remove the line, or set data.on_error=skip.",
                "missing_field",
            )
        messages = None  # the plain `prompt` is the prompt
    if messages is None and (not isinstance(prompt, (str, int, float)) or isinstance(prompt, bool)):
        raise _bad(where, "prompt", f"is {_show(prompt)}, not a string", "bad_field")
    rid = _prompt_id(prompt, messages) if rid is None else str(rid)
    meta = row.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise _bad(where, "meta", f'is {_show(meta)}, not an object (e.g. {{"teacher_model": ...}})', "bad_field")
    meta = dict(meta or {})
    for key in ("teacher_model", "model", "temperature", "finish_reason"):  # as API records give them
        if key in row and key not in meta:
            meta[key] = row[key]
    out = []
    # One line per (prompt, sample), as `collect` writes: `sample_index` numbers the prompt's samples.
    first_index = _sample_index(row, where) if len(responses) == 1 else 0
    for i, resp in enumerate(responses, start=first_index):
        if not isinstance(resp, str):
            raise _bad(where, resp_field.format(i - first_index), f"is {_show(resp)}, not a string", "bad_field")
        if not resp.strip():
            raise DataError(f"{where}: empty response (index {i}) for id {rid!r}.", "empty_response")
        lp = _logprobs_of(row, i - first_index, len(responses), where) if logprobs else None
        out.append(
            Sample(
                where=where,
                record_id=rid,
                response_index=i,
                prompt=None if messages is not None else str(prompt),
                messages=messages,
                response=resp,
                teacher_tokens=None if lp is None else lp.tokens,
                teacher_alts=None if lp is None else lp.alts,
                meta=meta,
                teacher_token_bytes=None if lp is None else lp.token_bytes,
                teacher_alt_bytes=None if lp is None else lp.alt_bytes,
            )
        )
    return out


def iter_corpus(
    paths,
    on_error: str,
    skipped: collections.Counter,
    errors: list[DataError] | None = None,
    max_errors: int = 20,
    logprobs: bool = True,
) -> Iterator[list[Sample]]:
    """Streams the corpus row by row as lists of samples (one per response).

    With on_error="error" a bad row raises its DataError; with "skip" it is counted in `skipped` by
    reason, its DataError kept in `errors` (the first `max_errors`), and it is dropped. The rows of a prompt
    given without `id` nor `sample_index` are its samples 0, 1, ... in the order read (one int per such
    prompt is kept to count them). `logprobs=False` leaves the teacher's log-probs unread (`samples_of_row`).
    """
    if on_error not in ("error", "skip"):
        raise ValueError(f"data.on_error must be 'error' or 'skip', got {on_error!r}.")
    numbered: dict[int, int] = {}  # samples so far of each prompt given without `id` nor `sample_index`
    for path in expand_paths(paths):
        for where, row in iter_rows(path):
            try:
                if isinstance(row, DataError):
                    raise row
                samples = samples_of_row(row, where, logprobs)
            except DataError as e:
                if on_error == "error":
                    raise
                skipped[e.reason] += 1
                if errors is not None and len(errors) < max_errors:
                    errors.append(e)
                continue
            if samples and row.get("id") is None and row.get("sample_index") is None:
                first = numbered.get(samples[0].prompt_key, 0)
                numbered[samples[0].prompt_key] = first + len(samples)
                for s in samples:
                    s.response_index += first
            yield samples
