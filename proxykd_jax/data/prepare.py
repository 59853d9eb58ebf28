"""The `prepare` stage: stream the teacher corpus, tokenise, split and write prepared records.

With data.on_error=error the corpus is first read once without tokenising (`check_corpus`: JSON,
fields, duplicate samples), so a bad line anywhere stops prepare before the long work, naming the
first few bad lines at once.

Memory is bounded by `data.prepare_buffer_mb`: rows are read one at a time, tokenised in batches of
about that much memory (`_buffered_bytes`: their text and the teacher's alternatives) and written at
once; only the seen prompt ids (to refuse duplicates) and the written sample ids grow with the corpus,
at 8 bytes per id (and, for prompts given without `id`, a count per prompt: `corpus.iter_corpus`).
Output is written to a temporary sibling folder (`.<out>.tmp`, removed by the next run if a crash
leaves it) and renamed into place at the end, so a crash never leaves a half-written prepared
directory behind. What it says about bad input (the `DataError`s and the lines on skipped or truncated
rows) is worded in `data/prepare_errors.py`.
"""

import array
import collections
import contextlib
import functools
import gc
import json
import logging
import os
import pathlib
import shutil
import time

import numpy as np
from array_record.python import array_record_module

from proxykd_jax import progress as progress_bars
from proxykd_jax.data import align, byte_head, corpus, corpus_files, records, split
from proxykd_jax.data.config import SPLITS
from proxykd_jax.data.prepare_errors import (
    BAD_LINES_SHOWN,
    MAX_ERRORS_KEPT,
    SKIPS_SHOWN,
    bad_lines,
    duplicate,
    empty_corpus,
    first_places,
    name_first_places,
    prompt_too_long,
    skipped_line,
    template_refusals,
    truncated_line,
)
from proxykd_jax.models.tokenizer import end_of_turn_id, tokenizer_hash
from proxykd_jax.npfiles import sha256

log = logging.getLogger(__name__)
_HEAD_PROBE_SAMPLES = 2000  # samples with teacher log-probs read to decide data.teacher_head=auto
_LOW_COVERAGE = 0.5  # below this fraction of our positions with a teacher head, prepare warns
# Python memory of a tokenised character (ids, offsets, records; measured on byte-level BPE).
_BYTES_PER_CHAR = 80
# Python memory of a teacher alternative as read (its string, log-prob and bytes: 206 B measured on top-20
# log-probs with bytes). Counting text alone, a batch of such samples held 12 times data.prepare_buffer_mb.
_BYTES_PER_ALT = 200


class _IdSet:
    """A set of int64 ids in about 8 bytes each: a sorted array plus a small pending set."""

    def __init__(self, pending_max: int = 1 << 10):
        self.sorted = np.zeros(0, np.int64)
        self.pending: set[int] = set()
        self.pending_max = pending_max

    def __contains__(self, key: int) -> bool:
        if key in self.pending:
            return True
        j = np.searchsorted(self.sorted, key)
        return bool(j < len(self.sorted) and self.sorted[j] == key)

    def add(self, key: int):
        self.pending.add(key)
        if len(self.pending) >= self.pending_max:
            self.sorted = np.union1d(self.sorted, np.fromiter(self.pending, np.int64, len(self.pending)))
            self.pending.clear()


@contextlib.contextmanager
def _gc_per_batch():
    """Pauses Python's cyclic garbage collector while the corpus is read; yields the function to run it
    once per batch written, over what the batch left (the younger generations).

    A row with teacher log-probs decodes into tens of thousands of short-lived containers (a dict and a
    byte list per alternative). With the collector on, they live long enough to reach its oldest
    generation and set off a full collection every row or two, each over all the buffered samples: more
    than half of prepare's time. The stage makes little cyclic garbage; it waits for the next batch."""
    if not gc.isenabled():  # the caller's choice: left as it is
        yield lambda: None
        return
    gc.disable()
    try:
        yield functools.partial(gc.collect, 1)
    finally:
        gc.enable()


