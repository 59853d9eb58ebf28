"""The eval stage on a realistic vocabulary: its rows by length, each batch cut to the longest, and the logits a tile
at a time, against file order at full length with the whole batch's logits.

Uses the corpus, 32,000-token tokenizer and d64 proxy of `benchmarks/posterior_stage.py` (built once in `--dir`),
runs `proxykd prepare` on `configs/demo.py` with `data.seq_len=--seq-len` and a quarter of the prompts held out
(`data.split`), then `proxykd eval` of the proxy (its only model, `proxy.init_from`) on every sample of the held-out
split, each variant in a fresh process:

  - as the stage is;
  - rows in file order at full length (`pipeline.by_length` and `pipeline.cut` replaced by the identity), logits
    still in tiles;
  - that, with the whole batch's logits at once (`metrics.TILE_TOKENS = 0`): the stage before 2026-12-08.

Prints each run's wall seconds, peak resident memory, the ratios and each run's held-out NLL (the order and tiles
change no result). Then distill's validation (`train.eval_every`) on the same split: `proxykd distill` of the demo's
d32 student (alpha 0: no posterior needed) for 2 steps with one validation pass, by length and in file order, and
without validation; a pass's seconds are a run's less the run without one.

  .venv/bin/python benchmarks/eval_stage.py [--dir /tmp/posterior_stage] [--prompts 1000] [--seq-len 1024] [--batch-size 16]
"""

from __future__ import annotations

import json
import shutil

from _common import print_table
from posterior_stage import CLI, FILE_ORDER, measured, setup, stage

WHOLE = "from proxykd_jax.eval import metrics; metrics.TILE_TOKENS = 0; "
VARIANTS = {
    "by length, cut, tiles": None,
    "file order, full length, tiles": FILE_ORDER + CLI,
    "file order, full length, whole logits": FILE_ORDER + WHOLE + CLI,
}


def main():
    batch = ("--batch-size", dict(type=int, default=16, help="eval.batch_size"))
    args, folder, run, flags = setup(__doc__.splitlines()[0], "eval", batch)
    flags += [
        f"--config.proxy.init_from={folder / 'proxy'}", "--config.eval.max_samples=0",
        f"--config.eval.batch_size={args.batch_size}", "--config.eval.known_teacher=",
        "--config.data.split.warmup=0.1", "--config.data.split.align=0.3", "--config.data.split.distill=0.35",
        "--config.data.split.heldout=0.25",
    ]  # fmt: skip
    stage("prepare", flags)  # (a finished one is reused)
    from proxykd_jax.data.records import PreparedData

    samples = PreparedData(run / "prepared").num_samples("heldout")
    seconds, peak, nll = {}, {}, {}
    for label, code in VARIANTS.items():
        shutil.rmtree(run / "eval", ignore_errors=True)
        seconds[label], peak[label] = measured("eval", flags, code)
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        nll[label] = metrics["models"]["proxy (before align)"]["heldout_nll"]
    print(f"{samples} held-out samples, data.seq_len {args.seq_len}, eval.batch_size {args.batch_size}, "
          "32,000-token vocabulary, d64 proxy")  # fmt: skip
    rows = [[label, s, samples / s, peak[label], f"{nll[label]:.6f}"] for label, s in seconds.items()]
    print_table(rows, ["eval rows", "wall s", "samples/s", "peak RSS GB", "held-out NLL"])
    first = next(iter(seconds.values()))
    print("; ".join(f"{label} / the stage: {s / first:.2f}x" for label, s in list(seconds.items())[1:]))

    student = [
        "--config.distill.loss.alpha=0", "--config.train.steps=2", f"--config.train.seq_len={args.seq_len}",
        "--config.model.vocab_size=32000", "--config.model.max_seq_len=2048", "--config.train.checkpoint_every=0",
        "--config.optim.warmup_steps=0", f"--config.train.batch_size={args.batch_size}",
    ]  # fmt: skip
    runs = {
        "no validation": ("0", None),
        "by length, cut": ("2", None),
        "file order, full length": ("2", FILE_ORDER + CLI),
    }
    seconds, loss = {}, {}
    for label, (every, code) in runs.items():
        shutil.rmtree(run / "student_sft", ignore_errors=True)
        seconds[label] = measured("distill", flags + student + [f"--config.train.eval_every={every}"], code)[0]
        rows = [json.loads(line) for line in (run / "student_sft" / "metrics.jsonl").read_text().splitlines()]
        loss[label] = next((r["eval_loss"] for r in rows if "eval_loss" in r), None)
    base = seconds.pop("no validation")
    loss.pop("no validation")
    print(f"distill: the d32 student, 2 steps of {args.batch_size} x {args.seq_len}; {base:.1f} s without validation")
    rows = [[label, s, s - base, f"{loss[label]:.8f}"] for label, s in seconds.items()]
    print_table(rows, ["validation rows", "wall s", "validation pass s", "eval_loss"])
    (_, a), (_, b) = ((k, s - base) for k, s in seconds.items())
    print(f"validation pass, file order / by length: {b / a:.2f}x")


if __name__ == "__main__":
    main()
