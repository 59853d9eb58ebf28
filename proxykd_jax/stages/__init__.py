"""One module per CLI stage, each `run(ctx)` on a `context.RunContext`.

`STAGES` lists them with their one-line description and the config groups each reads (what
`proxykd <stage> --help` shows). Stages never import each other; the demo runs the others through
`run_stage`, as the CLI does.
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Stage:
    doc: str
    groups: tuple[str, ...]


STAGES = {
    "collect": Stage("Query an OpenAI-compatible teacher endpoint for responses to prompts.", ("run", "collect")),
    "prepare": Stage("Tokenise the teacher corpus, split it by prompt, write records + manifest.", ("run", "data")),
    "prior": Stage("Build the prior tables (per-prompt prefix tries, back-off n-gram).", ("run", "prior")),
    "align": Stage(
        "Align the proxy to the teacher: SFT warm-up, then DPO rounds.",
        ("run", "mesh", "proxy", "data", "optim", "train", "align"),
    ),
    "posterior": Stage(
        "Combine the aligned proxy with the prior; write the sparse posterior store.",
        ("run", "mesh", "proxy", "data", "prior", "posterior"),
    ),
    "distill": Stage(
        "Train the student on hard labels + weighted KL to the posterior.",
        ("run", "mesh", "model", "data", "optim", "train", "distill"),
    ),
    "eval": Stage(
        "Evaluate the run's models on held-out data (and against a known teacher).",
        ("run", "mesh", "proxy", "data", "eval"),
    ),
    "export": Stage(
        "Write a student checkpoint as a Hugging Face folder.",
        ("run", "mesh", "model", "optim", "train", "distill", "export"),
    ),
    "serve": Stage("Serve a model behind an OpenAI-compatible HTTP API.", ("mesh", "serve")),
    "demo": Stage("Run the whole pipeline on the built-in tiny known-teacher setup.", ()),  # () = every group
    "report": Stage("Ablation report: every part of Proxy-KD over settings and seeds, with plots.", ()),
}


def run_stage(name: str, ctx, **kwargs):
    """Runs stage `name` on `ctx` (its own context: same mesh, lock and config)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}.")
    module = importlib.import_module(f"proxykd_jax.stages.{name}")
    return module.run(ctx.with_config(ctx.cfg, stage=name), **kwargs)
