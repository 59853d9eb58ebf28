"""One entry point, one subcommand per pipeline stage.

    proxykd <stage> --config=configs/demo.py [--config.model.num_layers=4 ...]
    proxykd <stage> --help          the config fields the stage reads, with defaults and comments
    python -m proxykd_jax <stage> --config=configs/llama.py:7b

The entry point parses flags, validates the config, starts jax.distributed when the config asks
for it, logs the devices, builds the run context (mesh, paths, overwrite rule, run-directory lock)
and runs the stage (`proxykd_jax.stages`). Every expected failure (`errors.ProxyKDError` and its
family) prints one line, `error: proxykd <stage>: <sentence>`, and exits 2; a diverged run exits 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys

from proxykd_jax.errors import ConfigError, ProxyKDError, one_line
from proxykd_jax.stages import STAGES

USAGE = (
    "usage: proxykd <stage> --config=CONFIG_FILE[:ARG] [--config.FIELD=VALUE ...]\n\nstages:\n"
    + "\n".join(f"  {name:<10} {stage.doc}" for name, stage in STAGES.items())
    + "\n\n`proxykd <stage> --help` lists the config fields a stage reads."
)


class UserError(ConfigError):
    """Bad command-line input: printed as one sentence, no traceback."""


def stage_help(stage: str) -> str:
    """The config groups `stage` reads, each field with its default and one-line comment."""
    from proxykd_jax import config as config_lib
    from proxykd_jax.context.artifacts import flatten

    cfg, docs = config_lib.base_config(), config_lib.field_docs()
    groups = STAGES[stage].groups or tuple(cfg.keys())
    lines = [
        f"proxykd {stage}: {STAGES[stage].doc}",
        "",
        f"usage: proxykd {stage} --config=CONFIG_FILE[:ARG] [--config.FIELD=VALUE ...]",
        "",
        "config fields it reads (defaults before a config file changes them):",
    ]
    for group in groups:
        lines.append(f"  {group}:")
        for key, value in flatten({group: cfg[group].to_dict()}).items():
            lines.append(f"    --config.{key}={value!r}")
            lines.append(f"        {docs.get(key, '')}")
    return "\n".join(lines)


def _run_stage(stage: str, argv: list[str]) -> int:
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Config file (`path.py` or `path.py:arg`).", flag_values=flag_values, lock_config=True
    )
    try:
        flag_values(["proxykd"] + argv)
    except (flags.Error, AttributeError, KeyError) as e:
        msg = str(e).strip("\"'")
        raise UserError(
            f"bad config override ({msg}); `proxykd {stage} --help` lists the fields and their meaning."
        ) from None
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags; ours live in flag_values
    cfg = flag_values.config
    if cfg is None:
        raise UserError(f"`proxykd {stage}` needs --config=PATH (for example --config=configs/demo.py).")

    from proxykd_jax import config as config_lib
    from proxykd_jax import context, stages

    config_lib.validate(cfg, stage)  # fields and input paths first: no jax start-up for a typo
    context.preflight(cfg, stage)  # the upstream artifacts the stage reads
    from proxykd_jax.parallel import distributed

    try:
        distributed.maybe_initialize_distributed(cfg.mesh.distributed)
    except ValueError as e:
        raise UserError(str(e)) from None
    import jax

    # the mesh against the devices, batch sizes against the mesh: all before the run directory exists
    config_lib.validate(cfg, stage, num_devices=jax.device_count(), process_count=jax.process_count())
    with context.create(cfg, stage) as ctx:
        stages.run_stage(stage, ctx)
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "httpx2", "httpcore", "absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    stage, rest = argv[0], argv[1:]
    if stage == "plan":  # ahead-of-time memory/FLOPs plan of every stage's step (proxykd_jax/plan.py)
        sys.exit(__import__("proxykd_jax.plan", fromlist=["main"]).main(rest))
    if stage not in STAGES:
        print(f"error: proxykd: unknown stage {stage!r}; choose one of: {', '.join(STAGES)}.", file=sys.stderr)
        sys.exit(2)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in rest):
        print(stage_help(stage))
        sys.exit(0)
    try:
        sys.exit(_run_stage(stage, rest))
    except (ProxyKDError, FileNotFoundError, FileExistsError) as e:
        # expected failures: one line, no traceback (anything else is a bug and keeps its traceback)
        print(f"error: proxykd {stage}: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # train.loop.TrainingDiverged: the message names the step
        print(f"error: proxykd {stage}: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
