"""`proxykd choose`: one posterior or distill setting chosen by the students' validation loss.

Some settings are measured, not derived: whether the stored posterior counts the response's own token
(`posterior.own_token`) helps on one teacher–proxy pair and hurts on another (docs/METHOD.md), and the KL weight
`distill.loss.alpha` or the proxy's evidence `posterior.n_max` have no value right for every pair. `choose` tries
each value of `choose.field` in `choose.candidates` and keeps the one whose student scores best on text none of them
trained on.

Each value is a run directory of its own, `<run>/choose/<field>/<value>/`, whose `prepared` and `prior` (and, for a
`distill.*` field, `posterior`) are links to the run's. There the posterior stage (for a `posterior.*` field) and the
distill stage run with the field set to the value, the student scored every `choose.eval_every` steps on
`choose.eval_split` (the `align` split by default: no stage distils on it, and `heldout` stays for `eval`), its
lowest-loss step kept (`distill.keep_best`). The value whose student reached the lowest loss is chosen;
`<run>/choose/<field>/choice.json` holds every value's lowest loss (per token of the split's responses) and its step.
Every trial is an ordinary run directory: each stage in it resumes after `kill -9`, one made with other settings is
refused as anywhere else (`run.overwrite` replaces it), values added later reuse the trials already finished, and
`eval` or `export` run in a trial's directory as in any run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib

import ml_collections

from proxykd_jax.context import RunPaths
from proxykd_jax.errors import ConfigError, ProxyKDError

log = logging.getLogger(__name__)

CHOICE = "choice.json"
# Fields a trial may not vary: where its inputs or outputs are, how its students are scored, and settings that
# change no result (a memory bound, a kernel choice).
FIXED = (
    "posterior.proxy",
    "posterior.batch_size",
    "posterior.chunk_tokens",
    "posterior.kernel",
    "distill.output",
    "distill.split",
    "distill.eval_split",
    "distill.keep_best",
    "distill.white_box",
    "distill.loss.chunk_size",
)


def default_config() -> ml_collections.ConfigDict:
    """The `choose` group."""
    cd = ml_collections.ConfigDict()
    cd.field = "posterior.own_token"  # the setting to choose: a posterior.* or distill.* field
    cd.candidates = "leave_out,count"  # its values to try, comma-separated (each its own posterior and/or student)
    cd.eval_every = 50  # score each trial's student every N distill steps (at most train.steps)
    cd.eval_split = "align"  # the split the students are scored on (no stage distils on it)
    return cd


@dataclasses.dataclass(frozen=True)
class Trial:
    value: object  # the field's value, of the field's type
    name: str  # as written in choose.candidates: the trial's folder name
    cfg: ml_collections.ConfigDict  # the trial's config (run.dir its folder)


def _parse(field: str, text: str, like):
    """`text` as a value of the type of `like` (the field's default), or a ConfigError naming it."""
    try:
        if isinstance(like, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a finite number"}[type(like)]
        raise ConfigError(
            f"config.choose.candidates: {text!r} is not a value of {field}, which takes {kind}."
        ) from None
    return text


def _check_field(cfg) -> str:
    field = str(cfg.choose.field).strip()
    group = field.split(".", 1)[0]
    flat = set(_flatten(cfg))
    if group not in ("posterior", "distill") or field not in flat:
        known = sorted(k for k in flat if k.split(".", 1)[0] in ("posterior", "distill") and k not in FIXED)
        raise ConfigError(
            f"config.choose.field={field!r} is not a posterior or distill setting; choose one of: {', '.join(known)}."
        )
    if field in FIXED:
        raise ConfigError(
            f"config.choose.field={field!r} cannot be chosen: every trial keeps it as the run has it (it places the "
            "trials' inputs or outputs, scores their students, or changes no result)."
        )
    return field


def _flatten(cfg) -> dict:
    from proxykd_jax.context.artifacts import flatten

    return flatten(cfg.to_dict())


def trials(cfg) -> list[Trial]:
    """Each value's trial config (`choose.field` set, run.dir its folder, its student scored and the best step
    kept), checked before any work: a field not chosen from, a value not of the field's type, fewer than two
    distinct values, a name that is no folder name."""
    field = _check_field(cfg)
    names = [v.strip() for v in str(cfg.choose.candidates).split(",") if v.strip()]
    like = _flatten(cfg)[field]
    values = [_parse(field, n, like) for n in names]
    if len(set(map(repr, values))) != len(values) or len(values) < 2:
        raise ConfigError(
            f"config.choose.candidates={cfg.choose.candidates!r} must name at least two different values of {field}, "
            "comma-separated, e.g. 'leave_out,count'."
        )
    for name in names:
        if "/" in name or "\\" in name or name.startswith("."):
            raise ConfigError(
                f"config.choose.candidates: {name!r} names the trial's folder; use no slash or leading dot."
            )
    every = int(cfg.choose.eval_every)
    if every < 1 or every > int(cfg.train.steps):
        raise ConfigError(
            f"config.choose.eval_every={every} must be between 1 and train.steps={cfg.train.steps}: the students "
            "are compared at the steps it scores."
        )
    if str(cfg.choose.eval_split) == str(cfg.distill.split):
        raise ConfigError(
            f"config.choose.eval_split={cfg.choose.eval_split!r} is the split the students train on "
            "(distill.split); score them on one they never see, such as align."
        )
    root = RunPaths.from_config(cfg).root / "choose" / field
    out = []
    for name, value in zip(names, values):
        trial = cfg.copy_and_resolve_references()
        with trial.unlocked():
            trial.run.dir = str(root / name)
            trial.train.eval_every = every
            trial.distill.eval_split = str(cfg.choose.eval_split)
            trial.distill.keep_best = True
            proxy = RunPaths.from_config(cfg).proxy / "final"  # the run's aligned proxy (a trial has no proxy/)
            if not str(cfg.posterior.proxy) and proxy.exists():  # (missing: the stage's preflight names `align`)
                trial.posterior.proxy = str(proxy.expanduser().resolve())
            group, *rest = field.split(".")
            node = trial[group]
            for part in rest[:-1]:
                node = node[part]
            node[rest[-1]] = value
        out.append(Trial(value, name, trial))
    return out


def validate(cfg) -> None:
    """The choose group's checks, and each trial's config checked as its stages check theirs."""
    from proxykd_jax import config as config_lib

    for trial in trials(cfg):
        for stage in ("posterior", "distill") if str(cfg.choose.field).startswith("posterior.") else ("distill",):
            try:
                config_lib.validate(trial.cfg, stage)
            except ConfigError as e:
                raise ConfigError(f"config.choose.candidates: with {cfg.choose.field}={trial.name}: {e}") from None


def _link(folder: pathlib.Path, names: tuple[str, ...]) -> None:
    """`folder/<name>` -> the run's `<name>` (three levels up), for each name."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = folder / name
        if not link.is_symlink():
            if link.exists():
                raise ProxyKDError(f"{link} exists and is not a link to the run's {name}; remove it and run again.")
            link.symlink_to(pathlib.Path("..", "..", "..", name))


def run_choose(ctx, run_stage) -> dict:
    """Runs (or resumes) every trial of `ctx`'s config through `run_stage(name, ctx)`; returns the choice
    ({"field", "chosen", "trials": [{"value", "best_eval_loss", "best_step"}]}), written to choice.json."""
    from proxykd_jax.data.records import PreparedData
    from proxykd_jax.parallel import hosts

    cfg = ctx.cfg
    field = str(cfg.choose.field)
    planned = trials(cfg)
    prepared, split = PreparedData(ctx.paths.prepared), str(cfg.choose.eval_split)
    if split not in prepared.manifest["splits"]:
        raise ProxyKDError(
            f"config.choose.eval_split={split!r} is not a split of {prepared.root}; choose one of "
            f"{', '.join(prepared.manifest['splits'])} (one no stage distils on, such as align)."
        )
    prepared.require_samples(
        split, short=" to score the trials' students on", fix="choose another --config.choose.eval_split, or "
    )
    on_posterior = field.startswith("posterior.")
    art = ctx.artifact("choose")
    if not art.done:
        art.begin()
    links = ("prepared", "prior") if on_posterior else ("prepared", "prior", "posterior")
    if ctx.is_writer:
        for trial in planned:
            _link(art.work / trial.name, links)
    hosts.sync("choose_links")
    rows = []
    for i, trial in enumerate(planned):
        folder = art.work / trial.name
        with trial.cfg.unlocked():
            trial.cfg.run.dir = str(folder)  # (beside the artifact while it is being replaced)
        # (the run directory's lock, which `ctx` holds, covers the trials)
        tctx = dataclasses.replace(ctx.with_config(trial.cfg), paths=RunPaths(folder), lock=None)
        log.info("choose: %s=%s (%d of %d)", field, trial.name, i + 1, len(planned))
        if on_posterior:
            run_stage("posterior", tctx)
        summary = run_stage("distill", tctx)
        rows.append(
            {
                "value": trial.value,
                "best_eval_loss": float(summary["best_eval_nll"]),
                "best_step": int(summary["best_step"]),
                "student": str(art.path / trial.name / pathlib.Path(summary["final"]).parent.name),
            }
        )
    best = min(rows, key=lambda r: r["best_eval_loss"])
    choice = {"field": field, "split": str(cfg.choose.eval_split), "chosen": best["value"], "trials": rows}
    ctx.write_json(art.work / CHOICE, choice)
    art.finish({"chosen": best["value"], "values": len(rows)})
    print(table(choice), flush=True)
    return choice


def table(choice: dict) -> str:
    """The trials as a plain-text table, the chosen value marked, and how to use it."""
    field = choice["field"]
    lines = [f"{field:<24} {'lowest ' + choice['split'] + ' loss':>20} {'at step':>8}"]
    for r in choice["trials"]:
        mark = "  <- chosen" if r["value"] == choice["chosen"] else ""
        lines.append(f"{str(r['value']):<24} {r['best_eval_loss']:>20.4f} {r['best_step']:>8}{mark}")
    lines.append(
        f"[choose] {field}={choice['chosen']}: set --config.{field}={choice['chosen']} in this run, or use the trial's "
        "run directory as it is."
    )
    return "\n".join(lines)
