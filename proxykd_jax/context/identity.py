"""The identities of the input files and model folders outside the run that an artifact was made from.

An input file's identity is its content (`content_id`: sha256, about 1.5 GB/s; the record keeps each file's size
and mtime_ns with its digest, so an unchanged file is not read again), so a prompts file or corpus edited in place
counts as changed. A model folder's identity is the content of its small files and the size and mtime_ns of its
weights (`model_id`: reading the weights would cost seconds per GB), so weights replaced in place count as changed
too. `input_files` gives both for one stage's `Spec`.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time

from proxykd_jax.context.paths import RunPaths
from proxykd_jax.context.specs import Spec
from proxykd_jax.errors import ProxyKDError

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


def input_files(spec: Spec, cfg, paths: RunPaths, records) -> tuple[dict, dict, dict]:
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
