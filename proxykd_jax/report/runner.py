"""Runs the report: settings x seeds x variants, sharing every artifact it can (see the package
docstring). Each (setting, seed) is a run directory `<run>/<setting>/seed<k>/` holding its
corpus, `prepared/` and `prior/`; each alignment and posterior a variant needs is a run directory
beside them (`a_<alignment>/`, `p_<alignment>_<posterior>/`) whose `prepared` and `prior` are
links to the seed's, and students are distilled into the posterior's directory under the
variant's name. Every stage there follows the usual overwrite rule and resumes after `kill -9`. The teacher
corpus is sampled straight from the known teacher (`write_corpus`, the `data.corpus` format). What no stage
records, a setting's teacher, proxy init, prompts and corpora, is kept once written: the settings it was built
with are in `<run>/<setting>/built_with.json`, and a report with others stops before any work. The tables
and plots show this run's plan only (`Runner.results`); results of earlier runs with other settings, seeds
or variants stay under `results/`, named in one line of the report (`Runner.left_out`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

from proxykd_jax.context import RunPaths
from proxykd_jax.context.artifacts import depends_on
from proxykd_jax.context.specs import Spec
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.eval import benchmark
from proxykd_jax.eval import metrics as metrics_lib
from proxykd_jax.report import metrics as report_metrics
from proxykd_jax.report.metrics import NA_METRICS, NA_TOKENIZERS
from proxykd_jax.report.settings import SETTINGS
from proxykd_jax.report.variants import DEFAULT_VARIANTS, VARIANTS, align_overrides, posterior_overrides

log = logging.getLogger(__name__)


def _names(text: str, known: dict, what: str, default=None) -> list[str]:
    names = [n.strip() for n in str(text).split(",") if n.strip()] or list(default or known)
    bad = [n for n in names if n not in known]
    if bad:
        raise ProxyKDError(f"config.report.{what}: unknown {', '.join(bad)}; choose from {', '.join(known)}.")
    return names


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ProxyKDError(f"config.report.seeds={text!r} must be comma-separated integers, e.g. '0,1,2'.") from None
    if not seeds:
        raise ProxyKDError("config.report.seeds is empty; give at least one seed, e.g. '0,1,2'.")
    return seeds


def variants_for(setting: str, variants: list[str]) -> list[str]:
    """The `variants` that apply to `setting` (a teacher-head ablation needs top log-probs in the corpus)."""
    return [n for n in variants if SETTINGS[setting].top_logprobs or not VARIANTS[n].needs_logprobs]


# What a setting's folder is built from outside the stages' own records: its teacher and proxy init
# (`SETTINGS[...].build`) and each seed's prompts and corpus (`SeedRun`), all kept once written.
_BUILT_FROM = Spec(
    path=lambda cfg, paths: paths.root,
    fields=("demo.*", "report.*")
    + tuple(f"proxy.{f}" for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads"))
    + tuple(f"proxy.{f}" for f in ("head_dim", "d_ff", "max_seq_len")),  # the teachers' and proxies' shapes
    # which settings, seeds and variants run, and what only the stages read (they follow their own records)
    ignore=("report.settings", "report.seeds", "report.variants", "report.nll_beta", "report.chartok_sft_steps"),
)
BUILT_WITH = "built_with.json"


def check_built_with(cfg, folder: pathlib.Path) -> None:
    """Refuses a setting's folder built with other `_BUILT_FROM` fields: its teacher, proxy init, prompts and
    corpora would be reused as they are, and the report would show them under the new settings."""
    path = folder / BUILT_WITH
    if not path.exists():
        return
    old, new = json.loads(path.read_text()), depends_on(cfg, _BUILT_FROM)
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    changes = [f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in keys]
    if changes:
        raise ProxyKDError(
            f"{folder} holds a teacher, proxy, prompts and corpora built with other settings ({'; '.join(changes)}), "
            "which the report does not rebuild; run it with a new --config.run.dir, or with the old settings."
        )


def _link(folder: pathlib.Path, names=("prepared", "prior")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(pathlib.Path("..") / name)


def write_corpus(
    teacher, prompts: pathlib.Path, out: pathlib.Path, samples_per_prompt: int, max_new_tokens: int, seed: int
):
    """The teacher's answers to `prompts` as a corpus file, one line per sample as `collect` writes it
    (id, prompt, response, sample_index, meta.finish_reason), sampled in batches straight from the
    known teacher: the HTTP path is the demo's, and at the report's sizes it would be most of the
    time. Written atomically; kept if it exists (a corpus written before finish reasons were
    recorded is kept too, and read as if every answer stopped)."""
    if out.exists():
        return
    rows = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]
    # A line per sample: a `responses` list shares one `meta`, and `prepare` needs each answer's finish
    # reason; the sample indices number the kept answers as the list did, so the sample ids stay the same.
    samples = teacher.corpus_rows(
        [r["id"] for r in rows], [r["prompt"] for r in rows], samples_per_prompt, max_new_tokens, seed=seed
    )
    lines = [json.dumps(line) + "\n" for line in samples]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(out)


@dataclasses.dataclass
class Runner:
    ctx: object  # the report's RunContext (holds the run directory's lock)
    out: pathlib.Path  # the report artifact's folder (results/, report.md, PNGs)
    run_stage: object  # stages.run_stage, handed down by the report stage (the library never imports stages)

    @property
    def cfg(self):
        return self.ctx.cfg

    # ------------------------------------------------------------------ contexts and stages

    def sub_context(self, folder: pathlib.Path, prompts, tokenizer, overrides: dict, proxy_init=None):
        """A context on run directory `folder` (same mesh; the report holds the lock)."""
        cfg = self.cfg.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.run.dir = str(folder)
            cfg.collect.prompts = str(prompts)
            cfg.data.corpus = str(pathlib.Path(folder) / "corpus" / "teacher.jsonl")
            cfg.data.tokenizer = str(tokenizer)
            cfg.proxy.init_from = str(proxy_init or tokenizer)
            cfg.update_from_flattened_dict(overrides)
        return dataclasses.replace(self.ctx, cfg=cfg, paths=RunPaths(pathlib.Path(folder)), lock=None)

    def stage(self, name: str, ctx, **kwargs):
        return self.run_stage(name, ctx, **kwargs)

    def collect_prepare(self, ctx, teacher, prior: bool = True, corpus=None) -> None:
        """Corpus (`corpus(teacher, prompts, out, cfg, seed)`, default `write_corpus`), prepare, prior."""
        cfg = ctx.cfg
        prompts, out = pathlib.Path(cfg.collect.prompts), pathlib.Path(cfg.data.corpus)
        if corpus is not None:
            corpus(teacher, prompts, out, cfg, ctx.seed)
        else:
            write_corpus(teacher, prompts, out, cfg.demo.samples_per_prompt, cfg.demo.max_new_tokens, ctx.seed)
        self.stage("prepare", ctx)
        if prior:
            self.stage("prior", ctx)

    # ------------------------------------------------------------------ one setting, one seed

    def plan(self) -> tuple[list[str], list[int], list[str]]:
        """(settings, seeds, variants) to run; one sentence on bad input."""
        rcfg = self.cfg.report
        return (
            _names(rcfg.settings, SETTINGS, "settings"),
            _seeds(rcfg.seeds),
            _names(rcfg.variants, VARIANTS, "variants", DEFAULT_VARIANTS),
        )

    def run(self) -> list[dict]:
        settings, seeds, variants = self.plan()
        root = self.ctx.paths.root
        applies = {s: variants_for(s, variants) for s in settings}
        total, done, start = len(seeds) * sum(len(v) for v in applies.values()), 0, time.perf_counter()
        for setting in settings:
            folder = root / setting
            folder.mkdir(parents=True, exist_ok=True)
            print(f"[report] {setting}: {SETTINGS[setting].doc}", flush=True)
            teacher = SETTINGS[setting].build(self, folder)
            for seed in seeds:
                seed_run = SeedRun(self, setting, folder, seed, teacher)
                for name in applies[setting]:
                    t0 = time.perf_counter()
                    res, reused = seed_run.variant(name)
                    done += 1
                    print(
                        f"[report] {done}/{total} {setting} seed {seed} {name}: nats/byte "
                        f"{_fmt(res['nats_per_byte'])}, KL {_fmt(res['kl_to_teacher'])}, teacher log-lik/byte of "
                        f"generations {_fmt(res['teacher_loglik_per_byte'])} "
                        f"({'reused' if reused else f'{time.perf_counter() - t0:.0f} s'}; "
                        f"{time.perf_counter() - start:.0f} s in all)",
                        flush=True,
                    )
                seed_run.estimates()
        return self.results()

    def planned(self) -> dict[pathlib.Path, set[str]]:
        """{each result file of this run's plan: the alignments of the plan's variants in its setting}: every
        variant that applies and, where one of them distils from the full empirical-Bayes posterior (the one
        the estimates measure), each seed's `estimates.json`; written yet or not."""
        settings, seeds, variants = self.plan()
        files = {}
        for setting in settings:
            names = variants_for(setting, variants)
            aligns = {VARIANTS[n].align for n in names}
            estimated = any(VARIANTS[n].align == "full" and VARIANTS[n].posterior in ("eb", "prioronly") for n in names)
            for seed in seeds:
                folder = self.out / "results" / setting / f"seed{seed}"
                files |= {folder / f"{n}.json": aligns for n in names}
                files |= {folder / "estimates.json": aligns} if estimated else {}
        return files

    def results(self) -> list[dict]:
        """The results of this run's plan, as dicts; the estimates with the plan's alignments only. results/
        may hold others, from earlier runs in this directory with other plans (`left_out`): they stay there."""
        return [
            _within(json.loads(p.read_text()), aligns)[0] if p.name == "estimates.json" else json.loads(p.read_text())
            for p, aligns in self.planned().items()
            if p.exists()
        ]

    def left_out(self) -> str | None:
        """One line on the results on disk outside this run's plan (left out of its tables and plots, kept on
        disk), or None where there are none."""
        planned, root = self.planned(), self.out / "results"
        others = [p.relative_to(root).parts for p in sorted(root.rglob("*.json")) if p not in planned]
        settings, seeds, _ = self.plan()
        seeds = [f"seed{s}" for s in seeds]
        why = {  # what puts a file outside the plan: its setting, else its seed, else itself
            "settings": {o[0] for o in others if o[0] not in settings},
            "seeds": {
                o[1].removeprefix("seed") for o in others if len(o) == 3 and o[0] in settings and o[1] not in seeds
            },
            "files": {o[-1] for o in others if len(o) != 3 or (o[0] in settings and o[1] in seeds)},
        }
        aligns = set()
        for path, mine in planned.items():
            if path.name == "estimates.json" and path.exists():
                aligns.update(_within(json.loads(path.read_text()), mine)[1])
        reasons = "; ".join(f"{k} {', '.join(sorted(v, key=lambda x: (len(x), x)))}" for k, v in why.items() if v)
        what = [f"{len(others)} result file{'s' * (len(others) != 1)} ({reasons})"] if others else []
        what += [f"the estimates of the proxies of alignment {', '.join(sorted(aligns))}"] if aligns else []
        if not what:
            return None
        return (
            "Results on disk outside this run's plan (from earlier runs in this directory) are left out of these "
            f"tables and plots, and kept under results/: {' and '.join(what)}."
        )


