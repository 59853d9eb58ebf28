"""One overwrite rule for every stage: what a re-run does with the artifact it finds.

A stage's output (its *artifact*: a folder, or the corpus file) carries a record, `artifact.json`
in the folder (`<file>.artifact.json` beside a file): the config fields that produced it (the
table `specs.ARTIFACTS`), the hashes of the upstream artifacts it was made from, the content digests of the
input files outside the run it read (`collect.prompts`, `data.corpus`, `data.tokenizer`), the
identities of the model folders it read (`proxy.init_from`, `model.init_from`, `posterior.proxy`,
`distill.white_box`, `eval.known_teacher`), a hash of all of these, and whether it is finished.
The record is written when the stage starts, so an interrupted stage is known too. Fields that name paths
(`specs.PATH_FIELDS`) count by what they name: the absolute path they resolve to from the working directory.

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

Here: the settings an artifact is compared on (`depends_on`, `_hash`), the move into place completed
(`settle`), and the decision (`outlook`, `open_artifact`). Elsewhere in context/: `specs.py` (the table,
`ARTIFACTS`, `PATH_FIELDS`), `records.py` (the record files, `Artifact`, the move), `identity.py` (the input
files' and model folders' identities).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Callable

from proxykd_jax.context.identity import input_files
from proxykd_jax.context.paths import RunPaths
from proxykd_jax.context.records import RECORD, Artifact, read_record, record_path, swap_into_place, tidy
from proxykd_jax.context.specs import ARTIFACTS, PATH_FIELDS, Spec, depends, matches, path_parts, resolve_path
from proxykd_jax.errors import ProxyKDError


def flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# Fields added after artifacts were recorded, by their last name, with the value that computes what runs
# before them did: at that value a field is left out of an artifact's settings, so the records made before it
# was added (and their hashes) still match.
_ADDED_FIELDS = {"qk_norm": False, "token_limit": "max_tokens", "send_sampling": True}
_ADDED_FIELDS |= {"keep_best": False, "eval_split": "heldout", "eval_every": 0}  # (distill's validation)
_ADDED_FIELDS |= {"own_token": "auto"}  # (the posterior's own-token choice)
_ADDED_FIELDS |= {  # the model's Gemma 3 numerics
    "norm_plus_one": False,
    "embed_scale": False,
    "activation": "silu",
    "sandwich_norms": False,
    "query_pre_attn_scalar": None,
    "layer_types": None,
    "rope_local_theta": None,
    "sliding_window": None,  # (the model's sliding window)
    "rope_layers": None,  # (SmolLM3's layers without RoPE)
    "partial_rotary_factor": 1.0,  # (Phi-3's RoPE on part of each head)
    "attn_softcap": None,  # (Gemma 2's soft-capping)
    "logit_softcap": None,
}


def depends_on(cfg, spec: Spec) -> dict:
    """{dotted key: value} of the config fields `spec` depends on, as JSON values (less `_ADDED_FIELDS` at the
    value that runs before them computed; `PATH_FIELDS` as what they name: `resolve_path`)."""
    flat = flatten(cfg.to_dict())
    picked = {k: v for k, v in flat.items() if depends(spec, k)}
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
            for part, path in zip(path_parts(key, text), path_parts(key, ours)):
                keys[f"{key} ({path})"] = f"{key} ({pathlib.Path(part).expanduser()})"
    return named, keys


def _rekey(ids: dict | None, keys: dict) -> dict | None:
    return None if ids is None else {keys.get(k, k): v for k, v in ids.items()}


def _inputs_as_recorded(recorded: dict, inputs: dict, paths: RunPaths) -> dict:
    """`inputs` with the labels a record gave the collected corpus files its `data.corpus` named: records written
    before path fields were recorded resolved labelled each by its text (relative to the run directory where it
    lay in it: `run_relative`), not by the path it resolves to."""
    text = recorded.get("data.corpus")
    if not isinstance(text, str):
        return inputs
    labels = {}
    for part in path_parts("data.corpus", text):
        then = pathlib.Path(part).expanduser()
        labels[run_relative(pathlib.Path(resolve_path("data.corpus", part)), paths)] = run_relative(then, paths)
    return _rekey(inputs, labels)


def _hash(fields: dict, inputs: dict, files: dict | None = None, models: dict | None = None) -> str:
    # without input files (model folders) the hash is what it was before they were recorded: old records stay valid
    payload = {"fields": fields, "inputs": inputs} | ({"files": files} if files else {})
    payload |= {"models": models} if models else {}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


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
            swap_into_place(beside, path, spec.is_file, spec.companions)
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
    rec = settle(path, spec.is_file, writer=writer)
    if rec is not None and writer:
        tidy(path, spec.is_file, spec.companions)
    redo = read_record(path.with_name(f".{path.name}.new"), spec.is_file)
    files, models, stamps = input_files(spec, cfg, paths, [rec, redo])
    # one decision on every process: process 0's resolved paths (hosts may reach a file through another working
    # directory or mount) and its input files' and model folders' identities
    configured, derived, files, models = json.loads(
        share(json.dumps([configured, derived, files, models], sort_keys=True))
    )
    fields = configured | {k: v for k, v in derived.items() if k in configured}
    digest = _hash(fields, inputs, files, models)
    art = Artifact(name, path, path, "new", fields, inputs, digest, spec.is_file, writer=writer)
    art.files, art.models, art.stamps, art.companions = files, models, stamps, spec.companions
    look = Outlook(art, rec, redo, [], waiting, rec is None and not _is_empty(path, spec.is_file))
    if rec is None:
        return look
    # a record made before input files (model folders) were recorded matches on what it recorded: its fields
    # (which name their paths) and upstream artifacts; it is not taken for a changed one;
    # a field the stage has ignored since (it never changed the result) is taken as the record has it;
    # a path field recorded as its text is taken as the record has it where it names the same path (`_as_recorded`),
    # and so is the label of an input that text named (`_inputs_as_recorded`);
    # and a derived field recorded as the config had it (before it was derived) is taken so
    old = rec.get("fields", {})
    old = old if isinstance(old, dict) else {}
    then = {k: v for k, v in old.items() if matches(k, spec.ignore)}
    hashes = {digest}
    labelled = _inputs_as_recorded(old, inputs, paths)
    for variant in (fields, configured):
        named, keys = _as_recorded(old, variant)
        old_files, old_models = files if "files" in rec else None, models if "models" in rec else None
        hashes.add(_hash(named | then, labelled, _rekey(old_files, keys), _rekey(old_models, keys)))
    if rec.get("hash") in hashes:
        art.status = "done" if rec.get("finished") else "resume"
        art.summary = rec.get("summary")
    else:
        named, keys = _as_recorded(old, fields)
        old_ids, new_ids = (rec.get("files"), rec.get("models")), (_rekey(files, keys), _rekey(models, keys))
        look.changes = _changes(old, named, rec.get("inputs", {}), labelled, old_ids, new_ids) or [
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
            swap_into_place(beside, path, spec.is_file, spec.companions)
        art.status, art.work, art.summary = "done", path, redo.get("summary")
    elif not writer and redo is None:  # the writer may have just moved the finished redo into place
        moved = read_record(path, spec.is_file)
        if moved is not None and moved.get("finished") and moved.get("hash") == digest:
            art.status, art.work, art.summary = "done", path, moved.get("summary")
    return art
