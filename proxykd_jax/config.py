"""Config assembly and validation.

Each module that reads a config group owns that group's defaults through its own
`default_config()`; `base_config()` puts the groups together, and the files under `configs/`
change what differs. `validate` runs before any stage starts and speaks in one sentence per
problem. Only the CLI, the stages and the config files import this module.
"""

from __future__ import annotations

import dataclasses
import math
import re

import ml_collections

from proxykd_jax.config_ranges import check_ranges, get_field
from proxykd_jax.errors import ConfigError


def model_group(init_from: str = "") -> ml_collections.ConfigDict:
    """A model shape (models.config.default_config) plus where its weights come from."""
    from proxykd_jax.models import config as model_config

    cd = model_config.default_config()
    cd.init_from = init_from  # local Hugging Face folder with weights; "" = random init from run.seed
    return cd


def base_config() -> ml_collections.ConfigDict:
    """All groups with their owners' defaults (unlocked: callers lock it)."""
    from proxykd_jax import choose, context
    from proxykd_jax.align import config as align_config
    from proxykd_jax.bayes import config as bayes_config
    from proxykd_jax.data import config as data_config
    from proxykd_jax.eval import config as eval_config
    from proxykd_jax.parallel import mesh
    from proxykd_jax.report import config as report_config
    from proxykd_jax.teacher import config as teacher_config
    from proxykd_jax.train.config import distill_config, export_config, loop_config, optim_config

    cfg = ml_collections.ConfigDict()
    cfg.run = context.run_config()
    cfg.mesh = mesh.default_config()
    cfg.model = model_group()  # the student
    cfg.proxy = model_group()  # the open proxy aligned to the teacher
    cfg.data = data_config.default_config()
    cfg.prior = bayes_config.prior_config()
    cfg.posterior = bayes_config.posterior_config()
    cfg.optim = optim_config()
    cfg.train = loop_config()
    cfg.align = align_config.default_config()
    cfg.distill = distill_config()
    cfg.collect = teacher_config.collect_config()
    cfg.serve = teacher_config.serve_config()
    cfg.eval = eval_config.default_config()
    cfg.export = export_config()
    cfg.demo = eval_config.demo_config()
    cfg.report = report_config.default_config()
    cfg.choose = choose.default_config()
    return cfg


def _check_model(name: str, group) -> None:
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff"):
        if getattr(group, field) <= 0:
            raise ConfigError(f"config.{name}.{field}={getattr(group, field)} must be positive.")
    if group.num_heads % group.num_kv_heads:
        raise ConfigError(
            f"config.{name}.num_heads={group.num_heads} is not a multiple of "
            f"num_kv_heads={group.num_kv_heads}; grouped-query attention needs it to be."
        )
    from proxykd_jax.models.config import ModelConfig

    try:  # the remaining per-field checks (remat, attention, dtypes, scan_layers, RoPE scaling) live there
        ModelConfig.from_config(group)
    except ValueError as err:  # its messages name fields as "model.<field>", the first and any later ones
        message = re.sub(r"\bmodel\.(?=[a-z_])", f"{name}.", str(err))
        if message.startswith(f"{name}."):
            raise ConfigError(f"config.{message}") from None
        raise ConfigError(f"config.{name}: {message}") from None


# (stage, config field naming a path that must exist when set, what it should be).
_INPUT_PATHS = (
    ("collect", "collect.prompts", "the prompts JSONL file"),
    ("prepare", "data.tokenizer", "a local tokenizer folder"),
    ("align", "proxy.init_from", "a local Hugging Face model folder"),
    ("posterior", "posterior.proxy", "the aligned proxy's Hugging Face folder"),
    ("distill", "model.init_from", "a local Hugging Face model folder"),
    ("distill", "distill.white_box", "the white-box teacher's Hugging Face folder"),
    ("eval", "eval.known_teacher", "the known teacher's folder"),
    ("serve", "serve.path", "the model folder to serve"),
)


