"""A full disk and a device out of memory, as the CLI reports them: one line that says what ran out, where,
and what to do (`cli._run_stage` raises it as `errors.ResourceExhausted`).

A full disk (ENOSPC, EDQUOT), a read-only one (EROFS), a file past a size limit (EFBIG) or a folder this user
may not write (EACCES, an OSError only) reaches a stage in several forms, often as the
cause or context of an exception that orbax's checkpoint thread raises again:
  an OSError     from Python's own writes (a write or close names no file, an open names it);
  a RuntimeError from array_record's writer: "write() failed: No space left on device; writing PATH; ...";
  a ValueError   from tensorstore under orbax: 'RESOURCE_EXHAUSTED: ... Failed writing: "PATH": ...
                 No space left on device [os_error_code='28']'.
Device memory runs out as XLA's `JaxRuntimeError`: "RESOURCE_EXHAUSTED: Out of memory while trying to
allocate N bytes." on a GPU or TPU, "INTERNAL: Error dispatching computation: Out of memory allocating N
bytes." where the CPU client reports it while dispatching.

Neither loses finished work: artifacts are written beside their place and moved there when complete, and
orbax finalises a checkpoint step only once all its items are written, so the same command resumes from
what was finished.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shlex
import sys

from proxykd_jax import batch_steps
from proxykd_jax.errors import ProxyKDError

# errno: (what ran out, what to do about it)
_DISK = {
    errno.ENOSPC: ("no space left on device", "free space on that filesystem"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota on that filesystem"),
    errno.EROFS: ("read-only file system", "make that filesystem writable (or set --config.run.dir to another)"),
    errno.EFBIG: (
        "file too large (the process's file-size limit, or the filesystem's largest file)",
        "raise the limit (`ulimit -f`) or set --config.run.dir on a filesystem that holds larger files",
    ),
    # a read names the input it could not read first (the stages' own checks); a write this user may not make
    errno.EACCES: (
        "permission denied",
        "give this user access to it (or set --config.run.dir to a folder you can write)",
    ),
    errno.ENOTDIR: ("not a directory", "a part of that path is a file: move it aside or choose another path,"),
}
# recognised as an OSError only: "Permission denied" or "Not a directory" in any message is too loose
_TEXT_ONLY_NOT = (errno.EACCES, errno.ENOTDIR)
# where a message that is no OSError names its file: tensorstore's, then array_record's
_PATHS = (
    re.compile(r'Failed writing: "([^"]+)"'),
    re.compile(r'local file "([^"]+)"'),
    re.compile(r"writing (/[^;\s]+)"),
)


def _chain(error: BaseException):
    """`error`, then every exception it was raised from or while handling (and a group's members)."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _text(error: BaseException) -> str:
    """str(error), or "" where its __str__ itself raises (that error is then no exhaustion this module knows)."""
    try:
        return str(error)
    except Exception:  # pylint: disable=broad-except  # any __str__ may fail; explaining must not
        return ""


def _named_path(text: str) -> str | None:
    for pattern in _PATHS:
        match = pattern.search(text)
        if match:
            return match.group(1).removesuffix(".__lock")  # tensorstore writes a file through `<file>.__lock`
    return None


def disk_full(error: BaseException) -> tuple[int, str | None] | None:
    """(errno, the file it names or None) of a full or read-only disk anywhere in `error`'s chain, else None."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _DISK:
            name = e.filename if e.filename is not None else e.filename2
            return e.errno, (os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else None)
        text = _text(e)
        for code in set(_DISK) - set(_TEXT_ONLY_NOT):
            if os.strerror(code) in text or f"os_error_code='{code}'" in text:
                return code, _named_path(text)
    return None


def out_of_memory(error: BaseException) -> str | None:
    """XLA's first line of a device out-of-memory anywhere in `error`'s chain, else None."""
    jax = sys.modules.get("jax")  # no jax imported: no XLA error
    if jax is None:
        return None
    for e in _chain(error):
        lines = _text(e).strip().splitlines()
        if isinstance(e, jax.errors.JaxRuntimeError) and lines:
            first = lines[0].strip()
            if first.startswith("RESOURCE_EXHAUSTED") or "out of memory" in first.lower():
                return first[:300]
    return None


def _plan_command(stage: str, cfg, argv: list[str], devices: int | None) -> str:
    """`proxykd plan` with this command's config arguments, the devices it ran on (None: jax's count) and
    the stage's steps."""
    if devices is None:
        devices = sys.modules["jax"].device_count()  # jax ran the step that ran out of memory
    steps = ",".join(batch_steps.stage_steps(stage, cfg))
    parts = ["proxykd plan", *(shlex.quote(a) for a in argv)]
    parts += [f"--devices={devices}"] if devices else []
    parts += [f"--steps={steps}"] if steps else []
    return " ".join(parts)


