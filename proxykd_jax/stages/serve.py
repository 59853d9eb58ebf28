"""`proxykd serve`: a project checkpoint behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

from proxykd_jax.teacher import server


def run(cfg) -> None:
    server.serve(cfg.serve)
