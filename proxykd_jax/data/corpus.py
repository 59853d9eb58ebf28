"""Teacher-corpus rows as `Sample`s, and `iter_corpus`, which streams a whole corpus as such.

A corpus row is one prompt with one or more teacher responses (see docs/DATA_FORMATS.md); each becomes
`Sample`s, one per response. ShareGPT (`conversations`) and Alpaca (`instruction`, `input`, `output`) rows
are read as chat `messages`. Bad rows raise `DataError` naming the file and line; with `on_error="skip"`
they are counted in a `Counter` and skipped instead.

Reading the files (JSONL, gzipped JSONL, `.json` arrays, parquet, local Hugging Face folders) is
`corpus_files.py`'s, the teacher's log-probs `corpus_logprobs.py`'s, `DataError` and the wording of a bad
row `corpus_errors.py`'s.
"""

import collections
import dataclasses
import hashlib
from collections.abc import Iterator

from proxykd_jax.data.corpus_errors import DataError, _bad, _show
from proxykd_jax.data.corpus_files import expand_paths, iter_rows
from proxykd_jax.data.corpus_logprobs import _logprobs_of
from proxykd_jax.teacher.prompts import canonical

_INT63 = (1 << 63) - 1


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
