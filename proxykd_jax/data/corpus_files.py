"""Finding and reading a corpus's files: JSONL (optionally gzipped), `.json` arrays, parquet and local
Hugging Face `datasets` folders, streamed as (where, row dict) one row at a time.

A row that is not a JSON object, not UTF-8 or not JSON comes as its `DataError` in the row's place (the
caller skips or raises it); a file that cannot be read at all (not gzip, cut short, not parquet) raises
one `DataError` naming it. Turning a row into samples is `corpus.py`'s.
"""

import gzip
import json
import os
import pathlib
import zlib
from collections.abc import Iterator
from typing import Any

from proxykd_jax.data.corpus_errors import DataError

_MAX_JSON_ARRAY = 64 << 20  # a `.json` file holding a JSON array is read whole (several times its size in memory)


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
