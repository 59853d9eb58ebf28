"""grain pipelines: one linear chain per stage, checkpointable iterator state.

  records -> shuffle (per epoch) -> repeat -> this process's slice -> decode -> join store entries
  by sample id -> shift to (input, target) [in data.num_workers worker processes, back in order]
  -> first-fit pack into rows -> batch -> (in the train loop) `to_global_batch` onto the mesh.

Packed batches are numpy dicts of [B_local, L] arrays (B_local = batch_size / process_count):
tokens, targets, positions, segment_ids (0 = padding), loss_mask (float32; 1 where the target is
a response token), sample_ids (-1 on padding); with a store: kd_ids [B, L, K], kd_logprobs
[B, L, K] (-inf where absent), kd_tail, weight; with teacher log-probs in the corpus:
teacher_topk_ids / teacher_topk_logprobs [B, L, 20]. `iter_samples` gives one sample per row instead.

What reaches the rows: a sample of one token has no target, so neither reader gives it a place (nor needs
its store entry, which `posterior` does not write). Nothing is truncated here (`prepare`'s data.truncate
cuts): a sample of more inputs than the rows' seq_len stops the reader with a DataError (`too_long`) when it
is reached. With data.num_epochs > 0 the stream's last packed rows that fill no batch are dropped.
"""

import itertools
import logging
import math
from collections.abc import Iterable, Iterator

import grain
import jax
import numpy as np

from proxykd_jax.data.corpus_errors import DataError
from proxykd_jax.data.records import PreparedData, decode_record
from proxykd_jax.data.store import StoreReader
from proxykd_jax.errors import ConfigError, InputFileError
from proxykd_jax.parallel import hosts

_SEQ_FIELDS = ("tokens", "targets", "loss_mask", "sample_ids")
_PAD = {"sample_ids": -1, "kd_logprobs": -np.inf, "teacher_topk_logprobs": -np.inf}


def _open(prepared) -> PreparedData:
    return prepared if isinstance(prepared, PreparedData) else PreparedData(prepared)


def require_vocab(prepared: PreparedData, vocab_size: int, field: str) -> None:
    """Refuses a model of `vocab_size` rows (config field `field`) that cannot index every token of the
    prepared tokenizer. A larger, padded embedding is fine: its extra ids are never tokens, so the
    student and the proxy may pad to different sizes."""
    tokens = int(prepared.manifest["tokenizer"]["vocab_size"])
    if int(vocab_size) < tokens:
        raise ConfigError(
            f"config.{field}={vocab_size} is smaller than the {tokens} tokens of the prepared tokenizer "
            f"({prepared.root}); use a model of that tokenizer and set {field} to its embedding rows "
            f"(at least {tokens})."
        )


def open_store(prepared: PreparedData, store, vocab_size: int | None = None) -> StoreReader:
    """A StoreReader checked against the prepared data's tokenizer (and that a model of `vocab_size`
    rows can index its ids).

    A store records the ids its token ids index (`vocab_size`): the tokenizer's size; stores written
    before recorded the proxy's embedding rows, which then equalled the student's."""
    if not isinstance(store, StoreReader):
        store = StoreReader(store, tokenizer_hash=prepared.tokenizer_hash)
    if store.tokenizer_hash != prepared.tokenizer_hash:
        raise InputFileError(
            f"{store.dir}: store tokenizer hash {store.tokenizer_hash[:12]} differs from the "
            f"prepared data's {prepared.tokenizer_hash[:12]}; re-run `posterior`."
        )
    tokens = prepared.manifest["tokenizer"]["vocab_size"]
    if vocab_size is not None and store.vocab_size > vocab_size:
        raise InputFileError(
            f"{store.dir}: the store's ids index {store.vocab_size} ids (an older store records its proxy's "
            f"embedding rows), more than the model's vocab_size {vocab_size}; delete {store.dir} and re-run "
            f"`proxykd posterior`, which records the tokenizer's {tokens}."
        )
    if store.vocab_size < tokens:
        raise InputFileError(
            f"{store.dir}: store vocab_size {store.vocab_size} is smaller than the tokenizer's {tokens}; "
            "re-run `proxykd posterior` on these prepared records."
        )
    return store


