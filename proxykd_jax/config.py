"""Config assembly and validation.

Each module that reads a config group owns that group's defaults through its own
`default_config()`; `base_config()` puts the groups together, and the files under `configs/`
change what differs. `validate` runs before any stage starts and speaks in one sentence per
problem. Only the CLI and the config files import this module.
"""

from __future__ import annotations

import ml_collections

from proxykd_jax.errors import ProxyKDError


def model_group(init_from: str = "") -> ml_collections.ConfigDict:
    """A model shape (models.llama.default_config) plus where its weights come from."""
    from proxykd_jax.models import llama

    cd = llama.default_config()
    cd.init_from = init_from  # local Hugging Face folder with weights; "" = random init from run.seed
    return cd


def base_config() -> ml_collections.ConfigDict:
    """All groups with their owners' defaults (unlocked: callers lock it)."""
    from proxykd_jax import context
    from proxykd_jax.align import config as align_config
    from proxykd_jax.bayes import config as bayes_config
    from proxykd_jax.data import config as data_config
    from proxykd_jax.eval import benchmark
    from proxykd_jax.eval import config as eval_config
    from proxykd_jax.parallel import mesh
    from proxykd_jax.report import config as report_config
    from proxykd_jax.teacher import config as teacher_config
    from proxykd_jax.train import distill, export, loop, optim

    cfg = ml_collections.ConfigDict()
    cfg.run = context.run_config()
    cfg.mesh = mesh.default_config()
    cfg.model = model_group()  # the student
    cfg.proxy = model_group()  # the open proxy aligned to the teacher
    cfg.data = data_config.default_config()
    cfg.prior = bayes_config.prior_config()
    cfg.posterior = bayes_config.posterior_config()
    cfg.optim = optim.default_config()
    cfg.train = loop.default_config()
    cfg.align = align_config.default_config()
    cfg.distill = distill.default_config()
    cfg.collect = teacher_config.collect_config()
    cfg.serve = teacher_config.serve_config()
    cfg.eval = eval_config.default_config()
    cfg.export = export.default_config()
    cfg.demo = benchmark.default_config()
    cfg.report = report_config.default_config()
    return cfg


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
    if "data" in cfg and "split" in cfg.data:
        fractions = {k: float(v) for k, v in cfg.data.split.items() if k != "salt"}
        bad = {k: v for k, v in fractions.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ProxyKDError(f"config.data.split: fractions must lie in [0, 1], got {bad}.")
        total = sum(fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise ProxyKDError(
                f"config.data.split fractions sum to {total:.4f}, not 1; "
                f"adjust {sorted(fractions)} so they add up to 1."
            )
    if "model" in cfg and "proxy" in cfg and cfg.model.vocab_size != cfg.proxy.vocab_size:
        raise ProxyKDError(
            f"config.model.vocab_size={cfg.model.vocab_size} differs from "
            f"config.proxy.vocab_size={cfg.proxy.vocab_size}; student and proxy must share "
            "one tokenizer and vocabulary."
        )


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
