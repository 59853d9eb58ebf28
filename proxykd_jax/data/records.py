"""Prepared records on disk: msgpack-encoded samples in ArrayRecord files, and their reader.

Layout of a prepared directory (see docs/DATA_FORMATS.md):
  <out>/manifest.json
  <out>/<split>/records-00000.arrayrecord ...
"""

import json
import pathlib

import msgpack
import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SYMBOLS = "first_byte_symbols.npy"  # int32 [V]: first-byte symbol of each of our tokens (bytes heads)


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
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: format_version {self.manifest.get('format_version')} is not "
                f"{FORMAT_VERSION}; re-run `prepare` with this version of proxykd_jax."
            )

    def files(self, split: str) -> list[str]:
        if split not in self.manifest["splits"]:
            raise KeyError(f"{self.root}: unknown split {split!r}; have {sorted(self.manifest['splits'])}.")
        return [str(self.root / f) for f in self.manifest["splits"][split]["files"]]

    def num_samples(self, split: str) -> int:
        return int(self.manifest["splits"][split]["samples"])

    def source(self, split: str):
        """A grain random-access source of serialised records (empty splits give an empty source)."""
        import grain  # pylint: disable=import-outside-toplevel

        files = self.files(split)
        if not files:
            return grain.sources.RangeDataSource(0, 0, 1)
        return grain.sources.ArrayRecordDataSource(files)

    def iter_split(self, split: str):
        """Decoded records of a split in file order (for the prior stage and tests)."""
        from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

        for f in self.files(split):
            reader = array_record_module.ArrayRecordReader(f)
            try:
                for i in range(reader.num_records()):
                    yield decode_record(reader.read([i])[0])
            finally:
                reader.close()

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
        return np.load(path)

    @property
    def has_teacher_head(self) -> bool:
        return bool(self.manifest["teacher_logprobs"]["samples_with_logprobs"])
