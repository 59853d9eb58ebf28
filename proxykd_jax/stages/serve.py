"""`proxykd serve`: a model behind an OpenAI-compatible HTTP API (`teacher/server.py`), its weights
placed on the mesh of the local devices. Reads only: takes no run-directory lock."""

from __future__ import annotations

import pathlib

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.teacher import server
from proxykd_jax.teacher.backends import LlamaBackend


def make_backend(ctx) -> LlamaBackend:
    """The backend of the `serve` group: a Hugging Face folder or a known-teacher folder, on the mesh."""
    scfg = ctx.cfg.serve
    path = pathlib.Path(scfg.path).expanduser()
    if not scfg.path or not path.is_dir():
        raise ProxyKDError(f"serve.path {scfg.path!r} is not a folder; point it at the checkpoint to serve.")
    name = scfg.model_name or path.name
    if scfg.source == "hf":
        from proxykd_jax.models.tokenizer import load_tokenizer

        _, model = ctx.load_model(path, dtype=scfg.dtype)
        return LlamaBackend(model, load_tokenizer(path), model_name=name, seed=scfg.seed)
    if scfg.source == "known":
        from flax import nnx

        from proxykd_jax.parallel import place_model
        from proxykd_jax.teacher.known import KnownTeacher

        teacher = KnownTeacher.load(str(path))
        model = nnx.merge(*place_model(teacher.model, ctx.mesh, ctx.rules))
        return LlamaBackend(model, teacher.tokenizer, model_name=name, seed=scfg.seed)
    raise ProxyKDError(f"serve.source must be 'hf' or 'known', not {scfg.source!r}.")


def run(ctx) -> None:
    server.serve(ctx.cfg.serve, make_backend(ctx))
