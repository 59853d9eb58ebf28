"""`proxykd prior`: the corpus prior tables from the distillation split's teacher responses.

Streams the prepared records (never the whole split in memory) into a
`bayes.prior.PriorBuilder` and writes the finished tables to `<run>/prior/`.
The response tokens counted are exactly the store's rows: `tokens[prompt_len:]`
(the response plus its eos).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import tqdm

from proxykd_jax.bayes import prior as prior_lib
from proxykd_jax.data.records import PreparedData
from proxykd_jax.stages.paths import RunPaths

SPLIT = "distill"
MANIFEST = "manifest.json"


def response_batches(prepared: PreparedData, split: str, batch: int = 4096, exclude=frozenset()):
    """(prompt_keys int64[b], [response tokens int32[T]]) in batches of `batch` samples."""
    keys, seqs = [], []
    for rec in prepared.iter_split(split):
        if int(rec["sample_id"]) in exclude:
            continue
        keys.append(int(rec["prompt_key"]))
        seqs.append(np.asarray(rec["tokens"][int(rec["prompt_len"]) :], np.int32))
        if len(keys) == batch:
            yield np.asarray(keys, np.int64), seqs
            keys, seqs = [], []
    if keys:
        yield np.asarray(keys, np.int64), seqs


def build(prepared: PreparedData, pcfg, split: str = SPLIT, exclude=frozenset()) -> prior_lib.PriorTables:
    """The tables from `split`'s responses, leaving out the sample ids in `exclude`."""
    vocab = int(prepared.manifest["tokenizer"]["vocab_size"])
    builder = prior_lib.PriorBuilder(
        vocab_size=vocab,
        order=pcfg.ngram_order,
        exact_top_s=pcfg.exact_top_s,
        ngram_top_s=pcfg.ngram_top_s,
        buffer_pairs=pcfg.buffer_pairs,
    )
    with tqdm.tqdm(total=prepared.num_samples(split), desc="prior", unit="sample") as bar:
        for keys, seqs in response_batches(prepared, split, exclude=exclude):
            builder.add(keys, seqs)
            bar.update(len(keys))
    return builder.finalize()


def load(cfg) -> prior_lib.PriorTables:
    return prior_lib.PriorTables.load(RunPaths.from_config(cfg).prior)


def run(cfg) -> dict:
    paths = RunPaths.from_config(cfg)
    out = paths.prior
    if (out / MANIFEST).exists() and not cfg.run.overwrite:
        logging.info("prior: %s is finished; skipping (run.overwrite=True rebuilds it)", out)
        return json.loads((out / MANIFEST).read_text())
    prepared = PreparedData(paths.prepared)
    start = time.perf_counter()
    tables = build(prepared, cfg.prior)
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
    logging.info(
        "prior: %d tokens, %.1f MB of tables in %.1f s -> %s",
        tables.num_tokens,
        tables.nbytes / 1e6,
        manifest["build_seconds"],
        out,
    )
    return manifest
