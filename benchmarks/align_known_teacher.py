"""Does proxy alignment move the proxy towards the teacher? KL(teacher || proxy) on held-out contexts.

    .venv/bin/python benchmarks/align_known_teacher.py [--out /tmp/align_kt] [--variants base,lr1e-3,...]

The known-teacher setup (docs/METHOD.md) at the demo's size (configs/demo.py): a KnownTeacher
(vocab 512, d_model 64, 2 layers, entropy 1.5 nats), 400 prompts x 4 sampled responses written as
a JSONL corpus, prepared with the teacher's word tokenizer (warm-up / align / distill / held-out
splits), and a proxy with the teacher's architecture whose weights are the teacher's times
(1 + 0.15 N(0, 1)). The align stage runs SFT on the warm-up split, then DPO rounds (teacher
response chosen, proxy sample rejected); the KL is E_t KL(q_t || p_t) over the response positions
of the held-out split, before alignment, after SFT and after each round.

Every variant shares the SFT phase (run once in the base run, copied into the others), then runs
its own DPO rounds. "sft+" is the control: beta = 1e-6 leaves the DPO term's gradient ~beta/2 of
its usual size, so its rounds are plain NLL steps on the alignment split's teacher responses (same
steps, same learning rate): whatever a DPO variant gains beyond it comes from the preference term.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from _common import print_table  # noqa: E402

VARIANTS = {  # name -> align overrides on top of configs/demo.py
    "base": {},
    "sft+": {"beta": 1e-6},
    "lr1e-3": {"dpo_lr": 1e-3},
    "sft+lr1e-3": {"beta": 1e-6, "dpo_lr": 1e-3},
    "nll0": {"nll_weight": 0.0, "dpo_lr": 1e-3},
    "beta0.5": {"beta": 0.5, "dpo_lr": 1e-3},
    "nll0.2": {"nll_weight": 0.2, "dpo_lr": 1e-3},
    "samples2": {"samples_per_prompt": 2, "dpo_lr": 1e-3},
    "rounds4": {"rounds": 4, "dpo_lr": 1e-3},
}


def build_setup(out: pathlib.Path, num_prompts: int, samples: int, proxy_noise: float | None = None):
    """(teacher, config) with <out>/base_run/prepared and <out>/proxy_init written (once); the proxy's
    noise is `proxy_noise`, default the demo's `demo.proxy_noise`."""
    from configs import demo as demo_config
    from proxykd_jax import data
    from proxykd_jax.eval.benchmark import perturbed_proxy
    from proxykd_jax.teacher.known import KnownTeacher

    cfg = demo_config.get_config().unlock()
    d = cfg.demo
    teacher = KnownTeacher.create(
        d.teacher_seed,
        vocab_size=cfg.proxy.vocab_size,
        d_model=d.teacher_d_model,
        num_layers=d.teacher_num_layers,
        num_heads=cfg.proxy.num_heads,
        num_kv_heads=cfg.proxy.num_kv_heads,
        d_ff=cfg.proxy.d_ff,
        max_seq_len=cfg.proxy.max_seq_len,
        target_entropy=d.teacher_entropy,
        folder=out / "teacher_tokenizer",
    )
    prepared = out / "base_run" / "prepared"
    if not prepared.exists():
        prompts = teacher.make_prompts(num_prompts, np.random.default_rng(cfg.run.seed))
        responses = teacher.sample(prompts, samples, d.max_new_tokens, seed=cfg.run.seed)
        corpus = out / "corpus.jsonl"
        kept = [(i, p, [x for x in r if x]) for i, (p, r) in enumerate(zip(prompts, responses))]  # drop empty ones
        corpus.write_text(
            "".join(json.dumps({"id": f"p{i:05d}", "prompt": p, "responses": r}) + "\n" for i, p, r in kept if r)
        )
        data.prepare([corpus], teacher.tokenizer, prepared, cfg.data, progress=False)
        teacher.tokenizer.save_pretrained(str(prepared / "tokenizer"))
    noise = d.proxy_noise if proxy_noise is None else proxy_noise
    perturbed_proxy(teacher, out / "proxy_init", noise, cfg.run.seed + 1)
    cfg.proxy.init_from = str(out / "proxy_init")
    cfg.train.progress = False
    cfg.train.tensorboard = False
    return teacher, cfg