def _check_split(cfg) -> None:
    fractions = {k: float(v) for k, v in cfg.data.split.items() if k != "salt"}
    bad = {k: v for k, v in fractions.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ConfigError(f"config.data.split: fractions must lie in [0, 1], got {bad}.")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"config.data.split fractions sum to {total:.4f}, not 1; adjust {sorted(fractions)} so they add up to 1."
        )


def _check_mesh(cfg, stage: str | None, num_devices: int, process_count: int) -> None:
    import math

    from proxykd_jax.context.specs import trial_stages
    from proxykd_jax.parallel import mesh as mesh_lib
    from proxykd_jax.parallel import rules as rules_lib

    sizes = dict(zip(mesh_lib.MESH_AXES, mesh_lib.resolve_shape(dict(cfg.mesh.shape), num_devices)))
    # the batch dimension is split over the mesh axes of the rules' `batch` entry (default data x fsdp)
    table = dict(rules_lib.normalize_rules(cfg.mesh.get("rules", rules_lib.LOGICAL_RULES)))
    axes = table.get("batch", ())
    if any(a not in sizes for a in axes):
        raise ConfigError(f"mesh.rules maps 'batch' to {list(axes)}; use mesh axes from {list(mesh_lib.MESH_AXES)}.")
    shards = math.prod(sizes[a] for a in axes)
    described = " x ".join(axes) + " = " + " x ".join(str(sizes[a]) for a in axes) if axes else "no axes = 1"
    # the batches each stage splits over the batch shards, and whether processes hold different rows
    # of them (align's held-out and reference passes: every process holds the whole batch); `choose` runs those
    # of its field's trials (`specs.trial_stages`)
    chosen = trial_stages(str(cfg.choose.field)) if stage == "choose" else ()
    for stage_name, group, field, per_process in (
        ("distill", "train", "batch_size", True),
        ("align", "align", "batch_size", True),
        ("align", "align", "eval_batch_size", False),
        ("posterior", "posterior", "batch_size", True),
        ("eval", "eval", "batch_size", True),
    ):
        runs = (None, "demo", stage_name) + (("choose",) if stage_name in chosen else ())
        if stage not in runs or group not in cfg:
            continue
        value = int(cfg[group][field])
        for ways, what in (
            (shards, f"the mesh's {described} batch shards"),
            (process_count if per_process else 1, f"the {process_count} processes"),
        ):
            if value % ways:
                raise ConfigError(
                    f"config.{group}.{field}={value} is not a multiple of {what}; make it a multiple of {ways}."
                )


