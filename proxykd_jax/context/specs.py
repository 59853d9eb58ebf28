"""The table of the stages' artifacts (`ARTIFACTS`): where each is, the config fields it depends on, its upstream
artifacts, the input files and model folders it reads (`Spec`).

Operational settings (batch sizes that only bound memory, progress bars, checkpoint cadence, rate limits, worker
counts) are left out of an artifact's fields: changing them never changes a result. Fields that name paths
(`PATH_FIELDS`) count by what they name: the absolute path they resolve to from the working directory
(`resolve_path`). `serve` writes nothing and has no entry. What a re-run does with the table: `context/artifacts.py`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import pathlib
from collections.abc import Callable, Sequence

from proxykd_jax.context.paths import STUDENT, STUDENT_SFT, RunPaths, student_name
from proxykd_jax.context.records import read_record, record_path


@dataclasses.dataclass(frozen=True)
class Spec:
    """One stage's artifact: where it is, the config fields it depends on, its upstream artifacts."""

    path: Callable[..., pathlib.Path]  # (cfg, paths) -> the artifact's folder (or file)
    fields: tuple[str, ...]  # dotted config keys; "group.*" = every field of the group
    ignore: tuple[str, ...] = ()  # keys matched by `fields` that do not change the result
    inputs: Callable[..., Sequence[pathlib.Path]] = lambda cfg, paths: ()  # upstream artifacts
    hint: str = ""  # where else the output could go, for the refusal message
    is_file: bool = False
    # input files or folders outside the run, (config key, path): identified by their content
    files: Callable[..., Sequence[tuple[str, pathlib.Path]]] = lambda cfg, paths: ()
    # model folders it reads, (config key, path): identified by their small files and weights' stamps (model_id)
    models: Callable[..., Sequence[tuple[str, pathlib.Path]]] = lambda cfg, paths: ()
    companions: tuple[str, ...] = ()  # a file artifact's companion files: suffixes after its name
    replace_note: str = ""  # what run.overwrite keeps, for the refusal message
    # fields the stage takes from elsewhere where the config leaves them unset, {dotted key: value}: recorded as
    # the value it works with, so a run that names it and one that leaves it to the stage are the same settings
    derived: Callable[..., dict] = lambda cfg, paths: {}


# The config fields that name files or folders. Each is recorded as the absolute path(s) it resolves to from
# the working directory of the run (`resolve_path`): a file named relative in one run and absolute in the next
# is the same setting, and a relative name re-run from another directory is another one. _PATH_LISTS name
# several, comma-separated.
PATH_FIELDS = (
    "collect.prompts",
    "collect.out",
    "data.corpus",
    "data.tokenizer",
    "proxy.init_from",
    "model.init_from",
    "posterior.proxy",
    "distill.white_box",
    "eval.known_teacher",
    "export.out",
    "serve.path",
    "serve.request_log",
)
_PATH_LISTS = ("collect.prompts", "data.corpus", "data.tokenizer")


def path_parts(key: str, value) -> list[str]:
    text = str(value or "")
    return [p for p in text.split(",") if p] if key in _PATH_LISTS else [text] * bool(text)


def resolve_path(key: str, value) -> str:
    """What the path field `key` = `value` names from here: its absolute path(s), user and symlinks resolved
    (comma-separated for a list); "" unset."""
    return ",".join(str(pathlib.Path(p).expanduser().resolve()) for p in path_parts(key, value))


def _corpus(cfg, paths: RunPaths) -> pathlib.Path:
    return pathlib.Path(cfg.collect.out).expanduser() if cfg.collect.out else paths.corpus


def _proxy_artifact(cfg, paths: RunPaths) -> list[pathlib.Path]:
    return [] if cfg.posterior.proxy else [paths.proxy]


def _path_list(key: str, value) -> list[tuple[str, pathlib.Path]]:
    """[(key, path)] of a path field (`PATH_FIELDS`): each path it names, resolved ([] when unset)."""
    return [(key, pathlib.Path(p)) for p in resolve_path(key, value).split(",") if p]


def _prepare_inputs(cfg, paths: RunPaths) -> list[pathlib.Path]:
    """The run's corpus, or the `data.corpus` files that `collect` made (a corpus file with its record,
    such as the run's own named by path): one still being collected is not prepared from."""
    if not cfg.data.corpus:
        return [paths.demo, _corpus(cfg, paths)]
    collected = [p for _, p in _path_list("data.corpus", cfg.data.corpus) if record_path(p, True).exists()]
    return [paths.demo] + collected


