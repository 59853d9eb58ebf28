"""grain pipelines: one linear chain per stage, checkpointable iterator state.

  records -> shuffle (per epoch) -> repeat -> this process's slice -> decode -> join store entries
  by sample id -> shift to (input, target) -> first-fit pack into rows -> batch -> multiprocess
  prefetch -> (in the train loop) `to_global_batch` onto the mesh.

Packed batches are numpy dicts of [B_local, L] arrays (B_local = batch_size / process_count):
tokens, targets, positions, segment_ids (0 = padding), loss_mask (float32; 1 where the target is
a response token), sample_ids (-1 on padding); with a store: kd_ids [B, L, K], kd_logprobs
[B, L, K] (-inf where absent), kd_tail, weight; with teacher log-probs in the corpus:
teacher_topk_ids / teacher_topk_logprobs [B, L, 20]. `iter_samples` gives one sample per row instead.
"""

import logging

import grain
import jax
import numpy as np

from proxykd_jax.data.corpus import DataError
from proxykd_jax.data.records import PreparedData, decode_record
from proxykd_jax.data.store import StoreReader
from proxykd_jax.errors import InputFileError

_SEQ_FIELDS = ("tokens", "targets", "loss_mask", "sample_ids")
_PAD = {"sample_ids": -1, "kd_logprobs": -np.inf, "teacher_topk_logprobs": -np.inf}


def _open(prepared) -> PreparedData:
    return prepared if isinstance(prepared, PreparedData) else PreparedData(prepared)


def open_store(prepared: PreparedData, store, vocab_size: int | None = None) -> StoreReader:
    """A StoreReader checked against the prepared data's tokenizer (and the model's vocab size)."""
    if not isinstance(store, StoreReader):
        store = StoreReader(store, tokenizer_hash=prepared.tokenizer_hash, vocab_size=vocab_size)
    if store.tokenizer_hash != prepared.tokenizer_hash:
        raise InputFileError(
            f"{store.dir}: store tokenizer hash {store.tokenizer_hash[:12]} differs from the "
            f"prepared data's {prepared.tokenizer_hash[:12]}; re-run `posterior`."
        )
    if vocab_size is not None and store.vocab_size != vocab_size:
        raise InputFileError(
            f"{store.dir}: store vocab_size {store.vocab_size} differs from the model's "
            f"{vocab_size}; re-run `posterior` for this model."
        )
    if store.vocab_size < prepared.manifest["tokenizer"]["vocab_size"]:
        raise InputFileError(
            f"{store.dir}: store vocab_size {store.vocab_size} is smaller than the "
            f"tokenizer's {prepared.manifest['tokenizer']['vocab_size']}."
        )
    return store


class _Decode(grain.transforms.Map):
    def map(self, data):
        return decode_record(data)


class _NotIn(grain.transforms.Filter):
    def __init__(self, ids):
        self.ids = frozenset(int(i) for i in ids)

    def filter(self, rec):
        return int(rec["sample_id"]) not in self.ids


