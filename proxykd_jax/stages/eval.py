"""`proxykd eval`: score the run's models on held-out teacher data (and against a known teacher).

Always: held-out NLL per response token of every model the run has (proxy before
and after alignment, Proxy-KD student, SFT student). With a known teacher
(`eval.known_teacher`, the demo's; DESIGN.md §5) also:

* E_t KL(q_t || model_t) on held-out teacher contexts for every model;
* the estimator's quality on the distillation split (contexts the proxy never
  trained on): E_t KL(q_t || .) for the smoothed one-hot label, the prior mean,
  the proxy before/after alignment and the posterior as stored (top-k + tail,
  the tail spread evenly over the other tokens);
* the teacher's mean per-token log-likelihood of each student's generations.

Writes `<run>/eval/metrics.json` and prints a table.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxykd_jax.data import pipeline
from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreReader
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.eval.known_teacher import kl_terms
from proxykd_jax.models import hf
from proxykd_jax.models.sampling import generate
from proxykd_jax.stages import prior as prior_stage
from proxykd_jax.stages.paths import RunPaths

log = logging.getLogger(__name__)
ONE_HOT_SMOOTHING = 0.1  # label smoothing of the one-hot reference estimate


@jax.jit
def _log_softmax(graphdef_state, batch):
    graphdef, state = graphdef_state
    model = nnx.merge(graphdef, state)
    return jax.nn.log_softmax(model(batch["tokens"], batch["positions"], batch["segment_ids"]), axis=-1)


def run_models(cfg) -> dict[str, pathlib.Path]:
    """The run's model folders that exist, by role."""
    paths = RunPaths.from_config(cfg)
    cands = {
        "proxy (before align)": pathlib.Path(cfg.proxy.init_from) if cfg.proxy.init_from else None,
        "proxy (aligned)": paths.proxy / "final",
        "student (SFT, alpha=0)": paths.student("student_sft") / "final",
        "student (Proxy-KD)": paths.student("student") / "final",
    }
    return {k: v for k, v in cands.items() if v is not None and (v / "config.json").exists()}


def _rows(prepared, cfg, split: str, limit: int):
    """Up to `limit` samples of `split` as padded one-sample-per-row batches."""
    seen = 0
    for batch in pipeline.iter_samples(prepared, split, cfg.data, batch_size=cfg.eval.batch_size):
        if limit and seen >= limit:
            return
        yield batch
        seen += int((batch["sample_ids"][:, 0] >= 0).sum())


