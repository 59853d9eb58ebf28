"""Progress bars that suit both a terminal and a log file.

On a terminal `bar` is a plain tqdm bar redrawn in place. When the stream is not a terminal (a
log file, a pipe, a batch job's captured stderr), carriage-return frames would pile up into one
unreadable line, so the same bar prints one ordinary line every `interval_s` seconds (and a last
line when it closes) instead.
"""

from __future__ import annotations

import sys

import tqdm


class _Lines:
    """A file-like wrapper that turns tqdm's carriage-return frames into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str):
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()

    def flush(self):
        self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar(iterable=None, *, total=None, desc=None, unit="it", disable=False, interval_s=30.0, file=None, **kw):
    """A tqdm bar on `file` (stderr by default); off the terminal, a line every `interval_s` seconds."""
    stream = sys.stderr if file is None else file
    if disable or _is_terminal(stream):
        return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream, **kw)
    return tqdm.tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(stream),
        mininterval=interval_s,
        maxinterval=max(interval_s, 10.0),
        miniters=1,  # with a fixed miniters tqdm never raises it, so only the interval paces the lines
        ncols=100,
        **kw,
    )
