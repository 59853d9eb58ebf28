"""The corpus file of `collect` as a journal: durable appends, and the keys already in it.

A line counts only once it is whole on disk: appends are fsynced, a write that fails part-way
(a full disk, a file-size limit, an I/O error) is cut back to the last whole line, and a torn
last line left by a crash is cut off when the file is opened again (the corpus and its failures file).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib

from proxykd_jax.teacher.config import TOKEN_LIMITS
from proxykd_jax.teacher.prompts import CollectError
from proxykd_jax.teacher.responses import usage_counts


def _read_cut_torn(path: pathlib.Path) -> list[bytes]:
    """The file's lines (the last one empty); a torn last line (crash mid-write) is cut off the file."""
    try:
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1]:  # no trailing newline: the last write was torn by a crash
            print(f"[collect] {path}: dropping a torn last line ({len(lines[-1])} bytes) left by a crash")
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(lines[-1]))
            lines[-1] = b""
    except OSError as err:
        raise CollectError(f"{path} cannot be read and repaired ({err.strerror}); check its permissions") from None
    return lines


def read_done(out: pathlib.Path) -> set[str]:
    """Keys already in the corpus; a torn last line (crash mid-write) is cut off the file."""
    return read_done_and_billed(out)[0]


class _Bill:
    """What answers were billed, added up one answer at a time (`read_done_and_billed`'s totals)."""

    def __init__(self):
        self.tokens_in, self.tokens_out, self.unbilled = 0, 0, 0
        self.fewest: int | None = None
        self.passed: dict[str, int] = {}

    def add(self, usage, sent: dict):
        """One answer's `usage` as the endpoint sent it, `sent` the row holding the limit it was sent with."""
        usage = usage_counts(usage)
        if not usage:
            self.unbilled += 1
            return
        self.tokens_in += usage["prompt_tokens"]
        self.tokens_out += usage["completion_tokens"]
        self.fewest = usage["prompt_tokens"] if self.fewest is None else min(self.fewest, usage["prompt_tokens"])
        for field in TOKEN_LIMITS:
            if isinstance(sent.get(field), int) and usage["completion_tokens"] > sent[field]:
                self.passed[field] = self.passed.get(field, 0) + 1

    def totals(self) -> tuple[int, int, int, int | None, dict[str, int]]:
        return self.tokens_in, self.tokens_out, self.unbilled, self.fewest, self.passed


def read_done_and_billed(
    out: pathlib.Path, failures: pathlib.Path | None = None
) -> tuple[set[str], tuple[int, int, int, int | None, dict[str, int]]]:
    """(`read_done`'s keys, (the prompt and completion tokens its answers were billed: their `meta.usage`,
    the answers whose endpoint sent no usage, the fewest prompt tokens an answer was billed: None for none,
    per limit field, `meta.max_tokens` or `meta.max_completion_tokens` as sent, the answers billed more
    completion tokens than it: hidden reasoning the limit did not bound)). With `failures`, the corpus's
    failures file, its answers billed but not stored (rows with a `usage`, beside the limit as sent) count too."""
    bill = _Bill()
    done = _read_corpus(out, bill) if out.exists() else set()
    if failures is not None:
        _read_failures(failures, bill)
    return done, bill.totals()


def _read_corpus(out: pathlib.Path, bill: _Bill) -> set[str]:
    """The corpus's keys; adds each record's `meta.usage` to `bill`."""
    done = set()
    for lineno, raw in enumerate(_read_cut_torn(out)[:-1], start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            done.add(row["key"])
        except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, or not a record
            raise CollectError(
                f"{out} line {lineno}: not a corpus record with a 'key'; "
                "move the file aside or point collect.out elsewhere"
            ) from None
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        bill.add(meta.get("usage"), meta)
    return done


def read_declined(path: pathlib.Path) -> set[str]:
    """Keys the endpoint answered for good without usable text (`"final": true` rows of the failures
    file): asking again would pay again for the same answer. Unreadable lines are skipped."""
    return _read_failures(path, _Bill())


def _read_failures(path: pathlib.Path, bill: _Bill) -> set[str]:
    """`read_declined`'s keys; adds to `bill` each row's `usage`: the rows of answers billed but not stored (rows
    written before they kept it, and failures without an answer, have none and count nothing)."""
    if not path.exists():
        return set()
    lines = _read_cut_torn(path)  # else the next append would merge into the torn line and be lost
    keys = set()
    for raw in lines:
        try:
            row = json.loads(raw)
        except ValueError:  # a torn or blank line
            continue
        if not isinstance(row, dict):
            continue
        if row.get("final") is True and isinstance(row.get("key"), str):
            keys.add(row["key"])
        if "usage" in row:
            bill.add(row["usage"], row)
    return keys


def _write_lines(path: pathlib.Path, lines: list[bytes]) -> tuple[int, OSError | None]:
    """Appends whole lines and fsyncs; returns (lines written, the error that stopped the rest)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        return 0, err
    written, error = 0, None
    try:
        start = end = os.lseek(fd, 0, os.SEEK_END)
        try:
            for line in lines:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                end += len(line)
                written += 1
        except OSError as err:
            error = err
            try:
                os.ftruncate(fd, end)  # drop the part of a line that did fit
            except OSError:
                pass  # a torn last line is cut off when the file is read again
        try:
            os.fsync(fd)
        except OSError as err:  # the written lines may not be durable: none of them counts, nor stays
            written, error = 0, error or err
            try:  # (else a re-run would count an answer both stored and recorded as not stored)
                os.ftruncate(fd, start)
            except OSError:
                pass
    finally:
        os.close(fd)
    return written, error


class DurableAppender:
    """Appends JSON lines with group commit: whatever queued while the last fsync ran is written
    and fsynced together, and each `append` returns only once its own line is on disk (or raises
    the OSError that kept it off the disk)."""

    def __init__(self, path: pathlib.Path):
        self.path, self.pending, self.task = path, [], None

    async def append(self, record: dict):
        future = asyncio.get_running_loop().create_future()
        self.pending.append(((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"), future))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._drain())
        await future

    async def _drain(self):
        while self.pending:
            batch, self.pending = self.pending, []
            written, error = await asyncio.to_thread(_write_lines, self.path, [line for line, _ in batch])
            for i, (_, future) in enumerate(batch):
                if future.done():  # its waiter was cancelled (Ctrl-C)
                    continue
                if i < written:
                    future.set_result(None)
                else:
                    future.set_exception(error)
