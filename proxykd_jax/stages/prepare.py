"""`proxykd prepare`: tokenise the teacher corpus, split it by prompt, write records.

Reads `data.corpus` (files, folders or local `datasets` folders; default: the run's collected
corpus) with the tokenizer in `data.tokenizer` (`data/prepare.py`), writes `<run>/prepared/` and
copies the tokenizer to `<run>/prepared/tokenizer/` so every later stage uses the very same one.
"""

from __future__ import annotations

import logging
import pathlib
import shutil

from proxykd_jax.context.records import RECORD
from proxykd_jax.data.prepare import prepare as prepare_corpus
from proxykd_jax.data.records import PreparedData
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)


def corpus_paths(ctx) -> list[str]:
    given = [p for p in str(ctx.cfg.data.corpus).split(",") if p]
    if given:
        return given
    corpus = ctx.artifact_path("collect")
    if not corpus.exists():
        raise ProxyKDError(
            f"no corpus: data.corpus is empty and {corpus} does not exist; run "
            "`proxykd collect` first or set --config.data.corpus=PATH[,PATH...]."
        )
    return [str(corpus)]


def _holds_only_record(folder: pathlib.Path) -> bool:
    return folder.is_dir() and {p.name for p in folder.iterdir()} <= {RECORD, RECORD + ".tmp"}


def run(ctx) -> dict:
    """Prepares (or reuses) the records; returns the manifest."""
    art = ctx.artifact("prepare")
    if art.done:
        log.info("prepare: %s is finished with these settings; reusing it", art.path)
        return PreparedData(art.path).manifest
    head = ctx.cfg.data.get("teacher_head", "auto")
    if head not in ("auto", "exact", "bytes"):
        raise ProxyKDError(f"data.teacher_head={head!r} is not one of auto, exact, bytes (docs/TOKENIZERS.md).")
    if not ctx.cfg.data.tokenizer:
        raise ProxyKDError(
            "data.tokenizer is empty; set it to a local tokenizer folder (for example the proxy's Hugging Face folder)."
        )
    sources = corpus_paths(ctx)
    tok = tokenizer_lib.load_tokenizer(ctx.cfg.data.tokenizer)
    fresh = not art.work.exists()
    art.begin()
    if ctx.is_writer:
        try:
            # The record `begin` wrote is carried into the new folder before it is swapped into place, so a
            # kill never leaves `prepared/` without its (unfinished) record (between the swap's two renames
            # there is no `prepared/` at all): the same command runs again instead of being refused.
            prepare_corpus(sources, tok, art.work, ctx.cfg.data, overwrite=True, keep=(RECORD,))
        except BaseException:
            # Bad input (or any failure): leave no half-made artifact behind whose record would make the
            # corrected command refused; prepare writes nothing into it until done, so nothing is lost.
            if fresh or _holds_only_record(art.work):
                shutil.rmtree(art.work, ignore_errors=True)
            raise
        tok.save_pretrained(str(art.work / "tokenizer"))
    manifest = PreparedData(art.work).manifest
    art.finish({"samples": manifest["counts"]["samples"], "tokenizer_hash": manifest["tokenizer"]["hash"]})
    splits = manifest["splits"]
    log.info(
        "prepare: %d samples (%s), %d tokens -> %s",
        manifest["counts"]["samples"],
        ", ".join(f"{name} {s['samples']}" for name, s in splits.items()),
        sum(s["tokens"] for s in splits.values()),
        art.path,
    )
    return manifest
