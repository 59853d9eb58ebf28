"""The corpus prior from prepared records: build the tables from one split's teacher responses
(streamed, never the whole split in memory), save them with a manifest, load them.

The response tokens counted are exactly the posterior store's rows: `tokens[max(prompt_len, 1):]` (the
response plus its eos; with an empty prompt the first token is no target, docs/DATA_FORMATS.md).
"""

from __future__ import annotations

import copy
import json
import logging
import pathlib
import time

import numpy as np

from proxykd_jax import progress as progress_bars
from proxykd_jax.bayes.prior import PriorBuilder, PriorTables
from proxykd_jax.errors import ProxyKDError

log = logging.getLogger(__name__)
SPLIT = "distill"
MANIFEST = "manifest.json"


def response_batches(prepared, split: str, batch: int = 4096, exclude=frozenset()):
    """(prompt_keys int64[b], [response tokens int32[T]]) in batches of `batch` samples."""
    keys, seqs = [], []
    for rec in prepared.iter_split(split):
        if int(rec["sample_id"]) in exclude:
            continue
        keys.append(int(rec["prompt_key"]))
        # The store's rows: the first token is never a target (an empty prompt's row starts at the second).
        seqs.append(np.asarray(rec["tokens"][max(int(rec["prompt_len"]), 1) :], np.int32))
        if len(keys) == batch:
            yield np.asarray(keys, np.int64), seqs
            keys, seqs = [], []
    if keys:
        yield np.asarray(keys, np.int64), seqs


def build_prior(prepared, pcfg, split: str = SPLIT, exclude=frozenset(), progress: bool = True) -> PriorTables:
    """The tables (`prior` config group `pcfg`) from `split`'s responses, without the ids in `exclude`."""
    vocab = int(prepared.manifest["tokenizer"]["vocab_size"])
    builder = PriorBuilder(
        vocab_size=vocab,
        order=pcfg.ngram_order,
        exact_top_s=pcfg.exact_top_s,
        ngram_top_s=pcfg.ngram_top_s,
        buffer_pairs=pcfg.buffer_pairs,
    )
    total = prepared.num_samples(split)
    with progress_bars.bar(total=total, desc="prior", unit="sample", disable=not progress) as bar:
        for keys, seqs in response_batches(prepared, split, exclude=exclude):
            builder.add(keys, seqs)
            bar.update(len(keys))
    return builder.finalize()


def built_with(tables: PriorTables, pcfg):
    """The `prior` group `pcfg` with the table-shaping fields `tables` were built with.

    The posterior's held-out tables (the EB fit) must be built as the tables the store queries were,
    whatever `prior.*` says on the posterior's command line."""
    out = copy.deepcopy(pcfg)
    with out.unlocked():
        out.ngram_order, out.exact_top_s, out.ngram_top_s = tables.order, tables.exact_top_s, tables.ngram_top_s
    return out


def write_prior(prepared, pcfg, out: pathlib.Path) -> dict:
    """Builds the distillation split's tables into `out` (tables + manifest.json); returns the manifest."""
    start = time.perf_counter()
    tables = build_prior(prepared, pcfg)
    tables.save(out)
    manifest = {
        "split": SPLIT,
        "tokens": tables.num_tokens,
        "vocab_size": tables.vocab_size,
        "ngram_order": tables.order,
        "bytes": int(tables.nbytes),
        "tokenizer_hash": prepared.tokenizer_hash,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info(
        "prior: %d tokens, %.1f MB of tables in %.1f s -> %s",
        tables.num_tokens,
        tables.nbytes / 1e6,
        manifest["build_seconds"],
        out,
    )
    return manifest


def load_prior(folder: pathlib.Path) -> PriorTables:
    """The tables `write_prior` wrote to `folder`."""
    if not (pathlib.Path(folder) / MANIFEST).exists():
        raise ProxyKDError(f"{folder} holds no prior tables; run `proxykd prior` first.")
    return PriorTables.load(folder)