class _Decode(grain.transforms.Map):
    def map(self, data):
        return decode_record(data)


class _NotIn(grain.transforms.Map):
    """Records of the given sample ids become `{}` (skipped by `_InOrder`, which still counts them, so
    that the iterator state is an index into the sample stream whatever the number of workers)."""

    def __init__(self, ids):
        self.ids = frozenset(int(i) for i in ids)

    def map(self, rec):
        return {} if int(rec["sample_id"]) in self.ids else rec


class _ToExample(grain.transforms.Map):
    """A record (+ its store entry) as shifted per-position arrays of length n - 1."""

    def __init__(self, store: StoreReader | None, teacher_k: int | None, seq_len: int, where: str, prepared_len):
        self.store, self.teacher_k = store, teacher_k
        self.seq_len, self.where, self.prepared_len = seq_len, where, prepared_len

    def map(self, rec):
        if not rec:  # a sample `_NotIn` skips
            return rec
        # The first token is never a target: with an empty prompt (prompt_len 0) the response starts at
        # input 0 like after a one-token prompt, and its store rows (as `iter_samples`' prompt_lengths
        # give them to `posterior`) start at the second token.
        tokens, p = rec["tokens"].astype(np.int32), max(int(rec["prompt_len"]), 1)
        n, sid = len(tokens), int(rec["sample_id"])
        if not _has_target(tokens):  # skipped like `_NotIn`'s (a packed segment of no tokens would use a segment id)
            return {}
        if n - 1 > self.seq_len:
            raise DataError(
                f"{self.where}: sample id {sid} has {n - 1} input tokens, more than the rows' seq_len {self.seq_len} "
                f"(the data was prepared with data.seq_len={self.prepared_len}); raise the stage's seq_len "
                "(train.seq_len for distill) to at least that, or re-run `proxykd prepare` with a data.seq_len no "
                "larger than it.",
                "too_long",
            )
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


_CHUNK = 32  # samples per message from a worker process


def _join(examples: list) -> dict:
    """A chunk of examples as one array per field, samples end to end, and their lengths (-1: a skipped
    sample): what crosses from a worker process is a few arrays per chunk, not a few per sample."""
    full = [ex for ex in examples if ex]
    out = {k: np.concatenate([ex[k] for ex in full]) for k in (full[0] if full else {})}
    out["_lengths"] = np.asarray([len(ex["tokens"]) if ex else -1 for ex in examples], np.int64)
    return out


def _split(chunk: dict) -> list:
    """`_join`'s examples back (views of its arrays), `{}` for a skipped sample."""
    lengths = chunk["_lengths"]
    ends = np.cumsum(np.maximum(lengths, 0))
    fields = [k for k in chunk if k != "_lengths"]
    return [{k: chunk[k][e - n : e] for k in fields} if n >= 0 else {} for n, e in zip(lengths, ends)]


class _InOrder(grain.IterDataset):
    """The per-sample examples of a MapDataset in index order, read in-process or by `num_workers`
    worker processes (each reads every num_workers-th chunk of `_CHUNK` samples; the chunks are
    interleaved back into order), so packing sees the same stream whatever the number of workers. The
    iterator state is the index of the next sample, `{"next_index": i}`, and restores under any number
    of workers."""

    def __init__(self, ds: grain.MapDataset, num_workers: int, buffer_size: int):
        super().__init__()
        self.ds, self.num_workers, self.buffer_size = ds, num_workers, buffer_size

    def __iter__(self):
        return _InOrderIterator(self.ds, self.num_workers, self.buffer_size)


