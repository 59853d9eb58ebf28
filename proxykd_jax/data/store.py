"""Sparse posterior store: per response token the top-k ids, top-k log-probs and tail mass.

One writer per host writes shards `shard-HHHHH-SSSSS.bin` with a manifest `.json` beside each. A
shard is finished by writing to a temporary name, fsync, and an atomic rename; its manifest (written
the same way, last) records k, vocabulary size, tokenizer hash, encodings, sha256 and the sample-id
range, so a killed run resumes after its last finished shard. Encodings (see docs/DATA_FORMATS.md):
ids as uint16, uint32 or packed bits; log-probs as float32, bfloat16, float16 or uint8 quantised
linearly between each row's top-1 and k-th log-prob; tail as float16 or float32.
"""

import dataclasses
import json
import math
import os
import pathlib

import ml_dtypes
import numpy as np

from proxykd_jax.errors import InputFileError
from proxykd_jax.npfiles import detail, sha256

STORE_VERSION = 1
_ALIGN = 64
_Q_NEGINF = 255  # uint8 code for a -inf log-prob (fewer than k candidates)
_Q_MAX = 254


@dataclasses.dataclass
class StoreEntry:
    """One sample's store rows: T = its response tokens (incl. eos), K = the store's k."""

    ids_TxK: np.ndarray  # int32
    logprobs_TxK: np.ndarray  # float32, -inf where a row has fewer than K candidates
    tail_T: np.ndarray  # float32, probability outside the K
    weight: float


def index_encoding(vocab_size: int, index_dtype: str) -> tuple[str, int]:
    """(encoding, bits per id) for `index_dtype` in auto/uint16/uint32/bits."""
    bits = max(1, math.ceil(math.log2(vocab_size)))
    if index_dtype == "auto":
        index_dtype = "uint16" if bits <= 16 else "bits"
    if index_dtype == "uint16" and bits > 16:
        raise ValueError(f"data.store.index_dtype=uint16 cannot hold vocab_size {vocab_size}.")
    if index_dtype not in ("uint16", "uint32", "bits"):
        raise ValueError(f"data.store.index_dtype must be auto/uint16/uint32/bits, got {index_dtype!r}.")
    return index_dtype, bits


