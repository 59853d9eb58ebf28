"""The align stage on a realistic corpus: each SFT and DPO batch, and each batch of the reference and held-out
passes, cut to its longest row (`align.cut_rows`), against every row at full length.

Uses the corpus, 32,000-token tokenizer and d64 proxy of `benchmarks/posterior_stage.py` (built once in `--dir`; its
samples hold 20-250 tokens), runs `proxykd prepare` on `configs/demo.py` with `data.seq_len=--seq-len`, then `proxykd
align` of the proxy (`proxy.init_from`) with `--sft-steps` SFT steps and one DPO round on `--prompts-per-round`
prompts (one pass over its pairs), each variant in a fresh process, `--repeats` times in alternation. The stage's
wall seconds include the compiles (a step compiles once per row length it meets, at most four) and the round's
sampling, which the cut does not change.

Prints each run's wall seconds, split into the SFT phase (from the start to its DONE marker: start-up, the initial
held-out pass, the SFT steps) and the round (its DONE marker's time less SFT's: sampling, the reference pass, the DPO
steps, the held-out pass), and the held-out NLL after each phase (the cut changes no result but by rounding); then
the ratios full length / cut of the whole run, the SFT phase and the round, of each pair of runs.

  .venv/bin/python benchmarks/align_stage.py [--dir /tmp/posterior_stage] [--prompts 1000] [--seq-len 1024]
      [--sft-steps 40] [--prompts-per-round 64] [--repeats 1]
"""

from __future__ import annotations

import json
import shutil
import time

from _common import print_table
from posterior_stage import measured, setup, stage

VARIANTS = {"cut to the longest row": True, "full length": False}


def main():
    args, folder, run, flags = setup(
        __doc__.splitlines()[0],
        "align",
        ("--sft-steps", dict(type=int, default=40, help="align.sft_steps")),
        ("--prompts-per-round", dict(type=int, default=64, help="align.prompts_per_round (one DPO round)")),
        ("--repeats", dict(type=int, default=1, help="runs of each variant, in alternation")),
    )
    vocab = json.loads((folder / "proxy" / "config.json").read_text())["vocab_size"]  # (32,000 but on few prompts)
    flags += [
        f"--config.proxy.init_from={folder / 'proxy'}", f"--config.proxy.vocab_size={vocab}",
        "--config.proxy.max_seq_len=2048",
        f"--config.align.sft_steps={args.sft_steps}",
        "--config.align.rounds=1", f"--config.align.prompts_per_round={args.prompts_per_round}",
        "--config.align.batch_size=8", "--config.align.heldout_samples=64", "--config.align.max_new_tokens=64",
    ]  # fmt: skip
    stage("prepare", flags)  # (a finished one is reused)
    seconds, peak, nll = {k: [] for k in VARIANTS}, {}, {}
    for _ in range(args.repeats):
        for label, cut in VARIANTS.items():
            shutil.rmtree(run / "proxy", ignore_errors=True)
            start = time.time()
            s, peak[label] = measured("align", flags + [f"--config.align.cut_rows={cut}"])
            sft, done = ((run / "proxy" / name / "DONE").stat().st_mtime for name in ("sft", "round_000"))
            seconds[label].append((s, sft - start, done - sft))
            records = [json.loads(line) for line in (run / "proxy" / "metrics.jsonl").read_text().splitlines()]
            nll[label] = {r["phase"]: r["heldout_nll"] for r in records}
    print(f"align: d64 proxy, {vocab:,}-token vocabulary, data.seq_len {args.seq_len}, {args.sft_steps} SFT steps of 8 "
          f"rows, one DPO round on {args.prompts_per_round} prompts (pairs of 8 per step)")  # fmt: skip
    phases = list(next(iter(nll.values())))
    rows = [
        [label, *(" / ".join(f"{r[i]:.1f}" for r in runs) for i in range(3)), peak[label]]
        + [f"{nll[label][p]:.6f}" for p in phases]
        for label, runs in seconds.items()
    ]
    heads = ["align rows", "wall s", "SFT phase s", "round s", "peak RSS GB", *(f"held-out NLL {p}" for p in phases)]
    print_table(rows, heads)
    cut, full = seconds.values()
    for i, part in enumerate(("run", "SFT phase", "round")):
        print(f"full length / cut, {part}: " + " / ".join(f"{f[i] / c[i]:.2f}x" for c, f in zip(cut, full)))


if __name__ == "__main__":
    main()
