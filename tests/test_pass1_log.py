"""The posterior's pass-1 chunks (`bayes/pass1_log.py`): what a chunk holds comes back exactly (the held-out
head arrays too), and a damaged chunk (truncated, empty, not a zip) is scored again instead of stopping the stage."""

import numpy as np
import pytest

from proxykd_jax.bayes import pass1_log


def _part(rng, n_held: int, k: int = 3) -> tuple[list, list, list, dict]:
    lengths = rng.integers(1, 7, n_held)
    hold = {
        "seqs": [rng.integers(0, 90, t).astype(np.int32) for t in lengths],
        "proxy_y": [rng.random(t) for t in lengths],
        "head_ids": [rng.integers(0, 258, (t, k)).astype(np.int32) for t in lengths],
        "head_lp": [rng.normal(size=(t, k)).astype(np.float32) for t in lengths],
        "head_g": [rng.random(t) for t in lengths],
    }
    ids = rng.integers(0, 1 << 40, int(rng.integers(n_held, n_held + 9))).tolist()
    return ids, rng.normal(size=len(ids)).tolist(), ids[:n_held], hold


def test_a_chunk_gives_back_exactly_what_it_was_given(tmp_path):
    rng = np.random.default_rng()
    log = pass1_log.Pass1Log(tmp_path, every=3, fingerprint={"batch_size": 4})
    parts = [_part(rng, n) for n in (2, 0, 5)]
    for part in parts:
        log.save(pass1_log.pack(*part))
    again = pass1_log.Pass1Log(tmp_path, every=3, fingerprint={"batch_size": 4})
    skip, chunks = again.resume()
    assert skip == 9 and len(chunks) == 3
    for (ids, logliks, held, hold), chunk in zip(parts, chunks):
        got_ids, got_logliks, got_held, got_hold = pass1_log.unpack(chunk)
        assert (got_ids, got_logliks, got_held) == (ids, logliks, held)
        for name, arrays in hold.items():
            assert len(got_hold.get(name, [])) == len(arrays)
            for a, b in zip(got_hold.get(name, []), arrays):
                assert a.dtype == b.dtype and np.array_equal(a, b)
    other = pass1_log.Pass1Log(tmp_path, every=3, fingerprint={"batch_size": 8})  # other settings: not read
    assert other.resume() == (0, []) and not list(tmp_path.glob("pass1.*"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_chunk_is_scored_again(tmp_path, damage):
    rng = np.random.default_rng()
    log = pass1_log.Pass1Log(tmp_path, every=2, fingerprint={})
    for n in (1, 2, 3):
        log.save(pass1_log.pack(*_part(rng, n)))
    path = sorted(tmp_path.glob("pass1.*.npz"))[1]
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": rng.bytes(len(data))}[damage])
    skip, chunks = pass1_log.Pass1Log(tmp_path, every=2, fingerprint={}).resume()
    assert skip == 2 and len(chunks) == 1
    assert [p.name for p in tmp_path.glob("pass1.*.npz")] == [sorted(tmp_path.glob("pass1.*.npz"))[0].name]
