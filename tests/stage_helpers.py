"""Running a stage from a test as the CLI does: one run context (mesh, paths, lock) per call."""

from __future__ import annotations


def run_stage(name: str, cfg, *, devices=None, **kwargs):
    """`proxykd <name>` on `cfg` in this process (mesh over `devices`, default all); returns its result."""
    from proxykd_jax import context, stages

    with context.create(cfg, name, devices=devices) as ctx:
        return stages.run_stage(name, ctx, **kwargs)
