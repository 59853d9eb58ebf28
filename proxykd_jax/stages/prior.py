"""`proxykd prior`: the corpus prior tables from the distillation split's teacher responses
(`bayes/tables.py`), written to `<run>/prior/`."""

from __future__ import annotations

import logging

from proxykd_jax.bayes import tables
from proxykd_jax.data.records import PreparedData

log = logging.getLogger(__name__)


def run(ctx) -> dict:
    """Builds (or reuses) the prior tables; returns their manifest."""
    art = ctx.artifact("prior")
    if art.done:
        log.info("prior: %s is finished with these settings; reusing it", art.path)
        return art.summary
    prepared = PreparedData(ctx.paths.prepared)  # a missing or foreign manifest stops before the record is written
    art.begin()
    manifest = None
    if ctx.is_writer:
        manifest = tables.write_prior(prepared, ctx.cfg.prior, art.work)
    art.finish(manifest)
    return manifest