class _InOrderIterator(grain.DatasetIterator):
    def __init__(self, ds: grain.MapDataset, num_workers: int, buffer_size: int):
        super().__init__()
        self.ds, self.num_workers, self.buffer_size = ds, num_workers, buffer_size
        self.next_index, self.it, self.pending = 0, None, []

    def __next__(self):
        while True:
            if not self.pending:
                if self.it is None:
                    self.it = self._open()
                got = next(self.it)
                self.pending = (_split(got) if self.num_workers else [got])[::-1]  # popped from the end: in order
            ex = self.pending.pop()
            self.next_index += 1
            if ex:  # `{}`: a sample `_NotIn` skips
                return ex

    def _open(self):
        rest = self.ds[self.next_index :]
        if not self.num_workers:
            return iter(rest)
        chunks = rest.batch(_CHUNK, batch_fn=_join).to_iter_dataset()
        options = grain.MultiprocessingOptions(
            num_workers=self.num_workers, per_worker_buffer_size=max(2, -(-self.buffer_size // _CHUNK))
        )
        return iter(chunks.mp_prefetch(options))

    def get_state(self):
        return {"next_index": self.next_index}

    def set_state(self, state):
        self.close_inner()
        self.next_index = int(state["next_index"])

    def close_inner(self):
        if self.it is not None and hasattr(self.it, "close"):
            self.it.close()
        self.it, self.pending = None, []


class _Rename(grain.transforms.Map):
    """Packed-row keys from grain's packer to the batch contract."""

    def map(self, row):
        out = {k: v for k, v in row.items() if not k.endswith(("_segment_ids", "_positions"))}
        out["segment_ids"] = row["tokens_segment_ids"].astype(np.int32)
        out["positions"] = row["tokens_positions"].astype(np.int32)
        return out


def _has_target(tokens) -> bool:
    """Whether a sample's tokens hold a target: one token has none, so it takes no row and needs no store entry."""
    return len(tokens) > 1


def _without_targets(prepared: PreparedData, split: str, ids: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """The ids among `missing` (no store entry) of samples of one token, which need none. Their records are read
    in split order (`ids`, the split's sample_ids.npy) up to the first missing sample that has a target: that one
    is refused, and the count then reported may include one-token samples after it."""
    source, exempt = prepared.source(split), []
    for i in np.flatnonzero(np.isin(ids, missing)):
        if _has_target(decode_record(source[int(i)])["tokens"]):
            break
        exempt.append(int(ids[i]))
    return np.asarray(exempt, np.int64)


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
    seq_len: int,
):
    """MapDataset of per-sample examples for this process (shared by both readers); `{}` for a
    sample of one token (no target) and one that data.on_error=skip drops because the store misses it."""
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
        ids = prepared.sample_ids(split)
        missing = reader.missing(ids)
        missing = missing[~np.isin(missing, _without_targets(prepared, split, ids, missing))]
        if len(missing):
            msg = (
                f"{reader.dir}: store misses {len(missing)} of {len(ids)} samples of split {split!r} "
                f"(e.g. sample id {int(missing[0])}); finish `posterior` or set data.on_error=skip."
            )
            if dcfg.on_error != "skip":
                raise DataError(msg, "store_missing")
            logging.warning("%s Skipping them.", msg)
            ds = ds.map(_NotIn(missing))
    teacher_k = prepared.manifest["teacher_topk"] if prepared.has_teacher_head else None
    where = f"{prepared.root / split}"
    return ds.map(_ToExample(reader, teacher_k, seq_len, where, prepared.manifest.get("seq_len")))


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
    of the result has get_state/set_state for exact resume. With process_count > 1 each process packs
    its own slice, so a finite stream may give processes different numbers of batches (`distill` packs
    the global batches on every process and keeps its rows instead).
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
        seq_len=seq_len,
    )
    fields = list(_SEQ_FIELDS)
    if prepared.has_teacher_head:
        fields += ["teacher_topk_ids", "teacher_topk_logprobs"]
    if store is not None:
        fields += ["kd_ids", "kd_logprobs", "kd_tail", "weight"]
    # Workers only read and join samples; packing runs here on the stream in order, so batches and
    # iterator states do not depend on data.num_workers (an operational setting).
    it = _InOrder(ds, dcfg.num_workers, dcfg.worker_buffer_size * local)
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={f: seq_len for f in fields},
        num_packing_bins=dcfg.packing_bins or local,
        shuffle_bins=False,
        padding_struct={f: _PAD.get(f) for f in fields},
    )
    return it.map(_Rename()).batch(local, drop_remainder=True)


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
    """One sample per row (none for a sample of one token), padded to [batch_size, seq_len]; the last batch is
    padded with empty rows.

    Adds `lengths` (input tokens per row, 0 on padding rows) and `prompt_lengths` (prompt tokens of
    the sample: the first response token is the target at input index prompt_lengths - 1) to the
    packed-batch fields. For DPO pairs and proxy scoring.
    """
    prepared = _open(prepared)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    seq_len = seq_len or dcfg.seq_len
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
        seq_len=seq_len,
    )
    pad_id = prepared.manifest["tokenizer"]["pad_id"]
    pad_id = prepared.manifest["tokenizer"]["eos_id"] if pad_id is None else pad_id
    collate = _PadBatch(batch_size, seq_len, int(pad_id or 0))
    return iter(_InOrder(ds, 0, 0).batch(batch_size, batch_fn=collate))


