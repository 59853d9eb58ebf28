"""`proxykd collect`: prompts + an OpenAI-compatible endpoint -> the teacher corpus
(`teacher/client.py`), `<run>/corpus/teacher.jsonl` unless `collect.out` says otherwise. Resumable:
samples already in the corpus are never requested (or paid for) again, and neither are they by a
redo with other settings (`run.overwrite=True`): it starts from the samples of the old corpus that
its settings still ask for."""

from __future__ import annotations

import logging

from proxykd_jax.teacher import client

log = logging.getLogger(__name__)


def run(ctx) -> dict:
    """Collects the missing samples; the corpus is finished once every requested sample is in it or
    was answered without content (final). A run that stops or leaves failures raises CollectError
    and leaves the corpus unfinished: the same command continues it.

    Changed settings (more samples per prompt, a prompts file with more prompts, another
    temperature) make another corpus, under the one overwrite rule: refused unless
    `run.overwrite=True`, which builds it beside the old one. Each sample is keyed by its content
    (`request_key`), so the redo first copies the old corpus's samples whose keys it still wants
    (`client.carry_over`) and requests only the rest: the old corpus is never paid for twice. Nor is an
    unfinished redo with yet other settings, which `begin()` removes: the samples of it that these settings
    ask for are set aside first (`.<corpus>.new.kept`) and copied into the new redo."""
    art = ctx.artifact("collect")
    if art.done:
        log.info("collect: %s is finished with these settings; reusing it", art.path)
        return art.summary
    ccfg = ctx.cfg.collect.copy_and_resolve_references()
    ccfg.out = str(art.work)
    prompts, api_key = client.check(ccfg)  # bad fields, prompts file or key: refused before anything is written
    redo = art.work != art.path and ctx.is_writer
    kept = art.work.with_name(art.work.name + ".kept")  # the paid samples of an abandoned redo, while begin() runs
    if redo and art.work.exists() and art.stale_work():
        client.carry_over(ccfg, prompts, art.work, kept)  # begin() removes a redo made with other settings
    art.begin()
    if redo:
        client.carry_over(ccfg, prompts, art.path, art.work)
        if kept.exists():
            client.carry_over(ccfg, prompts, kept, art.work)
            for part in (kept.with_name(kept.name + ".failures.jsonl"), kept):
                part.unlink(missing_ok=True)
    stats = client.collect(ccfg, prompts=prompts, api_key=api_key)
    keys = ("requested", "already_done", "done", "declined", "without_logprobs", "tokens_in", "tokens_out")
    art.finish({k: stats[k] for k in keys})
    return stats
