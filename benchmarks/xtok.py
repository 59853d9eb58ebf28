"""A teacher with its own tokenizer: a character-level known teacher, a byte-level BPE student.

Per seed: the character teacher (`eval/per_byte.py`), its corpus with the top-20 log-probs of every
character, our BPE tokenizer trained on its text and a randomly initialised proxy over it. Three
runs share corpus, proxy init and split and differ only in the teacher head:

  bytes   data.teacher_head=bytes (the first-byte rule)
  span    data.teacher_head=exact (the span rule: a teacher token kept where it equals one of ours)
  nohead  data.teacher_head=bytes, posterior.use_teacher_topk=False

With --fixed_eb a fourth run, `bytes_fixed`, keeps the bytes head but takes kappa and N_max from the
`nohead` run's (head-free) empirical-Bayes fit instead of fitting them after the head.

Each runs prepare -> prior -> posterior -> distill (Proxy-KD); the proxy is aligned (SFT warm-up) once,
in the `bytes` run, and shared; the `nohead` run also trains the alpha = 0 SFT student. Measured:
coverage of our response positions (span vs byte rule), the posterior's nats per byte on the held-out
split (dense float64, prior tables queried `external`), each student's nats per byte on held-out
teacher text and the teacher's nats per byte of each student's generations.

  python benchmarks/xtok.py --seeds 0,1,2 --out /tmp/xtok [--fixed_eb]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import runpy
import statistics
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = ("bytes", "span", "nohead")


def base_config(run_dir: pathlib.Path, args):
    cfg = runpy.run_path(str(REPO / "configs" / "demo.py"))["get_config"]()
    with cfg.unlocked():
        cfg.run.dir = str(run_dir)
        for group in (cfg.proxy, cfg.model):
            group.vocab_size = args.vocab
            group.max_seq_len = 128
        cfg.proxy.d_model, cfg.proxy.head_dim, cfg.proxy.d_ff, cfg.proxy.num_layers = 64, 16, 128, 2
        cfg.model.d_model, cfg.model.head_dim, cfg.model.d_ff, cfg.model.num_layers = 32, 8, 64, 1
        cfg.data.seq_len = cfg.train.seq_len = 96
        cfg.data.split.warmup, cfg.data.split.align, cfg.data.split.distill, cfg.data.split.heldout = 0.3, 0.1, 0.5, 0.1
        cfg.data.store.k = 16
        cfg.train.batch_size = 16
        cfg.train.steps, cfg.train.checkpoint_every, cfg.train.log_every = args.steps, args.steps, 50
        cfg.train.tensorboard, cfg.train.progress = False, False
        cfg.optim.warmup_steps = min(20, args.steps // 4)
        cfg.align.rounds, cfg.align.sft_steps, cfg.align.checkpoint_every = 0, args.sft_steps, args.sft_steps
        cfg.posterior.batch_size = 16
        cfg.collect.progress = False
    return cfg


def run(name, cfg, **kw):
    from proxykd_jax import context, stages

    with context.create(cfg, name) as ctx:
        return stages.run_stage(name, ctx, **kw)


def one_seed(seed: int, out: pathlib.Path, args) -> dict:
    from proxykd_jax.bayes.tables import load_prior
    from proxykd_jax.context import RunPaths
    from proxykd_jax.data.records import PreparedData
    from proxykd_jax.eval import per_byte
    from proxykd_jax.eval.metrics import Scorer, eval_batches
    from proxykd_jax.models import hf
    from proxykd_jax.models.tokenizer import load_tokenizer
    from proxykd_jax.parallel import make_mesh, normalize_rules

    root = out / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    cfg0 = base_config(root / "bytes", args)
    teacher = per_byte.char_teacher(
        1000 + seed,
        root / "teacher",
        vocab_size=args.teacher_vocab,
        d_model=64,
        num_layers=2,
        proxy_cfg=cfg0.proxy,
        target_entropy=args.teacher_entropy,
        eos_rate=0.03,
    )
    tok = per_byte.bpe_from_teacher(teacher, root / "bpe", args.vocab, texts=256, seed=seed)
    per_byte.random_proxy(tok, cfg0.proxy, root / "proxy_init", seed=seed + 1)
    corpus = root / "corpus.jsonl"
    if not corpus.exists():
        prompts = teacher.make_prompts(args.prompts, np.random.default_rng(seed), min_words=3, max_words=8)
        per_byte.write_corpus(
            teacher, prompts, corpus, samples=args.samples, max_new_tokens=args.max_new_tokens, top=20, seed=seed
        )
    variants = VARIANTS + (("bytes_fixed",) if args.fixed_eb else ())
    cfgs = {}
    for v in variants:
        cfg = base_config(root / v, args)
        with cfg.unlocked():
            cfg.data.corpus = str(corpus)
            cfg.data.tokenizer = cfg.proxy.init_from = str(root / "proxy_init")
            cfg.data.teacher_head = "exact" if v == "span" else "bytes"
            cfg.posterior.fit_empirical_bayes = v != "bytes_fixed"
            cfg.posterior.use_teacher_topk = v != "nohead"
            if v != "bytes":
                cfg.posterior.proxy = str(root / "bytes" / "proxy" / "final")
        cfgs[v] = cfg
    res = {"seed": seed, "coverage": {}, "posterior_nats_per_byte": {}, "student_nats_per_byte": {}, "gen": {}}
    t0 = time.time()
    for v in variants:
        cfg = cfgs[v]
        if v == "bytes_fixed":
            fitted = res["estimate"]["nohead"]
            with cfg.unlocked():
                cfg.prior.kappa, cfg.posterior.n_max = fitted["kappa"], fitted["n_max"]
        manifest = run("prepare", cfg)
        res["coverage"][v] = manifest["teacher_logprobs"]["student_position_fraction"]
        run("prior", cfg)
        if v == "bytes":
            run("align", cfg)
        est = run("posterior", cfg)
        run("distill", cfg)
        if v == "nohead":
            sft = cfg.copy_and_resolve_references()
            sft.distill.loss.alpha = 0.0
            run("distill", sft)
        res.setdefault("estimate", {})[v] = {"kappa": est["kappa"], "n_max": est["n_max"]}
    res["pipeline_seconds"] = time.time() - t0
    # Scores (one mesh over every device, as the eval stage does).
    mesh, rules = make_mesh(cfg0.mesh, None), normalize_rules(cfg0.mesh.rules)
    scorer = Scorer(mesh, rules)
    proxy = hf.load_hf(str(root / "bytes" / "proxy" / "final"))[1]
    for v in variants:
        paths = RunPaths.from_config(cfgs[v])
        prepared = PreparedData(paths.prepared)
        est = json.loads((paths.posterior / "estimate.json").read_text())
        res["posterior_nats_per_byte"][v] = per_byte.posterior_heldout_nats_per_byte(
            prepared,
            load_prior(paths.prior),
            est | {"n_max": est.get("n_max", cfgs[v].posterior.n_max)},
            proxy,
            cfgs[v].data,
            use_head=v != "nohead",
        )
    paths = RunPaths.from_config(cfgs["nohead"])
    prepared = PreparedData(paths.prepared)
    batches = eval_batches(prepared, "heldout", cfgs["nohead"].data, batch_size=16)
    models = {
        f"kd_{v}": hf.load_hf(str(RunPaths.from_config(cfgs[v]).student("student") / "final"))[1] for v in variants
    }
    models["sft"] = hf.load_hf(str(paths.student("student_sft") / "final"))[1]
    models["proxy"] = proxy
    res["student_nats_per_byte"] = per_byte.heldout_nats_per_byte(models, batches, tok, scorer)
    rows = [json.loads(x) for x in corpus.open()]
    held = {int(r["sample_id"]) for r in prepared.iter_split("heldout")}
    from proxykd_jax.data.corpus import stable_int63

    held_rows = [r for r in rows if stable_int63(f"{r['id']}\x00{r['sample_index']}") in held]
    res["teacher_nats_per_byte"] = per_byte.teacher_nats_per_byte(
        teacher, [r["prompt"] for r in held_rows], [r["response"] for r in held_rows]
    )
    prompts = list(dict.fromkeys(r["prompt"] for r in held_rows))[: args.gen_prompts]
    students = {k: m for k, m in models.items() if k != "proxy"}
    res["gen"] = per_byte.generation_nats_per_byte(
        students, prompts, teacher, load_tokenizer(root / "proxy_init"), max_new_tokens=32, seed=seed
    )
    return res


def store_stats(out: pathlib.Path, seeds, variants, samples: int = 300) -> None:
    """Prints, per finished run, what the stored posterior puts where on the distillation split (first
    `samples` samples): mean tail mass, how often the sampled token is among the top-k, the mean top-1
    probability and the mean probability of the sampled token itself."""
    from proxykd_jax.data.records import PreparedData
    from proxykd_jax.data.store import StoreReader

    for seed in seeds:
        for v in variants:
            root = out / f"seed{seed}" / v
            if not (root / "posterior").exists():
                continue
            pd = PreparedData(root / "prepared")
            st = StoreReader(root / "posterior", tokenizer_hash=pd.tokenizer_hash)
            tail, hit, top1, q_y = [], [], [], []
            for i, rec in enumerate(pd.iter_split("distill")):
                if i >= samples:
                    break
                e = st.get(int(rec["sample_id"]))
                y = rec["tokens"][int(rec["prompt_len"]) :]
                pr = np.exp(e.logprobs_TxK.astype(np.float64))
                tail.append(e.tail_T)
                hit.append((e.ids_TxK == y[:, None]).any(1))
                top1.append(pr.max(1))
                q_y.append(np.where(e.ids_TxK == y[:, None], pr, 0.0).sum(1))
            m = [float(np.concatenate(x).mean()) for x in (tail, hit, top1, q_y)]
            print(
                f"seed {seed} {v}: tail {m[0]:.3f}, sampled token in top-k {m[1]:.3f}, top-1 {m[2]:.3f}, q(sampled) {m[3]:.3f}"
            )


def alpha_sweep(out: pathlib.Path, seeds, alpha: float, args) -> list[dict]:
    """Trains the Proxy-KD students of the finished `bytes` and `nohead` runs again with
    distill.loss.alpha = `alpha` (output `student_a<alpha>`) and scores them like `one_seed`."""
    from proxykd_jax.context import RunPaths
    from proxykd_jax.data.records import PreparedData
    from proxykd_jax.eval import per_byte
    from proxykd_jax.eval.metrics import Scorer, eval_batches
    from proxykd_jax.models import hf
    from proxykd_jax.parallel import make_mesh, normalize_rules

    results = []
    for seed in seeds:
        root = out / f"seed{seed}"
        models = {}
        for v in ("bytes", "nohead"):
            cfg = base_config(root / v, args)
            with cfg.unlocked():
                cfg.data.corpus = str(root / "corpus.jsonl")
                cfg.data.tokenizer = cfg.proxy.init_from = str(root / "proxy_init")
                cfg.data.teacher_head = "bytes"
                cfg.posterior.use_teacher_topk = v != "nohead"
                if v != "bytes":
                    cfg.posterior.proxy = str(root / "bytes" / "proxy" / "final")
                cfg.distill.loss.alpha = alpha
                cfg.distill.output = f"student_a{alpha:g}"
            run("distill", cfg)
            models[f"kd_{v}_a{alpha:g}"] = hf.load_hf(
                str(RunPaths.from_config(cfg).student(cfg.distill.output) / "final")
            )[1]
        cfg0 = base_config(root / "nohead", args)
        prepared = PreparedData(RunPaths.from_config(cfg0).prepared)
        scorer = Scorer(make_mesh(cfg0.mesh, None), normalize_rules(cfg0.mesh.rules))
        tok = hf_tokenizer(root)
        batches = eval_batches(prepared, "heldout", cfg0.data, batch_size=16)
        r = {"seed": seed, "alpha": alpha}
        r["student_nats_per_byte"] = per_byte.heldout_nats_per_byte(models, batches, tok, scorer)
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


def hf_tokenizer(root: pathlib.Path):
    from proxykd_jax.models.tokenizer import load_tokenizer

    return load_tokenizer(root / "proxy_init")


def summarise(results: list[dict]) -> str:
    def ms(xs):
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"

    lines = [f"seeds: {[r['seed'] for r in results]}"]
    lines.append(
        f"coverage of our positions: span rule {ms([r['coverage']['span'] for r in results])}, byte rule "
        f"{ms([r['coverage']['bytes'] for r in results])}"
    )
    for key, title in (
        ("posterior_nats_per_byte", "posterior held-out nats/byte"),
        ("student_nats_per_byte", "held-out nats/byte"),
        ("gen", "teacher nats/byte of generations"),
    ):
        names = results[0][key].keys()
        lines.append(title + ": " + ", ".join(f"{n} {ms([r[key][n] for r in results])}" for n in names))
    lines.append(f"teacher's own held-out nats/byte: {ms([r['teacher_nats_per_byte'] for r in results])}")
    lines.append(
        "empirical Bayes (kappa, N_max): "
        + "; ".join(
            f"seed {r['seed']}: "
            + ", ".join(f"{v} ({e['kappa']:.3g}, {e['n_max']:.3g})" for v, e in r["estimate"].items())
            for r in results
        )
    )
    return "\n".join(lines)


def main():
    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="/tmp/xtok_bench")
    ap.add_argument("--vocab", type=int, default=320)
    ap.add_argument("--teacher_vocab", type=int, default=36)
    ap.add_argument("--teacher_entropy", type=float, default=1.5)
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=40)
    ap.add_argument("--sft_steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--gen_prompts", type=int, default=32)
    ap.add_argument("--fixed_eb", action="store_true", help="add the bytes_fixed run (head-free EB fit)")
    ap.add_argument("--results", default="results.json", help="file name of the results in --out")
    ap.add_argument("--alpha_sweep", type=float, default=0.0, help="retrain bytes/nohead students at this alpha")
    ap.add_argument("--store_stats", action="store_true", help="only print the stores' statistics of finished runs")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    if args.alpha_sweep:
        res = alpha_sweep(out, [int(x) for x in args.seeds.split(",")], args.alpha_sweep, args)
        (out / args.results).write_text(json.dumps(res, indent=1))
        return
    if args.store_stats:
        store_stats(out, [int(x) for x in args.seeds.split(",")], VARIANTS + ("bytes_fixed",))
        return
    results = []
    for s in [int(x) for x in args.seeds.split(",")]:
        r = one_seed(s, out, args)
        print(json.dumps(r), flush=True)
        results.append(r)
        (out / args.results).write_text(json.dumps(results, indent=1))
    print(summarise(results))


if __name__ == "__main__":
    main()
