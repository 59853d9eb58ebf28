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
    # why the stage runs as one process ("" = it runs on every process of a jax.distributed run)
    one_process: str = ""


STAGES = {
    "collect": Stage(
        "Query an OpenAI-compatible teacher endpoint for responses to prompts.",
        ("run", "collect"),
        one_process="it calls the teacher's API, and every process would request and pay for every sample",
    ),
    "prepare": Stage(
        "Tokenise the teacher corpus, split it by prompt, write records + manifest.",
        ("run", "data"),
        one_process="it is host work on files, with no model on the mesh",
    ),
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
    "serve": Stage(
        "Serve a model behind an OpenAI-compatible HTTP API.",
        ("mesh", "serve"),
        one_process="one HTTP server takes the requests, and other processes would not see them",
    ),
    "demo": Stage(  # () = every group
        "Run the whole pipeline on the built-in tiny known-teacher setup.", (), one_process="it runs collect and serve"
    ),
    "choose": Stage(
        "Choose a setting (posterior.own_token, align.rounds, ...) by the students' validation loss, one trial each.",
        ("run", "mesh", "model", "proxy", "data", "prior", "align", "posterior", "optim", "train", "distill", "choose"),
    ),
    "report": Stage(
        "Ablation report: every part of Proxy-KD over settings and seeds, with plots.",
        (),
        one_process="it writes its teachers' corpora and tiny models itself",
    ),
}


def run_stage(name: str, ctx, **kwargs):
    """Runs stage `name` on `ctx` (its own context: same mesh, lock and config)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}.")
    module = importlib.import_module(f"proxykd_jax.stages.{name}")
    return module.run(ctx.with_config(ctx.cfg, stage=name), **kwargs)