def _buffered_bytes(s: corpus.Sample) -> int:
    """About the Python memory a sample takes from being read until its batch is written."""
    alts = sum(map(len, s.teacher_alts)) if s.teacher_alts is not None else 0
    return _BYTES_PER_CHAR * (len(s.response) + len(s.prompt or "")) + _BYTES_PER_ALT * alts + 512


def _data_group(cfg):
    """Accepts the whole config or its `data` group."""
    return cfg.data if "data" in cfg else cfg


class _SplitWriter:
    """Writes one split's records into ArrayRecord files of at most `per_file` records each."""

    def __init__(self, root: pathlib.Path, name: str, per_file: int):
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name, self.per_file = name, per_file
        self.files: list[str] = []
        self.writer, self.in_file = None, 0
        self.samples = self.prompts = self.tokens = self.response_tokens = 0
        self.sample_ids = array.array("q")  # 8 bytes per sample, written as <split>/sample_ids.npy

    def write(self, rec: dict, new_prompt: bool):
        if self.writer is None or self.in_file >= self.per_file:
            self._close_file()
            rel = f"{self.name}/records-{len(self.files):05d}.arrayrecord"
            self.writer = array_record_module.ArrayRecordWriter(str(self.dir.parent / rel), "group_size:1")
            self.files.append(rel)
        self.writer.write(records.encode_record(rec))
        self.in_file += 1
        self.sample_ids.append(rec["sample_id"])
        self.samples += 1
        self.prompts += int(new_prompt)
        self.tokens += len(rec["tokens"])
        self.response_tokens += len(rec["tokens"]) - rec["prompt_len"]

    def _close_file(self):
        if self.writer is not None:
            self.writer.close()
        self.writer, self.in_file = None, 0

    def close(self) -> dict:
        self._close_file()
        np.save(self.dir / records.SAMPLE_IDS, np.frombuffer(self.sample_ids, np.int64))
        return {
            "samples": self.samples,
            "prompts": self.prompts,
            "tokens": self.tokens,
            "response_tokens": self.response_tokens,
            "files": self.files,
        }


def _record(enc: align.Encoded) -> dict:
    s = enc.sample
    loss_mask = np.zeros(len(enc.tokens_L), bool)
    loss_mask[enc.prompt_len :] = True
    rec = {
        "sample_id": s.sample_id,
        "prompt_key": s.prompt_key,
        "record_id": s.record_id,
        "response_index": s.response_index,
        "prompt_len": enc.prompt_len,
        "tokens": enc.tokens_L,
        "loss_mask": loss_mask,
        "meta": {k: v for k, v in s.meta.items() if isinstance(v, (str, int, float, bool))},
    }
    if enc.truncated:  # cut by data.truncate: scores of the teacher's text stop where the tokens do
        rec["response_chars"] = enc.response_chars
    if enc.teacher_topk_ids_LxK is not None:
        rec["teacher_topk_ids"] = enc.teacher_topk_ids_LxK
        rec["teacher_topk_logprobs"] = enc.teacher_topk_logprobs_LxK
    return rec


def _check_out(out: pathlib.Path, overwrite: bool):
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out}: output already exists; pass overwrite=True (--config.run.overwrite=True with proxykd prepare) to replace it, or choose another folder."
        )


