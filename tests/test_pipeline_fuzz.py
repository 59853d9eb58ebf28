"""The grain pipelines fuzzed against a plain reference: what a packed batch (and an `iter_samples` row) must hold.

Prepared records and stores are written here directly in their on-disk formats (docs/DATA_FORMATS.md: msgpack
records in ArrayRecord files, a manifest, `<split>/sample_ids.npy`; `StoreWriter` shards), so that a case can hold
what `prepare` rarely makes: one-token samples, empty responses, rows of exactly seq_len, store rows with fewer than
k candidates in every log-prob encoding. The reference (`ref_example`, `ref_packed`, `ref_rows`) is plain Python
over those samples; the only thing it takes from grain is the shuffled order of the records (grain's permutation),
which `test_epochs_cover_every_sample_once` and `test_processes_split_the_samples` check on their own. One case built by `prepare` itself
(`test_prepared_by_prepare_agrees`) ties the written format to the real one.
"""

import dataclasses
import json
import pathlib

import grain
import ml_dtypes
import numpy as np
import pytest
from array_record.python import array_record_module
from test_data_pipeline import setup  # noqa: F401  (the module's prepared split and store)

from proxykd_jax.data import (
    DataError,
    PreparedData,
    StoreWriter,
    default_config,
    encode_record,
    iter_samples,
    make_iterator,
)

SPLIT = "distill"


@dataclasses.dataclass
class Sample:
    """One prepared sample: its tokens (prompt, then response), prompt length, id, and the optional teacher top-k
    rows of its tokens ([n, Kt], row i about token i) and store entry (rows of its response targets)."""

    sid: int
    tokens: np.ndarray
    prompt_len: int
    teacher: tuple | None = None  # (ids [n, Kt] int32, log-probs [n, Kt] float32)
    entry: tuple | None = None  # (ids [T, k], log-probs [T, k], tail [T], weight), as given to the store


@dataclasses.dataclass
class Case:
    """A prepared split (and maybe a store) on disk, with the settings to read it under."""

    root: pathlib.Path
    samples: list
    seq_len: int  # the rows' length (the stage's seq_len; the data was prepared with prepared_len)
    prepared_len: int
    batch_size: int
    packing_bins: int
    teacher_k: int  # 0: the corpus has no teacher log-probs
    pad_id: int | None
    eos_id: int | None
    store: dict | None  # {"k", "value_dtype", "tail_dtype", "index_dtype", "dir"}
    skipped: frozenset = frozenset()  # sample ids the store misses (read with data.on_error=skip)
    shuffle: bool = False
    seed: int = 0
    num_epochs: int = 1

    def dcfg(self, **overrides):
        cfg = default_config()
        cfg.seq_len, cfg.batch_size, cfg.packing_bins = self.prepared_len, self.batch_size, self.packing_bins
        cfg.shuffle, cfg.shuffle_seed, cfg.num_epochs = self.shuffle, self.seed, self.num_epochs
        cfg.on_error = "skip" if self.skipped else "error"
        for key, value in overrides.items():
            cfg[key] = value
        return cfg

    @property
    def store_dir(self):
        return None if self.store is None else self.store["dir"]


# ----------------------------------------------------------------------------------------------- writing a case


