"""Held-out metrics of the run's models, each model on the mesh on its own.

Always: held-out NLL per response token of every model the run has (proxy before and after
alignment, Proxy-KD student, SFT student). With a known teacher (the demo's) also:

* E_t KL(q_t || model_t) on held-out teacher contexts for every model;
* the estimator's quality on the distillation split (contexts the proxy never trained on):
  E_t KL(q_t || .) for the smoothed one-hot label, the prior mean, the proxy before/after
  alignment and the posterior as stored (top-k + tail, the tail spread evenly over the other tokens);
* the teacher's mean per-token log-likelihood of each student's generations.

`score_model` scores one model for everything it takes part in (the eval stage loads, scores and
releases one model at a time); `reference_estimator_kl` is the estimator's part that needs no model;
`join_metrics` puts them together.

Batches are global (`eval.batch_size` rows, split over processes; each process puts its rows in order of
length within windows of batches, `pipeline.sample_batches`), so the batches hold the same samples on one
process or many; per-token log-probs come back from the mesh whole (replicated), each process scores its own
rows in float64 and the sums are added over processes.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxykd_jax import progress as progress_bars
from proxykd_jax.bayes import estimate
from proxykd_jax.data import pipeline
from proxykd_jax.errors import ConfigError
from proxykd_jax.eval.known_teacher import kl_terms
from proxykd_jax.parallel import hosts
from proxykd_jax.parallel.sharding import global_batch, replicated, under_mesh

log = logging.getLogger(__name__)

ONE_HOT_SMOOTHING = 0.1  # label smoothing of the one-hot reference estimate
_MODEL_FIELDS = ("tokens", "positions", "segment_ids", "targets")


TILE_TOKENS = 1024  # a model's logits are formed this many tokens at a time where only the targets' are needed


@functools.cache
def _scorer(mesh, full: bool, vocab: int, tile_tokens: int):
    """jit(model, batch) -> (log p(target) [B, L], log p [B, L, V] when `full`), replicated on `mesh`; with
    `vocab` below the model's rows (a padded embedding), the distribution over the first `vocab` ids only,
    as the posterior and sampling take it (V = `vocab`). Without `full`, the logits exist `tile_tokens` tokens
    at a time (`estimate.target_logprobs`; 0: the whole batch's at once), as the posterior forms them."""

    def score(graphdef, state, batch):
        if not full:
            return estimate.target_logprobs(graphdef, state, batch, vocab, tile_tokens), None
        model = nnx.merge(graphdef, state)
        logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
        logp = jax.nn.log_softmax(logits[..., :vocab] if 0 < vocab < logits.shape[-1] else logits, axis=-1)
        picked = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return picked, logp

    return under_mesh(
        jax.jit(score, static_argnums=0, out_shardings=replicated(mesh)), mesh, placed=lambda g, s, b: (b, s)
    )


def _empty(batch: dict) -> dict:
    out = dict(batch)
    out["sample_ids"] = np.full_like(batch["sample_ids"], -1)
    out["lengths"] = np.zeros_like(batch["lengths"])
    out["loss_mask"] = np.zeros_like(batch["loss_mask"])
    out["segment_ids"] = np.zeros_like(batch["segment_ids"])
    return out


def iter_eval_batches(prepared, split: str, data_cfg, *, batch_size: int, limit: int = 0, seq_len=None):
    """This process's rows of the first ceil(limit / batch_size) global batches of `split` (all when
    limit = 0), read as they are used: one sample per row of at most `seq_len` tokens (default data.seq_len),
    `batch_size` rows per global batch split over processes, as many batches on every process; rows in
    order of length within windows of batches, each batch cut to its longest row (`pipeline.sample_batches`).
    The scores are sums over the batches' positions, so the order changes none of them."""
    if batch_size % jax.process_count():
        raise ValueError(f"eval.batch_size={batch_size} must be a multiple of the {jax.process_count()} processes.")
    return pipeline.sample_batches(
        prepared, split, data_cfg, batch_size=batch_size, empty=_empty, seq_len=seq_len, limit=limit
    )


def eval_batches(prepared, split: str, data_cfg, *, batch_size: int, limit: int = 0) -> list[dict]:
    """`iter_eval_batches`' batches, read at once."""
    return list(iter_eval_batches(prepared, split, data_cfg, batch_size=batch_size, limit=limit))


def _mask(batch) -> np.ndarray:
    return np.asarray(batch["loss_mask"], np.float64) * (batch["segment_ids"] > 0)


class Scorer:
    """Runs models on host batches over the mesh; returns this process's rows as float64. `vocab`: the
    tokenizer's size, where a model's embedding is padded past it (0: every row is a token)."""

    def __init__(self, mesh, rules, vocab: int = 0):
        self.mesh, self.rules, self.vocab = mesh, rules, int(vocab)

    def __call__(self, model, batch, *, full: bool):
        graphdef, state = nnx.split(model)
        gb = global_batch({k: batch[k] for k in _MODEL_FIELDS}, self.mesh, self.rules)
        picked, logp = _scorer(self.mesh, full, self.vocab, TILE_TOKENS)(graphdef, state, gb)
        rows = batch["tokens"].shape[0]
        picked = hosts.host_rows(picked, rows).astype(np.float64)
        return picked, (hosts.host_rows(logp, rows).astype(np.float64) if full else None)


def model_metrics(models: dict, batches: list, teacher, scorer: Scorer) -> dict:
    """{name: {heldout_nll, kl_to_teacher (with a teacher)}} per response token over `batches`."""
    out = {}
    bar = progress_bars.bar(
        total=len(models) * len(batches), desc="eval: scoring", unit="batch", disable=jax.process_index() != 0
    )
    for name, model in models.items():
        sums = {"nll": 0.0, "kl": 0.0, "n": 0.0}
        bar.set_postfix_str(name)
        for batch in batches:
            picked, logp = scorer(model, batch, full=teacher is not None)
            mask = _mask(batch)
            sums["nll"] -= float(np.sum(picked * mask))
            sums["n"] += float(mask.sum())
            if teacher is not None and mask.any():
                q = teacher.distributions(batch["tokens"], batch["lengths"])
                sums["kl"] += float(np.sum(kl_terms(q, logp) * mask))
            bar.update()
        sums = hosts.allsum(sums)
        out[name] = {"heldout_nll": sums["nll"] / sums["n"]}
        if teacher is not None:
            out[name]["kl_to_teacher"] = sums["kl"] / sums["n"]
    bar.close()
    return out


def _dense_store(entry, vocab: int) -> np.ndarray:
    """[T, V] from a store entry: top-k as stored, the tail spread evenly over the other ids (absent
    entries, log-prob -inf, name no id: any id, an id of a padded embedding in stores written before)."""
    lps = entry.logprobs_TxK.astype(np.float64)
    valid = np.isfinite(lps)
    spread = np.asarray(entry.tail_T, np.float64) / np.maximum(vocab - valid.sum(1), 1)
    q = np.repeat(spread[:, None], vocab, 1)
    rows, slots = np.nonzero(valid)
    q[rows, entry.ids_TxK[rows, slots].astype(np.int64)] = np.exp(lps[rows, slots])
    return q


def _response_rows(batch):
    """(row, sample id, slice of its response's positions) of each sample of `batch` (padding rows left out)."""
    for row in range(batch["tokens"].shape[0]):
        sid = int(batch["sample_ids"][row, 0])
        if sid >= 0:
            yield row, sid, slice(int(batch["prompt_lengths"][row]) - 1, int(batch["lengths"][row]))


def reference_estimator_kl(prepared, tables, store, teacher, estimate: dict, batches) -> dict:
    """E_t KL(q_t || .) on distillation-split response positions (`batches`) of the estimates no model makes:
    the smoothed one-hot label, the prior (the one the store was built on: `estimate` is the posterior's
    estimate.json, its kappa and whether the response's own token counts) and the posterior as stored; with
    the number of positions. A KL is infinite where its estimate gives a token the teacher can write no
    probability (a stored row without tail mass), not floored to a finite number: `finite_or_null`."""
    vocab = tables.vocab_size
    kappa = float(estimate["kappa"])
    from proxykd_jax.bayes.prior import prior_query

    query = prior_query(estimate)
    keys = {int(r["sample_id"]): int(r["prompt_key"]) for r in prepared.iter_split("distill")}
    names = ["one-hot (smoothed)", "prior", "posterior (store)"]
    sums, n = dict.fromkeys(names, 0.0), 0.0
    for batch in batches:
        if not (batch["sample_ids"][:, 0] >= 0).any():
            continue
        q_all = teacher.distributions(batch["tokens"], batch["lengths"]).astype(np.float64)
        for row, sid, sl in _response_rows(batch):
            y = batch["targets"][row, sl].astype(np.int64)
            q = q_all[row, sl]
            prior = tables.query(np.asarray([keys[sid]], np.int64), [y.astype(np.int32)], **query)
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
            for name, e in estimates.items():
                with np.errstate(divide="ignore"):  # log 0 = -inf: an estimate without the teacher's token
                    sums[name] += float(np.sum(kl_terms(q, np.log(e))))
            n += len(y)
    total = hosts.allsum({**sums, "positions": n})
    return {name: total[name] / total["positions"] for name in names} | {"positions": int(total["positions"])}


def proxy_estimator_kl(proxy, teacher, batches, scorer: Scorer) -> dict:
    """{"kl": E_t KL(q_t || proxy_t), "positions"} on the response positions of `batches`: a proxy's own
    part of the eval's estimator metrics (`join_estimator`)."""
    total, n = 0.0, 0.0
    for batch in batches:
        lp = scorer(proxy, batch, full=True)[1]  # every process runs every collective step
        if not (batch["sample_ids"][:, 0] >= 0).any():
            continue
        q_all = teacher.distributions(batch["tokens"], batch["lengths"]).astype(np.float64)
        for row, _, sl in _response_rows(batch):
            total += float(np.sum(kl_terms(q_all[row, sl], lp[row, sl])))
            n += len(batch["targets"][row, sl])
    sums = hosts.allsum({"kl": total, "positions": n})
    return {"kl": sums["kl"] / sums["positions"], "positions": int(sums["positions"])}


def join_estimator(reference: dict, proxies: dict) -> dict:
    """The estimator metrics (E_t KL(q_t || .) of each estimate) from their model-free part
    (`reference_estimator_kl`) and each proxy's (`proxy_estimator_kl`, by name), scored on the same positions."""
    if any(p["positions"] != reference["positions"] for p in proxies.values()):
        raise ValueError(f"estimator parts scored on different positions: {reference} vs {proxies}")
    out = {name: v for name, v in reference.items() if name != "positions"}
    return out | {name: p["kl"] for name, p in proxies.items()} | {"positions": reference["positions"]}


def score_model(
    name: str, model, batches, teacher, scorer: Scorer, *, estimator_batches=None, prompts=(), max_new_tokens=0, seed=0
) -> dict:
    """Everything model `name` takes part in, with only it in memory: {"models": its `model_metrics` and,
    a student's with a teacher, its teacher log-likelihood of generations (`generation_metrics`)}, and
    {"estimator": `proxy_estimator_kl`} for a proxy with a teacher and `estimator_batches`."""
    out = {"models": model_metrics({name: model}, batches, teacher, scorer)[name]}
    if teacher is not None and estimator_batches is not None and name.startswith("proxy"):
        out["estimator"] = proxy_estimator_kl(model, teacher, estimator_batches, scorer)
    if teacher is not None and name.startswith("student"):
        generated = generation_metrics({name: model}, prompts, teacher, max_new_tokens=max_new_tokens, seed=seed)
        if name in generated:  # (none without prompts or new tokens)
            out["models"]["teacher_loglik_of_generations"] = generated[name]
    return out


def join_metrics(scores: dict, split: str, reference: dict | None = None) -> dict:
    """The eval's metrics from each model's `score_model` (by name, in the table's order) and, where the
    estimator is scored, its model-free part (`reference_estimator_kl`)."""
    metrics = {"models": {name: s["models"] for name, s in scores.items()}, "split": split}
    if reference is not None:
        proxies = {name: s["estimator"] for name, s in scores.items() if "estimator" in s}
        metrics["estimator_kl"] = join_estimator(reference, proxies)
    return metrics


def scored_alone(load_model, folder, score, **load):
    """`score(model)` of the model `load_model(folder, **load)` loads (a `RunContext.load_model`), collected
    before this returns: an NNX module graph holds reference cycles, so without a collection here it would
    stay on the device until Python's collector runs (after the next model has loaded)."""
    try:
        return score(load_model(folder, **load)[1])
    finally:
        gc.collect()


def _strict_json(value, at=()) -> tuple:
    """(`value` with each NaN or infinite number as None, [[key path..., its repr]] of those): JSON without the
    Infinity / NaN that strict readers refuse, and what `_unstrict` puts back."""
    if isinstance(value, dict):
        pairs = [(k, _strict_json(v, (*at, str(k)))) for k, v in value.items()]  # (JSON's keys: strings)
        return {k: v for k, (v, _) in pairs}, [m for _, (_, marks) in pairs for m in marks]
    if isinstance(value, float) and not math.isfinite(value):
        return None, [[*at, repr(value)]]
    return value, []


def _unstrict(value, marks: list):
    """`value` (`_strict_json`'s) with its NaN and infinite numbers back where `marks` put them."""
    for *path, number in marks:
        if not path:
            return float(number)
        node = value
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = float(number)
    return value


class Kept:
    """Scores kept in `folder` (the eval artifact's scored/), one small JSON file per model (or per part that
    no model takes part in), so a killed eval resumes with what it finished. `write(path, obj)` writes
    atomically (process 0's `RunContext.write_json`); `writer`: whether this process reads the files. A score
    that is not finite (an infinite KL) is stored as null, as metrics.json stores it, and listed in the file's
    "not_finite" ([key path..., "inf"]), which reading it back restores."""

    def __init__(self, folder: pathlib.Path, write, writer: bool):
        self.folder, self.write, self.writer = pathlib.Path(folder), write, writer

    def __call__(self, name: str, key: dict, score):
        """What `score()` returned for `name` when scored with `key` (how it was scored: its folder, dtypes),
        kept in its file by an earlier, killed run; else `score()`, then written there. A file that is
        damaged or of another key is scored again. Every process takes process 0's decision and values."""
        path = self.folder / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".json")
        key, text = json.loads(json.dumps(key)), "null"
        if self.writer:
            try:
                kept = json.loads(path.read_text())
                if isinstance(kept, dict) and kept.get("key") == key and "scores" in kept:
                    text = json.dumps(_unstrict(kept["scores"], kept.get("not_finite", [])))
            except (OSError, ValueError, LookupError, TypeError):  # missing or damaged (a torn write): scored again
                pass
        scores = json.loads(hosts.broadcast_text(text))
        if scores is not None:
            log.info("eval: %s was scored before the run stopped; reusing %s", name, path)
            return scores
        scores = score()
        strict, marks = _strict_json(scores)
        self.write(path, {"key": key, "scores": strict} | ({"not_finite": marks} if marks else {}))
        return scores


