"""`proxykd collect`: prompts + an OpenAI-compatible endpoint -> the teacher corpus
(`teacher/client.py`), `<run>/corpus/teacher.jsonl` unless `collect.out` says otherwise. Resumable:
samples already in the corpus are never requested (or paid for) again."""

from __future__ import annotations

import logging

from proxykd_jax.teacher import client
from proxykd_jax.teacher.prompts import read_prompts

log = logging.getLogger(__name__)


def run(ctx) -> dict:
    """Collects the missing samples; the corpus is finished once every requested sample is in it or
    was answered without content (final). A run that stops or leaves failures raises CollectError
    and leaves the corpus unfinished: the same command continues it."""
    art = ctx.artifact("collect")
    if art.done:
        log.info("collect: %s is finished with these settings; reusing it", art.path)
        return art.summary
    ccfg = ctx.cfg.collect.copy_and_resolve_references()
    read_prompts(ccfg.prompts, ccfg.api)  # a bad prompts file stops before the corpus is begun
    art.begin()
    ccfg.out = str(art.work)
    stats = client.collect(ccfg)
    art.finish({k: stats[k] for k in ("requested", "already_done", "done", "declined", "tokens_in", "tokens_out")})
    return stats
