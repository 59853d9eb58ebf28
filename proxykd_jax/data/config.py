"""Defaults of the `data` config group (corpus, prepare, store, pipelines)."""

import ml_collections

SPLITS = ("warmup", "align", "distill", "heldout")


def default_config() -> ml_collections.ConfigDict:
    """Returns the `data` group with one comment per field."""
    cd = ml_collections.ConfigDict()
    cd.corpus = ""  # teacher corpus: comma-separated JSONL/parquet files or folders; "" = <run>/corpus/teacher.jsonl
    cd.tokenizer = ""  # local tokenizer folder (normally the proxy's Hugging Face folder)
    cd.seq_len = 256  # tokens per packed row (and the longest sample prepare accepts)
    cd.on_error = "error"  # "error": stop on the first bad row; "skip": skip, count and report it
    cd.truncate = False  # True: cut over-long responses to seq_len (counted) instead of on_error
    cd.add_eos = True  # end each finished response (last target): the chat template's end of turn, else the eos
    cd.teacher_head = "auto"  # teacher top log-probs: "exact" (same tokenizer: span rule), "bytes" (first-byte rule), "auto" (decided from the data)
    cd.teacher_topk = 20  # width of the teacher top-logprob head kept per position (API maximum 20)
    cd.prepare_buffer_mb = 64.0  # approximate peak memory of `prepare` (text is tokenised in batches of this size)
    cd.records_per_file = 50_000  # prepared records per ArrayRecord file before rolling over
    cd.split = ml_collections.ConfigDict()
    cd.split.warmup = 0.10  # fraction of prompts for proxy SFT warm-up
    cd.split.align = 0.45  # fraction of prompts for proxy DPO alignment
    cd.split.distill = 0.40  # fraction of prompts for student distillation
    cd.split.heldout = 0.05  # fraction of prompts held out for evaluation
    cd.split.salt = "proxykd"  # hashed with the prompt id: change it to draw a different split
    cd.batch_size = 8  # global rows per batch (divided across jax processes)
    cd.packing_bins = 0  # first-fit packing bins per round; 0 means batch_size
    cd.shuffle = True  # shuffle samples (per epoch, deterministic in shuffle_seed)
    cd.shuffle_seed = 0  # seed of the sample shuffle
    cd.num_epochs = 1  # passes over the split; 0 repeats forever
    cd.num_workers = 0  # grain worker processes that read and join samples; 0 reads in-process (same batches)
    cd.worker_buffer_size = 2  # batches' worth of samples each worker reads ahead (at least two chunks of 32)
    cd.store = ml_collections.ConfigDict()
    cd.store.k = 64  # top-k entries kept per response token
    cd.store.index_dtype = "auto"  # "auto" (uint16 up to 65,536 ids, else packed bits), "uint16", "uint32", "bits"
    cd.store.value_dtype = "uint8"  # "float32", "bfloat16", "float16", "uint8" (per-row linear; benchmarks/data.py: k=64 202 B/token, KL 3e-6)
    cd.store.tail_dtype = "float16"  # "float32" or "float16" for the tail mass
    cd.store.shard_mb = 256.0  # bytes of token data per store shard before it is finished
    return cd
