"""`proxykd serve`: a model behind an OpenAI-compatible HTTP API (`teacher/server.py`), its weights
streamed onto the mesh of the local devices (`ctx.load_model`) and its KV cache split by the same
rules (rows over the batch axes, key/value heads over `tensor`). Reads only: takes no run-directory
lock."""

from __future__ import annotations

from flax import nnx

from proxykd_jax.parallel import place_model
from proxykd_jax.teacher import backends, listen


def make_backend(ctx) -> backends.LlamaBackend:
    """The backend of the `serve` group (a Hugging Face or known-teacher folder) on the mesh."""
    backend = backends.load_backend(
        ctx.cfg.serve,
        load_model=lambda folder, dtype: ctx.load_model(folder, dtype=dtype),
        place=lambda model: nnx.merge(*place_model(model, ctx.mesh, ctx.rules)),
    )
    backend.rules = ctx.rules
    return backend


def run(ctx) -> None:
    listen.serve(ctx.cfg.serve, lambda: make_backend(ctx))