def write_prepared(root: pathlib.Path, samples, *, vocab: int, prepared_len: int, teacher_k: int, pad_id, eos_id):
    """The split's records in two ArrayRecord files, its sample ids and a manifest, as `prepare` lays them out."""
    (root / SPLIT).mkdir(parents=True)
    files, half = [], (len(samples) + 1) // 2
    for f, part in enumerate((samples[:half], samples[half:])):
        if not part:
            continue
        rel = f"{SPLIT}/records-{f:05d}.arrayrecord"
        writer = array_record_module.ArrayRecordWriter(str(root / rel), "group_size:1")
        for s in part:
            rec = {
                "sample_id": s.sid,
                "prompt_key": s.sid // 3,
                "record_id": f"r{s.sid}",
                "response_index": 0,
                "prompt_len": s.prompt_len,
                "tokens": s.tokens.astype(np.int32),
                "loss_mask": np.arange(len(s.tokens)) >= s.prompt_len,
                "meta": {},
            }
            if s.teacher is not None:
                rec["teacher_topk_ids"], rec["teacher_topk_logprobs"] = s.teacher
            writer.write(encode_record(rec))
        writer.close()
        files.append(rel)
    np.save(root / SPLIT / "sample_ids.npy", np.asarray([s.sid for s in samples], np.int64))
    split = {"samples": len(samples), "prompts": len(samples), "tokens": 0, "response_tokens": 0, "files": files}
    manifest = {
        "format_version": 1,
        "tokenizer": {"hash": "fuzz", "vocab_size": vocab, "eos_id": eos_id, "pad_id": pad_id},
        "seq_len": prepared_len,
        "teacher_topk": teacher_k or 20,
        "split": {"fractions": {SPLIT: 1.0}},
        "splits": {SPLIT: split},
        "teacher_logprobs": {"samples_with_logprobs": sum(s.teacher is not None for s in samples)},
        "teacher_head": "exact",
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return PreparedData(root)


def random_rows(rng, t: int, k: int, vocab: int):
    """Store rows: each has 0..k candidates (sorted log-probs, -inf and id 0 past them) and a tail mass."""
    ids, lps = np.zeros((t, k), np.int64), np.full((t, k), -np.inf, np.float32)
    tail = rng.uniform(0, 1, t).astype(np.float32)
    for r in range(t):
        m = int(rng.integers(0, k + 1)) if rng.uniform() < 0.4 else k
        ids[r, :m] = rng.choice(vocab, size=m, replace=False)
        lps[r, :m] = np.sort(rng.uniform(-30, 0, m))[::-1]
    return ids, lps, tail


def random_case(root: pathlib.Path, rng, **fixed) -> Case:
    """A random case (any setting can be `fixed`): lengths from 1 token to exactly seq_len inputs, empty prompts
    and empty responses, samples with and without teacher rows, a store in a random encoding or none."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = fixed.get("vocab", int(rng.choice([7, 300, 70000])))
    prepared_len = fixed.get("prepared_len", int(rng.integers(1, 33)))
    n_samples = fixed.get("n_samples", int(rng.integers(1, 41)))
    teacher_k = fixed.get("teacher_k", int(rng.choice([0, 0, 1, 3, 5])))
    with_store = fixed.get("with_store", rng.uniform() < 0.7)
    k = int(rng.integers(1, 7))
    ids = rng.choice(2**62, size=n_samples, replace=False) + int(rng.integers(0, 2)) * 2**62
    samples = []
    for sid in ids:
        n = {0: 1, 1: 2, 2: prepared_len + 1}.get(int(rng.integers(0, 8)), int(rng.integers(1, prepared_len + 2)))
        n = min(max(n, fixed.get("min_tokens", 1)), fixed.get("max_tokens", 1 << 30))
        p = {0: 0, 1: n}.get(int(rng.integers(0, 6)), int(rng.integers(0, n + 1)))  # 1: an empty response
        s = Sample(int(sid), rng.integers(0, vocab, n).astype(np.int32), p)
        if teacher_k and rng.uniform() < 0.8:
            t_ids = rng.integers(0, vocab, (n, teacher_k)).astype(np.int32)
            t_lps = np.sort(rng.uniform(-20, 0, (n, teacher_k)), 1)[:, ::-1].astype(np.float32)
            t_lps[rng.uniform(size=(n, teacher_k)) < 0.2] = -np.inf
            t_lps[:p] = -np.inf
            s.teacher = (t_ids, np.sort(t_lps, 1)[:, ::-1].copy())
        if with_store:
            t = n - max(p, 1) if n > 1 else 0  # the first token is never a target
            s.entry = (*random_rows(rng, t, k, vocab), float(rng.uniform(0.01, 3)))
        samples.append(s)
    if not any(s.teacher is not None for s in samples):
        teacher_k = 0  # a corpus without teacher log-probs: no teacher fields
    pad_id = fixed.get("pad_id", [None, 0, int(rng.integers(0, vocab))][int(rng.integers(0, 3))])
    eos_id = [None, int(rng.integers(0, vocab))][int(rng.integers(0, 2))]
    write_prepared(
        root / "prep",
        samples,
        vocab=vocab,
        prepared_len=prepared_len,
        teacher_k=teacher_k,
        pad_id=pad_id,
        eos_id=eos_id,
    )
    store, skipped = None, frozenset()
    if with_store:
        index = "uint16" if vocab <= 65536 and rng.uniform() < 0.5 else str(rng.choice(["uint32", "bits"]))
        store = {
            "dir": root / "store",
            "k": k,
            "index_dtype": index,
            "value_dtype": fixed.get("value_dtype", str(rng.choice(["float32", "bfloat16", "float16", "uint8"]))),
            "tail_dtype": str(rng.choice(["float16", "float32"])),
        }
        if rng.uniform() < 0.2 and n_samples > 1:
            skipped = frozenset(int(s.sid) for s in samples if rng.uniform() < 0.2)
        # like `posterior`, which writes a one-token sample (no target) no entry, or with its entry of no rows
        no_target = {s.sid for s in samples if len(s.tokens) < 2} if rng.uniform() < 0.5 else set()
        if len(skipped | no_target) == len(samples):  # a store holds one entry at least (else it has no shard)
            skipped, no_target = skipped - {samples[0].sid}, no_target - {samples[0].sid}
        write_store(store, samples, vocab, skipped | no_target, shard_mb=float(rng.choice([1e-4, 1.0])))
    seq_len = fixed.get("seq_len", prepared_len + int(rng.choice([0, 0, 0, 1, 7])))
    pc_unit = fixed.get("batch_multiple", 1)
    return Case(
        root=root,
        samples=samples,
        seq_len=seq_len,
        prepared_len=prepared_len,
        batch_size=int(rng.integers(1, 6)) * pc_unit,
        packing_bins=fixed.get("packing_bins", int(rng.choice([0, 0, 1, 3, 7]))),
        teacher_k=teacher_k,
        pad_id=pad_id,
        eos_id=eos_id,
        store=store,
        skipped=skipped,
        shuffle=fixed.get("shuffle", bool(rng.uniform() < 0.5)),
        seed=int(rng.integers(0, 1000)),
        num_epochs=fixed.get("num_epochs", int(rng.choice([1, 1, 2, 3]))),
    )


def write_store(store: dict, samples, vocab: int, skipped=frozenset(), shard_mb: float = 1.0):
    with StoreWriter(
        store["dir"],
        k=store["k"],
        vocab_size=vocab,
        tokenizer_hash="fuzz",
        index_dtype=store["index_dtype"],
        value_dtype=store["value_dtype"],
        tail_dtype=store["tail_dtype"],
        shard_mb=shard_mb,
    ) as w:
        for s in samples:
            if s.sid not in skipped:
                w.add(s.sid, *s.entry)


# ------------------------------------------------------------------------------------------------- the reference


def stored_logprobs(lps, value_dtype: str):
    """(what the store gives back for `lps`, the tolerance per entry): exact but for the encoding's rounding."""
    lps = np.asarray(lps, np.float32)
    if value_dtype == "float32":
        return lps, np.zeros_like(lps)
    if value_dtype == "bfloat16":
        return lps.astype(ml_dtypes.bfloat16).astype(np.float32), np.zeros_like(lps)
    if value_dtype == "float16":
        return lps.astype(np.float16).astype(np.float32), np.zeros_like(lps)
    # uint8: 254 steps between each row's largest and smallest finite log-prob; the largest is kept exactly
    tol = np.zeros_like(lps)
    for r, row in enumerate(lps):
        finite = row[np.isfinite(row)]
        if len(finite):
            tol[r] = (finite.max() - finite.min()) / 254 / 2 * 1.001 + 1e-5
    return lps, tol


def ref_example(s: Sample, teacher_k: int, store: dict | None) -> dict:
    """The per-position fields of one sample, position j holding input token j and target token j + 1, written
    out one position at a time. Store rows score the response targets: row r the target max(prompt_len, 1) + r."""
    n = len(s.tokens)
    first_scored = max(s.prompt_len, 1)
    out = {
        "tokens": [],
        "targets": [],
        "loss_mask": [],
        "sample_ids": [],
        "teacher_topk_ids": [],
        "teacher_topk_logprobs": [],
        "kd_ids": [],
        "kd_logprobs": [],
        "kd_tol": [],
        "kd_tail": [],
        "weight": [],
    }
    if store is not None:
        k = store["k"]
        e_ids, e_lps, e_tail, e_weight = s.entry
        e_lps, e_tol = stored_logprobs(e_lps, store["value_dtype"])
        e_tail = np.asarray(e_tail, np.float32).astype(store["tail_dtype"]).astype(np.float32)
    for j in range(n - 1):
        target = j + 1
        out["tokens"].append(int(s.tokens[j]))
        out["targets"].append(int(s.tokens[target]))
        out["loss_mask"].append(1.0 if target >= s.prompt_len else 0.0)
        out["sample_ids"].append(s.sid)
        if teacher_k:
            if s.teacher is None:
                out["teacher_topk_ids"].append([0] * teacher_k)
                out["teacher_topk_logprobs"].append([-np.inf] * teacher_k)
            else:
                out["teacher_topk_ids"].append(list(s.teacher[0][target]))
                out["teacher_topk_logprobs"].append(list(s.teacher[1][target]))
        if store is not None:
            r = target - first_scored
            if r >= 0:
                out["kd_ids"].append(list(e_ids[r]))
                out["kd_logprobs"].append(list(e_lps[r]))
                out["kd_tol"].append(list(e_tol[r]))
                out["kd_tail"].append(float(e_tail[r]))
            else:
                out["kd_ids"].append([0] * k)
                out["kd_logprobs"].append([-np.inf] * k)
                out["kd_tol"].append([0.0] * k)
                out["kd_tail"].append(0.0)
            out["weight"].append(e_weight)
    return out


_DTYPES = {
    "tokens": np.int32,
    "targets": np.int32,
    "positions": np.int32,
    "segment_ids": np.int32,
    "loss_mask": np.float32,
    "sample_ids": np.int64,
    "teacher_topk_ids": np.int32,
    "teacher_topk_logprobs": np.float32,
    "kd_ids": np.int32,
    "kd_logprobs": np.float32,
    "kd_tol": np.float32,
    "kd_tail": np.float32,
    "weight": np.float32,
    "lengths": np.int32,
    "prompt_lengths": np.int32,
}


def _fields(case: Case) -> list:
    names = ["tokens", "targets", "positions", "segment_ids", "loss_mask", "sample_ids"]
    if case.teacher_k:
        names += ["teacher_topk_ids", "teacher_topk_logprobs"]
    if case.store is not None:
        names += ["kd_ids", "kd_logprobs", "kd_tol", "kd_tail", "weight"]
    return names


def _empty_rows(case: Case, rows: int, token_pad: int) -> dict:
    """`rows` padding rows: -1 sample ids, -inf log-probs, `token_pad` tokens and targets, zeros elsewhere."""
    length, out = case.seq_len, {}
    trailing = {"teacher_topk_ids": case.teacher_k, "teacher_topk_logprobs": case.teacher_k}
    if case.store is not None:
        trailing.update(kd_ids=case.store["k"], kd_logprobs=case.store["k"], kd_tol=case.store["k"])
    for name in _fields(case):
        shape = (rows, length) + ((trailing[name],) if name in trailing else ())
        fill = {"sample_ids": -1, "teacher_topk_logprobs": -np.inf, "kd_logprobs": -np.inf}.get(name, 0)
        out[name] = np.full(shape, token_pad if name in ("tokens", "targets") else fill, _DTYPES[name])
    return out


def stream(case: Case, process_index: int = 0, process_count: int = 1, limit: int | None = None):
    """This process's record indices in reading order: every epoch one pass over the records (in grain's
    shuffled order when shuffling), the passes end to end, then every process_count-th from process_index."""
    ds = grain.MapDataset.range(len(case.samples))
    if case.shuffle:
        ds = ds.shuffle(seed=case.seed)
    ds = ds.repeat(case.num_epochs or None)[process_index::process_count]
    n = len(ds) if limit is None else min(limit, len(ds))
    return [int(ds[i]) for i in range(n)]


def trainable(case: Case, s: Sample) -> bool:
    """Whether a sample reaches the rows: it has a target (two tokens or more) and, with a store, an entry."""
    return len(s.tokens) > 1 and s.sid not in case.skipped


def ref_packed(case: Case, order, local: int) -> list:
    """Packed batches by plain first-fit: each sample goes to the first of `bins` rows with room; when none has
    room, all the rows are emitted (in order) and a new round starts with it. The rows go out `local` a batch;
    the stream's last rows that fill no batch are dropped."""
    bins = case.packing_bins or local
    rows, current = [], []  # current: per bin, the examples in it

    def emit():
        for examples in current:
            row = _empty_rows(case, 1, 0)
            at = 0
            for seg, ex in enumerate(examples, 1):
                m = len(ex["tokens"])
                for name, values in ex.items():
                    if name in row:
                        row[name][0, at : at + m] = np.asarray(values, _DTYPES[name]).reshape(
                            (m,) + row[name].shape[2:]
                        )
                row["positions"][0, at : at + m] = np.arange(m)
                row["segment_ids"][0, at : at + m] = seg
                at += m
            rows.append(row)
        current.clear()

    for i in order:
        s = case.samples[i]
        if not trainable(case, s):
            continue
        ex = ref_example(s, case.teacher_k, case.store)
        m = len(ex["tokens"])
        for b in range(bins):
            if b == len(current):
                current.append([])
            if sum(len(e["tokens"]) for e in current[b]) + m <= case.seq_len:
                current[b].append(ex)
                break
        else:
            emit()
            current.append([ex])
    emit()
    batches = []
    for start in range(0, len(rows) - local + 1, local):
        batches.append({k: np.concatenate([r[k] for r in rows[start : start + local]]) for k in rows[0]})
    return batches


def ref_rows(case: Case, order, batch_size: int) -> list:
    """`iter_samples`' batches: one sample a row from input 0, the last batch filled with padding rows (tokens
    and targets padded with the tokenizer's pad id, else its eos id, else 0), `lengths` its inputs and
    `prompt_lengths` the input index + 1 of its first scored target."""
    pad = case.pad_id if case.pad_id is not None else case.eos_id
    pad = 0 if pad is None else pad
    examples = [case.samples[i] for i in order if trainable(case, case.samples[i])]
    batches = []
    for start in range(0, len(examples), batch_size):
        batch = _empty_rows(case, batch_size, pad)
        batch["lengths"] = np.zeros(batch_size, np.int32)
        batch["prompt_lengths"] = np.zeros(batch_size, np.int32)
        for row, s in enumerate(examples[start : start + batch_size]):
            ex = ref_example(s, case.teacher_k, case.store)
            m = len(ex["tokens"])
            for name, values in ex.items():
                if name in batch:
                    batch[name][row, :m] = np.asarray(values, _DTYPES[name]).reshape(batch[name][row, :m].shape)
            batch["positions"][row, :m] = np.arange(m)
            batch["segment_ids"][row, :m] = 1
            batch["lengths"][row] = m
            batch["prompt_lengths"][row] = max(s.prompt_len, 1)
        batches.append(batch)
    return batches


# ------------------------------------------------------------------------------------------------- comparing


def assert_batch(got: dict, want: dict, where: str = ""):
    """Every field, its dtype and shape exactly; stored log-probs within their encoding's rounding (`kd_tol`)."""
    expect = {k for k in want if k != "kd_tol"}
    assert set(got) == expect, f"{where}: fields {sorted(set(got) ^ expect)} differ"
    for name in sorted(expect):
        g, w = np.asarray(got[name]), want[name]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{where} {name}: {g.dtype}{g.shape} != {w.dtype}{w.shape}"
        if name == "kd_logprobs" and "kd_tol" in want:
            assert np.array_equal(np.isneginf(g), np.isneginf(w)), f"{where} {name}: -inf differs"
            fin = np.isfinite(w)
            err = np.abs(g[fin].astype(np.float64) - w[fin])
            assert np.all(err <= want["kd_tol"][fin]), f"{where} {name}: off by {err.max()}"
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"{where} {name}")