def _model_logprobs(model, batch) -> np.ndarray:
    fields = {k: jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids")}
    return np.asarray(_log_softmax(nnx.split(model), fields), np.float64)


def _mask(batch) -> np.ndarray:
    return np.asarray(batch["loss_mask"], np.float64) * (batch["segment_ids"] > 0)


def model_metrics(models: dict, batches: list, teacher) -> dict:
    out = {}
    for name, model in models.items():
        nll = kl = n = 0.0
        for batch in batches:
            lp = _model_logprobs(model, batch)
            mask = _mask(batch)
            picked = np.take_along_axis(lp, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
            nll -= float(np.sum(picked * mask))
            n += float(mask.sum())
            if teacher is not None:
                q = teacher.distributions(batch["tokens"], batch["lengths"])
                kl += float(np.sum(kl_terms(q, lp) * mask))
        out[name] = {"heldout_nll": nll / n}
        if teacher is not None:
            out[name]["kl_to_teacher"] = kl / n
    return out


def _dense_store(entry, vocab: int) -> np.ndarray:
    """[T, V] from a store entry: top-k as stored, the tail spread evenly over the other ids."""
    t, k = entry.ids_TxK.shape
    q = np.repeat((np.asarray(entry.tail_T, np.float64) / max(vocab - k, 1))[:, None], vocab, 1)
    np.put_along_axis(q, entry.ids_TxK.astype(np.int64), np.exp(entry.logprobs_TxK.astype(np.float64)), 1)
    return q


def estimator_metrics(cfg, prepared, teacher, models: dict, est: dict) -> dict:
    """E_t KL(q_t || .) of each estimate on distillation-split response positions."""
    paths = RunPaths.from_config(cfg)
    tables = prior_stage.load(cfg)
    store = StoreReader(paths.posterior, tokenizer_hash=prepared.tokenizer_hash)
    vocab, kappa = tables.vocab_size, float(est["kappa"])
    sums, n = {}, 0
    for batch in _rows(prepared, cfg, "distill", cfg.eval.max_samples):
        q_all = teacher.distributions(batch["tokens"], batch["lengths"]).astype(np.float64)
        lps = {name: _model_logprobs(m, batch) for name, m in models.items() if name.startswith("proxy")}
        for row in range(batch["tokens"].shape[0]):
            sid = int(batch["sample_ids"][row, 0])
            if sid < 0:
                continue
            p, length = int(batch["prompt_lengths"][row]), int(batch["lengths"][row])
            sl = slice(p - 1, length)
            y = batch["targets"][row, sl].astype(np.int64)
            q = q_all[row, sl]
            key = np.asarray([_prompt_key(prepared, sid)], np.int64)
            prior = tables.query(key, [y.astype(np.int32)], mode="include_self")
            a = kappa * tables.dense_ngram(prior)
            np.add.at(
                a,
                (np.repeat(np.arange(len(y)), prior.ids_NxS.shape[1]), np.asarray(prior.ids_NxS).reshape(-1)),
                np.asarray(prior.counts_NxS, np.float64).reshape(-1),
            )
            one_hot = np.full((len(y), vocab), ONE_HOT_SMOOTHING / vocab)
            one_hot[np.arange(len(y)), y] += 1.0 - ONE_HOT_SMOOTHING
            estimates = {
                "one-hot (smoothed)": one_hot,
                "prior": a / a.sum(1, keepdims=True),
                "posterior (store)": _dense_store(store.get(sid), vocab),
            }
            estimates.update({name: np.exp(lp[row, sl]) for name, lp in lps.items()})
            for name, e in estimates.items():
                sums[name] = sums.get(name, 0.0) + float(np.sum(kl_terms(q, np.log(np.maximum(e, 1e-300)))))
            n += len(y)
    return {name: s / n for name, s in sums.items()} | {"positions": n}


_KEYS: dict = {}


def _prompt_key(prepared, sid: int) -> int:
    if not _KEYS.get(prepared.root):
        _KEYS[prepared.root] = {int(r["sample_id"]): int(r["prompt_key"]) for r in prepared.iter_split("distill")}
    return _KEYS[prepared.root][sid]


def generation_metrics(cfg, prepared, teacher, students: dict) -> dict:
    """Teacher mean log-likelihood per token of each student's sampled answers to held-out prompts."""
    rows = []
    for batch in _rows(prepared, cfg, "heldout", cfg.eval.generate_prompts):
        for row in range(batch["tokens"].shape[0]):
            if batch["sample_ids"][row, 0] >= 0 and len(rows) < cfg.eval.generate_prompts:
                p = int(batch["prompt_lengths"][row])
                rows.append(batch["tokens"][row, :p])
    if not rows:
        return {}
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    lengths = np.asarray([len(r) for r in rows], np.int32)
    # Special tokens other than eos never occur in a response (pad, bos, unk): not sampled, as in serving.
    specials = tuple(i for i in getattr(teacher.tokenizer, "all_special_ids", ()) if i != teacher.eos_id)
    out = {}
    for name, model in students.items():
        gen = generate(
            model,
            tokens,
            lengths,
            jax.random.key(cfg.run.seed),
            max_new_tokens=cfg.eval.max_new_tokens,
            temperature=1.0,
            stop_tokens=(teacher.eos_id,),
            suppress_tokens=specials,
        )
        g, glen = np.asarray(gen.tokens_BxT), np.asarray(gen.lengths_B)
        contexts = [list(rows[i]) + g[i, : glen[i]].tolist() for i in range(len(rows))]
        q = teacher.distributions(contexts)
        total = count = 0.0
        for i, ctx in enumerate(contexts):
            p = len(rows[i])
            for t in range(p, len(ctx)):
                total += float(np.log(max(float(q[i, t - 1, ctx[t]]), 1e-300)))  # float64 floor
                count += 1
        out[name] = total / max(count, 1)
    return out


def run(cfg, *, teacher=None) -> dict:
    paths = RunPaths.from_config(cfg)
    prepared = PreparedData(paths.prepared)
    if teacher is None and cfg.eval.known_teacher:
        from proxykd_jax.teacher.known import KnownTeacher

        teacher = KnownTeacher.load(cfg.eval.known_teacher)
    folders = run_models(cfg)
    if not folders:
        raise ProxyKDError(f"{paths.root}: no model folders to evaluate; run `align` or `distill` first.")
    models = {name: hf.load_hf(str(f))[1] for name, f in folders.items()}
    batches = list(_rows(prepared, cfg, cfg.eval.split, cfg.eval.max_samples))
    metrics = {"models": model_metrics(models, batches, teacher), "split": cfg.eval.split}
    if teacher is not None:
        est_path = paths.posterior / "estimate.json"
        if est_path.exists():
            metrics["estimator_kl"] = estimator_metrics(
                cfg, prepared, teacher, models, json.loads(est_path.read_text())
            )
        students = {k: m for k, m in models.items() if k.startswith("student")}
        for name, ll in generation_metrics(cfg, prepared, teacher, students).items():
            metrics["models"][name]["teacher_loglik_of_generations"] = ll
    paths.eval.mkdir(parents=True, exist_ok=True)
    (paths.eval / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(format_table(metrics))
    return metrics


def format_table(metrics: dict) -> str:
    lines = [
        "| model | held-out NLL/token | KL(teacher ‖ model) | teacher log-lik of generations |",
        "|---|---|---|---|",
    ]
    for name, m in metrics["models"].items():
        cells = [
            f"{m['heldout_nll']:.4f}",
            f"{m['kl_to_teacher']:.4f}" if "kl_to_teacher" in m else "-",
            f"{m['teacher_loglik_of_generations']:.4f}" if "teacher_loglik_of_generations" in m else "-",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "estimator_kl" in metrics:
        est = metrics["estimator_kl"]
        lines += [
            "",
            f"| estimate of the teacher (distillation split, {est['positions']} positions) | KL(teacher ‖ estimate) |",
            "|---|---|",
        ]
        lines += [f"| {name} | {v:.4f} |" for name, v in est.items() if name != "positions"]
    return "\n".join(lines)
