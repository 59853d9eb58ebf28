"""`proxykd prepare`: tokenise the teacher corpus, split it by prompt, write records.

Reads `data.corpus` (files, folders or local `datasets` folders; default: the run's
collected corpus) with the tokenizer in `data.tokenizer`, writes `<run>/prepared/`
and copies the tokenizer to `<run>/prepared/tokenizer/` so every later stage uses
the very same one.
"""

from __future__ import annotations

import logging

from proxykd_jax.data.prepare import prepare as prepare_corpus
from proxykd_jax.data.records import PreparedData
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models import tokenizer as tokenizer_lib
from proxykd_jax.stages.paths import RunPaths


def corpus_paths(cfg) -> list[str]:
    paths = RunPaths.from_config(cfg)
    given = [p for p in str(cfg.data.corpus).split(",") if p]
    if given:
        return given
    if not paths.corpus.exists():
        raise ProxyKDError(
            f"no corpus: data.corpus is empty and {paths.corpus} does not exist; run "
            "`proxykd collect` first or set --config.data.corpus=PATH[,PATH...]."
        )
    return [str(paths.corpus)]


def run(cfg) -> dict:
    paths = RunPaths.from_config(cfg)
    if not cfg.data.tokenizer:
        raise ProxyKDError(
            "data.tokenizer is empty; set it to a local tokenizer folder (for example the proxy's Hugging Face folder)."
        )
    tok = tokenizer_lib.load_tokenizer(cfg.data.tokenizer)
    if (paths.prepared / "manifest.json").exists() and not cfg.run.overwrite:
        logging.info("prepare: %s is finished; skipping (run.overwrite=True redoes it)", paths.prepared)
        return PreparedData(paths.prepared).manifest
    manifest = prepare_corpus(corpus_paths(cfg), tok, paths.prepared, cfg.data, overwrite=cfg.run.overwrite)
    tok.save_pretrained(str(paths.tokenizer))
    return manifest
