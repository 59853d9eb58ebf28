"""Prepared records on disk: msgpack-encoded samples in ArrayRecord files, and their reader.

Layout of a prepared directory (see docs/DATA_FORMATS.md):
  <out>/manifest.json
  <out>/<split>/records-00000.arrayrecord ...
"""

import json
import pathlib

import msgpack
import numpy as np

from proxykd_jax.errors import InputFileError, ProxyKDError
from proxykd_jax.npfiles import read_npy

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SYMBOLS = "first_byte_symbols.npy"  # int32 [V]: first-byte symbol of each of our tokens (bytes heads)
SAMPLE_IDS = "sample_ids.npy"  # int64 [S] in each split's folder: its samples' ids in record order


def encode_record(fields: dict) -> bytes:
    """Serialises a flat dict of scalars (int/float/str) and numpy arrays with msgpack."""
    packed = {}
    for key, value in fields.items():
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value)
            packed[key] = {"d": value.dtype.str, "s": list(value.shape), "b": value.tobytes()}
        else:
            packed[key] = value
    return msgpack.packb(packed, use_bin_type=True)


def decode_record(data: bytes) -> dict:
    """Inverse of `encode_record`; arrays come back as writable numpy arrays."""
    out = {}
    for key, value in msgpack.unpackb(data, raw=False).items():
        if isinstance(value, dict) and "b" in value:
            value = np.frombuffer(value["b"], dtype=np.dtype(value["d"])).reshape(value["s"]).copy()
        out[key] = value
    return out


class PreparedData:
    """Read access to the output of `prepare`: the manifest and each split's record files."""

    def __init__(self, root):
        self.root = pathlib.Path(root)
        path = self.root / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path}: no prepared-data manifest; run the `prepare` stage first.")
        try:
            self.manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputFileError(
                f"{path} is not valid JSON ({e}); delete {self.root} and re-run `proxykd prepare`."
            ) from None
        version = self.manifest.get("format_version") if isinstance(self.manifest, dict) else None
        if version != FORMAT_VERSION:
            raise InputFileError(
                f"{path}: format_version {version!r} is not {FORMAT_VERSION}, the prepared-data format this "
                f"proxykd_jax reads; delete {self.root} and re-run `proxykd prepare` with this version."
            )

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise ProxyKDError(
                f"{self.root}: no split {split!r} in the prepared data; choose one of {', '.join(self.manifest['splits'])}."
            )
        return self.manifest["splits"][split]

    def files(self, split: str) -> list[str]:
        return [str(self.root / f) for f in self._split(split)["files"]]

    def num_samples(self, split: str) -> int:
        return int(self._split(split)["samples"])

    def require_samples(self, split: str, need: int = 1, *, short: str = "", fix: str = "") -> int:
        """The samples of `split`; fewer than `need` raise one sentence that says what to do.

        `short` says what they are too few for (e.g. ", fewer than align.batch_size=16"), `fix` offers
        another way out before the usual one (more prompts, or a larger data.split fraction)."""
        n = self.num_samples(split)
        if n >= need:
            return n
        prompts = sum(int(s.get("prompts", 0)) for s in self.manifest["splits"].values())
        fraction = self.manifest.get("split", {}).get("fractions", {}).get(split)
        share = f"data.split.{split}={fraction} of" if fraction is not None else "its share of"
        have = "no samples" if n == 0 else f"only {n} sample{'' if n == 1 else 's'}"
        raise ProxyKDError(
            f"{self.root}: split {split!r} has {have}{short} (it got {share} the corpus's {prompts} prompts); "
            f"{fix}give the corpus more prompts or raise data.split.{split}, then re-run `proxykd prepare` "
            "with --config.run.overwrite=True."
        )

    def source(self, split: str):
        """A grain random-access source of serialised records (empty splits give an empty source); a
        missing or damaged record file raises one sentence naming it (or its split) and what to do."""
        import grain  # pylint: disable=import-outside-toplevel

        files = self._existing(split)
        if not files:
            return grain.sources.RangeDataSource(0, 0, 1)
        try:
            return _Source(grain.sources.ArrayRecordDataSource(files), self.root, split)
        except RuntimeError as e:
            raise _damaged(self.root, self.root / split, e) from None

    def iter_split(self, split: str):
        """Decoded records of a split in file order (for the prior stage and tests)."""
        from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

        for f in self._existing(split):
            try:  # array_record raises RuntimeError on a damaged file: at open, read or close
                reader = array_record_module.ArrayRecordReader(f)
                try:
                    for i in range(reader.num_records()):
                        yield decode_record(reader.read([i])[0])
                finally:
                    reader.close()
            except RuntimeError as e:
                raise _damaged(self.root, f, e) from None

    def _existing(self, split: str) -> list[str]:
        files = self.files(split)
        for f in files:
            if not pathlib.Path(f).is_file():
                raise InputFileError(f"{f}: a record file of the prepared data is missing; {_prepare_again(self.root)}")
        return files

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer"]["hash"]

    @property
    def teacher_head(self) -> str:
        """`exact` (head ids are our tokens; also every prepared directory older than this field) or
        `bytes` (head ids are first-byte symbols, see docs/TOKENIZERS.md)."""
        return self.manifest.get("teacher_head", "exact")

    def head_symbols(self):
        """int32 [V] first-byte symbols of our tokens for a `bytes` head, else None."""
        if self.teacher_head != "bytes":
            return None
        path = self.root / SYMBOLS
        if not path.exists():
            raise FileNotFoundError(f"{path}: a bytes teacher head needs this file; re-run `prepare`.")
        return self._read_npy(SYMBOLS)

    def sample_ids(self, split: str) -> np.ndarray:
        """int64 [S]: the sample ids of `split`'s samples, in the order its records hold them."""
        self._split(split)
        return self._read_npy(f"{split}/{SAMPLE_IDS}")

    def _read_npy(self, name: str) -> np.ndarray:
        """The `.npy` at `name` (relative to the root), checked against the sha256 the manifest records for it
        (prepared folders written before `checksums` existed are read unchecked)."""
        checksum = self.manifest.get("checksums", {}).get(name)
        return read_npy(self.root / name, fix=_prepare_again(self.root), checksum=checksum)

    @property
    def has_teacher_head(self) -> bool:
        return bool(self.manifest["teacher_logprobs"]["samples_with_logprobs"])


def _prepare_again(root: pathlib.Path) -> str:
    """What to do about a damaged or missing file of the prepared data in `root`."""
    return f"delete {root} and re-run `proxykd prepare` (with --config.run.overwrite=True)."


def _damaged(root: pathlib.Path, where, error: Exception) -> InputFileError:
    """One sentence for array_record's RuntimeError on a damaged record file (truncated: no message)."""
    detail = " ".join(str(error).split()) or "it cannot be read"
    return InputFileError(f"{where}: the prepared records are damaged ({detail}); {_prepare_again(root)}")


class _Source:
    """A grain data source over one split's record files that turns array_record's RuntimeError on a
    damaged file into one sentence naming the split (`_damaged`); picklable for grain's workers."""

    def __init__(self, source, root: pathlib.Path, split: str):
        self.source, self.root, self.where = source, root, root / split

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        try:
            return self.source[index]
        except RuntimeError as e:
            raise _damaged(self.root, self.where, e) from None

    def __getitems__(self, indices):
        try:
            return self.source.__getitems__(indices)
        except RuntimeError as e:
            raise _damaged(self.root, self.where, e) from None
