"""The exception family for expected failures: bad input, a missing or damaged file, a full disk.

Each is raised with one sentence that names the file and line (or byte offset), the config
field or the checkpoint step, and says what to do. The CLI prints it as one line,
`error: <sentence>`, and exits 2; any other exception is a bug and keeps its traceback.
Library callers can catch `ProxyKDError` (a `ValueError`) for all of them.
"""

from __future__ import annotations


class ProxyKDError(ValueError):
    """Bad input: a file, a field or a value the user must fix."""


class ConfigError(ProxyKDError):
    """A config field, or a combination of fields, that cannot work; the message names the field."""


class InputFileError(ProxyKDError):
    """A missing, unreadable or malformed input file; the message names the file and the line or byte."""


class ModelFolderError(ProxyKDError):
    """A model folder this library cannot load: unsupported architecture, missing or misshapen weights."""


class CheckpointError(ProxyKDError):
    """A checkpoint that cannot be restored; the message names the step and what to delete or re-run."""


class ResourceExhausted(ProxyKDError):
    """A full (or read-only) disk, or device memory too small for a step (`exhaustion.py`); the message says
    what ran out, where, and what to change before running the same command again."""


def one_line(message: str) -> str:
    """`message` with its whitespace runs (newlines included) folded into single spaces."""
    return " ".join(str(message).split())
