"""`proxykd collect`: prompts + an OpenAI-compatible endpoint -> the teacher corpus
(`teacher/client.py`), `<run>/corpus/teacher.jsonl` unless `collect.out` says otherwise. Resumable:
samples already in the corpus are never requested (or paid for) again."""

from __future__ import annotations

import logging

from proxykd_jax.teacher import client

log = logging.getLogger(__name__)


def run(ctx) -> dict:
    """Collects the missing samples; the corpus is finished once every requested sample is in it or
    has a final failure (an answer without content, or filtered)."""
    art = ctx.artifact("collect")
    if art.done:
        log.info("collect: %s is finished with these settings; reusing it", art.path)
        return art.summary
    art.begin()
    ccfg = ctx.cfg.collect.copy_and_resolve_references()
    ccfg.out = str(art.work)
    stats = client.collect(ccfg)
    # a sample whose answer had no content (or was filtered) is final; an exhausted retry is not
    final = sum(n for reason, n in stats["failed"].items() if not reason.startswith("retries_exhausted"))
    if stats["done"] + stats["already_done"] + final == stats["requested"]:
        summary = {k: stats[k] for k in ("requested", "tokens_in", "tokens_out") if k in stats}
        art.finish(summary | {"final_failures": final})
    else:
        log.warning("collect: %s is unfinished; run the same command again for the missing samples", art.path)
    return stats