def assert_same_batches(got: list, want: list, where: str = ""):
    assert len(got) == len(want), f"{where}: {len(got)} batches, want {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_batch(g, w, f"{where} batch {i}")


def packed_reader(case: Case, *, workers: int = 0, **kw):
    """The packed reader over `case` (`workers` grain worker processes)."""
    prep, dcfg = case.root / "prep", case.dcfg(num_workers=workers)
    return make_iterator(prep, SPLIT, dcfg, store=case.store_dir, seq_len=case.seq_len, **kw)


def row_reader(case: Case, batch_size: int, **kw):
    """`iter_samples` over `case`: one sample per row, `batch_size` rows."""
    return iter_samples(
        case.root / "prep",
        SPLIT,
        case.dcfg(),
        batch_size=batch_size,
        store=case.store_dir,
        seq_len=case.seq_len,
        shuffle=case.shuffle,
        seed=case.seed,
        num_epochs=case.num_epochs,
        **kw,
    )


def check_case(case: Case, *, workers: int = 0) -> dict:
    """Both readers against the reference on one case; returns what was checked (for the fuzz log)."""
    if case.num_epochs == 0:
        raise ValueError("check_case reads to the end: give a finite num_epochs")
    local = case.batch_size
    want = ref_packed(case, stream(case), local)
    got = list(packed_reader(case, workers=workers))
    assert_same_batches(got, want, "packed")
    rows = int(np.random.default_rng(len(case.samples)).integers(1, 5))
    want_rows = ref_rows(case, stream(case), rows)
    got_rows = list(row_reader(case, rows))
    assert_same_batches(got_rows, want_rows, "iter_samples")
    return {"batches": len(got), "row_batches": len(got_rows)}


