"""Teacher corpus readers, tokenisation and splits, the `prepare` stage, the sparse posterior store
and the grain pipelines. Formats: docs/DATA_FORMATS.md.

The pipelines' names (`data/pipeline.py`, grain) load on their first use (`proxykd_jax.deferred`), so config
checks and `proxykd <stage> --help` (the `data` group's defaults, `data/config.py`) import no grain."""

from absl import flags as _flags

# grain 0.2.18 worker processes read absl flags; unparsed flags crash them (UnparsedFlagAccessError).
if not _flags.FLAGS.is_parsed():
    _flags.FLAGS.mark_as_parsed()

from proxykd_jax.data.config import SPLITS, default_config  # noqa: E402
from proxykd_jax.data.corpus import Sample, iter_corpus, stable_int63  # noqa: E402
from proxykd_jax.data.corpus_errors import DataError  # noqa: E402
from proxykd_jax.data.prepare import prepare, tokenizer_hash  # noqa: E402
from proxykd_jax.data.records import PreparedData, decode_record, encode_record  # noqa: E402
from proxykd_jax.data.split import assign_split, split_fractions  # noqa: E402
from proxykd_jax.data.store import StoreEntry, StoreReader, StoreWriter, kl_to_stored  # noqa: E402
from proxykd_jax.deferred import names_of  # noqa: E402

__all__ = [
    "DataError",
    "PreparedData",
    "SPLITS",
    "Sample",
    "StoreEntry",
    "StoreReader",
    "StoreWriter",
    "assign_split",
    "decode_record",
    "default_config",
    "encode_record",
    "iter_corpus",
    "iter_samples",
    "kl_to_stored",
    "make_dataset",
    "make_iterator",
    "open_store",
    "prepare",
    "split_fractions",
    "stable_int63",
    "to_global_batch",
    "tokenizer_hash",
]

__getattr__ = names_of(
    __name__, {"pipeline": ("iter_samples", "make_dataset", "make_iterator", "open_store", "to_global_batch")}
)
