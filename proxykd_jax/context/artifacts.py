"""One overwrite rule for every stage, and the table of what each stage's artifact depends on.

A stage's output (its *artifact*: a folder, or the corpus file) carries a record, `artifact.json`
in the folder (`<file>.artifact.json` beside a file): the config fields that produced it (the
table below), the hashes of the upstream artifacts it was made from, the content digests of the
input files outside the run it read (`collect.prompts`, `data.corpus`, `data.tokenizer`), the
identities of the model folders it read (`proxy.init_from`, `model.init_from`, `posterior.proxy`,
`distill.white_box`, `eval.known_teacher`), a hash of all of these, and whether it is finished.
The record is written when the stage starts, so an interrupted stage is known too. Fields that name paths
(`PATH_FIELDS`) count by what they name: the absolute path they resolve to from the working directory.

Running a stage again:
  * same fields and inputs, finished      -> the artifact is reused (the stage does nothing);
  * same fields and inputs, not finished  -> the stage resumes where it stopped;
  * different fields or inputs            -> it stops with one sentence naming what changed,
    unless `run.overwrite=True`: then the new artifact is written beside the old one
    (`.<name>.new`, resumable too) and renamed into place only when finished, so nothing finished
    is lost if the redo dies (`collect` first copies into it the samples of the old corpus that
    the new settings still ask for: nothing already paid for is requested again);
  * a non-empty output without a record (not made by a stage) -> refused unless run.overwrite;
  * an upstream artifact that is not finished -> refused (its stage must finish it first).
`outlook` says which of these the next run would do without doing it (`proxykd status`); `open_artifact`
acts on it.

An upstream artifact's hash is part of its dependants' inputs, so rebuilding `prepared/` with
other settings makes `prior/`, `proxy/`, ... stale, and they say so when run. An input file's
identity is its content (sha256, about 1.5 GB/s; the record keeps each file's size and mtime_ns
with its digest, so an unchanged file is not read again), so a prompts file or corpus edited in
place counts as changed. A model folder's identity is the content of its small files and the size
and mtime_ns of its weights (`model_id`: reading the weights would cost seconds per GB), so weights
replaced in place count as changed too. A record written before input files (model folders) were
recorded keeps its hash and matches on what it recorded. A file artifact is the file and its
companions (`<name>.failures.jsonl`, the record); nothing else beside it is touched. The move into
place is resumable: a run killed half-way through it is completed by the next `open_artifact`.
`serve` writes nothing and has no entry.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Sequence

from proxykd_jax.context.paths import STUDENT, STUDENT_SFT, RunPaths, student_name
from proxykd_jax.errors import ProxyKDError

RECORD = "artifact.json"


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


def _path_parts(key: str, value) -> list[str]:
    text = str(value or "")
    return [p for p in text.split(",") if p] if key in _PATH_LISTS else [text] * bool(text)


def resolve_path(key: str, value) -> str:
    """What the path field `key` = `value` names from here: its absolute path(s), user and symlinks resolved
    (comma-separated for a list); "" unset."""
    return ",".join(str(pathlib.Path(p).expanduser().resolve()) for p in _path_parts(key, value))


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
        ignore=("align.checkpoint_every", "align.logprob_chunk", "align.eval_batch_size")
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
            "posterior.kernel",
            "collect.*",
            "report.settings",
        )
        + ("report.seeds", "report.variants"),
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


def record_path(path: pathlib.Path, is_file: bool) -> pathlib.Path:
    return path.with_name(path.name + "." + RECORD) if is_file else path / RECORD


def read_record(path: pathlib.Path, is_file: bool | None = None) -> dict | None:
    """The record of the artifact at `path` (None when it has none or it is unreadable)."""
    candidates = [is_file] if is_file is not None else [False, True]
    for kind in candidates:
        try:
            rec = json.loads(record_path(path, kind).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict):
            return rec
    return None


def flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) or key == p for p in patterns)


# Fields added after artifacts were recorded, by their last name, with the value that computes what runs
# before them did: at that value a field is left out of an artifact's settings, so the records made before it
# was added (and their hashes) still match.
_ADDED_FIELDS = {"qk_norm": False, "token_limit": "max_tokens", "send_sampling": True}


def depends_on(cfg, spec: Spec) -> dict:
    """{dotted key: value} of the config fields `spec` depends on, as JSON values (less `_ADDED_FIELDS` at the
    value that runs before them computed; `PATH_FIELDS` as what they name: `resolve_path`)."""
    flat = flatten(cfg.to_dict())
    picked = {k: v for k, v in flat.items() if _matches(k, spec.fields) and not _matches(k, spec.ignore)}
    missing = object()
    picked = {k: v for k, v in picked.items() if _ADDED_FIELDS.get(k.rsplit(".", 1)[-1], missing) != v}
    picked = {k: resolve_path(k, v) if k in PATH_FIELDS and isinstance(v, str) else v for k, v in picked.items()}
    return json.loads(json.dumps(picked, sort_keys=True, default=repr))


def _as_recorded(recorded: dict, fields: dict) -> tuple[dict, dict]:
    """(`fields` with the text a record names a path field by, where that text resolves here to the path these
    fields name; {input key with the path: the key with the text}): records written before path fields were
    recorded resolved kept the text they were given, in their fields and in the keys of their input files."""
    named, keys = dict(fields), {}
    for key in PATH_FIELDS:
        text, ours = recorded.get(key), fields.get(key)
        if isinstance(text, str) and isinstance(ours, str) and text != ours and resolve_path(key, text) == ours:
            named[key] = text
            for part, path in zip(_path_parts(key, text), _path_parts(key, ours)):
                keys[f"{key} ({path})"] = f"{key} ({pathlib.Path(part).expanduser()})"
    return named, keys


def _rekey(ids: dict | None, keys: dict) -> dict | None:
    return None if ids is None else {keys.get(k, k): v for k, v in ids.items()}


def _hash(fields: dict, inputs: dict, files: dict | None = None, models: dict | None = None) -> str:
    # without input files (model folders) the hash is what it was before they were recorded: old records stay valid
    payload = {"fields": fields, "inputs": inputs} | ({"files": files} if files else {})
    payload |= {"models": models} if models else {}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------ input files

# Skipped inside an input folder: a tokenizer folder is often a model's whole Hugging Face folder,
# whose weights say nothing about the tokenizer (and would cost seconds per GB to read).
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz", ".onnx")
_RACY_NS = 2_000_000_000  # a file modified this recently may change again within its mtime tick
_BIG = 64 << 20  # a model folder's file this large counts as weights whatever its name (by its stamp, not read)


def _file_digest(path: pathlib.Path, known: dict, stamps: dict) -> str:
    """sha256 of a file's bytes; reuses `known[path] = [size, mtime_ns, digest]` while size and mtime_ns
    are unchanged, and notes the stamp in `stamps` (not for a file modified in the last 2 s)."""
    st = path.stat()
    key = str(path.absolute())
    cached = known.get(key)
    if isinstance(cached, list) and len(cached) == 3 and cached[:2] == [st.st_size, st.st_mtime_ns]:
        digest = cached[2]
    else:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        digest = h.hexdigest()
    if time.time_ns() - st.st_mtime_ns > _RACY_NS:
        stamps[key] = [st.st_size, st.st_mtime_ns, digest]
    return digest


def content_id(path: pathlib.Path, known: dict | None = None, stamps: dict | None = None) -> str:
    """The identity of an input file or folder: the sha256 of its bytes (of a folder: of its files' relative
    paths and digests, hidden files and model weights left out); "missing" when it does not exist."""
    known = {} if known is None else known
    stamps = {} if stamps is None else stamps
    try:
        if path.is_file():
            return _file_digest(path, known, stamps)
        if not path.is_dir():
            return "missing"
        entries = [[rel, _file_digest(f, known, stamps)] for rel, f in _folder_files(path) if not _is_weights(f)]
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    except OSError as e:
        raise ProxyKDError(f"cannot read the input {path} ({e.strerror or e}); check that it is readable.") from None


def _folder_files(folder: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """(relative path, file) of every file in `folder`, sorted; hidden files and folders left out."""
    out = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if not any(part.startswith(".") for part in rel.parts) and f.is_file():
            out.append((rel.as_posix(), f))
    return out


def _is_weights(f: pathlib.Path, size: int = 0) -> bool:
    return f.name.endswith(_WEIGHTS) or size >= _BIG


def model_id(path: pathlib.Path, known: dict | None = None, stamps: dict | None = None) -> str:
    """The identity of an input model folder (a Hugging Face folder, a known teacher): the sha256 of, per
    file, its relative path and either the sha256 of its bytes (config.json, tokenizer files: small, and
    cached in the record like input files) or, for model weights (a weights suffix, or 64 MiB and more),
    its size and mtime_ns; "missing" when it does not exist.

    Weights are not read because that costs seconds per GB on the first look in every run directory
    (minutes for a 7B model), while a save, a download or a copy that replaces a weights file gives it a new
    mtime_ns: weights replaced in place count as changed. What the stamp cannot tell: the same weights
    copied anew (`cp` without `-p`, a fresh download) also count as changed (a refusal to confirm with
    run.overwrite, never a stale reuse), and a replacement that keeps both size and mtime_ns (`cp -p` of
    weights of the same size, `touch -r`) is not seen. The folder's path is a config field, so pointing a
    stage at a copy elsewhere changes its settings whatever the copy holds."""
    known = {} if known is None else known
    stamps = {} if stamps is None else stamps
    try:
        if path.is_file():
            files = [(path.name, path)]
        elif path.is_dir():
            files = _folder_files(path)
        else:
            return "missing"
        entries = []
        for rel, f in files:
            st = f.stat()
            if _is_weights(f, st.st_size):
                entries.append([rel, st.st_size, st.st_mtime_ns])
            else:
                entries.append([rel, _file_digest(f, known, stamps)])
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    except OSError as e:
        raise ProxyKDError(f"cannot read the input {path} ({e.strerror or e}); check that it is readable.") from None


def _input_files(spec: Spec, cfg, paths: RunPaths, records) -> tuple[dict, dict, dict]:
    """({"<config key> (<path>)": content id} of `spec`'s input files, the same with the model_id of its model
    folders, {file: [size, mtime_ns, digest]} of the files read for them)."""
    known = {}
    for rec in records:
        if rec and isinstance(rec.get("stamps"), dict):
            known.update(rec["stamps"])
    files, models, stamps = {}, {}, {}
    for key, path in spec.files(cfg, paths):
        files[f"{key} ({path})"] = content_id(path, known, stamps)
    for key, path in spec.models(cfg, paths):
        models[f"{key} ({path})"] = model_id(path, known, stamps)
    return files, models, stamps


def run_relative(path: pathlib.Path, paths: RunPaths) -> str:
    """`path` relative to the run directory where it lies inside it, else whole."""
    try:
        return str(path.relative_to(paths.root))
    except ValueError:
        return str(path)


def _changes(old: dict, new: dict, old_inputs: dict, new_inputs: dict, old_ids=(), new_ids=()) -> list[str]:
    """What differs, one phrase each; `old_ids`/`new_ids`: the records' input files and model folders, in turn
    (an old one None: the record is from before they were recorded, there is nothing to compare)."""
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            show = lambda v: "(unset)" if v is missing else json.dumps(v)  # noqa: E731
            # a path recorded as its text (an older record): what it names from here too
            here = resolve_path(key, a) if key in PATH_FIELDS and isinstance(a, str) else a
            out.append(f"{key} {show(a)}" + (f" (here {here})" if here != a else "") + f" -> {show(b)}")
    for key in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(key) != new_inputs.get(key):
            if key not in new_inputs:
                out.append(f"it was made from {key}/, no longer an input")
            else:
                out.append(f"its input {key}/ " + ("was rebuilt" if key in old_inputs else "is new"))
    for old_files, new_files in zip(old_ids, new_ids):
        if old_files is None:  # records made before these were recorded have none to compare
            continue
        for key in sorted(set(new_files or {}) - set(old_files)):
            out.append(f"its input {key} is new")
        for key in sorted(set(old_files) & set(new_files or {})):
            if old_files[key] != new_files[key]:
                out.append(f"the content of its input {key} changed")
    return out


@dataclasses.dataclass
class Artifact:
    """One stage's artifact and what to do with it: status is new, resume, done or replace.

    `work` is where the stage writes: the artifact itself, or `.<name>.new` beside it when
    replacing. Call `begin()` before writing and `finish(summary)` when done.
    """

    name: str
    path: pathlib.Path
    work: pathlib.Path
    status: str
    fields: dict
    inputs: dict
    hash: str
    is_file: bool
    summary: dict | None = None  # of a finished artifact being reused
    sync: Callable[[str], None] = lambda name: None
    writer: bool = True  # this process writes records (process 0)
    files: dict = dataclasses.field(default_factory=dict)  # content ids of the input files
    models: dict = dataclasses.field(default_factory=dict)  # model_id of the input model folders
    stamps: dict = dataclasses.field(default_factory=dict)  # their sizes and mtimes (not hashed)
    companions: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        return self.status == "done"

    def _record(self, finished: bool, summary=None) -> dict:
        rec = {"stage": self.name, "hash": self.hash, "finished": finished, "fields": self.fields}
        rec.update(inputs=self.inputs, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        rec.update(files=self.files, models=self.models, stamps=self.stamps)
        if finished and self.is_file:  # which companions the swap moves (context: _swap_file)
            rec["companions"] = [s for s in ("",) + self.companions if _part(self.work, s).exists()]
        if summary is not None:
            rec["summary"] = summary
        return rec

    def _write_record(self, where: pathlib.Path, rec: dict) -> None:
        target = record_path(where, self.is_file)
        tmp, created = target.with_name(target.name + ".tmp"), not target.parent.exists()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(rec, indent=1, sort_keys=True, default=repr))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            tmp.replace(target)
        except OSError as e:  # a full disk, a read-only folder: the record stays as it was
            tmp.unlink(missing_ok=True)
            if created:
                shutil.rmtree(target.parent, ignore_errors=True)
            raise ProxyKDError(
                f"cannot write {target} ({e.strerror or e}); free space or fix the folder's permissions, then "
                "re-run the same command."
            ) from None

    def stale_work(self) -> bool:
        """Whether `work` is an abandoned redo made with other settings (or without a record), which
        `begin()` removes; only when replacing."""
        if self.status != "replace":
            return False
        rec = read_record(self.work, self.is_file)
        return rec is None or rec.get("hash") != self.hash

    def begin(self) -> None:
        """Marks the artifact as being made (before the stage writes anything into `work`)."""
        if self.done:
            raise RuntimeError(f"{self.path} is finished; a stage reuses it instead of calling begin().")
        self.sync(f"artifact {self.name}: decided")
        if self.writer:
            if self.stale_work():
                _remove(self.work, self.is_file, self.companions)
            if not self.is_file:
                self.work.mkdir(parents=True, exist_ok=True)
            self._write_record(self.work, self._record(False))
        self.sync(f"artifact {self.name}: begun")

    def finish(self, summary: dict | None = None) -> None:
        """Records the artifact as finished (with `summary`) and, when replacing, moves it into place."""
        self.sync(f"artifact {self.name}: finishing")
        if self.writer:
            self._write_record(self.work, self._record(True, summary))
            if self.work != self.path:
                _swap(self.work, self.path, self.is_file, self.companions)
        self.status, self.work, self.summary = "done", self.path, summary
        self.sync(f"artifact {self.name}: finished")


def _part(path: pathlib.Path, suffix: str) -> pathlib.Path:
    """The companion `suffix` of the file artifact `path` ("" is the file itself)."""
    return path.with_name(path.name + suffix)


def _old(p: pathlib.Path) -> pathlib.Path:
    return p.with_name(".old." + p.name)


def _file_parts(path: pathlib.Path, companions: Sequence[str]) -> list[pathlib.Path]:
    """Every file that belongs to the file artifact `path`: itself, its companions, its record (and a
    record being written). Only these: other files whose names start with `path`'s are the user's."""
    rec = record_path(path, True)
    return [_part(path, s) for s in ("",) + tuple(companions)] + [rec, rec.with_name(rec.name + ".tmp")]


def _remove(path: pathlib.Path, is_file: bool, companions: Sequence[str] = ()) -> None:
    if is_file:
        for p in _file_parts(path, companions):
            p.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _swap(work: pathlib.Path, path: pathlib.Path, is_file: bool, companions: Sequence[str] = ()) -> None:
    """Moves the finished `work` into `path`; the old artifact is removed only after that.

    Resumable from any point: while it runs, `path` has no record (a folder: `path` is missing), and
    `open_artifact` calls it again when it finds that state next to a finished `work`."""
    if is_file:
        _swap_file(work, path, companions)
        return
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    work.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _swap_file(work: pathlib.Path, path: pathlib.Path, companions: Sequence[str]) -> None:
    """The file version of `_swap`. The old record goes first and the new record comes last, so a record
    at `path` always describes a whole artifact; the finished record lists which parts it has."""
    suffixes = ("",) + tuple(companions)
    rec_target, rec_work = record_path(path, True), record_path(work, True)
    moving = (read_record(work, True) or {}).get("companions")
    if moving is None:  # a record written before companions were listed
        moving = [s for s in suffixes if _part(work, s).exists()]
    if rec_target.exists():
        rec_target.rename(_old(rec_target))
    for s in suffixes:
        target, source = _part(path, s), _part(work, s)
        if s in moving and not source.exists():
            continue  # moved before an interruption
        if target.exists():  # the old artifact's: kept aside until the new one is in place
            target.rename(_old(target))
        if s in moving:
            source.rename(target)
    rec_work.rename(rec_target)
    _tidy(path, True, companions)
    _file_parts(work, companions)[-1].unlink(missing_ok=True)


def _tidy(path: pathlib.Path, is_file: bool, companions: Sequence[str]) -> None:
    """Removes what a swap killed after the new artifact was in place left behind (the old artifact)."""
    if is_file:
        for p in _file_parts(path, companions)[:-1]:
            _old(p).unlink(missing_ok=True)
    else:
        shutil.rmtree(path.with_name(f".{path.name}.old"), ignore_errors=True)


def settle(path: pathlib.Path, is_file: bool | None = None, *, writer: bool = True) -> dict | None:
    """The record of the artifact at `path`, after completing a move into place that was interrupted
    (`path` has no record and `.<name>.new` beside it is finished); None when there is none. Only the
    `writer` moves files; the other processes read what the move leads to."""
    beside = path.with_name(f".{path.name}.new")
    for _ in range(2):  # twice: the writer may move the artifact between the two reads
        rec = read_record(path, is_file)
        if rec is not None:
            return rec
        new = read_record(beside, is_file)
        if new is not None and new.get("finished") and new.get("stage") in ARTIFACTS:
            break
    else:
        return None
    spec = ARTIFACTS[new["stage"]]
    if writer:
        try:
            _swap(beside, path, spec.is_file, spec.companions)
        except OSError as e:
            raise ProxyKDError(
                f"cannot move the finished {beside} into place at {path} ({e.strerror or e}); fix the folder's "
                "permissions and re-run the same command."
            ) from None
    return new


def _is_empty(path: pathlib.Path, is_file: bool) -> bool:
    """Whether nothing is at `path` yet: a folder holding only the first record of a run killed while it
    wrote it (`artifact.json.tmp`, before the rename) holds nothing of anyone's either."""
    if is_file:
        return not path.exists()
    return not path.exists() or {p.name for p in path.iterdir()} <= {RECORD + ".tmp"}