def prepare(
    corpus_paths, tokenizer, out_dir, cfg, overwrite: bool = False, progress: bool = True, keep: tuple[str, ...] = ()
) -> dict:
    """Tokenises and splits a teacher corpus into `out_dir`; returns the manifest it wrote.

    Args:
      corpus_paths: JSONL/parquet files, folders of them, or local `datasets` folders.
      tokenizer: a Hugging Face fast tokenizer (its chat template formats `messages`).
      out_dir: the prepared directory to create (refused if it exists unless `overwrite`).
      cfg: the `data` config group (or a whole config holding one).
      keep: names of files in an existing `out_dir` to carry into the new one (the stage's record),
        copied in before the swap so that no moment leaves `out_dir` without them.

    The records are written to `.<out>.tmp` beside `out_dir` (a name a killed run's successor finds
    and removes) and swapped into place at the end.
    """
    dcfg = _data_group(cfg)
    out = pathlib.Path(out_dir)
    _check_out(out, overwrite)
    fractions = split.split_fractions(dcfg.split)
    tmp, old = _scratch(out)
    for stale in (tmp, old):  # left by a run killed mid-prepare or mid-swap
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    try:
        manifest = _prepare_into(corpus_paths, tokenizer, tmp, dcfg, fractions, progress)
        _check_out(out, overwrite)
        for name in keep:
            if (out / name).is_file():
                shutil.copy2(out / name, tmp / name)
        _fsync_dir(tmp)
        if out.exists():
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        _fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def _scratch(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(temporary folder, the old folder's place during the swap) of `out`: fixed names beside it, not
    the `.<name>.old` the artifact layer uses for its own swap."""
    return out.parent / f".{out.name}.tmp", out.parent / f".{out.name}.replaced"


def _claim(row: list, seen_ids) -> corpus.Sample | None:
    """The first sample of `row` whose id `seen_ids` holds (a duplicate: the row is not taken), else None
    with the row's ids added to `seen_ids`."""
    dup = next((s for s in row if s.sample_id in seen_ids), None)
    if dup is None:
        for s in row:
            seen_ids.add(s.sample_id)
    return dup


def _fsync_dir(path: pathlib.Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_corpus(corpus_paths, progress: bool = False) -> tuple[int, int]:
    """Reads the whole corpus once without tokenising (JSON, fields, duplicate samples); raises one DataError
    for its bad lines: a bad line's own sentence, or for several how many and the first few. Returns the
    (rows, samples) it read: the totals of the later passes' bars.

    The teacher's log-probs are checked by the tokenising pass instead: reading them would double this pass's
    time (20,000 samples, half with top-20 log-probs: 2.7 s without them, 4.4 s with; the whole prepare 17 s)."""
    skipped: collections.Counter = collections.Counter()
    errors: list[corpus.DataError] = []
    seen_ids = _IdSet()
    dups: dict[int, corpus.Sample] = {}  # index in `errors` -> the duplicate sample there
    bar = progress_bars.bar(unit=" rows", desc="prepare: checking the corpus", disable=not progress)
    rows = corpus.iter_corpus(corpus_paths, "skip", skipped, errors, BAD_LINES_SHOWN, logprobs=False)
    n = samples = 0
    with _gc_per_batch() as collect_garbage:
        for n, row in enumerate(rows, 1):
            if n % 4096 == 0:
                bar.update(4096)
                collect_garbage()
            samples += len(row)
            dup = _claim(row, seen_ids)
            if dup is not None:
                skipped["duplicate_id"] += 1
                if len(errors) < BAD_LINES_SHOWN:
                    dups[len(errors)] = dup
                    errors.append(duplicate(dup))
    bar.update(n % 4096)
    bar.close()
    name_first_places(corpus_paths, errors, dups, logprobs=False)
    total = sum(skipped.values())
    if total:
        raise bad_lines(total, errors)
    return n, samples


def decide_head(corpus_paths, tokenizer, dcfg, progress: bool = False, rows: int | None = None) -> tuple[str, dict]:
    """(`exact` | `bytes`, the evidence) for `data.teacher_head`: given, or for `auto` from the span
    rule on the first samples with teacher log-probs (`align.choose_head`), read until there are enough
    (a corpus with fewer is read to its end: `rows`, its rows where known, is the bar's total).

    They are encoded as they are read, in batches of data.prepare_buffer_mb (`_buffered_bytes`) or 256
    samples: only a batch is held (holding them all took 0.6 GB on a corpus of 1,200 with top-20 log-probs)."""
    mode = str(dcfg.get("teacher_head", "auto"))
    if mode not in ("auto",) + align.HEADS:
        raise ValueError(f"data.teacher_head={mode!r} is not one of {('auto',) + align.HEADS}.")
    if mode != "auto":
        return mode, {"source": "config"}
    # An end row whatever data.add_eos: the probe asks whether the teacher tokenises like us, and without one each
    # answer's final stop position (`SampleEncoder._align`) was dropped, short answers falling below the bar.
    encoder = align.SampleEncoder(
        tokenizer, seq_len=1 << 30, teacher_topk=dcfg.teacher_topk, add_eos=True, head="exact"
    )
    stats = align.AlignStats()
    budget = int(dcfg.prepare_buffer_mb * (1 << 20))
    batch: list[corpus.Sample] = []
    taken = buffered = 0

    def encode():
        for enc in encoder.encode_batch(batch):
            if not isinstance(enc, corpus.DataError):
                stats.add(enc.stats)
        batch.clear()

    bar = progress_bars.bar(total=rows, unit=" rows", desc="prepare: choosing the teacher head", disable=not progress)
    with _gc_per_batch() as collect_garbage:
        for row in corpus.iter_corpus(corpus_paths, "skip", collections.Counter()):
            bar.update()
            for s in row:
                if s.teacher_alts is not None and taken < _HEAD_PROBE_SAMPLES:
                    batch.append(s)
                    taken += 1
                    buffered += _buffered_bytes(s)
            if taken == _HEAD_PROBE_SAMPLES:
                break
            if len(batch) >= 256 or buffered >= budget:
                encode()
                collect_garbage()
                buffered = 0
        encode()  # the last batch
    bar.close()
    d = stats.as_dict()
    evidence = {
        "source": "auto",
        "probe_samples": taken,
        "span_position_fraction": d["position_fraction"],
        "span_mass_fraction": d["mass_fraction"],
    }
    return align.choose_head(stats), evidence


def coverage_line(manifest: dict) -> str:
    """One line on how much of the corpus the teacher head covers (and a warning when it is little)."""
    t = manifest["teacher_logprobs"]
    if not t["samples_with_logprobs"]:
        return "prepare: the corpus has no teacher log-probs (no teacher head)"
    frac, mass = t["student_position_fraction"], t["head_mass_fraction"]
    line = (
        f"prepare: teacher head {manifest['teacher_head']}: covers {frac:.1%} of our response positions, keeping "
        f"{mass:.1%} of the teacher's top-logprob mass there ({t['mass_fraction']:.1%} of all its mass)"
    )
    if frac < _LOW_COVERAGE:
        other = "bytes" if manifest["teacher_head"] == "exact" else "exact"
        line += (
            f"\nWARNING: the teacher head covers only {frac:.1%} of positions; the teacher's tokenizer may "
            f"differ from ours (try data.teacher_head={other}; docs/TOKENIZERS.md)"
        )
    return line


def _prepare_into(corpus_paths, tokenizer, tmp: pathlib.Path, dcfg, fractions, progress) -> dict:
    t0 = time.time()
    skipped: collections.Counter = collections.Counter()
    errors: list[corpus.DataError] = []
    truncated_at: list[str] = []  # the first few samples data.truncate cut, for the line printed at the end
    rows = total = None  # counted by the checking pass (`data.on_error=error`), for the bars
    if dcfg.on_error == "error":
        rows, total = check_corpus(corpus_paths, progress)
    head, head_evidence = decide_head(corpus_paths, tokenizer, dcfg, progress, rows)
    encoder = align.SampleEncoder(
        tokenizer,
        seq_len=dcfg.seq_len,
        teacher_topk=dcfg.teacher_topk,
        add_eos=dcfg.add_eos,
        truncate=dcfg.truncate,
        head=head,
    )
    if dcfg.add_eos and tokenizer.eos_token_id is None:
        raise ValueError(
            "data.add_eos is set but the tokenizer has no eos token; set its eos_token or data.add_eos=False."
        )
    writers = {name: _SplitWriter(tmp, name, dcfg.records_per_file) for name in SPLITS}
    stats = align.AlignStats()
    seen_ids = _IdSet()
    counts = collections.Counter()
    budget = int(dcfg.prepare_buffer_mb * (1 << 20))
    buffer: list[corpus.Sample] = []
    buffered = 0
    sources = [str(p) for p in corpus_files.expand_paths(corpus_paths)]
    bar = progress_bars.bar(total=total, unit=" samples", desc="prepare", disable=not progress)

    seen_prompts = _IdSet()  # a prompt's rows may come in any order; it is counted once (in its one split)
    dups: dict[int, corpus.Sample] = {}  # index in `errors` -> the duplicate sample there

    def flush():
        for s, enc in zip(buffer, encoder.encode_batch(buffer)):
            if isinstance(enc, corpus.DataError):
                if enc.reason == "too_long" and dcfg.truncate:  # refused only when no response token fits
                    enc = prompt_too_long(s, dcfg.seq_len)
                skip(enc)
                continue
            name = split.assign_split(s.record_id, fractions, dcfg.split.salt)
            new_prompt = s.prompt_key not in seen_prompts
            writers[name].write(_record(enc), new_prompt=new_prompt)
            if new_prompt:
                seen_prompts.add(s.prompt_key)
            stats.add(enc.stats)
            counts["samples"] += 1
            counts["truncated"] += int(enc.truncated)
            if enc.truncated and len(truncated_at) < SKIPS_SHOWN:
                truncated_at.append(s.where)
        bar.update(len(buffer))
        buffer.clear()

    def skip(err: corpus.DataError, dup: corpus.Sample | None = None):
        if dcfg.on_error == "error":
            if err.reason == "bad_messages":  # the template may refuse many rows: say how many
                raise template_refusals(corpus_paths, tokenizer, err)
            if dup is not None:
                raise duplicate(dup, first_places(corpus_paths, [dup.sample_id], True).get(dup.sample_id))
            raise err
        skipped[err.reason] += 1
        if len(errors) < MAX_ERRORS_KEPT:
            if dup is not None:
                dups[len(errors)] = dup
            errors.append(err)

    with _gc_per_batch() as collect_garbage:
        for row in corpus.iter_corpus(corpus_paths, dcfg.on_error, skipped, errors, MAX_ERRORS_KEPT):
            counts["rows"] += 1
            dup = _claim(row, seen_ids)
            if dup is not None:
                skip(duplicate(dup), dup)
                continue
            for sample in row:
                buffer.append(sample)
                buffered += _buffered_bytes(sample)
            if buffered >= budget:
                flush()
                collect_garbage()
                buffered = 0
        flush()
    bar.close()
    name_first_places(corpus_paths, errors, dups, logprobs=True)
    if counts["samples"] == 0:
        raise empty_corpus(sources, counts["rows"], skipped, errors)
    split_info = {name: w.close() for name, w in writers.items()}
    npy = [f"{name}/{records.SAMPLE_IDS}" for name in writers]
    if head == "bytes":
        np.save(tmp / records.SYMBOLS, byte_head.token_symbols(tokenizer))
        npy.append(records.SYMBOLS)
    manifest = {
        "format_version": records.FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sources": sources,
        "tokenizer": {
            "hash": tokenizer_hash(tokenizer),
            "name": getattr(tokenizer, "name_or_path", ""),
            "vocab_size": len(tokenizer),
            "eos_id": tokenizer.eos_token_id,
            # what ends the answers of rows the chat template formats (the eos where it writes no special token)
            "end_of_turn_id": end_of_turn_id(tokenizer),
            "pad_id": tokenizer.pad_token_id,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        },
        "seq_len": int(dcfg.seq_len),
        "teacher_topk": int(dcfg.teacher_topk),
        "split": {"fractions": fractions, "salt": dcfg.split.salt},
        "splits": split_info,
        "counts": {
            "rows": counts["rows"],
            "samples": counts["samples"],
            "truncated": counts["truncated"],
            "skipped": dict(skipped),
            "skipped_total": sum(skipped.values()),
            "errors": [str(e) for e in errors],
        },
        "teacher_logprobs": stats.as_dict(),
        "teacher_head": head,
        "teacher_head_decision": head_evidence,
        "checksums": {name: sha256(tmp / name) for name in npy},  # an .npy holds none of its own
        "seconds": time.time() - t0,
    }
    path = tmp / records.MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for line in (skipped_line(skipped, errors), truncated_line(counts["truncated"], truncated_at, dcfg.seq_len)):
        if line:  # data dropped or cut: said whatever `progress` says
            print(line)
    line = coverage_line(manifest)
    if progress or "WARNING" in line:
        print(line)
    return manifest
