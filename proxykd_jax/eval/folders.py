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


def saved_teacher(seed: int, folder: pathlib.Path, *, vocab_size: int, d_model: int, num_layers: int, proxy_cfg, **kw):
    """A known teacher with the proxy's attention and MLP shapes (`KnownTeacher.create(seed, ..., **kw)`),
    saved to `folder` atomically; loaded when the folder exists (a folder that exists is complete)."""
    from proxykd_jax.teacher.known import KnownTeacher

    folder = pathlib.Path(folder)
    if (folder / "config.json").exists():
        return KnownTeacher.load(str(folder), seed=seed)

    def write(tmp):
        teacher = KnownTeacher.create(
            seed,
            vocab_size=vocab_size,
            d_model=d_model,
            num_layers=num_layers,
            num_heads=proxy_cfg.num_heads,
            num_kv_heads=proxy_cfg.num_kv_heads,
            d_ff=proxy_cfg.d_ff,
            max_seq_len=proxy_cfg.max_seq_len,
            folder=tmp / "tokenizer_build",
            **kw,
        )
        teacher.save(str(tmp))
        return teacher

    return save_atomic(write, folder)
