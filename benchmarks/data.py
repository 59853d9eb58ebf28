"""Data benchmark: prepare throughput (plain responses, and responses with the teacher's top-20 log-probs),
pipeline throughput at the distillation batch shape, and the sparse store's bytes/token and
reconstruction KL per encoding at k = 16, 64, 128.

  .venv/bin/python benchmarks/data.py                  # full run (a few minutes on 2 CPU cores)
  .venv/bin/python benchmarks/data.py --quick          # smaller corpus and store samples
  .venv/bin/python benchmarks/data.py --prepare-only   # the prepare table only

Each part prints a table. The store KL is KL(original || stored) over the k+1 buckets (top-k and
tail), the stored distribution renormalised, averaged over tokens; `original` is float32.
"""

import argparse
import json
import pathlib
import random
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from proxykd_jax.data import (  # noqa: E402
    PreparedData,
    StoreReader,
    StoreWriter,
    default_config,
    kl_to_stored,
    make_iterator,
    prepare,
)
from proxykd_jax.models.tokenizer import build_bpe_tokenizer, load_tokenizer  # noqa: E402

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "so no out up into do time could my than first water more other about"
).split()


def _text(rng, n):
    return " ".join(rng.choice(WORDS) + ("," if rng.random() < 0.1 else "") for _ in range(n))


def make_corpus(path: pathlib.Path, n_prompts: int, seed: int = 0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_prompts):
            row = {
                "id": f"p{i}",
                "prompt": _text(rng, rng.randint(8, 30)),
                "responses": [_text(rng, rng.randint(40, 160)) for _ in range(4)],
            }
            f.write(json.dumps(row) + "\n")


