"""A run's own files damaged at random (bit rot, a truncated copy, a foreign file) are read as what was written or
refused in one sentence naming the file (`InputFileError`), never as other numbers or a library's exception: the
prior's tables, a posterior store shard's manifest (its data file has a checksum, the manifest did not), the
prepared splits' sample ids (checked against the sha256 the prepared manifest records) and tokenizer, and a DPO
round's saved pairs."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
from test_bayes_prior import V, random_corpus

from proxykd_jax.align.pairs import load_pairs, save_pairs
from proxykd_jax.bayes.prior import PriorTables
from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreReader, StoreWriter
from proxykd_jax.errors import InputFileError
from proxykd_jax.models.tokenizer import build_word_tokenizer, load_tokenizer
from proxykd_jax.npfiles import sha256

DRAWS = 40


def _damage(data: bytes, rng) -> bytes:
    """One of: a bit flipped anywhere, cut short anywhere, emptied, another file's bytes."""
    kind = rng.integers(4)
    if kind == 0:
        out = bytearray(data)
        out[rng.integers(len(out))] ^= 1 << int(rng.integers(8))
        return bytes(out)
    if kind == 1:
        return data[: rng.integers(len(data))]
    return b"" if kind == 2 else rng.bytes(int(rng.integers(1, 200)))


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return np.array_equal(np.asarray(a), np.asarray(b))


def _tables(t: PriorTables) -> dict:
    fields = ("exact_top_s", "ngram_top_s", "num_tokens", "exact_min_count", "vocab_size", "order")
    arrays = {f"{i}.{k}": v for i, c in enumerate([t.exact, *t.ngrams]) for k, v in vars(c).items()}
    return {"base_V": t.base_V, **arrays, **{f: getattr(t, f) for f in fields}}


@pytest.mark.parametrize("name", ["tables.npz", "tables.json"])
def test_damaged_prior_tables_load_as_written_or_are_refused_naming_the_file(tmp_path, name):
    keys, seqs = random_corpus(3)
    PriorTables.build(keys, seqs, vocab_size=V, order=3).save(tmp_path / "prior")
    want = _tables(PriorTables.load(tmp_path / "prior"))
    intact = (tmp_path / "prior" / name).read_bytes()
    rng, refused = np.random.default_rng(7), 0
    for _ in range(DRAWS):
        shutil.copytree(tmp_path / "prior", tmp_path / "copy", dirs_exist_ok=True)
        (tmp_path / "copy" / name).write_bytes(_damage(intact, rng))
        try:
            got = PriorTables.load(tmp_path / "copy")
        except InputFileError as e:
            assert str(tmp_path / "copy" / name) in str(e) and "re-run `proxykd prior`" in str(e), e
            refused += 1
            continue
        assert _same(_tables(got), want)  # a flip the reader never reads (JSON spacing, a zip comment)
    assert refused >= DRAWS // 2


def _store(folder: pathlib.Path, value_dtype: str, index_dtype: str, rng) -> dict:
    entries = {}
    with StoreWriter(
        folder, k=4, vocab_size=300, tokenizer_hash="h", value_dtype=value_dtype, index_dtype=index_dtype
    ) as w:
        for sid in rng.choice(1 << 40, 6, replace=False):
            t = int(rng.integers(1, 7))
            ids = rng.integers(0, 300, (t, 4))
            lps = np.log(rng.dirichlet(np.ones(5), t)[:, :4]).astype(np.float32)
            w.add(int(sid), ids, lps, rng.random(t).astype(np.float32), float(rng.random()))
            entries[int(sid)] = None
    reader = StoreReader(folder, tokenizer_hash="h", vocab_size=300)
    return {sid: vars(reader.get(sid)) for sid in entries}


@pytest.mark.parametrize("value_dtype, index_dtype", [("uint8", "bits"), ("bfloat16", "uint16"), ("float32", "uint32")])
def test_a_store_manifest_damaged_anywhere_reads_as_written_or_is_refused(tmp_path, value_dtype, index_dtype):
    rng = np.random.default_rng(abs(hash(value_dtype)) % 1000)
    want = _store(tmp_path / "store", value_dtype, index_dtype, rng)
    (manifest,) = (tmp_path / "store").glob("shard-*.json")
    intact, refused = manifest.read_bytes(), 0
    for _ in range(5 * DRAWS):
        shutil.copytree(tmp_path / "store", tmp_path / "copy", dirs_exist_ok=True)
        damaged = bytearray(intact)  # one bit, anywhere: valid JSON with another number, most often
        damaged[rng.integers(len(damaged))] ^= 1 << int(rng.integers(7))
        (tmp_path / "copy" / manifest.name).write_bytes(bytes(damaged))
        try:
            reader = StoreReader(tmp_path / "copy", tokenizer_hash="h", vocab_size=300)
            got = {sid: vars(reader.get(sid)) for sid in want}
        except InputFileError as e:
            # (a flipped checksum reads as the data file's damage, a flipped tokenizer hash as another tokenizer's
            # store: each names its file and says to make the store again)
            assert str(tmp_path / "copy" / "shard-00000-00000.") in str(e) and "posterior`" in str(e), e
            refused += 1
            continue
        assert _same(got, want), damaged.decode(errors="replace")  # a field the reader does not read
    assert refused >= 4 * DRAWS


