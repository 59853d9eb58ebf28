"""Folders written whole or not at all: the known teachers, proxies and tokenizers that the demo,
the benchmarks and the report build once and reuse."""

from __future__ import annotations

import pathlib
import shutil

import jax


def save_atomic(write, folder: pathlib.Path):
    """Returns `write(tmp)`, which writes the whole of `folder` into `tmp` = `<folder>.tmp` (removed
    first: a killed run's leftover), and then renames `tmp` to `folder`; so a folder that exists is
    complete, and a run killed mid-save leaves only a `.tmp` that the next run throws away.

    Every process calls `write` (a model save may be collective); only process 0 renames (the files
    are written by it); the others write into a `.tmp<k>` of their own and remove it."""
    folder = pathlib.Path(folder)
    rank = jax.process_index()
    tmp = folder.with_name(folder.name + (".tmp" if rank == 0 else f".tmp{rank}"))
    shutil.rmtree(tmp, ignore_errors=True)
    result = write(tmp)
    if rank:
        shutil.rmtree(tmp, ignore_errors=True)
        return result
    if folder.exists():  # an older, incomplete folder without its done marker
        shutil.rmtree(folder)
    tmp.rename(folder)
    return result