def make_logprob_corpus(path: pathlib.Path, tok, n_samples: int, seed: int = 0):
    """One response per line with the teacher's tokens (ours: the same tokenizer) and its top-20
    alternatives at each, with their log-probs and bytes, as an OpenAI-style API gives them."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    vocab = len(tok)
    pieces = [tok.decode([i]) for i in range(vocab)]
    with open(path, "w") as f:
        for i in range(n_samples):
            resp = _text(rng, rng.randint(40, 160))
            ids = tok(resp, add_special_tokens=False)["input_ids"]
            top = []
            for t in ids:
                alts = [t] + list(nrng.choice(vocab, 19, replace=False))
                lps = np.sort(-np.abs(nrng.normal(-5, 2, 20)) - 0.2)[::-1]
                lps[0] = -0.1
                top.append(
                    [
                        {"token": pieces[a], "logprob": float(lp), "bytes": list(pieces[a].encode())}
                        for a, lp in zip(alts, lps)
                    ]
                )
            row = {"id": f"p{i}", "prompt": _text(rng, 10), "response": resp, "tokens": [pieces[t] for t in ids]}
            f.write(json.dumps(dict(row, top_logprobs=top)) + "\n")


def bench_prepare(tmp: pathlib.Path, n_prompts: int, n_logprob_samples: int, tok):
    cfg = default_config()
    cfg.seq_len, cfg.truncate = 256, True
    cfg.split.warmup, cfg.split.align, cfg.split.distill, cfg.split.heldout = 0.0, 0.0, 1.0, 0.0
    print("\n## prepare (byte-level BPE, seq_len 256, one process)")
    print(
        "| corpus | corpus MB | samples | tokens | seconds | samples/s | tokens/s | teacher positions/s | max RSS growth MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    plain, with_logprobs = tmp / "corpus.jsonl", tmp / "corpus-logprobs.jsonl"
    make_corpus(plain, n_prompts)
    make_logprob_corpus(with_logprobs, tok, n_logprob_samples)
    rows = [
        ("4 responses per prompt", plain, "prep", "auto"),
        ("teacher top-20 log-probs", with_logprobs, "prep-lp", "exact"),
    ]
    for name, corpus, out, head in rows:
        cfg.teacher_head = head
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        m = prepare([corpus], tok, tmp / out, cfg, progress=False)
        dt = time.perf_counter() - t0
        tokens = sum(s["tokens"] for s in m["splits"].values())
        positions = m["teacher_logprobs"]["positions_total"]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        per_position = f"{positions / dt:,.0f}" if positions else "-"
        print(
            f"| {name} | {corpus.stat().st_size / 2**20:.1f} | {m['counts']['samples']} | {tokens} | {dt:.1f} | "
            f"{m['counts']['samples'] / dt:,.1f} | {tokens / dt:,.0f} | {per_position} | {(rss - rss0) / 1024:.0f} |"
        )
    cfg.teacher_head = "auto"
    return tmp / "prep", cfg


def bench_pipeline(prep: pathlib.Path, cfg, tok, k: int, n_batches: int, workers: int):
    pd = PreparedData(prep)
    rng = np.random.default_rng(0)
    vocab = len(tok)
    t0 = time.perf_counter()
    with StoreWriter(
        prep.parent / "store", k=k, vocab_size=vocab, tokenizer_hash=pd.tokenizer_hash, value_dtype="bfloat16"
    ) as w:
        for r in pd.iter_split("distill"):
            t = len(r["tokens"]) - r["prompt_len"]
            ids = rng.integers(0, vocab, size=(t, k))
            lps = np.sort(rng.normal(-6, 2, size=(t, k)), 1)[:, ::-1]
            w.add(r["sample_id"], ids, lps, np.full(t, 0.1), 1.0)
    write_s = time.perf_counter() - t0
    print(f"\n## pipeline (distillation batch 8 x 256, store k={k} joined, bf16 values)")
    print(f"(store written in {write_s:.1f} s)")
    print("| workers | batches | seconds | batches/s | tokens/s (B*L) | non-pad tokens/s |")
    print("|---|---|---|---|---|---|")
    for nw in sorted({0, workers}):
        c = cfg.copy_and_resolve_references()
        c.batch_size, c.num_epochs, c.num_workers = 8, 0, nw
        it = make_iterator(pd, "distill", c, store=prep.parent / "store")
        next(it)  # start-up (worker processes, first reads) is not throughput
        t0 = time.perf_counter()
        real = 0
        for _ in range(n_batches):
            b = next(it)
            real += int((b["segment_ids"] > 0).sum())
        dt = time.perf_counter() - t0
        print(
            f"| {nw} | {n_batches} | {dt:.2f} | {n_batches / dt:.1f} | {n_batches * 8 * 256 / dt:,.0f} "
            f"| {real / dt:,.0f} |"
        )


def _posteriors(rng, n_tokens: int, vocab: int, k: int, chunk: int = 256):
    """LM-like next-token distributions: softmax of Gaussian logits at random temperatures."""
    ids, lps, tails = [], [], []
    for start in range(0, n_tokens, chunk):
        m = min(chunk, n_tokens - start)
        logits = rng.standard_normal((m, vocab), np.float32) * rng.uniform(1.5, 4.0, (m, 1)).astype(np.float32)
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
            - logits.max(1, keepdims=True)
        )
        top = np.argpartition(-logp, k, 1)[:, :k]
        lp = np.take_along_axis(logp, top, 1)
        order = np.argsort(-lp, 1)
        top, lp = np.take_along_axis(top, order, 1), np.take_along_axis(lp, order, 1)
        ids.append(top)
        lps.append(lp)
        tails.append(np.clip(1 - np.exp(lp.astype(np.float64)).sum(1), 0, 1))
    return np.concatenate(ids), np.concatenate(lps).astype(np.float32), np.concatenate(tails)


def bench_store(tmp: pathlib.Path, n_tokens: int):
    rng = np.random.default_rng(0)
    print("\n## sparse store: bytes/token and KL(original || stored), 100-token samples")
    print("| vocab | k | ids | values | tail | bytes/token | mean KL (nats) | max KL (nats) |")
    print("|---|---|---|---|---|---|---|---|")
    encodings = [
        ("uint32", "float32", "float32"),
        ("auto", "bfloat16", "float16"),
        ("auto", "float16", "float16"),
        ("auto", "uint8", "float16"),
    ]
    for vocab in (32000, 128256):
        for k in (16, 64, 128):
            ids, lps, tails = _posteriors(rng, n_tokens, vocab, k)
            for idx_dt, val_dt, tail_dt in encodings:
                d = tmp / f"store-{vocab}-{k}-{idx_dt}-{val_dt}"
                with StoreWriter(
                    d,
                    k=k,
                    vocab_size=vocab,
                    tokenizer_hash="bench",
                    index_dtype=idx_dt,
                    value_dtype=val_dt,
                    tail_dtype=tail_dt,
                ) as w:
                    for s in range(0, n_tokens, 100):
                        w.add(s, ids[s : s + 100], lps[s : s + 100], tails[s : s + 100], 1.0)
                reader = StoreReader(d)
                nbytes = sum(p.stat().st_size for p in d.glob("*.bin"))
                got = [reader.get(s) for s in range(0, n_tokens, 100)]
                kl = kl_to_stored(
                    lps, tails, np.concatenate([g.logprobs_TxK for g in got]), np.concatenate([g.tail_T for g in got])
                )
                assert all(np.array_equal(g.ids_TxK, ids[s : s + 100]) for g, s in zip(got, range(0, n_tokens, 100)))
                enc = reader.shards[0][1]["index_dtype"]
                print(
                    f"| {vocab} | {k} | {enc} | {val_dt} | {tail_dt} | {nbytes / n_tokens:.1f} | "
                    f"{kl.mean():.2e} | {kl.max():.2e} |"
                )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--workers", type=int, default=2, help="grain workers for the second pipeline row")
    ap.add_argument("--prepare-only", action="store_true", help="only the prepare table")
    args = ap.parse_args()
    n_prompts, n_logprob_samples, n_batches, n_tokens = (300, 200, 50, 2000) if args.quick else (3000, 1000, 300, 20000)
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        rng = random.Random(1)
        build_bpe_tokenizer([_text(rng, 30) for _ in range(2000)], 1024, tmp / "tok")
        tok = load_tokenizer(tmp / "tok")
        prep, cfg = bench_prepare(tmp, n_prompts, n_logprob_samples, tok)
        if args.prepare_only:
            return
        bench_pipeline(prep, cfg, tok, 64, n_batches, args.workers)
        bench_store(tmp, n_tokens)


if __name__ == "__main__":
    main()
