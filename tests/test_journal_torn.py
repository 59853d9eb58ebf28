"""The collect journals cut a torn last line (left by kill -9 mid-write) before appending again."""

import asyncio
import json

import pytest

from proxykd_jax.teacher import journal

TORN = b'{"key": "a", "final": true}\n{"key": "b", "fin'


def _append(path, record):
    asyncio.run(journal.DurableAppender(path).append(record))


@pytest.mark.parametrize("reader", [journal.read_declined, journal.read_done])
def test_torn_last_line_is_cut_so_the_next_append_survives(tmp_path, reader):
    path = tmp_path / "teacher.jsonl.failures.jsonl"
    path.write_bytes(TORN)
    assert reader(path) == {"a"}
    assert path.read_bytes() == b'{"key": "a", "final": true}\n'
    _append(path, {"key": "c", "final": True})
    assert reader(path) == {"a", "c"}
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "c"]


def test_whole_files_are_left_as_they_are(tmp_path):
    path = tmp_path / "f.jsonl"
    data = b'{"key": "a", "final": true}\n{"key": "b", "final": false}\n'
    path.write_bytes(data)
    assert journal.read_declined(path) == {"a"}
    assert path.read_bytes() == data


def test_lines_whose_fsync_failed_are_cut_back_out(tmp_path, monkeypatch):
    """A batch whose fsync fails counts as not written (its answers go to the failures file with their usage),
    so its lines must not stay in the file either: a re-run would count those answers twice against the cap."""
    path = tmp_path / "teacher.jsonl"
    _append(path, {"key": "a", "final": True})
    kept = path.read_bytes()

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        _append(path, {"key": "b", "final": True})
    assert path.read_bytes() == kept
    assert journal.read_done(path) == {"a"}
