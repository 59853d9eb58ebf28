"""`proxykd choose`: one setting chosen by the students' validation loss.

Some settings are measured, not derived: whether the stored posterior counts the response's own token
(`posterior.own_token`) helps on one teacher–proxy pair and hurts on another, and so does aligning the proxy at all
(README, Results); the KL weight `distill.loss.alpha` or the proxy's evidence `posterior.n_max` have no value right
for every pair. `choose` tries each value of `choose.field` in `choose.candidates` and keeps the one whose student
scores best on text none of them trained on.

A field is tried where it acts: a trial runs the stages of prior, align, posterior and distill whose artifact depends
on the field (the artifact table, `context.specs`) and every later one that reads theirs (`specs.trial_stages`:
`posterior.own_token` runs posterior and distill; `align.rounds` align, posterior and distill; `distill.loss.alpha`
distill alone). Each value is a run directory of its own, `<run>/choose/<field>/<value>/`, whose folders of the
stages it does not run (`prepared`, and `prior`, `proxy` or `posterior`) are links to the run's (`links`); so are
those of the stages it runs whose artifact the run already has finished with the trial's settings and inputs, a
candidate that is the run's own value (`_reusable`: they are reused, not made again). Its student
is scored every `choose.eval_every` steps on `choose.eval_split` (the `align` split by default: no stage distils on
it, and `heldout` stays for `eval`) and its lowest-loss step kept (`distill.keep_best`). The value whose student
reached the lowest loss is chosen; `<run>/choose/<field>/choice.json` holds every value's lowest loss (per token of
the split's responses) and its step. Every trial is an ordinary run directory: each stage in it resumes after
`kill -9`, one made with other settings is refused as anywhere else (`run.overwrite` replaces it), values added later
reuse the trials already finished, and `eval` or `export` run in a trial's directory as in any run. Fields that place
inputs or outputs, score the students, change the prepared data every trial shares, or change no result are refused
before any work (`FIXED`, `_check_field`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib

import ml_collections

from proxykd_jax.context.paths import RunPaths
from proxykd_jax.context.specs import ARTIFACTS, PATH_FIELDS, depends, matches, trial_stages
from proxykd_jax.errors import ConfigError, ProxyKDError

log = logging.getLogger(__name__)

CHOICE = "choice.json"
# The run directory's folder of each stage's artifact (linked into a trial that does not make it).
FOLDER = {"prepare": "prepared", "prior": "prior", "align": "proxy", "posterior": "posterior"}
# Fields a trial may not vary: where its inputs or outputs are, how its students are scored and kept, and the
# run's own settings (the path fields, `specs.PATH_FIELDS`, too).
FIXED = (
    "run.*",
    "mesh.*",
    "choose.*",
    "train.eval_every",
    "distill.output",
    "distill.split",
    "distill.eval_split",
    "distill.keep_best",
    "distill.white_box",
)


def links(cfg, field: str) -> tuple[str, ...]:
    """The run directory's folders a trial of `field` reads as they are: links in its own directory."""
    run = trial_stages(field)
    linked = [FOLDER["prepare"]] + [FOLDER[s] for s in ("prior", "posterior") if s not in run]
    if "align" not in run and "posterior" in run and not str(cfg.posterior.proxy):
        linked.append(FOLDER["align"])  # (posterior.proxy set: the trials' posteriors read that folder)
    return tuple(linked)


def default_config() -> ml_collections.ConfigDict:
    """The `choose` group."""
    cd = ml_collections.ConfigDict()
    cd.field = "posterior.own_token"  # the setting to choose: one of prior, align, posterior or distill (align.rounds)
    cd.candidates = "leave_out,count"  # its values to try, comma-separated: a trial run directory each
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