def _unfinished_input(name: str, upstream: pathlib.Path, rec: dict, paths: RunPaths) -> ProxyKDError:
    maker = rec.get("stage", "?")
    where = record_path(upstream, not (upstream / RECORD).exists())
    return ProxyKDError(
        f"{run_relative(upstream, paths)} is not finished (its `proxykd {maker}` run stopped before the end), so "
        f"`proxykd {name}` cannot use it yet: re-run that `proxykd {maker}` command to finish it (its settings are "
        f"in {where}), or rebuild it with --config.run.overwrite=True, then run `proxykd {name}` again."
    )


def _upstream(name: str, cfg, paths: RunPaths, *, writer: bool) -> tuple[dict, list[tuple[pathlib.Path, dict]]]:
    """({label: hash} of the upstream artifacts of stage `name` that have a record, [(upstream, record)] of
    those not finished). Once one is not finished the stage stops: it completes no move of the others."""
    inputs, waiting = {}, []
    for upstream in ARTIFACTS[name].inputs(cfg, paths):
        rec = settle(upstream, writer=writer and not waiting)
        if rec is None:
            continue
        if not rec.get("finished"):
            waiting.append((upstream, rec))
        inputs[run_relative(upstream, paths)] = rec.get("hash")
    return inputs, waiting