def _check_training(cfg, groups) -> None:
    # train.steps and optim.warmup_steps make distill's schedule; align's phases set their own (align.*_steps,
    # align.warmup_steps), so a stage without the distill group does not check them.
    if "train" in groups and "optim" in groups and "distill" in groups:
        steps, accum = int(cfg.train.steps), int(cfg.optim.grad_accum)
        updates = int(cfg.optim.decay_steps) or max(steps // accum, 1)
        if int(cfg.optim.warmup_steps) >= updates:
            raise ConfigError(
                f"config.optim.warmup_steps={cfg.optim.warmup_steps} must be below the schedule's "
                f"{updates} optimizer updates (train.steps={steps} // optim.grad_accum={accum}, or "
                "optim.decay_steps); lower optim.warmup_steps or raise train.steps."
            )
        if int(cfg.train.seq_len) > int(cfg.model.max_seq_len) and "model" in groups:
            raise ConfigError(
                f"config.train.seq_len={cfg.train.seq_len} exceeds config.model.max_seq_len="
                f"{cfg.model.max_seq_len}; lower train.seq_len or raise model.max_seq_len."
            )


def _check_paths(cfg, stage: str | None) -> None:
    import pathlib

    for owner, field, what in _INPUT_PATHS:
        value = get_field(cfg, field)
        if stage not in (owner, None) or not value:
            continue
        if not pathlib.Path(str(value)).expanduser().exists():
            raise ConfigError(f"config.{field}={str(value)!r} does not exist; point it at {what}.")
    output = str(get_field(cfg, "distill.output") or "")
    parts = pathlib.PurePath(output).parts
    if output and (pathlib.PurePath(output).is_absolute() or ".." in parts or len(parts) != 1):
        raise ConfigError(
            f"config.distill.output={output!r} must be a folder name inside the run directory (e.g. student_v2): "
            "eval, export and status look for students there; set --config.run.dir for another place."
        )
    if stage in ("prepare", None) and "data" in cfg:
        for path in (p for p in str(cfg.data.corpus).split(",") if p):
            if not pathlib.Path(path).expanduser().exists():
                raise ConfigError(
                    f"config.data.corpus names {path!r}, which does not exist; give JSONL, parquet or "
                    "datasets folders (comma-separated)."
                )


def _check_align(acfg) -> None:
    loss_type, smoothing, reference = acfg.get("loss_type"), acfg.get("label_smoothing"), acfg.get("reference")
    if loss_type is not None and loss_type not in ("dpo", "ipo"):
        raise ConfigError(f"config.align.loss_type={loss_type!r} must be 'dpo' or 'ipo'.")
    if reference is not None and reference not in ("previous", "initial"):
        raise ConfigError(f"config.align.reference={reference!r} must be 'previous' or 'initial'.")
    if smoothing is not None and not 0.0 <= float(smoothing) < 0.5:
        raise ConfigError(f"config.align.label_smoothing={smoothing!r} must lie in [0, 0.5) (0 = plain DPO).")
    if smoothing and loss_type == "ipo":
        raise ConfigError("config.align.label_smoothing applies to loss_type 'dpo' only; set it to 0 with 'ipo'.")
    if acfg.get("beta") is not None and not 0 < float(acfg.beta) < math.inf:
        raise ConfigError(f"config.align.beta={acfg.beta!r} must be a positive number (finite).")
    if acfg.get("temperature") is not None and not 0 <= float(acfg.temperature) < math.inf:
        raise ConfigError(
            f"config.align.temperature={acfg.temperature!r} must be at least 0 and finite (0 samples the rejected "
            "responses greedily)."
        )
    lora = acfg.get("lora")
    if lora is not None and int(lora.get("rank") or 0) > 0 and not 0 < float(lora.get("alpha", 1.0)) < math.inf:
        raise ConfigError(
            f"config.align.lora.alpha={lora.alpha!r} must be a positive number (finite): the adapters are scaled by "
            "alpha / rank, so 0 would train adapters that change nothing (align.lora.rank=0 is full fine-tuning)."
        )
    per_round, per_prompt = int(acfg.get("prompts_per_round") or 0), int(acfg.get("samples_per_prompt") or 1)
    if int(acfg.get("rounds") or 0) > 0 and 0 < per_round * per_prompt < int(acfg.get("batch_size") or 1):
        raise ConfigError(
            f"config.align.prompts_per_round={per_round} x samples_per_prompt={per_prompt} pairs cannot fill one "
            f"batch of align.batch_size={acfg.batch_size}; raise align.prompts_per_round (0 = all examples) or "
            "lower align.batch_size."
        )


def _check_report_seeds(text) -> None:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items or not all(x.lstrip("-").isdigit() for x in items):
        raise ConfigError(f"config.report.seeds={text!r} must be comma-separated integers, e.g. '0,1,2'.")


# The numerics a proxy started from the known teacher's weights must share with it (align checks its start folder
# on them: context.FOLDER_FIELDS); the teacher's are ModelConfig's defaults (teacher/known.py).
_KNOWN_TEACHER_NUMERICS = ("rope_theta", "rope_scaling", "rms_eps", "qkv_bias", "qk_norm", "tie_embeddings")
_KNOWN_TEACHER_NUMERICS += ("norm_plus_one", "embed_scale", "activation", "sandwich_norms", "query_pre_attn_scalar")
_KNOWN_TEACHER_NUMERICS += ("layer_types", "rope_local_theta", "sliding_window", "rope_layers", "partial_rotary_factor")
_KNOWN_TEACHER_NUMERICS += ("attn_softcap", "logit_softcap")


def _check_known_teacher(cfg, stage: str) -> None:
    """The demo's and the report's known teachers (`eval/benchmark.py`, `report/settings.py`): built with the
    proxy's heads over the proxy's vocabulary (a character teacher: its own 36 tokens)."""
    from proxykd_jax.eval.config import CHAR_TEACHER_VOCAB
    from proxykd_jax.models.tokenizer import SPECIAL_TOKENS

    demo, heads = cfg.demo, int(cfg.proxy.num_heads)
    if int(demo.teacher_d_model) % (2 * heads):
        raise ConfigError(
            f"config.demo.teacher_d_model={demo.teacher_d_model} must be a multiple of {2 * heads}: the known teacher "
            f"has the proxy's {heads} heads (proxy.num_heads), and its head_dim = teacher_d_model / {heads} must be "
            "even for RoPE."
        )
    # A teacher over the proxy's tokenizer starts the proxy: the demo's proxy is its weights with noise, the
    # report's perturbed setting likewise; the specialised setting's proxy is a random init of the proxy group
    # pre-trained on the general teacher's samples, and a character teacher's is a random init: their own shape.
    if stage == "report":
        names = {s.strip() for s in str(cfg.report.settings).split(",") if s.strip()}
        same = not names or "perturbed" in names  # (none named: every setting, `report.runner`)
    else:
        same = demo.teacher_tokenizer != "char"
    teacher_head_dim = int(demo.teacher_d_model) // heads
    pairs = (  # (field the sentence names, its value, what it must equal, that value)
        ("demo.teacher_d_model", demo.teacher_d_model, "proxy.d_model", cfg.proxy.d_model),
        ("demo.teacher_num_layers", demo.teacher_num_layers, "proxy.num_layers", cfg.proxy.num_layers),
        ("proxy.head_dim", cfg.proxy.head_dim, "demo.teacher_d_model / proxy.num_heads", teacher_head_dim),
    )
    for field, value, other, want in pairs if same else ():
        if int(value) != int(want):
            raise ConfigError(
                f"config.{field}={value!r} must equal {other} ({want}): a known teacher over the proxy's "
                f"tokenizer gives the proxy its starting weights, so they share one shape; set {field}={want}."
            )
    from proxykd_jax.models.config import ModelConfig

    # and the same numerics: the teacher's are ModelConfig's defaults (teacher/known.py `KnownTeacher.create`)
    teacher = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for name in _KNOWN_TEACHER_NUMERICS if same else ():
        value = cfg.proxy[name]
        if (tuple(value) if isinstance(value, (tuple, list)) else value) != teacher[name]:
            raise ConfigError(
                f"config.proxy.{name}={value!r} must equal the known teacher's ({teacher[name]!r}): a known teacher "
                "over the proxy's tokenizer gives the proxy its starting weights, so they compute alike; set "
                f"proxy.{name}={teacher[name]!r}."
            )
    vocabs = [CHAR_TEACHER_VOCAB if demo.teacher_tokenizer == "char" else int(cfg.proxy.vocab_size)]
    if stage == "report" and "chartok" in str(cfg.report.settings):  # the report's character teacher
        vocabs.append(CHAR_TEACHER_VOCAB)
    words = min(vocabs) - len(SPECIAL_TOKENS)
    if not 0 < float(demo.teacher_entropy) < math.log(words):
        raise ConfigError(
            f"config.demo.teacher_entropy={demo.teacher_entropy!r} must lie in (0, {math.log(words):.4f}) nats: "
            f"below the log of the teacher's {words} words."
        )
    if stage != "report":
        return
    if not math.isfinite(float(cfg.report.style_boost)):
        raise ConfigError(f"config.report.style_boost={cfg.report.style_boost!r} must be a finite number (nats).")
    words = int(cfg.proxy.vocab_size) - len(SPECIAL_TOKENS)  # the specialised teacher has the general one's words
    if int(cfg.report.style_words) > words:
        raise ConfigError(
            f"config.report.style_words={cfg.report.style_words} must be at most {words}, the teacher's words "
            "(proxy.vocab_size less its special tokens)."
        )


def validate(
    cfg: ml_collections.ConfigDict, stage: str | None = None, num_devices: int | None = None, process_count: int = 1
) -> None:
    """Cross-field checks, before any output folder is created or any long work starts.

    With `stage`, only the groups that stage reads are checked, and the input paths it needs
    must exist; with `num_devices`, the mesh shape must fit the devices and the training batch
    sizes must split over its batch shards (and over `process_count` processes).
    """
    groups = tuple(cfg.keys())
    if stage is not None:
        from proxykd_jax.stages import STAGES

        groups = STAGES[stage].groups or groups
    if "run" in cfg and "run" in groups and not str(cfg.run.dir).strip():  # "" would be the working directory
        raise ConfigError("config.run.dir is empty; set --config.run.dir to the run directory (e.g. runs/r1).")
    for name in ("model", "proxy"):
        if name in cfg and name in groups:
            _check_model(name, cfg[name])
    check_ranges(cfg, groups)
    if "data" in cfg and "split" in cfg.data and "data" in groups:
        _check_split(cfg)
    # model.vocab_size and proxy.vocab_size may differ (one tokenizer, embeddings padded to different sizes):
    # each must hold the prepared tokenizer's ids, which the stages check (`data.pipeline.require_vocab`).
    _check_training(cfg, groups)
    if "align" in cfg and "align" in groups:
        _check_align(cfg.align)
    if "report" in cfg and "report" in groups:
        _check_report_seeds(cfg.report.seeds)
    if stage in ("demo", "report") and "demo" in cfg:
        _check_known_teacher(cfg, stage)
    if stage == "choose":  # the field, its values, and each trial's config as its own stages check it
        _check_choose(cfg)
    if num_devices is not None and "mesh" in cfg and "mesh" in groups:
        _check_mesh(cfg, stage, num_devices, process_count)
    _check_paths(cfg, stage)


def _check_choose(cfg) -> None:
    """`proxykd choose`'s field and candidates (`choose.trials`), and each trial's config checked as every stage
    it runs checks its own."""
    from proxykd_jax import choose
    from proxykd_jax.context.specs import trial_stages

    for trial in choose.trials(cfg):
        for stage in trial_stages(str(cfg.choose.field)):
            try:
                validate(trial.cfg, stage)
            except ConfigError as e:
                raise ConfigError(f"config.choose.candidates: with {cfg.choose.field}={trial.name}: {e}") from None


def field_docs(fn=None, prefix: str = "") -> dict[str, str]:
    """{dotted field: its one-line comment}, read from the source of `fn` (default `base_config`)
    and of every proxykd_jax function it takes a group from (each `default_config()`)."""
    import ast
    import importlib
    import inspect
    import io
    import textwrap
    import tokenize

    fn = fn or base_config
    src = textwrap.dedent(inspect.getsource(fn))
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline)
        if tok.type == tokenize.COMMENT
    }
    namespace = dict(fn.__globals__)
    nodes = sorted((n for n in ast.walk(ast.parse(src)) if hasattr(n, "lineno")), key=lambda n: n.lineno)
    for node in nodes:  # imports inside the function body
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                value = getattr(module, alias.name, None)
                if value is None:
                    value = importlib.import_module(f"{node.module}.{alias.name}")
                namespace[alias.asname or alias.name] = value

    def chain(expr) -> list[str] | None:
        names = []
        while isinstance(expr, ast.Attribute):
            names.append(expr.attr)
            expr = expr.value
        return [expr.id] + names[::-1] if isinstance(expr, ast.Name) else None

    def callee(expr):
        if not isinstance(expr, ast.Call) or (names := chain(expr.func)) is None or names[0] not in namespace:
            return None
        obj = namespace[names[0]]
        for name in names[1:]:
            obj = getattr(obj, name, None)
        ok = inspect.isfunction(obj) and obj.__module__.startswith("proxykd_jax")
        return obj if ok else None

    roots, out = {}, {}
    for node in nodes:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        names = chain(node.targets[0])
        if names is None:
            continue
        if len(names) == 1:
            roots[names[0]] = prefix
            path_prefix = prefix
        elif names[0] in roots:
            path = roots[names[0]] + ".".join(names[1:])
            note = next((comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments), "")
            if note:
                out[path] = note
            path_prefix = path + "."
        else:
            continue
        inner = callee(node.value)
        if inner is not None:
            out.update(field_docs(inner, path_prefix))
    return out
