"""The posterior's first pass (the proxy's scores of every sample, `estimate.fit_estimate`) kept on disk in
chunks, so a killed run resumes at the last chunk every process finished instead of scoring the split again.

Each process writes its own chunks, `pass1.p<process>.<chunk>.npz` in the artifact's work folder, every
`every` batches (about 1% of the pass): only what the chunk added (ids, log-likelihoods, the held-out
samples' targets, proxy probabilities and head statistics), written beside and renamed into place. A chunk
records what its batches depend on (`fingerprint`: batch size, sequence length, processes, chunk length);
chunks of other settings are not read. On resume every process starts at the chunk count all of them
reached (batches are collective, so they must agree). `clear` removes the chunks once the estimate is written.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import jax
import numpy as np

from proxykd_jax.npfiles import DAMAGED
from proxykd_jax.parallel import hosts

CHUNKS = 100  # a killed pass loses at most about 1/CHUNKS of its work

_RAGGED = ("seqs", "proxy_y", "head_ids", "head_lp", "head_g")  # per held-out sample, concatenated by token


def chunk_batches(total_batches: int) -> int:
    """Batches per chunk for a pass of `total_batches`."""
    return max(1, math.ceil(total_batches / CHUNKS))


class Pass1Log:
    """Chunks of pass 1 for this process; see the module docstring."""

    def __init__(self, folder, *, every: int, fingerprint: dict):
        self.folder, self.every = pathlib.Path(folder), int(every)
        self.fingerprint = json.dumps({**fingerprint, "every": self.every}, sort_keys=True)
        self.process = jax.process_index()
        self.next_chunk = 0

    def _path(self, chunk: int) -> pathlib.Path:
        return chunk_path(self.folder, self.process, chunk)

    def resume(self) -> tuple[int, list[dict]]:
        """(batches done, the chunks' contents in order): the chunks every process finished."""
        chunks, count = [], 0
        while self._path(count).exists():
            try:
                with np.load(self._path(count)) as z:
                    if str(z["fingerprint"]) != self.fingerprint:
                        break
                    chunks.append({k: z[k] for k in z.files if k != "fingerprint"})
            except DAMAGED:  # score its batches again
                break
            count += 1
        agreed = int(hosts.allgather(np.asarray([len(chunks)], np.int64)).min())
        for path in self.folder.glob(f"pass1.p{self.process:04d}.*.npz"):
            if int(path.name.split(".")[2]) >= agreed:  # (a chunk past the agreed count is scored again)
                path.unlink(missing_ok=True)
        self.next_chunk = agreed
        return agreed * self.every, chunks[:agreed]

    def save(self, part: dict) -> None:
        """Writes the next chunk: `part`'s arrays (what the chunk's batches added)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(self.next_chunk)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, fingerprint=np.asarray(self.fingerprint), **part)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.next_chunk += 1

    @staticmethod
    def clear(folder) -> None:
        """Removes every process's chunks (once the estimate they made is written)."""
        for path in pathlib.Path(folder).glob("pass1.p*.npz"):
            path.unlink(missing_ok=True)


def chunk_path(folder, process: int, chunk: int) -> pathlib.Path:
    """The file of chunk `chunk` of process `process` in `folder`."""
    return pathlib.Path(folder) / f"pass1.p{process:04d}.{chunk:05d}.npz"


def pack(ids, logliks, hold_sid, hold: dict[str, list]) -> dict:
    """The arrays of one chunk: per sample ids and log-likelihoods, per held-out sample its id and token
    count, and the held-out samples' per-token arrays concatenated (`_RAGGED`; absent where empty)."""
    out = {
        "ids": np.asarray(ids, np.int64),
        "logliks": np.asarray(logliks, np.float64),
        "hold_sid": np.asarray(hold_sid, np.int64),
        "hold_len": np.asarray([len(s) for s in hold["seqs"]], np.int64),
    }
    for name in _RAGGED:
        if hold.get(name):
            out[name] = np.concatenate(hold[name])
    return out


def unpack(chunk: dict) -> tuple[list, list, list, dict[str, list]]:
    """`pack`'s inverse: (ids, log-likelihoods, held-out ids, per held-out sample arrays)."""
    cuts = np.cumsum(chunk["hold_len"])[:-1]
    hold = {name: list(np.split(chunk[name], cuts)) for name in _RAGGED if name in chunk}
    return chunk["ids"].tolist(), chunk["logliks"].tolist(), chunk["hold_sid"].tolist(), hold
