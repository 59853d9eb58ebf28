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