def ref_prefix(case: Case, batches: int, local: int, process_index: int = 0, process_count: int = 1) -> list:
    """The first `batches` packed batches of an endless (or long) stream: the reference packs a prefix of the
    stream long enough that its own last, cut-short round lies past them."""
    spare = -(-(case.packing_bins or local) // local) + 1
    limit = 4 * (batches + spare) * local + 8
    while True:
        order = stream(case, process_index, process_count, limit)
        want = ref_packed(case, order, local)
        if len(want) >= batches + spare or len(order) < limit:
            return want[:batches]
        limit *= 2


def take(it, n: int) -> list:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def check_resume(case: Case, rng, *, n: int | None = None, restore_workers: int = 0) -> dict:
    """n batches, the iterator state through JSON, a new iterator (reading with `restore_workers` worker
    processes) from it: the next batches are the same and, for an endless stream, those of the reference."""
    n, m = int(rng.integers(0, 12)) if n is None else n, int(rng.integers(1, 6))
    it = packed_reader(case)
    before = take(it, n)
    state = json.loads(json.dumps(it.get_state()))
    after = take(it, m)
    if case.num_epochs == 0:
        assert_same_batches(before + after, ref_prefix(case, n + m, case.batch_size), "uninterrupted")
    fresh = packed_reader(case, workers=restore_workers)
    fresh.set_state(state)
    assert_same_batches(take(fresh, m), after, f"resumed after {n}")
    read = sum(int(b["segment_ids"].max(1).sum()) for b in before)  # samples in the batches before the state
    return {"n": n, "m": len(after), "epochs_before": read / sum(trainable(case, s) for s in case.samples)}


def check_processes(case: Case, process_count: int) -> dict:
    """Each process's packed batches against the reference on its slice of the stream; with one sample a row,
    the processes' samples are disjoint and, together, every trainable sample once per epoch."""
    local = case.batch_size // process_count
    seen = []
    for pi in range(process_count):
        kw = {"process_index": pi, "process_count": process_count}
        got = list(packed_reader(case, **kw))
        assert_same_batches(got, ref_packed(case, stream(case, pi, process_count), local), f"process {pi}")
        rows = row_reader(case, 2, **kw)
        seen.append([int(s) for b in rows for s in b["sample_ids"][:, 0] if s >= 0])
    every = sorted(s.sid for s in case.samples if trainable(case, s)) * case.num_epochs
    assert sorted(sum(seen, [])) == sorted(every)
    if case.num_epochs == 1:
        assert not set(seen[0]) & set(seen[1]), "two processes read one sample"
    return {"seen": [len(x) for x in seen]}


def check_too_long(case: Case, *, workers: int = 0) -> dict:
    """Rows shorter than a sample's inputs: each reader stops with a DataError (`too_long`) naming the first such
    sample it reaches and the rows' seq_len; nothing is truncated."""
    order = [case.samples[i] for i in stream(case) if trainable(case, case.samples[i])]
    first = next((s for s in order if len(s.tokens) - 1 > case.seq_len), None)
    assert first is not None, "the case has no sample longer than its rows"
    readers = {
        "packed": lambda: packed_reader(case, workers=workers),
        "iter_samples": lambda: row_reader(case, 3),
    }
    for name, reader in readers.items():
        with pytest.raises(DataError) as e:
            for _ in reader():
                pass
        assert e.value.reason == "too_long", name
        want = f"sample id {first.sid} has {len(first.tokens) - 1} input tokens, more than the rows' seq_len {case.seq_len}"
        assert want in str(e.value), (name, str(e.value))
    return {}


def check_epochs(case: Case) -> dict:
    """One bin and one row a batch (so no row is dropped and the packer keeps the stream's order): the sample
    ids, taken in order, are every trainable sample once per epoch, and a shuffle draws a new order per epoch."""
    case = dataclasses.replace(case, batch_size=1, packing_bins=1)
    ids = []
    for batch in packed_reader(case):
        seg, sid = batch["segment_ids"][0], batch["sample_ids"][0]
        ids += [int(sid[np.flatnonzero(seg == s)[0]]) for s in range(1, seg.max() + 1)]
    every = sorted(s.sid for s in case.samples if trainable(case, s))
    assert len(ids) == len(every) * case.num_epochs
    epochs = [ids[e * len(every) : (e + 1) * len(every)] for e in range(case.num_epochs)]
    for e, got in enumerate(epochs):
        assert sorted(got) == every, f"epoch {e} is not every sample once"
    if case.shuffle and len(every) >= 6 and case.num_epochs > 1:
        assert any(got != epochs[0] for got in epochs[1:]), "every epoch in the same order"
    if not case.shuffle:
        assert epochs[0] == [s.sid for s in case.samples if trainable(case, s)], "not in record order"
    return {}


# ------------------------------------------------------------------------------------------------- the tests


def _case(tmp_path, seed: int, **fixed) -> Case:
    return random_case(tmp_path / f"case{seed}", np.random.default_rng(seed), **fixed)


@pytest.mark.parametrize("seed", range(10))
def test_readers_match_the_reference(tmp_path, seed):
    """Random lengths (one token to exactly seq_len inputs), empty prompts and responses, teacher rows on some
    samples, a store in a random encoding (some entries missing, read with data.on_error=skip), random seq_len,
    batch_size, packing bins, epochs and shuffle: both readers give the reference's batches."""
    check_case(_case(tmp_path, seed))


@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16", "float16", "uint8"])
def test_store_rows_score_their_targets_in_every_encoding(tmp_path, value_dtype):
    """Store rows with fewer than k candidates (-inf and id 0 past them), beside teacher rows, in each encoding."""
    case = _case(tmp_path, 100, with_store=True, teacher_k=3, value_dtype=value_dtype, n_samples=30)
    assert any(np.isneginf(s.entry[1]).any() and np.isfinite(s.entry[1]).any() for s in case.samples)
    check_case(case)


def test_one_token_samples_take_no_row_and_need_no_store_entry(tmp_path):
    """A sample of one token (an empty prompt, a one-token response, data.add_eos=False) has no target: it used
    a packed segment id of no tokens, an `iter_samples` row that read as padding, and, since `posterior` (which
    reads those rows) writes it no entry, the store then 'missed' it and the distill pipeline refused the store."""
    rng = np.random.default_rng(5)
    lengths, prompts = [3, 1, 4, 1, 2], [1, 0, 2, 1, 0]
    samples = [
        Sample(10 + i, rng.integers(0, 50, n).astype(np.int32), p) for i, (n, p) in enumerate(zip(lengths, prompts))
    ]
    store = {
        "dir": tmp_path / "store",
        "k": 2,
        "index_dtype": "uint16",
        "value_dtype": "float32",
        "tail_dtype": "float32",
    }
    for s in samples:
        s.entry = (*random_rows(rng, len(s.tokens) - max(s.prompt_len, 1) if len(s.tokens) > 1 else 0, 2, 50), 0.5)
    write_prepared(tmp_path / "prep", samples, vocab=50, prepared_len=9, teacher_k=0, pad_id=0, eos_id=1)
    write_store(store, samples, 50, skipped={11, 13})  # as `posterior` writes them: the one-token samples left out
    case = Case(tmp_path, samples, 9, 9, batch_size=1, packing_bins=0, teacher_k=0, pad_id=0, eos_id=1, store=store)
    (row,) = list(packed_reader(case))
    np.testing.assert_array_equal(row["segment_ids"][0], [1, 1, 2, 2, 2, 3, 0, 0, 0])
    check_case(case)  # both readers; iter_samples' rows: the three samples with a target, then padding
    store["dir"] = tmp_path / "store_short"  # a sample with a target missing too: refused, and named
    write_store(store, samples, 50, skipped={11, 12, 13})
    with pytest.raises(DataError, match="store misses .* of 5 samples .*e.g. sample id 12") as e:
        next(packed_reader(case))
    assert e.value.reason == "store_missing"


@pytest.mark.parametrize("seed", range(3))
def test_resume_from_a_saved_state(tmp_path, seed):
    rng = np.random.default_rng(200 + seed)
    case = _case(tmp_path, 200 + seed, num_epochs=[0, 2, 0][seed], n_samples=int(rng.integers(3, 12)))
    assert check_resume(case, rng, n=int(rng.integers(3, 9)))["epochs_before"] > 1


def test_resume_with_a_worker_process(tmp_path):
    """A state taken past the first epoch restores the same batches under data.num_workers=1 (a grain worker
    process; the state is an index into the sample stream, whatever reads it). One worker start costs ~10 s."""
    case = _case(tmp_path, 300, num_epochs=0, n_samples=10, with_store=True)
    assert check_resume(case, np.random.default_rng(300), n=9, restore_workers=1)["epochs_before"] > 1


@pytest.mark.parametrize("seed,processes", [(400, 2), (401, 3), (402, 2)])
def test_processes_split_the_samples(tmp_path, seed, processes):
    check_processes(_case(tmp_path, seed, batch_multiple=processes), processes)


@pytest.mark.parametrize("seed", range(4))
def test_epochs_cover_every_sample_once(tmp_path, seed):
    check_epochs(_case(tmp_path, 500 + seed, num_epochs=3, shuffle=seed % 2 == 0, n_samples=12))


@pytest.mark.parametrize("seed", range(3))
def test_rows_shorter_than_a_sample_stop_with_too_long(tmp_path, seed):
    case = _case(tmp_path, 600 + seed, prepared_len=20, min_tokens=3, num_epochs=1, n_samples=8)
    case.seq_len = 12 - 4 * seed
    check_too_long(case)


def test_prepared_by_prepare_agrees(setup):  # noqa: F811
    """The records and store that `prepare` and `StoreWriter` wrote for test_data_pipeline.py: the reference
    reads them as its samples and agrees with both readers."""
    pd = setup["pd"]
    samples = []
    for sid, r in setup["recs"].items():
        teacher = (r["teacher_topk_ids"], r["teacher_topk_logprobs"]) if "teacher_topk_ids" in r else None
        samples.append(Sample(sid, r["tokens"], int(r["prompt_len"]), teacher, setup["store"][sid]))
    tok = pd.manifest["tokenizer"]
    store = {"dir": setup["root"] / "store", "k": 8, "value_dtype": "float32", "tail_dtype": "float32"}
    case = Case(setup["root"], samples, 48, 48, 4, 0, pd.manifest["teacher_topk"], tok["pad_id"], tok["eos_id"], store)
    case.shuffle, case.seed = True, 7
    check_case(case)
