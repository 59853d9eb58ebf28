"""One entry point, one subcommand per pipeline stage.

    proxykd <stage> --config=configs/demo.py [--config.model.num_layers=4 ...]
    python -m proxykd_jax <stage> --config=configs/llama.py:7b

The entry point parses flags, starts jax.distributed when the config asks for
it, logs the devices, and calls one function per stage. All logic lives in
`proxykd_jax.stages`.
"""

from __future__ import annotations

import importlib
import logging
import sys

STAGES = {
    "collect": "Query an OpenAI-compatible teacher endpoint for responses to prompts.",
    "prepare": "Tokenise the teacher corpus, split it by prompt, write records + manifest.",
    "prior": "Build the prior tables (per-prompt prefix tries, back-off n-gram).",
    "align": "Align the proxy to the teacher: SFT warm-up, then DPO rounds.",
    "posterior": "Combine the aligned proxy with the prior; write the sparse posterior store.",
    "distill": "Train the student on hard labels + weighted KL to the posterior.",
    "eval": "Evaluate checkpoints on held-out data (and against a known teacher).",
    "export": "Write a checkpoint as a Hugging Face folder.",
    "serve": "Serve a model behind an OpenAI-compatible HTTP API.",
    "demo": "Run the whole pipeline on the built-in tiny known-teacher setup.",
}

USAGE = "usage: proxykd <stage> --config=CONFIG_FILE[:ARG] [--config.FIELD=VALUE ...]\n\nstages:\n" + "\n".join(
    f"  {name:<10} {doc}" for name, doc in STAGES.items()
)


class UserError(Exception):
    """Bad input from the user: printed as one sentence, no traceback."""


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
            f"bad config override ({msg}); fields and their comments are in the config file and "
            "in the module named by each group's default_config()."
        ) from None
    cfg = flag_values.config
    if cfg is None:
        raise UserError(f"`proxykd {stage}` needs --config=PATH (for example --config=configs/demo.py).")

    from proxykd_jax import config as config_lib

    config_lib.validate(cfg)
    from proxykd_jax.parallel import distributed

    distributed.maybe_initialize_distributed(cfg.mesh.distributed)
    import jax

    logging.info(
        "jax %s: process %d/%d, %d local / %d global devices (%s)",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    module = importlib.import_module(f"proxykd_jax.stages.{stage}")
    module.run(cfg)
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
    if stage not in STAGES:
        print(f"proxykd: unknown stage {stage!r}; choose one of: {', '.join(STAGES)}.", file=sys.stderr)
        sys.exit(2)
    from proxykd_jax.errors import ProxyKDError

    try:
        sys.exit(_run_stage(stage, rest))
    except (UserError, ProxyKDError, FileNotFoundError, FileExistsError) as e:
        print(f"proxykd {stage}: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # train.loop.TrainingDiverged: the message names the step
        print(f"proxykd {stage}: {e}", file=sys.stderr)
        sys.exit(1)
