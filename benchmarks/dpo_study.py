"""Where does preference optimisation help beyond NLL? A one-factor-at-a-time grid around the demo's DPO.

    .venv/bin/python benchmarks/dpo_study.py [--out /tmp/dpo_study] [--noises 0.15,0.3,0.6] [--seeds 0,1]
        [--variants dpo,ctl,beta0.05,...] [--extra-seed-variants dpo,ctl]

The setup of benchmarks/align_known_teacher.py (the demo's known teacher, 400 prompts x 4 teacher
responses, the proxy = teacher weights x (1 + noise N(0, 1)), SFT 60 steps, then 2 rounds on 256
alignment prompts at dpo_lr 1e-3), repeated at several proxy starting distances (`--noises`; one
shared prepared corpus, one SFT phase per distance). At each distance every variant changes ONE
factor of the base ("dpo": DPO, beta 0.1, 1 rejected sample per prompt, reference = previous round)
and is compared with its NLL-only control: the same rounds with beta = 1e-6 (the preference term's
gradient ~beta/2 of its usual size, i.e. plain NLL steps on the same teacher responses, same steps,
same learning rate; "ctl4" for the 4-samples variant, which has 4x the pairs and steps). Metric:
KL(teacher || proxy) on 64 held-out responses after the last round; the table gives the paired
difference variant - control (negative = the preference term helps), per seed and its mean. The
seed changes the rounds' rejected samples, prompt subsets and data order (SFT is shared).
Results are appended to <out>/results.jsonl as they finish; a rerun reuses finished runs.
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
from align_known_teacher import build_setup, run_variant  # noqa: E402

NLL_BETA = 1e-6
VARIANTS = {  # name -> (align overrides on top of configs/demo.py, its NLL-only control)
    "dpo": ({}, "ctl"),
    "ctl": ({"beta": NLL_BETA}, None),
    "beta0.05": ({"beta": 0.05}, "ctl"),
    "beta0.5": ({"beta": 0.5}, "ctl"),
    "samples4": ({"samples_per_prompt": 4}, "ctl4"),
    "ctl4": ({"beta": NLL_BETA, "samples_per_prompt": 4}, None),
    "ipo": ({"loss_type": "ipo"}, "ctl"),
    "cdpo0.1": ({"label_smoothing": 0.1}, "ctl"),
    "ref_initial": ({"reference": "initial"}, "ctl"),
    # with 2 rounds the reference choice differs in round 1 only: the same comparison over 4 rounds
    "rounds4": ({"rounds": 4}, "ctl_r4"),
    "ctl_r4": ({"rounds": 4, "beta": NLL_BETA}, None),
    "ref_initial_r4": ({"rounds": 4, "reference": "initial"}, "ctl_r4"),
}
DEFAULT_VARIANTS = "dpo,ctl,beta0.05,beta0.5,samples4,ctl4,ipo,cdpo0.1,ref_initial"


def run_name(name: str, seed: int, base_seed: int) -> str:
    """The first variant at the base seed owns the SFT phase (align_known_teacher's "base" run)."""
    return "base" if (name == "dpo" and seed == base_seed) else f"{name}_s{seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/dpo_study", help="working directory (reused if present)")
    parser.add_argument("--noises", default="0.15,0.3,0.6", help="proxy starting distances (demo.proxy_noise)")
    parser.add_argument("--seeds", default="0", help="seeds for every variant")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--extra-seeds", default="1", help="more seeds, for --extra-seed-variants only")
    parser.add_argument("--extra-seed-variants", default="dpo,ctl")
    parser.add_argument("--prompts", type=int, default=400, help="prompts sent to the teacher")
    parser.add_argument("--samples", type=int, default=4, help="teacher responses per prompt")
    parser.add_argument("--report-only", action="store_true", help="print the table of the finished runs")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    noises = [float(x) for x in args.noises.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    extra = [int(x) for x in args.extra_seeds.split(",") if x]
    names = [v for v in args.variants.split(",") if v]
    for v in names:  # every variant runs with its control
        ctl = VARIANTS[v][1]
        if ctl and ctl not in names:
            names.append(ctl)
    extra_names = [v for v in args.extra_seed_variants.split(",") if v]
    results_path = out / "results.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["noise"], r["variant"], r["seed"])] = r
    # the order puts the main comparison first: dpo vs ctl at every distance, then the other factors
    jobs = [(n, v, s) for s in seeds for v in ("dpo", "ctl") if v in names for n in noises]
    jobs += [(n, v, s) for s in extra for v in ("dpo", "ctl") if v in extra_names for n in noises]
    jobs += [(n, v, s) for n in noises for s in seeds for v in names if v not in ("dpo", "ctl")]
    jobs += [(n, v, s) for n in noises for s in extra for v in extra_names if v not in ("dpo", "ctl")]
    base_seed = seeds[0]
    setups = {}
    for noise, name, seed in [] if args.report_only else jobs:
        if (noise, name, seed) in done:
            continue
        nout = out / f"noise{noise}"
        if noise not in setups:
            first = out / f"noise{noises[0]}" / "base_run" / "prepared"
            if noise != noises[0] and first.exists() and not (nout / "base_run" / "prepared").exists():
                shutil.copytree(first, nout / "base_run" / "prepared")  # one corpus for every distance
            setups[noise] = build_setup(nout, args.prompts, args.samples, proxy_noise=noise)
        teacher, cfg = setups[noise]
        rname = run_name(name, seed, base_seed)
        if rname != "base" and not (nout / "base_run" / "proxy" / "sft").exists():
            run_variant(nout, teacher, cfg, "base", VARIANTS["dpo"][0], seed=base_seed)  # the shared SFT
        start = time.perf_counter()
        res = run_variant(nout, teacher, cfg, rname, VARIANTS[name][0], seed=seed)
        rec = res["records"]
        last = sorted(k for k in rec if k.startswith("round_"))[-1]
        row = {
            "noise": noise,
            "variant": name,
            "seed": seed,
            "kl_init": rec["init"]["kl_to_teacher"] if "init" in rec else None,
            "kl_sft": rec["sft"]["kl_to_teacher"] if "sft" in rec else None,
            "kl_rounds": [rec[k]["kl_to_teacher"] for k in sorted(rec) if k.startswith("round_")],
            "kl_last": rec[last]["kl_to_teacher"],
            "heldout_nll": rec[last]["heldout_nll"],
            "seconds": time.perf_counter() - start,
        }
        done[(noise, name, seed)] = row
        with results_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[dpo_study] noise {noise} {name} seed {seed}: KL {row['kl_last']:.4f} ({row['seconds']:.0f} s)")
    print_results(done, noises)


def print_results(done: dict, noises: list[float]) -> None:
    rows = []
    for noise in noises:
        base = [r for (n, v, _), r in done.items() if n == noise and v == "dpo" and r["kl_sft"] is not None]
        kl_init = f"{base[0]['kl_init']:.3f}" if base else "-"
        kl_sft = f"{base[0]['kl_sft']:.3f}" if base else "-"
        for name, (overrides, ctl) in VARIANTS.items():
            pairs = sorted(
                (s, r["kl_last"], done[(noise, ctl, s)]["kl_last"])
                for (n, v, s), r in done.items()
                if n == noise and v == name and ctl and (noise, ctl, s) in done
            )
            if not pairs:
                continue
            diffs = np.array([kl - c for _, kl, c in pairs])
            spread = f" ± {diffs.std(ddof=1):.4f}" if len(diffs) > 1 else ""
            rows.append(
                (
                    noise,
                    kl_init,
                    kl_sft,
                    name,
                    ", ".join(f"{k}={v}" for k, v in overrides.items()) or "beta=0.1, 1 sample, ref previous",
                    " ".join(f"{kl:.4f}" for _, kl, _ in pairs),
                    " ".join(f"{c:.4f}" for _, _, c in pairs),
                    " ".join(f"{d:+.4f}" for d in diffs),
                    f"{diffs.mean():+.4f}{spread}",
                    len(pairs),
                )
            )
    print(
        "KL(teacher || proxy), nats, on 64 held-out responses after the last round (2; 4 for rounds4 and "
        "ref_initial_r4); diff = variant - its NLL-only control, same seed"
    )
    print_table(
        rows,
        [
            "noise",
            "KL init",
            "KL SFT",
            "variant",
            "change from base",
            "KL variant",
            "KL control",
            "diff per seed",
            "mean diff",
            "seeds",
        ],
    )


if __name__ == "__main__":
    main()