class _ToExample(grain.transforms.Map):
    """A record (+ its store entry) as shifted per-position arrays of length n - 1."""

    def __init__(self, store: StoreReader | None, teacher_k: int | None):
        self.store, self.teacher_k = store, teacher_k

    def map(self, rec):
        tokens, p = rec["tokens"].astype(np.int32), int(rec["prompt_len"])
        n, sid = len(tokens), int(rec["sample_id"])
        ex = {
            "tokens": tokens[:-1],
            "targets": tokens[1:],
            "loss_mask": rec["loss_mask"][1:].astype(np.float32),
            "sample_ids": np.full(n - 1, sid, np.int64),
        }
        if self.teacher_k:
            if "teacher_topk_ids" in rec:
                ex["teacher_topk_ids"] = rec["teacher_topk_ids"][1:].astype(np.int32)
                ex["teacher_topk_logprobs"] = rec["teacher_topk_logprobs"][1:].astype(np.float32)
            else:
                ex["teacher_topk_ids"] = np.zeros((n - 1, self.teacher_k), np.int32)
                ex["teacher_topk_logprobs"] = np.full((n - 1, self.teacher_k), -np.inf, np.float32)
        if self.store is not None:
            entry = self.store.get(sid)
            t, k = n - p, self.store.k
            if entry.ids_TxK.shape[0] != t:
                raise DataError(
                    f"{self.store.dir}: sample id {sid} has {entry.ids_TxK.shape[0]} store rows "
                    f"but {t} response tokens in the prepared data; the store was built from "
                    "other data, re-run `posterior`.",
                    "store_mismatch",
                )
            kd_ids = np.zeros((n - 1, k), np.int32)
            kd_lps = np.full((n - 1, k), -np.inf, np.float32)
            kd_tail = np.zeros(n - 1, np.float32)
            kd_ids[p - 1 :], kd_lps[p - 1 :], kd_tail[p - 1 :] = entry.ids_TxK, entry.logprobs_TxK, entry.tail_T
            ex.update(
                kd_ids=kd_ids, kd_logprobs=kd_lps, kd_tail=kd_tail, weight=np.full(n - 1, entry.weight, np.float32)
            )
        return ex


class _Rename(grain.transforms.Map):
    """Packed-row keys from grain's packer to the batch contract."""

    def map(self, row):
        out = {k: v for k, v in row.items() if not k.endswith(("_segment_ids", "_positions"))}
        out["segment_ids"] = row["tokens_segment_ids"].astype(np.int32)
        out["positions"] = row["tokens_positions"].astype(np.int32)
        return out


def _samples(
    prepared: PreparedData,
    split: str,
    dcfg,
    *,
    store,
    shuffle: bool,
    seed: int,
    num_epochs: int,
    process_index: int,
    process_count: int,
    vocab_size,
):
    """MapDataset of per-sample examples for this process (shared by both readers)."""
    prepared.require_samples(split)  # an empty split: one sentence (more prompts, or its data.split fraction)
    ds = grain.MapDataset.source(prepared.source(split))
    if len(ds) == 0:
        raise DataError(f"{prepared.root}: split {split!r} has no records; re-run `proxykd prepare`.", "empty_split")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs if num_epochs else None)
    ds = ds[process_index::process_count].map(_Decode())
    reader = None
    if store is not None:
        reader = open_store(prepared, store, vocab_size)
        ids = np.load(prepared.root / split / "sample_ids.npy")
        missing = reader.missing(ids)
        if len(missing):
            msg = (
                f"{reader.dir}: store misses {len(missing)} of {len(ids)} samples of split {split!r} "
                f"(e.g. sample id {int(missing[0])}); finish `posterior` or set data.on_error=skip."
            )
            if dcfg.on_error != "skip":
                raise DataError(msg, "store_missing")
            logging.warning("%s Skipping them.", msg)
            ds = ds.filter(_NotIn(missing))
    teacher_k = prepared.manifest["teacher_topk"] if prepared.has_teacher_head else None
    return ds.map(_ToExample(reader, teacher_k))


def make_dataset(
    prepared,
    split: str,
    dcfg,
    *,
    store=None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """The packed-batch grain IterDataset of `split` for this jax process (see module docstring).

    `store` is a StoreReader or store folder to join; `dcfg` the `data` config group. The iterator
    of the result has get_state/set_state for exact resume.
    """
    prepared = _open(prepared)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    seq_len = seq_len or dcfg.seq_len
    batch_size = batch_size or dcfg.batch_size
    if batch_size % pc:
        raise ValueError(f"data.batch_size {batch_size} must be a multiple of the {pc} jax processes.")
    local = batch_size // pc
    ds = _samples(
        prepared,
        split,
        dcfg,
        store=store,
        shuffle=dcfg.shuffle,
        seed=dcfg.shuffle_seed,
        num_epochs=dcfg.num_epochs,
        process_index=pi,
        process_count=pc,
        vocab_size=vocab_size,
    )
    fields = list(_SEQ_FIELDS)
    if prepared.has_teacher_head:
        fields += ["teacher_topk_ids", "teacher_topk_logprobs"]
    if store is not None:
        fields += ["kd_ids", "kd_logprobs", "kd_tail", "weight"]
    it = ds.to_iter_dataset()
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={f: seq_len for f in fields},
        num_packing_bins=dcfg.packing_bins or local,
        shuffle_bins=False,
        padding_struct={f: _PAD.get(f) for f in fields},
    )
    it = it.map(_Rename()).batch(local, drop_remainder=True)
    if dcfg.num_workers:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=dcfg.num_workers, per_worker_buffer_size=dcfg.worker_buffer_size)
        )
    return it