def check_inputs(name: str, cfg, paths: RunPaths, *, writer: bool = True) -> dict:
    """{label: hash} of the upstream artifacts of stage `name`; raises when one is not finished (a stage
    that read it would be made from part of it, and reused as if from all of it once it finishes)."""
    inputs, waiting = _upstream(name, cfg, paths, writer=writer)
    if waiting:
        raise _unfinished_input(name, *waiting[0], paths)
    return inputs


@dataclasses.dataclass
class Outlook:
    """What the next run of a stage would find (`outlook`): its artifact as `open_artifact` decides it
    before the overwrite rule (status new, resume or done), and what the rule acts on."""

    artifact: Artifact
    record: dict | None  # the artifact's record (None: it has none)
    redo: dict | None  # the record of the redo beside it (`.<name>.new`, run.overwrite), if any
    changes: list[str]  # what differs from the record, one phrase each ([]: it matches, or there is none)
    waiting: list[tuple[pathlib.Path, dict]]  # (upstream artifact, its record) of those not finished
    foreign: bool  # a non-empty output without a record (not made by the stage)

    @property
    def state(self) -> str:
        """finished | unfinished (", other settings" where the record differs) | not started | not made by proxykd."""
        if self.record is None:
            return "not made by proxykd" if self.foreign else "not started"
        done = "finished" if self.record.get("finished") else "unfinished"
        return done + (", other settings" if self.changes else "")


