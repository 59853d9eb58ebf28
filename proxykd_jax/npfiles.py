"""Reading the run's NumPy files (`.npy`, `.npz`) whole, with a damaged file as one sentence.

np.load reads an `.npz` member only when it is indexed, and a damaged file fails there with whichever error its
damage reaches first (zipfile's CRC check, a short read, a header that does not parse). These helpers read every
array at once and turn each of those into `InputFileError`, naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import io
import pathlib
import zipfile

import numpy as np

from proxykd_jax.errors import InputFileError

# what np.load raises on a truncated, bit-flipped or foreign file (zipfile's CRC check: BadZipFile)
DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def detail(error: Exception) -> str:
    """What a damaged file's reading error says, in a few words (a missing key as such; numpy's advice to load a
    foreign file's pickled bytes left out)."""
    if isinstance(error, KeyError):
        return f"it has no {error.args[0]!r}" if error.args else "a field is missing"
    if "pickled" in str(error):
        return "it is not a NumPy array file"
    return " ".join(str(error).split()) or type(error).__name__


def _damaged(path, error: Exception, fix: str) -> InputFileError:
    return InputFileError(f"{path}: the file is damaged ({detail(error)}); {fix}")


def read_npz(path, *, fix: str, names=None) -> dict[str, np.ndarray]:
    """Every array of the `.npz` at `path` (or those in `names`, each required), read whole; a damaged or
    incomplete file raises `InputFileError` ending in `fix` (what to delete and re-run)."""
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: np.asarray(z[name]) for name in (z.files if names is None else names)}
    except DAMAGED as e:
        raise _damaged(path, e, fix) from None


def sha256(path) -> str:
    """The sha256 hex digest of the file at `path` (recorded beside an `.npy` when it is written)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:  # in 64 KiB reads: a hash costs the stage that writes the file no memory
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def read_npy(path, *, fix: str, checksum: str | None = None) -> np.ndarray:
    """The array of the `.npy` at `path`; a damaged file raises `InputFileError` ending in `fix`. With `checksum`
    (the file's sha256 when written) a file whose bytes changed is refused too: a flip in its data would
    otherwise read as other numbers."""
    path = pathlib.Path(path)
    try:
        if checksum is None:
            return np.load(path, allow_pickle=False)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == checksum:
            return np.load(io.BytesIO(data), allow_pickle=False)
    except DAMAGED as e:
        raise _damaged(path, e, fix) from None
    raise InputFileError(f"{path}: the file is damaged (its sha256 is not the one recorded when it was written); {fix}")