def encode_ids(ids_NxK: np.ndarray, encoding: str, bits: int) -> np.ndarray:
    if encoding == "uint16":
        return ids_NxK.astype(np.uint16)
    if encoding == "uint32":
        return ids_NxK.astype(np.uint32)
    n, k = ids_NxK.shape
    bits_NxKxB = (ids_NxK.astype(np.uint32)[..., None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(bits_NxKxB.astype(np.uint8).reshape(n, k * bits), axis=1, bitorder="little")


def decode_ids(raw: np.ndarray, encoding: str, bits: int, k: int) -> np.ndarray:
    if encoding != "bits":
        return raw.astype(np.int32)
    n = raw.shape[0]
    bits_NxKxB = np.unpackbits(raw, axis=1, count=k * bits, bitorder="little").reshape(n, k, bits)
    return (bits_NxKxB.astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(-1, dtype=np.int32)


def encode_values(lp_NxK: np.ndarray, value_dtype: str) -> dict[str, np.ndarray]:
    """Encoded log-prob sections; uint8 adds per-row `hi` (top-1) and `span` (top-1 minus k-th)."""
    if value_dtype == "float32":
        return {"values": lp_NxK.astype(np.float32)}
    if value_dtype == "float16":
        return {"values": np.maximum(lp_NxK, -6e4).astype(np.float16)}
    if value_dtype == "bfloat16":
        return {"values": lp_NxK.astype(ml_dtypes.bfloat16).view(np.uint16)}
    if value_dtype != "uint8":
        raise ValueError(f"data.store.value_dtype must be float32/bfloat16/float16/uint8, got {value_dtype!r}.")
    finite = np.isfinite(lp_NxK)
    hi_N = np.where(finite, lp_NxK, -np.inf).max(1)
    hi_N = np.where(np.isfinite(hi_N), hi_N, 0.0).astype(np.float32)
    lo_N = np.where(finite, lp_NxK, np.inf).min(1)
    span_N = np.where(np.isfinite(lo_N), hi_N - lo_N, 0.0).astype(np.float32)
    scale_N = np.where(span_N > 0, _Q_MAX / np.maximum(span_N, 1e-30), 0.0)
    code = np.rint((hi_N[:, None] - np.where(finite, lp_NxK, 0.0)) * scale_N[:, None])
    code = np.where(finite, np.clip(code, 0, _Q_MAX), _Q_NEGINF).astype(np.uint8)
    return {"values": code, "hi": hi_N, "span": span_N}


def decode_values(sec: dict[str, np.ndarray], value_dtype: str) -> np.ndarray:
    raw = sec["values"]
    if value_dtype == "bfloat16":
        return np.asarray(raw).view(ml_dtypes.bfloat16).astype(np.float32)
    if value_dtype != "uint8":
        out = raw.astype(np.float32)
        return np.where(out <= -6e4, -np.inf, out) if value_dtype == "float16" else out
    code = raw.astype(np.float32)
    lp = sec["hi"][:, None] - code * (sec["span"][:, None] / _Q_MAX)
    return np.where(raw == _Q_NEGINF, -np.inf, lp).astype(np.float32)


def kl_to_stored(lp_NxK, tail_N, stored_lp_NxK, stored_tail_N) -> np.ndarray:
    """KL(original || stored) per row over the K+1 buckets (top-k and tail), in float64 nats.

    The stored distribution is renormalised to sum to one (it is what a reader would use)."""
    p = np.concatenate([np.exp(np.asarray(lp_NxK, np.float64)), np.asarray(tail_N, np.float64)[:, None]], 1)
    q = np.concatenate(
        [np.exp(np.asarray(stored_lp_NxK, np.float64)), np.asarray(stored_tail_N, np.float64)[:, None]], 1
    )
    p = p / p.sum(1, keepdims=True)
    q = q / q.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0.0)
    return terms.sum(1)


def _write_atomic(path: pathlib.Path, chunks):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(host: int, seq: int) -> str:
    return f"shard-{host:05d}-{seq:05d}"


def _shard_seq(path: pathlib.Path) -> int:
    """The shard number in `shard-HHHHH-SSSSS.<ext>` (-1 for a name that is not a shard's)."""
    parts = path.name.split(".", 1)[0].split("-")
    return int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else -1


class StoreWriter:
    """Writes one host's store shards; `add` per sample, `close` to finish the last shard."""

    def __init__(
        self,
        directory,
        *,
        k: int,
        vocab_size: int,
        tokenizer_hash: str,
        host: int = 0,
        index_dtype: str = "auto",
        value_dtype: str = "bfloat16",
        tail_dtype: str = "float16",
        shard_mb: float = 256,
    ):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.k, self.vocab_size, self.tok_hash, self.host = k, vocab_size, tokenizer_hash, host
        self.index_enc, self.index_bits = index_encoding(vocab_size, index_dtype)
        encode_values(np.zeros((1, 1), np.float32), value_dtype)  # validates the name
        if tail_dtype not in ("float16", "float32"):
            raise ValueError(f"data.store.tail_dtype must be float16/float32, got {tail_dtype!r}.")
        self.value_dtype, self.tail_dtype = value_dtype, tail_dtype
        self.shard_bytes = int(shard_mb * (1 << 20))
        self._finished = []
        for m in sorted(self.dir.glob(f"shard-{host:05d}-*.json")):
            meta = json.loads(m.read_text())
            for key, want in (("k", k), ("vocab_size", vocab_size), ("tokenizer_hash", tokenizer_hash)):
                if meta[key] != want:
                    raise ValueError(
                        f"{m}: existing shard has {key}={meta[key]!r} but this writer {want!r}; "
                        "write to a new store folder or delete the old shards."
                    )
            self._finished.append(m)
        for orphan in self.dir.glob(f"shard-{host:05d}-*.bin"):  # data of a shard whose manifest was never written
            if not orphan.with_suffix(".json").exists():
                orphan.unlink()
        for part in self.dir.glob(f"shard-{host:05d}-*.tmp"):  # a file a killed run wrote but never renamed
            part.unlink()
        # The next shard number follows the highest one left on disk, never the count of finished shards: after a
        # shard is deleted, the count would name an existing shard and overwrite it. (A resumed run's next shard
        # takes the number and the samples an unfinished one had: the store is the one an unbroken run writes.)
        self._seq = 1 + max((_shard_seq(p) for p in self.dir.glob(f"shard-{host:05d}-*")), default=-1)
        self._reset()

    @classmethod
    def from_config(cls, directory, store_cfg, *, vocab_size, tokenizer_hash, host=0):
        return cls(
            directory,
            k=store_cfg.k,
            vocab_size=vocab_size,
            tokenizer_hash=tokenizer_hash,
            host=host,
            index_dtype=store_cfg.index_dtype,
            value_dtype=store_cfg.value_dtype,
            tail_dtype=store_cfg.tail_dtype,
            shard_mb=store_cfg.shard_mb,
        )

    def _reset(self):
        self._ids, self._ids_rows, self._lps, self._tails, self._weights = [], [], [], [], []
        self._bytes = 0

    def finished_sample_ids(self) -> np.ndarray:
        """Sample ids already stored in this host's finished shards (skip them when resuming)."""
        parts = [
            StoreReader.shard_sample_ids(self.dir / (m.stem + ".bin"), json.loads(m.read_text()))
            for m in self._finished
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def add(self, sample_id: int, topk_ids_TxK, topk_logprobs_TxK, tail_T, weight: float = 1.0):
        ids = np.asarray(topk_ids_TxK)
        lps = np.asarray(topk_logprobs_TxK, np.float32)
        tail = np.asarray(tail_T, np.float32)
        t = ids.shape[0]
        if ids.shape != (t, self.k) or lps.shape != (t, self.k) or tail.shape != (t,):
            raise ValueError(
                f"sample {sample_id}: store rows must be ids/logprobs [T, {self.k}] and tail "
                f"[T], got {ids.shape}, {lps.shape}, {tail.shape}."
            )
        if t and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"sample {sample_id}: token ids must lie in [0, {self.vocab_size}).")
        self._ids.append(int(sample_id))
        self._ids_rows.append(ids)
        self._lps.append(lps)
        self._tails.append(tail)
        self._weights.append(float(weight))
        self._bytes += t * self.k * 6
        if self._bytes >= self.shard_bytes:
            self.flush()

    def flush(self):
        """Finishes the current shard (if it holds samples): data file, then its manifest."""
        if not self._ids:
            return
        lengths = np.asarray([len(x) for x in self._tails], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids_NxK = np.concatenate(self._ids_rows).reshape(-1, self.k)
        lp_NxK = np.concatenate(self._lps).reshape(-1, self.k)
        tail_N = np.concatenate(self._tails)
        sections = {
            "sample_ids": np.asarray(self._ids, np.int64),
            "offsets": offsets,
            "weights": np.asarray(self._weights, np.float32),
            "ids": encode_ids(ids_NxK, self.index_enc, self.index_bits),
            "tail": tail_N.astype(self.tail_dtype),
        }
        sections.update(encode_values(lp_NxK, self.value_dtype))
        chunks, layout, pos = [], {}, 0
        for name, arr in sections.items():
            arr = np.ascontiguousarray(arr)
            pad = (-pos) % _ALIGN
            chunks.append(b"\0" * pad)
            pos += pad
            layout[name] = {"offset": pos, "dtype": arr.dtype.str, "shape": list(arr.shape)}
            chunks.append(arr.tobytes())
            pos += arr.nbytes
        name = shard_name(self.host, self._seq)
        bin_path = self.dir / f"{name}.bin"
        _write_atomic(bin_path, chunks)
        sid = sections["sample_ids"]
        meta = {
            "store_version": STORE_VERSION,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "tokenizer_hash": self.tok_hash,
            "host": self.host,
            "shard": self._seq,
            "index_dtype": self.index_enc,
            "index_bits": self.index_bits,
            "value_dtype": self.value_dtype,
            "tail_dtype": self.tail_dtype,
            "num_samples": len(sid),
            "num_tokens": int(offsets[-1]),
            "sample_id_min": int(sid.min()),
            "sample_id_max": int(sid.max()),
            "bytes": pos,
            "sha256": sha256(bin_path),
            "sections": layout,
        }
        _write_atomic(self.dir / f"{name}.json", [json.dumps(meta, indent=1).encode()])
        self._finished.append(self.dir / f"{name}.json")
        self._seq += 1
        self._reset()

    def close(self):
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()


# a shard manifest's fields and their types (`StoreWriter.flush`; `sample_id_min`, `_max`, `host` and `shard` go unread)
_REQUIRED = dict(store_version=int, k=int, vocab_size=int, tokenizer_hash=str, index_dtype=str, index_bits=int)
_REQUIRED |= dict(
    value_dtype=str, tail_dtype=str, num_samples=int, num_tokens=int, bytes=int, sha256=str, sections=dict
)


def _layout(meta: dict) -> tuple[dict, int]:
    """(section table, data bytes) that `StoreWriter.flush` writes for a shard of these fields."""
    n, t, k = meta["num_samples"], meta["num_tokens"], meta["k"]
    encoding, bits = index_encoding(meta["vocab_size"], meta["index_dtype"])
    if bits != meta["index_bits"]:
        raise ValueError(f"index_bits={meta['index_bits']} for vocab_size={meta['vocab_size']}")
    ids = {"uint16": (np.uint16, [t, k]), "uint32": (np.uint32, [t, k])}.get(
        encoding, (np.uint8, [t, -(-k * bits // 8)])
    )
    values = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "uint8": np.uint8}
    if meta["value_dtype"] not in values:
        raise ValueError(f"value_dtype={meta['value_dtype']!r}")
    sections = {
        "sample_ids": (np.int64, [n]),
        "offsets": (np.int64, [n + 1]),
        "weights": (np.float32, [n]),
        "ids": ids,
        "tail": (np.dtype(meta["tail_dtype"]), [t]),
        "values": (values[meta["value_dtype"]], [t, k]),
    }
    if meta["value_dtype"] == "uint8":
        sections |= {"hi": (np.float32, [t]), "span": (np.float32, [t])}
    layout, pos = {}, 0
    for name, (dtype, shape) in sections.items():
        pos += (-pos) % _ALIGN
        layout[name] = {"offset": pos, "dtype": np.dtype(dtype).str, "shape": shape}
        pos += np.dtype(dtype).itemsize * math.prod(shape)
    return layout, pos


def _check_layout(manifest: pathlib.Path, meta, folder: pathlib.Path) -> None:
    """Refuses a shard manifest that is not what `StoreWriter.flush` writes: every field of its type, and the
    section table (offsets, dtypes, shapes) the one its fields give. The data file's checksum does not cover its
    manifest, and a damaged one would read the right bytes as wrong arrays."""
    try:
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        for key, kind in _REQUIRED.items():
            if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
                raise ValueError(f"{key}={meta[key]!r} is not of type {kind.__name__}")
        if meta["store_version"] != STORE_VERSION:
            raise ValueError(f"store_version={meta['store_version']}, this library reads {STORE_VERSION}")
        layout, end = _layout(meta)
        if meta["sections"] != layout:
            name = next((n for n in {**layout, **meta["sections"]} if meta["sections"].get(n) != layout.get(n)), "")
            raise ValueError(f"section {name!r} is {meta['sections'].get(name)}, its fields give {layout.get(name)}")
        if end != meta["bytes"]:
            raise ValueError(f"its sections end at byte {end}, not at bytes={meta['bytes']}")
    except (KeyError, TypeError, ValueError) as e:
        raise InputFileError(
            f"{manifest}: the shard manifest is damaged ({detail(e)}); delete the store folder "
            f"{folder} and re-run `proxykd posterior`."
        ) from None


class StoreReader:
    """Validated random access to a store by sample id; picklable (files reopen in each process)."""

    def __init__(
        self, directory, *, tokenizer_hash: str | None = None, vocab_size: int | None = None, verify: bool = True
    ):
        self.dir = pathlib.Path(directory)
        metas = sorted(self.dir.glob("shard-*.json"))
        if not metas:
            raise FileNotFoundError(
                f"{self.dir}: no finished store shards (shard-*.json); run the `posterior` stage first."
            )
        self.shards = []
        for m in metas:
            try:
                meta = json.loads(m.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputFileError(
                    f"{m}: the shard manifest is not valid JSON ({e}); delete the store folder {self.dir} "
                    "and re-run `proxykd posterior`."
                ) from None
            path = m.with_suffix(".bin")
            if not path.exists():
                raise FileNotFoundError(f"{path}: data file of finished shard {m.name} is missing.")
            _check_layout(m, meta, self.dir)
            for key, want in (("tokenizer_hash", tokenizer_hash), ("vocab_size", vocab_size)):
                if want is not None and meta[key] != want:
                    raise InputFileError(
                        f"{m}: store written with {key}={meta[key]!r} but the data uses "
                        f"{want!r}; re-run `posterior` with the same tokenizer as `prepare`."
                    )
            first = self.shards[0][1] if self.shards else meta
            for key in ("k", "vocab_size", "tokenizer_hash"):
                if meta[key] != first[key]:
                    raise InputFileError(
                        f"{m}: {key}={meta[key]!r} differs from other shards ({first[key]!r}); "
                        "one store folder must hold shards of one run."
                    )
            if verify and sha256(path) != meta["sha256"]:
                raise InputFileError(
                    f"{path}: sha256 checksum does not match its manifest (corrupt or truncated); delete "
                    f"the store folder {self.dir} and re-run `proxykd posterior`."
                )
            if path.stat().st_size != meta["bytes"]:  # (unverified: the checksum would have said so)
                raise InputFileError(
                    f"{path}: the data file holds {path.stat().st_size} bytes, its manifest {meta['bytes']} (truncated "
                    f"or corrupt); delete the store folder {self.dir} and re-run `proxykd posterior`."
                )
            self.shards.append((path, meta))
        self.k = self.shards[0][1]["k"]
        self.vocab_size = self.shards[0][1]["vocab_size"]
        self.tokenizer_hash = self.shards[0][1]["tokenizer_hash"]
        ids = [self.shard_sample_ids(p, meta) for p, meta in self.shards]
        which = np.concatenate([np.full(len(x), i, np.int32) for i, x in enumerate(ids)])
        rows = np.concatenate([np.arange(len(x), dtype=np.int64) for x in ids])
        all_ids = np.concatenate(ids)
        order = np.argsort(all_ids, kind="stable")
        self._sorted_ids, self._which, self._rows = all_ids[order], which[order], rows[order]
        dup = self._sorted_ids[1:][self._sorted_ids[1:] == self._sorted_ids[:-1]]
        if len(dup):
            raise InputFileError(
                f"{self.dir}: sample id {int(dup[0])} is stored in more than one shard; delete the duplicate shard."
            )
        self._maps = None

    @staticmethod
    def shard_sample_ids(path, meta) -> np.ndarray:
        sec = meta["sections"]["sample_ids"]
        return np.fromfile(path, np.int64, count=sec["shape"][0], offset=sec["offset"])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def _sections(self, i: int) -> dict[str, np.ndarray]:
        if self._maps is None:
            self._maps = [None] * len(self.shards)
        if self._maps[i] is None:
            path, meta = self.shards[i]
            self._maps[i] = {
                name: np.memmap(path, np.dtype(s["dtype"]), "r", s["offset"], tuple(s["shape"]))
                for name, s in meta["sections"].items()
                if int(np.prod(s["shape"])) > 0
            }
        return self._maps[i]

    @property
    def sample_ids(self) -> np.ndarray:
        return self._sorted_ids

    def __len__(self) -> int:
        return len(self._sorted_ids)

    def missing(self, sample_ids) -> np.ndarray:
        """The ids among `sample_ids` that the store does not hold."""
        sample_ids = np.asarray(sample_ids, np.int64)
        return sample_ids[~np.isin(sample_ids, self._sorted_ids)]

    def get(self, sample_id: int) -> StoreEntry:
        j = np.searchsorted(self._sorted_ids, sample_id)
        if j >= len(self._sorted_ids) or self._sorted_ids[j] != sample_id:
            raise KeyError(
                f"{self.dir}: no store entry for sample id {sample_id}; the `posterior` stage "
                "did not finish for it (re-run it to resume)."
            )
        shard, row = int(self._which[j]), int(self._rows[j])
        meta = self.shards[shard][1]
        sec = self._sections(shard)
        a, b = int(sec["offsets"][row]), int(sec["offsets"][row + 1])
        rows = {name: np.asarray(sec[name][a:b]) for name in ("values", "hi", "span") if name in sec}
        ids = (
            decode_ids(np.asarray(sec["ids"][a:b]), meta["index_dtype"], meta["index_bits"], self.k)
            if b > a
            else np.zeros((0, self.k), np.int32)
        )
        lps = decode_values(rows, meta["value_dtype"]) if b > a else np.zeros((0, self.k), np.float32)
        tail = np.asarray(sec["tail"][a:b], np.float32) if b > a else np.zeros(0, np.float32)
        return StoreEntry(ids, lps, tail, float(sec["weights"][row]))