def run_variant(out: pathlib.Path, teacher, cfg, name: str, overrides: dict, seed: int | None = None) -> dict:
    """Runs one variant's alignment (sharing the base run's SFT phase); returns its summaries.
    `seed` (default run.seed) changes the rounds' rejected samples, prompt subsets and data order.

    Calls the library (`align.rounds`) rather than the stage: the variants share a finished SFT
    phase, which the stage's overwrite rule would (rightly) refuse to mix into another artifact."""
    from proxykd_jax import context
    from proxykd_jax.align import rounds
    from proxykd_jax.eval.benchmark import teacher_probs_fn

    run = out / ("base_run" if name == "base" else f"run_{name}")
    if name != "base" and not run.exists():
        run.mkdir()
        shutil.copytree(out / "base_run" / "prepared", run / "prepared")
        shutil.copytree(out / "base_run" / "proxy" / "sft", run / "proxy" / "sft")
    vcfg = cfg.copy_and_resolve_references()
    vcfg.run.dir = str(run)
    vcfg.align.update(overrides)
    if seed is not None:
        vcfg.run.seed = seed
    start = time.perf_counter()
    with context.create(vcfg, "align", lock=False) as ctx:
        _, proxy = ctx.init_model("proxy", ctx.seed)
        sink = ctx.sink(run / "proxy")
        rounds.align_proxy(
            proxy,
            rounds.AlignData.load(run / "prepared"),
            vcfg.align,
            vcfg.optim,
            vcfg.train,
            out_dir=run / "proxy",
            mesh=ctx.mesh,
            rules=ctx.rules,
            seed=ctx.seed,
            seq_len=int(vcfg.align.seq_len or vcfg.data.seq_len),
            sink=sink,
            teacher_probs_fn=teacher_probs_fn(teacher),
        )
        sink.close()
    summaries = [json.loads(line) for line in (run / "proxy" / "metrics.jsonl").read_text().splitlines()]
    return {"records": {r["phase"]: r for r in summaries}, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/align_known_teacher", help="working directory (reused if present)")
    parser.add_argument("--variants", default="base,sft+,lr1e-3", help=f"comma-separated, from {sorted(VARIANTS)}")
    parser.add_argument("--prompts", type=int, default=400, help="prompts sent to the teacher")
    parser.add_argument("--samples", type=int, default=4, help="teacher responses per prompt")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, cfg = build_setup(out, args.prompts, args.samples)
    names = ["base"] + [v for v in args.variants.split(",") if v and v != "base"]
    results = {name: run_variant(out, teacher, cfg, name, VARIANTS[name]) for name in names}
    base = results["base"]["records"]
    rows = []
    for name in names:
        rec = results[name]["records"]
        rounds = sorted(k for k in rec if k.startswith("round_"))
        overrides = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "demo config"
        kls = [rec[r]["kl_to_teacher"] for r in rounds]
        rows.append(
            (
                name,
                overrides,
                base["init"]["kl_to_teacher"],
                base["sft"]["kl_to_teacher"],
                " ".join(f"{k:.4f}" for k in kls),
                f"{kls[-1] - base['sft']['kl_to_teacher']:+.4f}",
                rec[rounds[-1]]["heldout_nll"],
                f"{results[name]['seconds']:.0f}",
            )
        )
    print(f"held-out contexts: KL(teacher || proxy) in nats over {cfg.align.heldout_samples} held-out responses")
    print_table(
        rows,
        [
            "variant",
            "align overrides",
            "KL init",
            "KL after SFT",
            "KL after each DPO round",
            "last - SFT",
            "held-out NLL",
            "s",
        ],
    )


if __name__ == "__main__":
    main()
