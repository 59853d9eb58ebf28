"""Teacher-corpus readers: JSONL (optionally gzipped), parquet and local Hugging Face folders.

A corpus row is one prompt with one or more teacher responses (see docs/DATA_FORMATS.md). Readers
stream rows one at a time and turn each into `Sample`s, one per response. Bad rows raise
`DataError` naming the file and line; with `on_error="skip"` they are counted in a `Counter` and
skipped instead.
"""

import collections
import dataclasses
import gzip
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Iterator
from typing import Any

from proxykd_jax.errors import ProxyKDError

_INT63 = (1 << 63) - 1


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


def iter_rows(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
    """Yields (where, row dict or DataError) for every row of one corpus file or datasets folder."""
    if _is_hf_folder(path):
        import datasets  # pylint: disable=import-outside-toplevel

        ds = datasets.load_from_disk(str(path))
        parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [("", ds)]
        for part, d in parts:
            for i, row in enumerate(d):
                yield f"{path}{'/' + part if part else ''}:row {i}", row
        return
    kind = _corpus_kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield f"{path}:row {i}", row
                i += 1
        return
    if kind != "jsonl":
        raise DataError(
            f"{path}: unknown corpus format; use .jsonl, .jsonl.gz, .parquet or a datasets folder.", "missing_file"
        )
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        offset = 0  # byte offset of the line's start (in the decompressed stream for .gz)
        for n, raw in enumerate(f, start=1):
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
                        f"{where}: malformed JSON ({e.msg} at column {e.colno}); fix or "
                        "remove the line, or set data.on_error=skip.",
                        "malformed_json",
                    ),
                )
                continue
            if not isinstance(row, dict):
                yield where, DataError(f"{where}: a corpus line must be a JSON object.", "malformed_json")
                continue
            yield where, row


def _alts_of(entries, where: str) -> list[tuple[str, float]]:
    """Normalises one position's alternatives: a list of {token, logprob} or a {token: logprob} map."""
    if isinstance(entries, dict):
        return [(str(t), float(lp)) for t, lp in entries.items()]
    out = []
    for e in entries or []:
        if not isinstance(e, dict) or "token" not in e or "logprob" not in e:
            raise DataError(f"{where}: each top_logprobs entry needs 'token' and 'logprob'.", "bad_logprobs")
        out.append((str(e["token"]), float(e["logprob"])))
    return out


def _logprobs_of(row: dict, idx: int, n_resp: int, where: str):
    """(teacher tokens | None, alternatives | None) for response `idx`, from either accepted layout."""
    many = "responses" in row
    lp = row.get("logprobs")
    if isinstance(lp, (dict, list)) and lp:
        content = lp[idx] if many and isinstance(lp, list) else lp
        content = content.get("content") if isinstance(content, dict) else content
        if not isinstance(content, list):
            raise DataError(f"{where}: 'logprobs' must follow the OpenAI layout {{'content': [...]}}.", "bad_logprobs")
        tokens = [str(c["token"]) for c in content]
        alts = [_alts_of(c.get("top_logprobs"), where) or [(str(c["token"]), float(c["logprob"]))] for c in content]
        return tokens, alts
    top = row.get("top_logprobs")
    if top is None:
        return None, None
    toks = row.get("tokens")
    if many:
        if not isinstance(top, list) or len(top) != n_resp:
            raise DataError(
                f"{where}: with 'responses', 'top_logprobs' must be a list with one entry per response.", "bad_logprobs"
            )
        top = top[idx]
        toks = toks[idx] if isinstance(toks, list) and len(toks) == n_resp else None
        if top is None:
            return None, None
    if not isinstance(top, list):
        raise DataError(f"{where}: 'top_logprobs' must be a list with one entry per teacher token.", "bad_logprobs")
    alts = [_alts_of(pos, where) for pos in top]
    if toks is not None and len(toks) != len(alts):
        raise DataError(f"{where}: 'tokens' has {len(toks)} entries but 'top_logprobs' {len(alts)}.", "bad_logprobs")
    return ([str(t) for t in toks] if toks is not None else None), alts


def samples_of_row(row: dict, where: str) -> list[Sample]:
    """Turns one corpus row into samples (one per response); raises DataError on a bad row."""
    if row.get("id") is None or str(row["id"]) == "":
        raise DataError(f"{where}: missing field 'id' (the prompt id).", "missing_field")
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
        raise DataError(
            f"{where}: field 'id' is a {type(row['id']).__name__}; a prompt id must be a string or an integer.",
            "bad_field",
        )
    messages, prompt = row.get("messages"), row.get("prompt")
    if "responses" in row and row["responses"] is not None:
        responses = row["responses"]
        if not isinstance(responses, list):
            raise DataError(f"{where}: 'responses' must be a list of strings.", "missing_field")
    elif row.get("response") is not None:
        responses = [row["response"]]
    elif (
        isinstance(messages, list)
        and messages
        and isinstance(messages[-1], dict)
        and messages[-1].get("role") == "assistant"
    ):
        responses, messages = [messages[-1].get("content")], messages[:-1]
    else:
        raise DataError(
            f"{where}: missing field 'response' (or 'responses', or a final assistant message).", "missing_field"
        )
    if messages is None and prompt is None:
        raise DataError(f"{where}: missing field 'prompt' (or chat 'messages').", "missing_field")
    if messages is not None and (
        not isinstance(messages, list)
        or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    ):
        raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects.", "missing_field")
    meta = dict(row.get("meta") or {})
    for key in ("teacher_model", "model", "temperature"):
        if key in row and key not in meta:
            meta[key] = row[key]
    out = []
    # One line per (prompt, sample), as `collect` writes: `sample_index` numbers the prompt's samples.
    first_index = int(row.get("sample_index") or 0) if len(responses) == 1 else 0
    for i, resp in enumerate(responses, start=first_index):
        if not isinstance(resp, str) or not resp.strip():
            raise DataError(f"{where}: empty response (index {i}) for id {row['id']!r}.", "empty_response")
        toks, alts = _logprobs_of(row, i - first_index, len(responses), where)
        if alts is not None:
            for pos in alts:
                for _, lp in pos:
                    if math.isnan(lp) or lp > 1e-4:
                        raise DataError(
                            f"{where}: top_logprobs hold a log-prob {lp} outside (-inf, 0].", "bad_logprobs"
                        )
        out.append(
            Sample(
                where=where,
                record_id=str(row["id"]),
                response_index=i,
                prompt=None if messages is not None else str(prompt),
                messages=messages,
                response=resp,
                teacher_tokens=toks,
                teacher_alts=alts,
                meta=meta,
            )
        )
    return out


def iter_corpus(
    paths, on_error: str, skipped: collections.Counter, errors: list[str] | None = None, max_errors: int = 20
) -> Iterator[list[Sample]]:
    """Streams the corpus row by row as lists of samples (one per response).

    With on_error="error" a bad row raises its DataError; with "skip" it is counted in `skipped` by
    reason, its message kept in `errors` (the first `max_errors`), and it is dropped.
    """
    if on_error not in ("error", "skip"):
        raise ValueError(f"data.on_error must be 'error' or 'skip', got {on_error!r}.")
    for path in expand_paths(paths):
        for where, row in iter_rows(path):
            try:
                if isinstance(row, DataError):
                    raise row
                samples = samples_of_row(row, where)
            except DataError as e:
                if on_error == "error":
                    raise
                skipped[e.reason] += 1
                if errors is not None and len(errors) < max_errors:
                    errors.append(str(e))
                continue
            yield samples