def outlook(
    name: str, cfg, paths: RunPaths, *, writer: bool = False, share: Callable[[str], str] = lambda text: text
) -> Outlook:
    """What the next `proxykd <name>` would find, raising nothing for a refusal. Reads files only (and hashes
    the input files whose size or mtime changed since the record: `content_id`); the `writer` completes an
    interrupted move into place, where no upstream artifact is unfinished. `share`: as in `open_artifact`."""
    spec = ARTIFACTS[name]
    path = spec.path(cfg, paths)
    inputs, waiting = _upstream(name, cfg, paths, writer=writer)
    writer = writer and not waiting  # a stage that stops for its inputs moves nothing of its own
    configured = depends_on(cfg, spec)
    derived = {k: resolve_path(k, v) if k in PATH_FIELDS else v for k, v in spec.derived(cfg, paths).items()}
    fields = configured | {k: v for k, v in derived.items() if k in configured}
    rec = settle(path, spec.is_file, writer=writer)
    if rec is not None and writer:
        _tidy(path, spec.is_file, spec.companions)
    redo = read_record(path.with_name(f".{path.name}.new"), spec.is_file)
    files, models, stamps = _input_files(spec, cfg, paths, [rec, redo])
    if models:  # one entry per model folder the config names: every process takes part, or none
        models = json.loads(share(json.dumps(models, sort_keys=True)))
    digest = _hash(fields, inputs, files, models)
    art = Artifact(name, path, path, "new", fields, inputs, digest, spec.is_file, writer=writer)
    art.files, art.models, art.stamps, art.companions = files, models, stamps, spec.companions
    look = Outlook(art, rec, redo, [], waiting, rec is None and not _is_empty(path, spec.is_file))
    if rec is None:
        return look
    # a record made before input files (model folders) were recorded matches on what it recorded: its fields
    # (which name their paths) and upstream artifacts; it is not taken for a changed one;
    # a field the stage has ignored since (it never changed the result) is taken as the record has it;
    # a path field recorded as its text is taken as the record has it where it names the same path (`_as_recorded`);
    # and a derived field recorded as the config had it (before it was derived) is taken so
    old = rec.get("fields", {})
    old = old if isinstance(old, dict) else {}
    then = {k: v for k, v in old.items() if _matches(k, spec.ignore)}
    hashes = {digest}
    for variant in (fields, configured):
        named, keys = _as_recorded(old, variant)
        old_files, old_models = files if "files" in rec else None, models if "models" in rec else None
        hashes.add(_hash(named | then, inputs, _rekey(old_files, keys), _rekey(old_models, keys)))
    if rec.get("hash") in hashes:
        art.status = "done" if rec.get("finished") else "resume"
        art.summary = rec.get("summary")
    else:
        named, keys = _as_recorded(old, fields)
        old_ids, new_ids = (rec.get("files"), rec.get("models")), (_rekey(files, keys), _rekey(models, keys))
        look.changes = _changes(old, named, rec.get("inputs", {}), inputs, old_ids, new_ids) or [
            "(unknown: its record is from another version)"
        ]
    return look