def _what_to_lower(stage: str, cfg) -> tuple[str, str]:
    """("lower <its rows field> or <its sequence field>", ", set --config.<group>.remat=full" where the step trains)
    for `stage`'s batch steps; the general words for a stage that runs none of them (or without a config)."""
    steps = batch_steps.stage_steps(stage, cfg)
    if not steps or cfg is None:
        return (
            "lower the stage's batch size or sequence length",
            ", set --config.model.remat=full (the student) or --config.proxy.remat=full (the proxy)",
        )
    _, _, rows, seq = batch_steps.row_shape(cfg, steps[0])
    group = batch_steps.model_group(steps[0])
    return f"lower {rows} or {seq}", (f", set --config.{group}.remat=full" if steps[0] in batch_steps.TRAINS else "")


class _WithoutExhaustionReports(logging.Filter):
    """Drops the log records that report a full disk or a device out of memory from a background thread
    (orbax's checkpoint threads, through absl) or from a task nobody awaited (asyncio): each with its
    traceback, a hundred lines for one checkpoint. The failure does not pass silently: orbax raises it again
    in the stage's thread, at the next save or at the wait for the last one, and the CLI reports it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            return disk_full(error) is None and out_of_memory(error) is None
        try:
            message = record.getMessage()
        except Exception:  # pylint: disable=broad-except  # a malformed record: logging reports it itself
            return True
        return disk_full(Exception(message)) is None


_QUIET = _WithoutExhaustionReports()


def quiet_background_reports() -> None:
    """Installs `_WithoutExhaustionReports` on the loggers of orbax's threads (absl) and of asyncio."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)


def explain(stage: str, error: BaseException, cfg=None, argv: list[str] | None = None, devices: int | None = None):
    """The one line (str) for a full disk (or a path that cannot be written), a device or the host out of memory
    behind `error` in `proxykd <stage>` run
    as `argv` (after the stage name) with config `cfg` on `devices` devices (None: as many as jax has); None
    for any other error, and for a `ProxyKDError`, which says it in its own sentence (collect's counts what it
    stored)."""
    if isinstance(error, ProxyKDError):
        return None
    full = disk_full(error)
    if full is not None:
        code, path = full
        what, todo = _DISK[code]
        where = path or (f"under {cfg.run.dir}" if cfg is not None else "the run directory")
        verb = "on" if code in _TEXT_ONLY_NOT else "writing"  # (these may be a read's)
        return f"{what} {verb} {where}; {todo} and run the same command again to resume."
    first = out_of_memory(error)
    if first is not None:
        lower, remat = _what_to_lower(stage, cfg)
        return (
            f"the device ran out of memory ({first}); `{_plan_command(stage, cfg, list(argv or ()), devices)}` "
            f"prints each step's bytes per device: {lower}{remat}, or use more devices; checkpoints written so far are kept "
            "and the same command resumes."
        )
    host = next((e for e in _chain(error) if isinstance(e, MemoryError)), None)
    if host is not None:  # numpy's "Unable to allocate 7.45 TiB for an array with shape ..." names the size
        said = _text(host).strip().splitlines()[:1]
        lower, _ = _what_to_lower(stage, cfg)
        return (
            f"the host ran out of memory (MemoryError{': ' + said[0][:200] if said else ''}); {lower}, or run on a "
            "machine with more memory; finished work is kept and the same command resumes."
        )
    return None