@dataclasses.dataclass
class SeedRun:
    runner: Runner
    setting: str
    folder: pathlib.Path  # the setting's folder (teacher/, proxy_init/)
    seed: int
    teacher: object

    def __post_init__(self):
        r, cfg = self.runner, self.runner.cfg
        self.spec = SETTINGS[self.setting]
        self.dir = self.folder / f"seed{self.seed}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prompts = self.dir / "prompts.jsonl"
        benchmark.write_prompts(self.teacher, self.prompts, cfg.demo.num_prompts, 1000 + self.seed)
        self.results = r.out / "results" / self.setting / f"seed{self.seed}"
        self.base = self.context(self.dir, {})
        self._prepared = False

    def context(self, folder, overrides):
        overrides = {
            "run.seed": self.seed,
            "eval.known_teacher": str(self.folder / "teacher"),
            "data.corpus": str(self.dir / "corpus" / "teacher.jsonl"),
            **(self.spec.overrides(self.runner.cfg.report) if self.spec.overrides else {}),
            **overrides,
        }
        return self.runner.sub_context(
            folder, self.prompts, self.folder / "proxy_init", overrides, proxy_init=self.folder / "proxy_init"
        )

    def prepare(self) -> None:
        if not self._prepared:
            self.runner.collect_prepare(self.base, self.teacher, corpus=self.spec.corpus)
            self._prepared = True

    def proxy(self, align: str) -> tuple[pathlib.Path, dict]:
        """(the proxy folder of alignment `align`, its phase summaries)."""
        if align == "none":
            return self.folder / "proxy_init", {}
        self.prepare()
        folder = self.dir / f"a_{align}"
        _link(folder)
        actx = self.context(folder, align_overrides(align, self.runner.cfg.report))
        probs = benchmark.teacher_probs_fn(self.teacher) if self.spec.same_tokenizer else None  # over our tokens
        summary = self.runner.stage("align", actx, teacher_probs_fn=probs)
        return folder / "proxy" / "final", summary

    def posterior(self, align: str, post: str):
        """(context of posterior `post` on alignment `align`'s proxy, its estimate summary)."""
        proxy, _ = self.proxy(align)
        eb = None
        if post == "prioronly":
            eb = self.posterior("full", "eb")[1]
        folder = self.dir / f"p_{align}_{post}"
        _link(folder)
        pctx = self.context(folder, {"posterior.proxy": str(proxy), **posterior_overrides(post, eb)})
        return pctx, self.runner.stage("posterior", pctx)

    def variant(self, name: str) -> tuple[dict, bool]:
        """(result of variant `name`, whether it was reused), the result written atomically."""
        path = self.results / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text()), True
        v = VARIANTS[name]
        res = {"setting": self.setting, "seed": self.seed, "variant": name, "label": v.label}
        if v.white_box and not self.spec.same_tokenizer:  # its targets are distributions over the teacher's tokens
            res.update({k: None for k in NA_METRICS} | {"na": {k: NA_TOKENIZERS for k in NA_METRICS}, "curve": []})
            self.runner.ctx.write_json(path, res)
            return res, False
        self.prepare()
        if v.white_box:
            folder = self.dir / "w_teacher"
            _link(folder, ("prepared",))
            dctx = self.context(folder, {"distill.white_box": str(self.folder / "teacher"), "distill.output": name})
        else:
            pctx, _ = self.posterior(v.align, v.posterior)
            over = {"distill.output": name} | ({"distill.loss.alpha": 0.0} if v.alpha_zero else {})
            dctx = self.context(pctx.paths.root, {"posterior.proxy": pctx.cfg.posterior.proxy, **over})
        summary = self.runner.stage("distill", dctx)
        if "best_step" in summary:  # distill.keep_best: final/ is this evaluated step, not the last one
            res["best_step"] = int(summary["best_step"])
        student = dctx.paths.student(name)
        res.update(self.score(dctx, student / "final"))
        res["curve"] = _curve(student / "metrics.jsonl")
        self.runner.ctx.write_json(path, res)
        return res, False

    def score(self, ctx, folder) -> dict:
        from proxykd_jax.data.records import PreparedData

        cfg = ctx.cfg
        prepared = PreparedData(ctx.paths.prepared)
        scorer = metrics_lib.Scorer(ctx.mesh, ctx.rules)
        batches = metrics_lib.eval_batches(
            prepared, cfg.eval.split, cfg.data, batch_size=cfg.eval.batch_size, limit=cfg.eval.max_samples
        )
        prompts = metrics_lib.heldout_prompts(prepared, cfg.data, "heldout", cfg.eval.generate_prompts)

        def scores(model) -> dict:
            if not self.spec.same_tokenizer:
                return report_metrics.cross_tokenizer_scores(
                    model, self.teacher, prepared, batches, prompts, scorer, cfg.eval.max_new_tokens, self.seed
                )
            out = report_metrics.heldout_scores(model, self.teacher, batches, scorer)
            out["teacher_loglik_per_byte"] = report_metrics.generation_score(
                model, prompts, self.teacher, max_new_tokens=cfg.eval.max_new_tokens, seed=self.seed
            )
            return out

        group = cfg.model  # the student, in the dtypes distill ran it in, released before the next variant
        load = dict(dtype=str(group.dtype), param_dtype=str(group.param_dtype), group=group)
        return metrics_lib.scored_alone(ctx.load_model, folder, scores, **load)

    def estimates(self) -> dict:
        """KL(teacher || estimate) of the prior, each proxy and the posterior on the distillation
        split, the alignment phases and the empirical-Bayes fit. Written per seed with the aligned
        proxies it covers (`covers`), and written again when a later report run has added one (a
        variant that needs another alignment), so the report never shows a stale subset."""
        path = self.results / "estimates.json"
        aligned = [
            a for a in ("sft", "nll", "full") if (self.dir / f"a_{a}" / "proxy" / "final" / "config.json").exists()
        ]
        old = json.loads(path.read_text()) if path.exists() else {}
        if old.get("covers") == aligned or not (self.dir / "p_full_eb" / "posterior").exists():
            return old
        from proxykd_jax.bayes.tables import load_prior
        from proxykd_jax.data.records import PreparedData
        from proxykd_jax.data.store import StoreReader

        ctx, _ = self.posterior("full", "eb")
        est = json.loads((ctx.paths.posterior / "estimate.json").read_text())
        prepared = PreparedData(ctx.paths.prepared)
        proxies, phases = {"proxy (before align)": self.folder / "proxy_init"}, {}
        for align in aligned:
            folder, phases[align] = self.proxy(align)
            proxies[f"proxy ({align})"] = folder
        load = dict(dtype=str(ctx.cfg.proxy.dtype), param_dtype=str(ctx.cfg.proxy.param_dtype), group=ctx.cfg.proxy)

        def each_proxy(score) -> dict:  # one proxy in memory at a time, as the eval stage scores them
            return {k: metrics_lib.scored_alone(ctx.load_model, f, score, **load) for k, f in proxies.items()}

        eb = {k: est.get(k) for k in ("kappa", "n_max", "heldout_loglik", "eb_search", "heldout_tokens")}
        if not self.spec.same_tokenizer:  # no KL to a teacher over other tokens; the proxies per byte instead
            batches = metrics_lib.eval_batches(
                prepared, "heldout", ctx.cfg.data, batch_size=ctx.cfg.eval.batch_size, limit=ctx.cfg.eval.max_samples
            )
            scorer = metrics_lib.Scorer(ctx.mesh, ctx.rules)
            out = {
                "setting": self.setting,
                "seed": self.seed,
                "estimator_kl": {},
                "na": {"estimator_kl": NA_TOKENIZERS, "phases": NA_TOKENIZERS},
                "proxy_nats_per_byte": each_proxy(
                    lambda m: report_metrics.nats_per_byte(m, prepared, batches, scorer)["nats_per_byte"]
                ),
                "phases": {},
                "eb": eb,
                "covers": aligned,
            }
            self.runner.ctx.write_json(path, out)
            return out
        batches = metrics_lib.eval_batches(
            prepared, "distill", ctx.cfg.data, batch_size=ctx.cfg.eval.batch_size, limit=ctx.cfg.eval.max_samples
        )
        store = StoreReader(ctx.paths.posterior, tokenizer_hash=prepared.tokenizer_hash)
        reference = metrics_lib.reference_estimator_kl(
            prepared, load_prior(ctx.paths.prior), store, self.teacher, est, batches
        )
        scorer = metrics_lib.Scorer(ctx.mesh, ctx.rules)
        kl = metrics_lib.join_estimator(
            reference, each_proxy(lambda m: metrics_lib.proxy_estimator_kl(m, self.teacher, batches, scorer))
        )
        out = {
            "setting": self.setting,
            "seed": self.seed,
            "estimator_kl": kl,
            "phases": {a: {p: r.get("kl_to_teacher") for p, r in s.items()} for a, s in phases.items()},
            "eb": eb,
            "covers": aligned,
        }
        self.runner.ctx.write_json(path, out)
        return out


