"""One overwrite rule for every stage, and the table of what each stage's artifact depends on.

A stage's output (its *artifact*: a folder, or the corpus file) carries a record, `artifact.json`
in the folder (`<file>.artifact.json` beside a file): the config fields that produced it (the
table below), the hashes of the upstream artifacts it was made from, a hash of both, and whether
it is finished. The record is written when the stage starts, so an interrupted stage is known too.

Running a stage again:
  * same fields and inputs, finished      -> the artifact is reused (the stage does nothing);
  * same fields and inputs, not finished  -> the stage resumes where it stopped;
  * different fields or inputs            -> it stops with one sentence naming what changed,
    unless `run.overwrite=True`: then the new artifact is written beside the old one
    (`.<name>.new`, resumable too) and renamed into place only when finished, so nothing finished
    is lost if the redo dies;
  * a non-empty output without a record (not made by a stage) -> refused unless run.overwrite.

An upstream artifact's hash is part of its dependants' inputs, so rebuilding `prepared/` with
other settings makes `prior/`, `proxy/`, ... stale, and they say so when run. `serve` writes
nothing and has no entry.
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


def _corpus(cfg, paths: RunPaths) -> pathlib.Path:
    return pathlib.Path(cfg.collect.out).expanduser() if cfg.collect.out else paths.corpus


def _proxy_artifact(cfg, paths: RunPaths) -> list[pathlib.Path]:
    return [] if cfg.posterior.proxy else [paths.proxy]


def _export_source(cfg, paths: RunPaths) -> pathlib.Path:
    return paths.student(cfg.export.source or student_name(cfg.distill))


_MODEL_SHAPE = tuple(f"proxy.{f}" for f in ("vocab_size", "num_heads", "num_kv_heads", "d_ff", "max_seq_len"))

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
            "collect.price_*",
            "collect.progress",
            "collect.seed",
        ),
        inputs=lambda cfg, paths: [paths.demo],
        hint="--config.collect.out=FILE for another corpus",
        is_file=True,
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
        inputs=lambda cfg, paths: [paths.demo] + ([] if cfg.data.corpus else [_corpus(cfg, paths)]),
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
        ignore=("align.checkpoint_every", "align.logprob_chunk", "align.eval_batch_size"),
        inputs=lambda cfg, paths: [paths.demo, paths.prepared],
    ),
    "posterior": Spec(
        path=lambda cfg, paths: paths.posterior,
        fields=("posterior.*", "prior.kappa", "data.store.*", "data.seq_len", "proxy.dtype", "run.seed"),
        ignore=("posterior.chunk_tokens", "posterior.kernel", "data.store.shard_mb"),
        inputs=lambda cfg, paths: [paths.prepared, paths.prior] + _proxy_artifact(cfg, paths),
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
    ),
    "eval": Spec(
        path=lambda cfg, paths: paths.eval,
        fields=("eval.*", "data.seq_len", "proxy.init_from", "run.seed"),
        inputs=lambda cfg, paths: [
            paths.demo,
            paths.prepared,
            paths.prior,
            paths.proxy,
            paths.posterior,
            paths.student(STUDENT),
            paths.student(STUDENT_SFT),
        ],
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
        inputs=lambda cfg, paths: [_export_source(cfg, paths)],
        hint="--config.export.out=FOLDER to write elsewhere",
    ),
}


def record_path(path: pathlib.Path, is_file: bool) -> pathlib.Path:
    return path.with_name(path.name + "." + RECORD) if is_file else path / RECORD


def read_record(path: pathlib.Path, is_file: bool | None = None) -> dict | None:
    """The record of the artifact at `path` (None when it has none or it is unreadable)."""
    candidates = [is_file] if is_file is not None else [False, True]
    for kind in candidates:
        try:
            return json.loads(record_path(path, kind).read_text())
        except (OSError, ValueError):
            continue
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


def depends_on(cfg, spec: Spec) -> dict:
    """{dotted key: value} of the config fields `spec` depends on, as JSON values."""
    flat = flatten(cfg.to_dict())
    picked = {k: v for k, v in flat.items() if _matches(k, spec.fields) and not _matches(k, spec.ignore)}
    return json.loads(json.dumps(picked, sort_keys=True, default=repr))


def _hash(fields: dict, inputs: dict) -> str:
    return hashlib.sha256(json.dumps({"fields": fields, "inputs": inputs}, sort_keys=True).encode()).hexdigest()


def _label(path: pathlib.Path, paths: RunPaths) -> str:
    try:
        return str(path.relative_to(paths.root))
    except ValueError:
        return str(path)


def _changes(old: dict, new: dict, old_inputs: dict, new_inputs: dict) -> list[str]:
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            show = lambda v: "(unset)" if v is missing else json.dumps(v)  # noqa: E731
            out.append(f"{key} {show(a)} -> {show(b)}")
    for key in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(key) != new_inputs.get(key):
            out.append(f"its input {key}/ " + ("was rebuilt" if key in old_inputs else "is new"))
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

    @property
    def done(self) -> bool:
        return self.status == "done"

    def _record(self, finished: bool, summary=None) -> dict:
        rec = {"stage": self.name, "hash": self.hash, "finished": finished, "fields": self.fields}
        rec.update(inputs=self.inputs, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
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

    def begin(self) -> None:
        """Marks the artifact as being made (before the stage writes anything into `work`)."""
        if self.done:
            raise RuntimeError(f"{self.path} is finished; a stage reuses it instead of calling begin().")
        self.sync(f"artifact {self.name}: decided")
        if self.writer:
            if self.status == "replace":
                rec = read_record(self.work, self.is_file)
                if rec is None or rec.get("hash") != self.hash:  # an abandoned redo with other settings
                    _remove(self.work, self.is_file)
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
                _swap(self.work, self.path, self.is_file)
        self.status, self.work, self.summary = "done", self.path, summary
        self.sync(f"artifact {self.name}: finished")


def _siblings(path: pathlib.Path) -> list[pathlib.Path]:
    """A file artifact and its companions (`teacher.jsonl.failures.jsonl`, its record, ...)."""
    if not path.parent.exists():
        return []
    return [p for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(path.name + ".")]


def _remove(path: pathlib.Path, is_file: bool) -> None:
    if is_file:
        for p in _siblings(path):
            p.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _swap(work: pathlib.Path, path: pathlib.Path, is_file: bool) -> None:
    """Moves the finished `work` into `path`; the old artifact is removed only after that."""
    if is_file:
        old = [p for p in _siblings(path) if not p.name.startswith(work.name)]
        for p in old:
            p.rename(p.with_name(".old." + p.name))
        for p in _siblings(work):
            p.rename(path.with_name(path.name + p.name[len(work.name) :]))
        for p in old:
            p.with_name(".old." + p.name).unlink()
        return
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    work.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _is_empty(path: pathlib.Path, is_file: bool) -> bool:
    if is_file:
        return not path.exists()
    return not path.exists() or not any(path.iterdir())


def open_artifact(
    name: str, cfg, paths: RunPaths, *, overwrite: bool, sync=lambda name: None, writer: bool = True
) -> Artifact:
    """Decides what the stage `name` does with its artifact (reads files only; raises on a refusal)."""
    spec = ARTIFACTS[name]
    path = spec.path(cfg, paths)
    fields = depends_on(cfg, spec)
    inputs = {}
    for upstream in spec.inputs(cfg, paths):
        rec = read_record(upstream)
        if rec is not None:
            inputs[_label(upstream, paths)] = rec["hash"]
    digest = _hash(fields, inputs)
    rec = read_record(path, spec.is_file)
    beside = path.with_name(f".{path.name}.new")
    art = Artifact(name, path, path, "new", fields, inputs, digest, spec.is_file, sync=sync, writer=writer)
    hint = f", {spec.hint}" if spec.hint else ""
    if rec is None:
        if _is_empty(path, spec.is_file):
            return art
        if not overwrite:
            raise ProxyKDError(
                f"{path} exists but was not made by `proxykd {name}` (it has no {RECORD}); set "
                f"--config.run.overwrite=True to replace it{hint}, or choose another --config.run.dir."
            )
        art.status, art.work = "replace", beside
        return art
    if rec.get("hash") == digest:
        art.status = "done" if rec.get("finished") else "resume"
        art.summary = rec.get("summary")
        return art
    if not overwrite:
        changes = _changes(rec.get("fields", {}), fields, rec.get("inputs", {}), inputs)
        state = "finished" if rec.get("finished") else "unfinished"
        raise ProxyKDError(
            f"{path} ({state}) was made from other settings or inputs: {'; '.join(changes)}. Set "
            f"--config.run.overwrite=True to replace it (the new one is written beside it and moved "
            f"into place when finished){hint}, or choose another --config.run.dir."
        )
    art.status, art.work = "replace", beside
    return art