def heldout_prompts(prepared, data_cfg, split: str, limit: int) -> list[np.ndarray]:
    """The first `limit` distinct prompts of `split` (a prompt's several responses count once, as the
    eval stage's per-byte prompts do), the same on every process."""
    rows, seen = [], set()
    for batch in pipeline.iter_samples(prepared, split, data_cfg, batch_size=16, process_index=0, process_count=1):
        for row in range(batch["tokens"].shape[0]):
            prompt = batch["tokens"][row, : int(batch["prompt_lengths"][row])]
            if batch["sample_ids"][row, 0] >= 0 and len(rows) < limit and prompt.tobytes() not in seen:
                seen.add(prompt.tobytes())
                rows.append(prompt)
        if len(rows) >= limit:
            break
    return rows


def sample_answers(model, prompts: list, tokenizer, stop_ids, *, max_new_tokens: int, seed: int) -> list[list[int]]:
    """`model`'s answer to each prompt (token ids), sampled in one left-aligned batch as the eval
    stage samples: temperature 1, ending after one of `stop_ids` (an id or several: the eos, a chat
    template's end of turn; kept in the answer), and no other special token ever sampled (pad, bos, unk
    never occur in a response, as in serving), nor an id past the tokenizer's (a padded embedding's,
    which the teacher cannot score)."""
    from proxykd_jax.models.sampling import generate

    width = max(len(r) for r in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, r in enumerate(prompts):
        tokens[i, : len(r)] = r
    lengths = np.asarray([len(r) for r in prompts], np.int32)
    stops = tuple(dict.fromkeys(int(i) for i in ((stop_ids,) if isinstance(stop_ids, int) else stop_ids)))
    specials = tuple(i for i in getattr(tokenizer, "all_special_ids", ()) if i not in stops)
    gen = generate(
        model,
        tokens,
        lengths,
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        stop_tokens=stops,
        suppress_tokens=specials,
        vocab=min(len(tokenizer), model.cfg.vocab_size),  # a padded embedding's ids: no token
    )
    g, glen = hosts.to_host(gen.tokens_BxT), hosts.to_host(gen.lengths_B)
    return [g[i, : glen[i]].tolist() for i in range(len(prompts))]


def generation_metrics(students: dict, prompts: list, teacher, *, max_new_tokens: int, seed: int) -> dict:
    """Teacher mean log-likelihood per token of each student's sampled answers to `prompts` ({} when
    there are no prompts or max_new_tokens is 0: no generations)."""
    if not prompts or max_new_tokens < 1:
        return {}
    out = {}
    for name, model in students.items():
        answers = sample_answers(
            model, prompts, teacher.tokenizer, teacher.eos_id, max_new_tokens=max_new_tokens, seed=seed
        )
        contexts = [list(p) + a for p, a in zip(prompts, answers)]
        q = teacher.distributions(contexts)
        total = count = 0.0
        for i, ctx in enumerate(contexts):
            p = len(prompts[i])
            for t in range(p, len(ctx)):
                total += float(np.log(max(float(q[i, t - 1, ctx[t]]), 1e-300)))  # float64 floor
                count += 1
        out[name] = total / max(count, 1)
    return out


def model_folders(proxy_init: str, paths) -> dict[str, pathlib.Path]:
    """The run's model folders that exist, by role (`paths`: the run's paths)."""
    cands = {
        "proxy (before align)": pathlib.Path(proxy_init) if proxy_init else None,
        "proxy (aligned)": paths.proxy / "final",
        "student (SFT, alpha=0)": paths.student("student_sft") / "final",
        "student (Proxy-KD)": paths.student("student") / "final",
    }
    return {k: v for k, v in cands.items() if v is not None and (v / "config.json").exists()}


def format_table(metrics: dict) -> str:
    if metrics.get("units") == "per_byte":
        lines = [
            "| model | held-out nats/byte | teacher nats/byte of generations |",
            "|---|---|---|",
        ]
        for name, m in metrics["models"].items():
            gen = m.get("teacher_nats_per_byte_of_generations")
            lines.append(
                f"| {name} | {m['heldout_nats_per_byte']:.4f} | " + (f"{gen:.4f}" if gen is not None else "-") + " |"
            )
        lines.append(f"| teacher | {metrics['teacher_nats_per_byte']:.4f} | - |")
        return "\n".join(lines)
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


def nulls_as_nan(metrics: dict) -> dict:
    """`metrics` with each null (a value that was not finite, `finite_or_null`) read back as NaN: what `run`
    prints and returns, the same whether it evaluated or reused metrics.json."""
    if isinstance(metrics, dict):
        return {k: nulls_as_nan(v) for k, v in metrics.items()}
    return math.nan if metrics is None else metrics


def finite_or_null(metrics: dict) -> dict:
    """A copy of `metrics` with each NaN or infinite number as None (JSON null: NaN and Infinity are not
    JSON), said in one warning. A KL can be infinite where an estimate gives no probability to a token
    the teacher can write (a posterior entry without tail mass)."""
    safe, marks = _strict_json(metrics)
    if marks:
        log.warning(
            "eval: %s not finite (a KL is infinite where a model or an estimate gives no probability to a token "
            "the teacher writes); metrics.json stores null there",
            ", ".join(f"{'.'.join(path)} = {number}" for *path, number in marks),
        )
    return safe


def check_teacher_tokenizer(teacher, prepared, folder: str) -> None:
    """Refuses a known teacher that reads token ids otherwise than the prepared data (a character-level one
    is scored per byte instead): its distributions and log-likelihoods would be read at the wrong ids."""
    from proxykd_jax.models.tokenizer import tokenizer_hash

    theirs = tokenizer_hash(teacher.tokenizer)
    if teacher.is_char or theirs == prepared.tokenizer_hash:
        return
    ours = prepared.manifest["tokenizer"]
    raise ConfigError(
        f"eval.known_teacher={folder}: the teacher's tokenizer ({len(teacher.tokenizer)} tokens, hash {theirs}) "
        f"differs from the prepared data's ({ours['vocab_size']} tokens, hash {ours['hash']} in "
        f"{prepared.root / 'manifest.json'}), so its probabilities cannot be read at the run's token ids; give a "
        "known teacher with the run's tokenizer (data.tokenizer) or a character-level one, or leave "
        "eval.known_teacher unset."
    )
