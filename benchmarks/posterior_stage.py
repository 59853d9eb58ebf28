"""The posterior stage on a realistic vocabulary: its rows by length and cut to the longest, against file order.

Builds once, in `--dir`, a corpus of `--prompts` prompts x 4 responses of Zipfian pseudo-words (25-180 words), a
32,000-token byte-level BPE trained on it and a random 2-layer d64 proxy of context 2,048, and runs `proxykd prepare`
and `prior` on `configs/demo.py` with `data.seq_len=--seq-len`. Then `proxykd posterior` runs twice, each in a fresh
process: as the stage is, and with `pipeline.by_length` and `pipeline.cut` replaced by the identity (rows in file
order at full length, as the stage read them before 2026-12-07). Prints each run's wall seconds and samples/s, the
ratio, and how many stored ids the two stores share (the order changes no result).

  .venv/bin/python benchmarks/posterior_stage.py [--dir /tmp/posterior_stage] [--prompts 1000] [--seq-len 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
from _common import print_table

REPO = pathlib.Path(__file__).resolve().parent.parent
FILE_ORDER = (  # put before CLI: the rows in file order at full length
    "from proxykd_jax.data import pipeline; pipeline.by_length = lambda b, w: b; pipeline.cut = lambda b, s: b; "
)
CLI = "import sys; from proxykd_jax import cli; cli.main(sys.argv[1:])"


def build(folder: pathlib.Path, prompts: int) -> None:
    """The corpus, tokenizer and proxy (kept when `folder/proxy` exists)."""
    from flax import nnx

    from proxykd_jax.models import hf
    from proxykd_jax.models.llama import Llama, ModelConfig
    from proxykd_jax.models.tokenizer import build_bpe_tokenizer

    if (folder / "proxy" / "config.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 11))) for _ in range(60_000)]
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    p /= p.sum()

    def text(n: int) -> str:
        return " ".join(words[i] for i in rng.choice(len(words), n, p=p))

    rows = [
        {"id": f"p{i}", "prompt": text(int(rng.integers(5, 16))), "responses": [text(int(rng.integers(25, 180))) for _ in range(4)]}
        for i in range(prompts)
    ]  # fmt: skip
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = build_bpe_tokenizer((r["prompt"] + " " + " ".join(r["responses"]) for r in rows), 32_000, folder / "tok")
    cfg = ModelConfig(
        vocab_size=len(tok), d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128,
        max_seq_len=2048,
    )  # fmt: skip
    hf.save_hf(Llama(cfg, rngs=nnx.Rngs(0)), cfg, folder / "proxy", tokenizer=tok)


def measured(name: str, args: list[str], code: str | None = None) -> tuple[float, float]:
    """(wall seconds, peak resident GB) of `proxykd <name> <args>` in a fresh process (`code`: run instead of the
    CLI's module)."""
    cmd = [sys.executable, "-c", code, name, *args] if code else [sys.executable, "-m", "proxykd_jax", name, *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"`proxykd {name}` failed: {cmd}")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20  # (kB on Linux)


def stage(name: str, args: list[str], code: str | None = None) -> float:
    """Wall seconds of `proxykd <name> <args>` in a fresh process (`measured`)."""
    return measured(name, args, code)[0]


def setup(description: str, name: str, *extra: tuple[str, dict]):
    """(args, corpus folder, run folder `<dir>/<name>_<seq len>`, the flags every stage of the run takes) of a
    benchmark over the corpus `build` makes: the flags `--dir`, `--prompts`, `--seq-len` and `extra` ones."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dir", default="/tmp/posterior_stage", help="where the corpus, proxy and run are kept")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--seq-len", type=int, default=1024, help="data.seq_len (at most 2,048: the proxy's context)")
    for flag, kw in extra:
        ap.add_argument(flag, **kw)
    args = ap.parse_args()
    folder = pathlib.Path(args.dir)
    build(folder, args.prompts)
    run = folder / f"{name}_{args.seq_len}"
    flags = [
        "--config=configs/demo.py", f"--config.run.dir={run}", f"--config.data.corpus={folder / 'corpus.jsonl'}",
        f"--config.data.tokenizer={folder / 'proxy'}", f"--config.data.seq_len={args.seq_len}",
    ]  # fmt: skip
    return args, folder, run, flags


def main():
    args, folder, run, flags = setup(__doc__.splitlines()[0], "run")
    flags.append(f"--config.posterior.proxy={folder / 'proxy'}")
    for name in ("prepare", "prior"):  # (a finished one is reused)
        stage(name, flags)
    from proxykd_jax.data.records import PreparedData
    from proxykd_jax.data.store import StoreReader

    prepared = PreparedData(run / "prepared")
    samples = prepared.num_samples("distill")
    seconds, stores = {}, {}
    for label, code in (("by length, cut", None), ("file order, full length", FILE_ORDER + CLI)):
        shutil.rmtree(run / "posterior", ignore_errors=True)
        seconds[label] = stage("posterior", flags, code)
        kept = folder / f"posterior_{args.seq_len}_{label.split(',')[0].replace(' ', '_')}"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.move(run / "posterior", kept)
        stores[label] = StoreReader(kept, tokenizer_hash=prepared.tokenizer_hash)
    same = total = 0
    for sid in prepared.sample_ids("distill"):
        a, b = (s.get(int(sid)).ids_TxK for s in stores.values())
        same, total = same + int((a == b).sum()), total + a.size
    print(f"{samples} distillation samples, data.seq_len {args.seq_len}, 32,000-token vocabulary, d64 proxy")
    rows = [[label, s, samples / s] for label, s in seconds.items()]
    print_table(rows, ["posterior rows", "wall s", "samples/s"])
    first, second = seconds.values()
    print(f"file order / by length: {second / first:.2f}x; stored ids equal: {same / total:.4%}")


if __name__ == "__main__":
    main()