def make_iterator(prepared, split: str, dcfg, **kw) -> grain.DatasetIterator:
    """`iter(make_dataset(...))`: a DatasetIterator to checkpoint with the model state."""
    return iter(make_dataset(prepared, split, dcfg, **kw))


class _PadBatch:
    """Collates per-sample examples into fixed [batch_size, seq_len] rows (pad rows: sample_ids -1)."""

    def __init__(self, batch_size: int, seq_len: int, pad_id: int):
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id

    def __call__(self, examples):
        b, length = self.batch_size, self.seq_len
        first = examples[0]
        out = {}
        for name, v in first.items():
            fill = _PAD.get(name, self.pad_id if name in ("tokens", "targets") else 0)
            out[name] = np.full((b, length) + v.shape[1:], fill, v.dtype)
        out["positions"] = np.zeros((b, length), np.int32)
        out["segment_ids"] = np.zeros((b, length), np.int32)
        out["lengths"] = np.zeros(b, np.int32)
        out["prompt_lengths"] = np.zeros(b, np.int32)
        for i, ex in enumerate(examples):
            n = len(ex["tokens"])
            for name, v in ex.items():
                out[name][i, :n] = v
            out["positions"][i, :n] = np.arange(n)
            out["segment_ids"][i, :n] = 1
            out["lengths"][i] = n
            out["prompt_lengths"][i] = n + 1 - int(ex["loss_mask"].sum())
        return out


def iter_samples(
    prepared,
    split: str,
    dcfg,
    *,
    batch_size: int,
    store=None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    num_epochs: int = 1,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """One sample per row, padded to [batch_size, seq_len]; the last batch is padded with empty rows.

    Adds `lengths` (input tokens per row, 0 on padding rows) and `prompt_lengths` (prompt tokens of
    the sample: the first response token is the target at input index prompt_lengths - 1) to the
    packed-batch fields. For DPO pairs and proxy scoring.
    """
    prepared = _open(prepared)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    ds = _samples(
        prepared,
        split,
        dcfg,
        store=store,
        shuffle=shuffle,
        seed=seed,
        num_epochs=num_epochs,
        process_index=pi,
        process_count=pc,
        vocab_size=vocab_size,
    )
    pad_id = prepared.manifest["tokenizer"]["pad_id"]
    pad_id = prepared.manifest["tokenizer"]["eos_id"] if pad_id is None else pad_id
    collate = _PadBatch(batch_size, seq_len or dcfg.seq_len, int(pad_id or 0))
    return iter(ds.to_iter_dataset().batch(batch_size, batch_fn=collate))


def to_global_batch(batch: dict, mesh, rules=None) -> dict:
    """Host-local numpy batch -> global jax.Arrays, batch dim over the mesh axes of logical `batch`.

    int64 fields (`sample_ids`) stay on the host unless jax_enable_x64 is on: as int32 they would
    silently wrap. The loss needs segment_ids, not sample ids; keep the host batch for logging.
    """
    from proxykd_jax.parallel import LOGICAL_RULES, global_batch  # pylint: disable=import-outside-toplevel

    if not jax.config.jax_enable_x64:
        batch = {k: v for k, v in batch.items() if np.asarray(v).dtype != np.int64}
    return global_batch(batch, mesh, LOGICAL_RULES if rules is None else rules)
