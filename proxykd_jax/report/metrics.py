"""Scores of one student against the known teacher, per byte of text (tokenizer-free):

* nats per byte of held-out teacher responses (the student's NLL summed over response tokens, the
  <eos> included, divided by the responses' UTF-8 bytes, to which the <eos> adds none: the eval
  stage's convention, `eval.per_byte.text_bytes`);
* E_t KL(teacher_t || student_t) per response token on the same held-out contexts;
* the teacher's log-likelihood per byte of the student's sampled answers to held-out prompts.

With a teacher over other tokens (`cross_tokenizer_scores`) the KL is "n/a (tokenizers differ)";
nats per byte are counted the same way over our tokens, and the teacher scores the decoded answers
with its own tokenizer (eval/per_byte.py: their end is scored where they ended and counts no byte).

The per-token scorers are eval/metrics.py's, the byte counts eval/per_byte.py's (one convention).
"""

from __future__ import annotations

import numpy as np

from proxykd_jax.eval import metrics as metrics_lib
from proxykd_jax.eval import per_byte
from proxykd_jax.parallel import hosts


def _counts(batches, tokenizer) -> dict:
    counts = {"tokens": 0.0, "bytes": 0.0}
    for batch in batches:
        counts["tokens"] += float((np.asarray(batch["loss_mask"], np.float64) * (batch["segment_ids"] > 0)).sum())
        counts["bytes"] += per_byte.target_bytes(batch, tokenizer)
    return hosts.allsum(counts)


def heldout_scores(model, teacher, batches, scorer) -> dict:
    """{nats_per_byte, nll_per_token, kl_to_teacher, tokens, bytes} on held-out `batches`."""
    m = metrics_lib.model_metrics({"m": model}, batches, teacher, scorer)["m"]
    counts = _counts(batches, teacher.tokenizer)
    return {
        "nats_per_byte": m["heldout_nll"] * counts["tokens"] / counts["bytes"],
        "nll_per_token": m["heldout_nll"],
        "kl_to_teacher": m["kl_to_teacher"],
        "tokens": int(counts["tokens"]),
        "bytes": int(counts["bytes"]),
    }


def generation_score(model, prompts: list, teacher, *, max_new_tokens: int, seed: int) -> float | None:
    """The teacher's log-likelihood per byte of the model's sampled answers to `prompts` (an answer's
    <eos> scored where it stopped, adding no byte); None without prompts or with max_new_tokens = 0."""
    if not prompts or max_new_tokens < 1:
        return None
    answers = metrics_lib.sample_answers(
        model, prompts, teacher.tokenizer, teacher.eos_id, max_new_tokens=max_new_tokens, seed=seed
    )
    q = teacher.distributions([list(p) + a for p, a in zip(prompts, answers)])
    total, nbytes = 0.0, 0
    for i, (p, a) in enumerate(zip(prompts, answers)):
        for t, tok in enumerate(a):
            total += float(np.log(max(float(q[i, len(p) + t - 1, tok]), 1e-300)))  # float64 floor
        nbytes += per_byte.text_bytes(a, teacher.tokenizer)
    return total / max(nbytes, 1)


NA_TOKENIZERS = "tokenizers differ"
NA_METRICS = ("nats_per_byte", "kl_to_teacher", "teacher_loglik_per_byte")  # what a skipped variant lacks


def nats_per_byte(model, prepared, batches, scorer) -> dict:
    """{nats_per_byte, nll_per_token, tokens, bytes} of `model` on `batches` of `prepared` (our tokenizer)."""
    from proxykd_jax.models.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared.root / "tokenizer")
    nll = metrics_lib.model_metrics({"m": model}, batches, None, scorer)["m"]["heldout_nll"]
    counts = _counts(batches, tok)
    return {
        "nats_per_byte": nll * counts["tokens"] / counts["bytes"],
        "nll_per_token": nll,
        "tokens": int(counts["tokens"]),
        "bytes": int(counts["bytes"]),
    }


def cross_tokenizer_scores(model, teacher, prepared, batches, prompts, scorer, max_new_tokens: int, seed: int) -> dict:
    """The student's scores against a teacher over other tokens: nats per byte of held-out teacher
    text, the teacher's log-likelihood per byte of the student's answers to `prompts` (our token
    ids, decoded to text for the teacher), and KL "n/a (tokenizers differ)"."""
    from proxykd_jax.models.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared.root / "tokenizer")
    out = nats_per_byte(model, prepared, batches, scorer)
    texts = [tok.decode([int(t) for t in p], skip_special_tokens=True) for p in prompts]
    gen = per_byte.generation_nats_per_byte({"m": model}, texts, teacher, tok, max_new_tokens=max_new_tokens, seed=seed)
    return out | {
        "kl_to_teacher": None,
        "teacher_loglik_per_byte": -gen["m"] if gen else None,
        "na": {"kl_to_teacher": NA_TOKENIZERS},
    }
