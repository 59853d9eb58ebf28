"""Config assembly and validation.

Each module that reads a config group owns that group's defaults through its
own `default_config()`; `base_config()` puts the groups together, and the files
under `configs/` change what differs. `validate` runs before any stage starts
and speaks in one sentence per problem.
"""

from __future__ import annotations

import ml_collections

from proxykd_jax.errors import ProxyKDError


def run_config() -> ml_collections.ConfigDict:
    cd = ml_collections.ConfigDict()
    cd.dir = "runs/default"  # run directory: every stage reads and writes here (stages/paths.py)
    cd.seed = 0  # base seed; each stage derives its own streams from it
    cd.overwrite = False  # allow a stage to replace a finished artifact (never silent otherwise)
    return cd


def model_group(init_from: str = "") -> ml_collections.ConfigDict:
    """A model shape (models.llama.default_config) plus where its weights come from."""
    from proxykd_jax.models import llama

    cd = llama.default_config()
    cd.init_from = init_from  # local Hugging Face folder with weights; "" = random init from run.seed
    return cd


def base_config() -> ml_collections.ConfigDict:
    """All groups with their owners' defaults (unlocked: callers lock it)."""
    from proxykd_jax.bayes import config as bayes_config
    from proxykd_jax.data import config as data_config
    from proxykd_jax.eval import config as eval_config
    from proxykd_jax.parallel import mesh
    from proxykd_jax.stages import align, demo, distill, export
    from proxykd_jax.teacher import config as teacher_config
    from proxykd_jax.train import loop, optim

    cfg = ml_collections.ConfigDict()
    cfg.run = run_config()
    cfg.mesh = mesh.default_config()
    cfg.model = model_group()  # the student
    cfg.proxy = model_group()  # the open proxy aligned to the teacher
    cfg.data = data_config.default_config()
    cfg.prior = bayes_config.prior_config()
    cfg.posterior = bayes_config.posterior_config()
    cfg.optim = optim.default_config()
    cfg.train = loop.default_config()
    cfg.align = align.default_config()
    cfg.distill = distill.default_config()
    cfg.collect = teacher_config.collect_config()
    cfg.serve = teacher_config.serve_config()
    cfg.eval = eval_config.default_config()
    cfg.export = export.default_config()
    cfg.demo = demo.default_config()
    return cfg


def model_config_from(group: ml_collections.ConfigDict):
    """The ModelConfig dataclass from a model group (ignores `init_from`)."""
    from proxykd_jax.models import llama

    fields = {k: v for k, v in group.items() if k != "init_from"}
    try:
        return llama.ModelConfig(**fields)
    except TypeError as e:
        raise ProxyKDError(f"model config: {e}; see models/llama.py default_config() for the fields.") from None


def _check_model(name: str, group) -> None:
    if group.num_heads % group.num_kv_heads:
        raise ProxyKDError(
            f"config.{name}.num_heads={group.num_heads} is not a multiple of "
            f"num_kv_heads={group.num_kv_heads}; grouped-query attention needs it to be."
        )
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff"):
        if getattr(group, field) <= 0:
            raise ProxyKDError(f"config.{name}.{field}={getattr(group, field)} must be positive.")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Cross-field checks, before any long work starts."""
    for name in ("model", "proxy"):
        if name in cfg:
            _check_model(name, cfg[name])
    if "data" in cfg and "splits" in cfg.data:
        fractions = dict(cfg.data.splits)
        bad = {k: v for k, v in fractions.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ProxyKDError(f"config.data.splits: fractions must lie in [0, 1], got {bad}.")
        total = sum(fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise ProxyKDError(
                f"config.data.splits fractions sum to {total:.4f}, not 1; "
                f"adjust {sorted(fractions)} so they add up to 1."
            )
    if "model" in cfg and "proxy" in cfg and cfg.model.vocab_size != cfg.proxy.vocab_size:
        raise ProxyKDError(
            f"config.model.vocab_size={cfg.model.vocab_size} differs from "
            f"config.proxy.vocab_size={cfg.proxy.vocab_size}; student and proxy must share "
            "one tokenizer and vocabulary."
        )