def _check_field(cfg, flat: dict) -> str:
    """`choose.field`, refused where it cannot be chosen; `flat`: the config's fields by dotted key."""
    field = str(cfg.choose.field).strip()
    if field not in flat:
        raise ConfigError(
            f"config.choose.field={field!r} is not a config field; name one as --config.FIELD names it, e.g. "
            "posterior.own_token, posterior.n_max, distill.loss.alpha or align.rounds."
        )
    if not isinstance(flat[field], (bool, int, float, str)):
        raise ConfigError(
            f"config.choose.field={field!r} holds a {type(flat[field]).__name__}; choose tries settings that take one "
            "number, word or true/false."
        )
    if matches(field, FIXED) or field in PATH_FIELDS:
        raise ConfigError(
            f"config.choose.field={field!r} cannot be chosen: every trial keeps it as the run has it (it places the "
            "trials' inputs or outputs, scores or keeps their students, or is the run's own setting)."
        )
    if depends(ARTIFACTS["prepare"], field):
        raise ConfigError(
            f"config.choose.field={field!r} changes the prepared data, which every trial shares; choose a setting of "
            "prior, align, posterior or distill."
        )
    run = trial_stages(field)
    if not run:
        raise ConfigError(
            f"config.choose.field={field!r} changes no result of prior, align, posterior or distill (it bounds memory "
            "or time, or no stage of theirs reads it); choose a setting that does."
        )
    if "align" in run and str(cfg.posterior.proxy):
        raise ConfigError(
            f"config.choose.field={field!r} makes each trial align its own proxy, but posterior.proxy names a proxy "
            "folder its posterior would read instead; set --config.posterior.proxy='' (the aligned proxy)."
        )
    return field


def trials(cfg) -> list[Trial]:
    """Each value's trial config (`choose.field` set, run.dir its folder, its student scored and the best step
    kept), checked before any work: a field not chosen from, a value not of the field's type, fewer than two
    distinct values, a name that is no folder name."""
    from proxykd_jax.context.artifacts import flatten

    flat = flatten(cfg.to_dict())
    field = _check_field(cfg, flat)
    names = [v.strip() for v in str(cfg.choose.candidates).split(",") if v.strip()]
    values = [_parse(field, n, flat[field]) for n in names]
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
            trial.update_from_flattened_dict({field: value})
        out.append(Trial(value, name, trial))
    return out


def _link(folder: pathlib.Path, names, made_here: bool = False) -> None:
    """`folder/<name>` -> the run's `<name>` (three levels up), for each name. `made_here`: a folder the trial made
    itself in an earlier run is kept (its stage decides about it) rather than refused."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = folder / name
        if not link.is_symlink():
            if link.exists() and made_here:
                continue
            if link.exists():
                raise ProxyKDError(f"{link} exists and is not a link to the run's {name}; remove it and run again.")
            link.symlink_to(pathlib.Path("..", "..", "..", name))


def _reusable(ctx, trial_cfg, run: tuple[str, ...]) -> list[str]:
    """The folders, in the run directory, of the leading stages of `run` whose artifact there is finished with the
    trial's settings and inputs (a candidate that is the run's own value): linked into the trial, they are reused
    rather than made again. The first stage that differs, and every later one, is the trial's own."""
    from proxykd_jax.context.artifacts import outlook
    from proxykd_jax.context.paths import student_name
    from proxykd_jax.parallel import hosts

    as_run = trial_cfg.copy_and_resolve_references()
    with as_run.unlocked():
        as_run.run.dir = str(ctx.paths.root)
    out = []
    for stage in run:
        look = outlook(stage, as_run, ctx.paths, share=hosts.broadcast_text)
        if look.state != "finished":  # (", other settings" where it differs)
            break
        out.append(student_name(as_run.distill) if stage == "distill" else FOLDER[stage])
    return out


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
    run, linked = trial_stages(field), links(cfg, field)
    reused = {trial.name: _reusable(ctx, trial.cfg, run) for trial in planned}
    art = ctx.artifact("choose")
    if not art.done:
        art.begin()
    if ctx.is_writer:
        for trial in planned:
            _link(art.work / trial.name, linked)
            _link(art.work / trial.name, reused[trial.name], made_here=True)
    hosts.sync("choose_links")
    rows = []
    for i, trial in enumerate(planned):
        folder = art.work / trial.name
        with trial.cfg.unlocked():
            trial.cfg.run.dir = str(folder)  # (beside the artifact while it is being replaced)
        # (the run directory's lock, which `ctx` holds, covers the trials)
        tctx = dataclasses.replace(ctx.with_config(trial.cfg), paths=RunPaths(folder), lock=None)
        log.info("choose: %s=%s (%d of %d)", field, trial.name, i + 1, len(planned))
        for stage in run[:-1]:
            run_stage(stage, tctx)
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