def _within(estimate: dict, aligns: set) -> tuple[dict, list[str]]:
    """(`estimate` with only the aligned proxies of `aligns`, the alignments it left out): a seed's
    estimates cover every aligned proxy in its folder, those of earlier runs with other variants too."""
    extra = sorted((set(estimate.get("covers") or ()) | set(estimate.get("phases") or ())) - set(aligns))
    if not extra:
        return estimate, []
    drop = {f"proxy ({a})" for a in extra}
    out = dict(estimate, phases={a: p for a, p in estimate.get("phases", {}).items() if a not in extra})
    for key in ("estimator_kl", "proxy_nats_per_byte"):
        if key in out:
            out[key] = {k: v for k, v in out[key].items() if k not in drop}
    if "covers" in out:
        out["covers"] = [a for a in out["covers"] if a not in extra]
    return out, extra


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _curve(path: pathlib.Path) -> list:
    """[(step, ce)] from a student's metrics.jsonl: its NLL per token of the teacher tokens it trains on."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["ce"])) for r in rows if "ce" in r and "step" in r]


def _older_report(root: pathlib.Path) -> pathlib.Path | None:
    """A corpus of the report in `root` written before corpora recorded each answer's finish reason (the
    first one found), or None. Its results were scored by that version too: <eos> counted as a byte."""
    for corpus in sorted(root.glob("*/*/corpus/teacher.jsonl")):
        with open(corpus) as f:
            first = f.readline()
        if first.strip() and "finish_reason" not in first:
            return corpus
    return None


def run_report(ctx, run_stage) -> list[dict]:
    """Runs (or resumes) the report of `ctx`'s config into its `report` artifact, running the
    pipeline's stages through `run_stage(name, ctx, **kwargs)`; returns the results."""
    from proxykd_jax.report import plots, tables

    art = ctx.artifact("report")
    runner = Runner(ctx, art.work, run_stage)
    settings = runner.plan()[0]
    for setting in settings:  # before any work
        check_built_with(ctx.cfg, ctx.paths.root / setting)
    older = _older_report(ctx.paths.root)
    if older is not None:  # its corpora train an eos after cut answers and its scores use another byte count
        raise ProxyKDError(
            f"{older} was written by an older proxykd_jax (no finish reasons: cut answers get an eos target, and "
            f"the results beside it count <eos> as a byte); run the report with a new --config.run.dir."
        )
    if not art.done:
        art.begin()
    for setting in settings:  # what each setting's folder is (about to be) built with
        if not (ctx.paths.root / setting / BUILT_WITH).exists():
            ctx.write_json(ctx.paths.root / setting / BUILT_WITH, depends_on(ctx.cfg, _BUILT_FROM))
    results = runner.run()  # the plan's only: earlier runs' results under results/ stay there, left out
    estimates = [r for r in results if "estimator_kl" in r]
    variants = [r for r in results if "variant" in r]
    left_out = runner.left_out()
    if left_out:
        print(f"[report] {left_out}", flush=True)
    md = tables.report_markdown(ctx.cfg, variants, estimates, left_out=left_out)
    if ctx.is_writer:
        pngs = plots.write_plots(art.work, variants, estimates)
        tmp = art.work / "report.md.tmp"
        tmp.write_text(md + "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs))
        tmp.replace(art.work / "report.md")
    art.finish({"results": len(variants)})  # again when redone with another plan: the record counts this one
    print(f"[report] done: {art.path / 'report.md'}", flush=True)
    return results