def _prepared_ids(root: pathlib.Path, ids: np.ndarray, checksums: bool) -> PreparedData:
    """A prepared folder holding only what `PreparedData.sample_ids` reads: the manifest and one split's ids."""
    (root / "distill").mkdir(parents=True)
    np.save(root / "distill" / "sample_ids.npy", ids)
    manifest = {"format_version": 1, "splits": {"distill": {"samples": len(ids), "files": []}}}
    if checksums:
        manifest["checksums"] = {"distill/sample_ids.npy": sha256(root / "distill" / "sample_ids.npy")}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return PreparedData(root)


def test_damaged_sample_ids_and_pairs_are_refused_naming_the_file(tmp_path):
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 1 << 62, 50)
    prepared = _prepared_ids(tmp_path / "prepared", ids, checksums=True)
    rows = {"chosen": rng.integers(0, 9, (5, 7)), "rejected_len": rng.integers(0, 7, 5)}
    save_pairs(tmp_path / "pairs.npz", rows, dropped=3)
    for path, load in (
        (tmp_path / "prepared" / "distill" / "sample_ids.npy", lambda _: prepared.sample_ids("distill")),
        (tmp_path / "pairs.npz", load_pairs),
    ):
        want, intact, refused = load(path), path.read_bytes(), 0
        copy = path if path.suffix == ".npy" else tmp_path / "copy.npz"
        for _ in range(DRAWS):
            copy.write_bytes(_damage(intact, rng))
            try:
                got = load(copy)
            except InputFileError as e:
                assert str(copy) in str(e) and "delete" in str(e), e
                refused += 1
                continue
            assert _same(got, want)
        assert refused >= DRAWS // 2


def test_a_flip_in_the_sample_ids_data_is_refused_by_the_checksum_and_an_older_folder_reads_unchecked(tmp_path):
    rng = np.random.default_rng(12)
    ids = rng.integers(0, 1 << 62, 30)
    for checksums in (True, False):
        root = tmp_path / str(checksums)
        prepared = _prepared_ids(root, ids, checksums)
        path = root / "distill" / "sample_ids.npy"
        data = bytearray(path.read_bytes())
        at = len(data) - 8 * len(ids) + int(rng.integers(8 * len(ids)))  # inside the ids, past the header
        data[at] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
        if checksums:
            with pytest.raises(
                InputFileError, match="sample_ids.npy: the file is damaged .*sha256.*re-run `proxykd prepare`"
            ):
                prepared.sample_ids("distill")
        else:  # written before the manifest recorded checksums: the flip reads as another id
            got = prepared.sample_ids("distill")
            assert (got != ids).sum() == 1


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_damaged_prepared_tokenizer_is_refused_naming_its_folder(tmp_path, name):
    folder = tmp_path / "prepared" / "tokenizer"
    build_word_tokenizer(["alpha", "beta", "gamma"], folder)
    (tmp_path / "prepared" / "manifest.json").write_text("{}")  # prepare's folder: the remedy is to prepare again
    text = "alpha gamma beta"
    assert load_tokenizer(folder)(text)["input_ids"]
    intact = (folder / name).read_bytes()
    rng, refused = np.random.default_rng(5), 0
    for _ in range(DRAWS // 2):
        shutil.copytree(folder, tmp_path / "copy" / "tokenizer", dirs_exist_ok=True)
        shutil.copy(tmp_path / "prepared" / "manifest.json", tmp_path / "copy")
        (tmp_path / "copy" / "tokenizer" / name).write_bytes(_damage(intact, rng))
        try:  # (no checksum covers a tokenizer's files: a flipped letter of a token can load as another token)
            load_tokenizer(tmp_path / "copy" / "tokenizer")(text)
        except InputFileError as e:
            assert f"{tmp_path / 'copy' / 'tokenizer'}: the tokenizer cannot be loaded" in str(e), e
            assert f"delete {tmp_path / 'copy'} and re-run `proxykd prepare`" in str(e), e
            refused += 1
    assert refused >= DRAWS // 8