def _prepare_files(cfg, paths: RunPaths) -> list[tuple[str, pathlib.Path]]:
    return _path_list("data.corpus", cfg.data.corpus) + _path_list("data.tokenizer", cfg.data.tokenizer)


def export_source(cfg, paths: RunPaths) -> pathlib.Path:
    """The student folder `export` writes out: `export.source`, else the one `distill` writes with this config."""
    return paths.student(cfg.export.source or student_name(cfg.distill))


def recorded_start(cfg, paths: RunPaths) -> tuple[str, pathlib.Path]:
    """(the `model.init_from` in the record of the folder `export` writes out, "" where it names none; that
    record's path): the folder the student started from (`proxykd distill $R --config.model.init_from=F`)."""
    folder = export_source(cfg, paths)
    fields = (read_record(folder, False) or {}).get("fields")
    return (str(fields.get("model.init_from") or "") if isinstance(fields, dict) else ""), record_path(folder, False)


_MODEL_SHAPE = tuple(f"proxy.{f}" for f in ("vocab_size", "num_heads", "num_kv_heads", "d_ff", "max_seq_len"))
_DTYPES = ("proxy.dtype", "proxy.param_dtype", "model.dtype", "model.param_dtype")

# What each stage's artifact depends on. Operational settings (batch sizes that only bound memory,
# progress bars, checkpoint cadence, rate limits, worker counts) are left out: changing them never
# changes a result.
ARTIFACTS: dict[str, Spec] = {
    "demo": Spec(
        path=lambda cfg, paths: paths.demo,
        fields=("demo.*", "run.seed") + _MODEL_SHAPE,
    ),
    "collect": Spec(
        path=_corpus,
        fields=("collect.*",),
        ignore=(
            "collect.out",
            "collect.base_url",
            "collect.api_key",
            "collect.api_key_env",
            "collect.concurrency",
            "collect.requests_per_minute",
            "collect.tokens_per_minute",
            "collect.request_timeout_s",
            "collect.max_attempts",
            "collect.backoff_*",
            "collect.breaker_*",  # when an outage stops the run, not what it collects
            "collect.price_*",
            "collect.max_cost",  # where the run stops, not what it collects
            "collect.progress",
            "collect.seed",
        ),
        inputs=lambda cfg, paths: [paths.demo],
        hint="--config.collect.out=FILE for another corpus",
        is_file=True,
        files=lambda cfg, paths: _path_list("collect.prompts", cfg.collect.prompts),
        companions=(".failures.jsonl",),  # teacher/client.py: the failed and declined samples
        replace_note="; the samples already in it that the new settings still ask for are kept, not paid again",
    ),
    "prepare": Spec(
        path=lambda cfg, paths: paths.prepared,
        fields=("data.*",),
        ignore=(
            "data.prepare_buffer_mb",
            "data.records_per_file",
            "data.batch_size",
            "data.packing_bins",
            "data.shuffle",
            "data.shuffle_seed",
            "data.num_epochs",
            "data.num_workers",
            "data.worker_buffer_size",
            "data.store.*",
        ),
        inputs=_prepare_inputs,
        files=_prepare_files,
    ),
    "prior": Spec(
        path=lambda cfg, paths: paths.prior,
        fields=("prior.*",),
        ignore=("prior.kappa", "prior.buffer_pairs"),
        inputs=lambda cfg, paths: [paths.prepared],
    ),
    "align": Spec(
        path=lambda cfg, paths: paths.proxy,
        fields=("align.*", "proxy.*", "optim.*", "data.seq_len", "run.seed"),
        # each phase's schedule is its own: align.sft_lr / dpo_lr, align.warmup_steps, the decay over the phase
        ignore=("align.checkpoint_every", "align.logprob_chunk", "align.eval_batch_size", "align.cut_rows")
        + ("optim.lr", "optim.warmup_steps", "optim.decay_steps"),
        inputs=lambda cfg, paths: [paths.demo, paths.prepared],
        models=lambda cfg, paths: _path_list("proxy.init_from", cfg.proxy.init_from),
    ),
    "posterior": Spec(
        path=lambda cfg, paths: paths.posterior,
        fields=("posterior.*", "prior.kappa", "data.store.*", "data.seq_len", "proxy.dtype", "run.seed"),
        ignore=("posterior.chunk_tokens", "posterior.kernel", "data.store.shard_mb"),
        inputs=lambda cfg, paths: [paths.prepared, paths.prior] + _proxy_artifact(cfg, paths),
        models=lambda cfg, paths: _path_list("posterior.proxy", cfg.posterior.proxy),
    ),
    "distill": Spec(
        path=lambda cfg, paths: paths.student(student_name(cfg.distill)),
        fields=(
            "distill.*",
            "model.*",
            "optim.*",
            "train.steps",
            "train.batch_size",
            "train.seq_len",
            "train.eval_every",  # the steps distill.keep_best chooses from
            "data.packing_bins",
            "data.shuffle",
            "data.shuffle_seed",
            "data.num_epochs",
            "run.seed",
        ),
        ignore=("distill.output", "distill.loss.chunk_size"),
        inputs=lambda cfg, paths: [paths.prepared] + ([] if cfg.distill.white_box else [paths.posterior]),
        hint="--config.distill.output=NAME for another folder",
        models=lambda cfg, paths: (
            _path_list("model.init_from", cfg.model.init_from) + _path_list("distill.white_box", cfg.distill.white_box)
        ),
    ),
    "eval": Spec(
        path=lambda cfg, paths: paths.eval,
        # (each model is scored in the dtypes its own stage runs it in)
        fields=("eval.*", "data.seq_len", "proxy.init_from", "run.seed", *_DTYPES),
        inputs=lambda cfg, paths: [
            paths.demo,
            paths.prepared,
            paths.prior,
            paths.proxy,
            paths.posterior,
            paths.student(STUDENT),
            paths.student(STUDENT_SFT),
        ],
        models=lambda cfg, paths: (
            _path_list("proxy.init_from", cfg.proxy.init_from)
            + _path_list("eval.known_teacher", cfg.eval.known_teacher)
        ),
    ),
    "report": Spec(  # the ablation report (report/): results of every variant, report.md, PNGs
        path=lambda cfg, paths: paths.root / "report",
        fields=("*",),
        # which settings, seeds and variants run does not change any one result (each is its own file)
        ignore=(
            "run.dir",
            "run.overwrite",
            "mesh.*",
            "train.progress",
            "train.log_every",
            "train.steps_per_call",
            "train.eval_every",  # (each student's own record holds it)
            "posterior.kernel",
            "collect.*",
            "report.settings",
        )
        + ("report.seeds", "report.variants"),
    ),
    "choose": Spec(  # the trials of one field (choose.py): each its own run directory, choice.json
        path=lambda cfg, paths: paths.root / "choose" / str(cfg.choose.field),
        # each trial's stages record and check their own settings; a value added later is one more trial
        fields=("choose.field",),
    ),
    "export": Spec(
        path=lambda cfg, paths: pathlib.Path(cfg.export.out).expanduser() if cfg.export.out else paths.export,
        fields=("export.*", "model.*"),
        ignore=("export.out",),
        inputs=lambda cfg, paths: [export_source(cfg, paths)],
        hint="--config.export.out=FOLDER to write elsewhere",
        # the start folder whose config.json keys and stop ids it keeps: the config's, else the student's record's
        derived=lambda cfg, paths: {"model.init_from": cfg.model.init_from or recorded_start(cfg, paths)[0]},
    ),
}


def matches(key: str, patterns) -> bool:
    """Whether dotted config key `key` is one of `patterns` ("group.*" patterns match a whole group)."""
    return any(fnmatch.fnmatchcase(key, p) or key == p for p in patterns)


def depends(spec: Spec, key: str) -> bool:
    """Whether the artifact of `spec` depends on config field `key` (a dotted key)."""
    return matches(key, spec.fields) and not matches(key, spec.ignore)


# The stages a `proxykd choose` trial may run, in pipeline order, each with those whose artifacts it reads.
TRIAL_CHAIN = ("prior", "align", "posterior", "distill")
_TRIAL_READS = {"prior": (), "align": (), "posterior": ("prior", "align"), "distill": ("posterior",)}


def trial_stages(field: str) -> tuple[str, ...]:
    """The stages a `proxykd choose` trial of config field `field` runs: those of `TRIAL_CHAIN` whose artifact
    depends on it, and every later one that reads one of theirs; () where none does (it changes none of their
    results)."""
    run: list[str] = []
    for stage in TRIAL_CHAIN:
        if depends(ARTIFACTS[stage], field) or any(up in run for up in _TRIAL_READS[stage]):
            run.append(stage)
    return tuple(run)