def open_artifact(
    name: str,
    cfg,
    paths: RunPaths,
    *,
    overwrite: bool,
    sync=lambda name: None,
    writer: bool = True,
    share: Callable[[str], str] = lambda text: text,
) -> Artifact:
    """Decides what the stage `name` does with its artifact (reads files only, except to complete an
    interrupted move into place; raises on a refusal). `share`: process 0's text on every process
    (`hosts.broadcast_text`): the model folders' identities are process 0's, since a folder copied
    to each host's own disk has other mtimes there, and the processes must decide alike."""
    spec = ARTIFACTS[name]
    look = outlook(name, cfg, paths, writer=writer, share=share)
    if look.waiting:
        raise _unfinished_input(name, *look.waiting[0], paths)
    art, rec, redo = look.artifact, look.record, look.redo
    art.sync, art.writer = sync, writer
    path, digest = art.path, art.hash
    beside = path.with_name(f".{path.name}.new")
    hint = f", {spec.hint}" if spec.hint else ""
    if rec is None:
        if not look.foreign:
            return art
        if not overwrite:
            raise ProxyKDError(
                f"{path} exists but was not made by `proxykd {name}` (it has no {record_path(path, spec.is_file)}); "
                f"set --config.run.overwrite=True to replace it{hint}, or choose another --config.run.dir."
            )
        art.status, art.work = "replace", beside
        return art
    if not look.changes:
        return art
    if not overwrite:
        state = "finished" if rec.get("finished") else "unfinished"
        raise ProxyKDError(
            f"{path} ({state}) was made from other settings or inputs: {'; '.join(look.changes)}. Set "
            f"--config.run.overwrite=True to replace it (the new one is written beside it and moved "
            f"into place when finished{spec.replace_note}){hint}, or choose another --config.run.dir."
        )
    art.status, art.work = "replace", beside
    if redo is not None and redo.get("finished") and redo.get("hash") == digest:  # killed before its move
        if writer:
            _swap(beside, path, spec.is_file, spec.companions)
        art.status, art.work, art.summary = "done", path, redo.get("summary")
    elif not writer and redo is None:  # the writer may have just moved the finished redo into place
        moved = read_record(path, spec.is_file)
        if moved is not None and moved.get("finished") and moved.get("hash") == digest:
            art.status, art.work, art.summary = "done", path, moved.get("summary")
    return art