SORT_WINDOW = 32  # batches whose rows are put in order of length together (`by_length`)


def sample_batches(
    prepared, split: str, dcfg, *, batch_size: int, empty, seq_len: int | None = None, limit: int = 0
) -> Iterator[dict]:
    """This process's rows of the first ceil(limit / batch_size) global batches of `split` (all: limit 0), one sample
    per row (`iter_samples`), `batch_size` rows per global batch split over processes, as many batches on every
    process (`hosts.lockstep`; `empty(template)` pads). Windows of `SORT_WINDOW` batches have their rows in order of
    length (`by_length`, each process its own rows), and each batch is cut to the fewest positions of
    `lengths_of(seq_len)` that hold its longest row on every process (`cut`): a batch of short samples runs a
    short forward. The batches hold the same samples as in file order, so a sum over them is the same."""
    prepared, seq_len = _open(prepared), int(seq_len or dcfg.seq_len)
    total = prepared.num_samples(split)
    count = math.ceil(min(total, limit or total) / batch_size)  # (each process's slice fills at most as many)
    it = iter_samples(prepared, split, dcfg, batch_size=batch_size // jax.process_count(), seq_len=seq_len)
    return cut(hosts.lockstep(by_length(itertools.islice(it, count), SORT_WINDOW), count, empty), seq_len)


def by_length(batches: Iterable[dict], window: int) -> Iterator[dict]:
    """`batches` (same-size [rows, ...] arrays) re-formed a window of `window` at a time, with the window's rows in
    order of `lengths` (stably): as many batches, as many rows each."""
    batches = iter(batches)
    while group := list(itertools.islice(batches, window)):
        rows = {k: np.concatenate([b[k] for b in group]) for k in group[0]}
        order = np.argsort(rows["lengths"], kind="stable").reshape(len(group), -1)
        for sel in order:
            yield {k: v[sel] for k, v in rows.items()}


def lengths_of(seq_len: int) -> list[int]:
    """The row lengths a batch is cut to: seq_len, and its halves down to an eighth (at most four shapes to
    compile for each step that runs on them)."""
    return sorted({-(-seq_len // 2**j) for j in range(4)})


def cut_length(need: int, seq_len: int) -> int:
    """The fewest of `lengths_of(seq_len)` positions that hold a row of `need` positions."""
    return next(n for n in lengths_of(seq_len) if n >= need)


def cut(batches: Iterable[dict], seq_len: int) -> Iterator[dict]:
    """Each batch's per-position fields cut to the fewest of `lengths_of(seq_len)` positions that hold its longest
    row (`lengths`) on every process (the global batch has one shape)."""
    for batch in batches:
        need = int(hosts.allgather(np.asarray([batch["lengths"].max(initial=0)], np.int64)).max())
        length = cut_length(need, seq_len)
        yield {k: v[:, :length] if v.ndim > 1 else v for k, v in batch.items()}


def to_global_batch(batch: dict, mesh, rules=None) -> dict:
    """Host-local numpy batch -> global jax.Arrays, batch dim over the mesh axes of logical `batch`.

    int64 fields (`sample_ids`) stay on the host unless jax_enable_x64 is on: as int32 they would
    silently wrap. The loss needs segment_ids, not sample ids; keep the host batch for logging.
    """
    from proxykd_jax.parallel import LOGICAL_RULES, global_batch  # pylint: disable=import-outside-toplevel

    if not jax.config.jax_enable_x64:
        batch = {k: v for k, v in batch.items() if np.asarray(v).dtype != np.int64}
    return global_batch(batch, mesh, LOGICAL_RULES if rules is None else rules)
