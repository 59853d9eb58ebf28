"""Tokenizer-free scores and the character-teacher setup (docs/TOKENIZERS.md).

Models with different tokenizers are compared in nats per byte of text: a model's negative
log-likelihood of a held-out response (its end included where it ended: our eos token, the
teacher's <eos>) divided by the response's UTF-8 bytes, to which the end adds none (`text_bytes`,
the report's convention too). For the student's own text the judge is the teacher: its
log-likelihood per byte of the student's generations, each the text of its tokens up to its last whole
character where max_new_tokens cut it inside one (`generation_text`: the numerator and the denominator
cover the same bytes).

The setup half builds the known teacher with its own tokenizer: a character-level `KnownTeacher`,
a byte-level BPE student tokenizer trained on the teacher's text, and a randomly initialised proxy
over that tokenizer (a proxy cannot share weights with a teacher over other tokens).
"""

from __future__ import annotations

import codecs
import functools
import json
import pathlib

import jax
import numpy as np
from flax import nnx

from proxykd_jax.data import byte_head
from proxykd_jax.eval.folders import save_atomic, saved_teacher
from proxykd_jax.eval.metrics import _mask, sample_answers
from proxykd_jax.models.tokenizer import end_of_turn_id
from proxykd_jax.parallel import hosts
from proxykd_jax.teacher import token_bytes


def text_bytes(ids, tokenizer) -> int:
    """UTF-8 bytes of the text of our token `ids`: the denominator of every nats per byte, in `eval`
    and in `report` alike.

    The convention: a model's log-prob of the end of a text (<eos>, where the text ended) counts in
    the numerator, and the end adds no byte; bytes are the decoded text's UTF-8 bytes (every special
    token adds none). So the same text has the same bytes under any tokenizer, a word tokenizer's
    spaces included, and a teacher scoring text (`KnownTeacher.text_logprob`) counts it the same way.
    Where the tokens hold bytes that are not UTF-8 (a response data.truncate cut inside a character), the
    bytes they hold count, not the 3 of each replacement character decoding wrote for them
    (`_replaced_bytes`)."""
    return _decoded(ids, tokenizer)[2]


def _decoded(ids, tokenizer) -> tuple[list[int], str, int]:
    """(the ids that are no special token, their decoded text, its bytes as `text_bytes` counts them)."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    words = [int(i) for i in ids if int(i) not in special]
    if not words:
        return words, "", 0
    text = tokenizer.decode(words)
    if "\ufffd" in text:  # (a byte-fallback run that is not UTF-8: decoded again as Python and byte-level BPE do)
        lossy = _lossy_byte_runs(words, tokenizer)
        text = text if lossy == words else tokenizer.decode(lossy)
    return words, text, len(text.encode("utf-8")) + _replaced_bytes(words, tokenizer, text)


@functools.lru_cache(maxsize=8)
def _byte_fallback_ids(tokenizer) -> list[int] | None:
    """`token_bytes.byte_fallback_ids(tokenizer)`, read once per tokenizer."""
    return token_bytes.byte_fallback_ids(tokenizer)


def _lossy_byte_runs(words: list[int], tokenizer) -> list[int]:
    """`words` with every run of byte-fallback `<0xNN>` tokens whose bytes are not UTF-8 spelled again, as byte
    tokens, in the UTF-8 of their lossy decoding: one replacement character (U+FFFD) for each maximal invalid
    subpart, as Python's and a byte-level BPE's decoding write. A `ByteFallback` decoder writes one for every byte
    of such a run, its whole characters' bytes too (`é` then a cut character's first byte: three). Unchanged for a
    tokenizer without byte fallback."""
    ids = _byte_fallback_ids(tokenizer)
    if ids is None:
        return words
    byte_of = {i: b for b, i in enumerate(ids)}
    out, run = [], []

    def flush():
        raw = bytes(byte_of[i] for i in run)
        lossy = raw.decode("utf-8", errors="replace").encode("utf-8")
        out.extend(run if lossy == raw else [ids[b] for b in lossy])
        run.clear()

    for w in words:
        if w in byte_of:
            run.append(w)
        else:
            flush()
            out.append(w)
    flush()
    return out


@functools.lru_cache(maxsize=8)
def _token_bytes(tokenizer) -> list[bytes | None]:
    """`byte_head.token_bytes(tokenizer)`, read once per tokenizer (a pass over its vocabulary)."""
    return byte_head.token_bytes(tokenizer)


def _held_bytes(words: list[int], tokenizer) -> bytes | None:
    """The bytes tokens `words` hold, end to end; None where one token's bytes are unknown (`_token_bytes`)."""
    table = _token_bytes(tokenizer)
    pieces = [table[i] if i < len(table) else None for i in words]
    return None if any(p is None for p in pieces) else b"".join(pieces)


def _replaced_bytes(words: list[int], tokenizer, text: str) -> int:
    """The bytes tokens `words` hold that are not UTF-8, less the 3 of each replacement character (U+FFFD) their
    decoded `text` holds for them: the correction from `text`'s UTF-8 bytes to the bytes actually there. 0 where
    `text` holds no replacement character, or a token's bytes are unknown (`byte_head.token_bytes`)."""
    mark = "\ufffd"
    raw = _held_bytes(words, tokenizer) if mark in text else None
    if raw is None:
        return 0
    genuine = raw.count(mark.encode())  # U+FFFD characters the text really holds
    lossy = raw.decode("utf-8", errors="replace")
    invalid = len(raw) - (len(lossy.encode("utf-8")) - 3 * (lossy.count(mark) - genuine))
    written = text.count(mark) - genuine  # (however the tokenizer's decoder groups the invalid bytes)
    return invalid - 3 * written if invalid and written > 0 else 0


def target_bytes(batch, tokenizer) -> int:
    """`text_bytes` of the scored targets (the response, its eos included) of every sample of `batch`: each
    segment of a packed row on its own, as decoding two responses as one text would count a separator (a word
    tokenizer's space) that neither holds."""
    targets, mask, segments = np.asarray(batch["targets"]), _mask(batch), np.asarray(batch["segment_ids"])
    return sum(
        text_bytes(targets[r][(mask[r] > 0) & (segments[r] == s)], tokenizer)
        for r in range(mask.shape[0])
        for s in np.unique(segments[r][mask[r] > 0])
    )


def heldout_nats_per_byte(models: dict, batches: list, tokenizer, scorer) -> dict:
    """{name: nats per byte} of each model's NLL of the response targets (eos included) over `batches`,
    per byte of the responses' text (`text_bytes`)."""
    nbytes = float(sum(target_bytes(batch, tokenizer) for batch in batches))
    out = {}
    for name, model in models.items():
        sums = {"nll": 0.0, "bytes": nbytes}
        for batch in batches:
            picked, _ = scorer(model, batch, full=False)
            sums["nll"] -= float(np.sum(picked * _mask(batch)))
        sums = hosts.allsum(sums)
        out[name] = sums["nll"] / max(sums["bytes"], 1.0)
    return out


def generation_nats_per_byte(
    students: dict, prompts: list[str], teacher, tokenizer, *, max_new_tokens: int, seed: int
) -> dict:
    """{name: -(teacher log-likelihood of the student's answers, their end included) / their bytes}.

    Each student answers `prompts` (tokenised with our `tokenizer`) by sampling at temperature 1;
    the teacher scores the decoded text with its own tokenizer (`teacher.text_logprob`), its <eos>
    only after an answer that ended (not one cut at max_new_tokens), up to the last whole character of
    an answer cut inside one, over the bytes `generation_text` counts. {} without prompts or with
    max_new_tokens = 0 (no generations)."""
    if not prompts or max_new_tokens < 1:
        return {}
    # as prepare tokenised these plain prompts for training: with the tokenizer's special tokens (a bos)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    # an answer ends at the eos or at the chat template's end of turn (what prepare ended chat answers with)
    stops = tuple(t for t in dict.fromkeys([tokenizer.eos_token_id, end_of_turn_id(tokenizer)]) if t is not None)
    out = {}
    for name, model in students.items():
        answers = sample_answers(model, ids, tokenizer, stops, max_new_tokens=max_new_tokens, seed=seed)
        ended = [bool(a) and a[-1] in stops for a in answers]
        scored = [generation_text([t for t in a if t not in stops], tokenizer, e) for a, e in zip(answers, ended)]
        ll, _ = teacher.text_logprob(prompts, [t for t, _ in scored], ended=ended)  # (its bytes: U+FFFD's 3 each)
        out[name] = float(-ll.sum() / max(sum(n for _, n in scored), 1))
    return out


def generation_text(ids, tokenizer, ended: bool) -> tuple[str, int]:
    """(the text a teacher scores, its bytes) of a generated answer, our token `ids` (special tokens, the stop
    among them, hold no text); `ended`: the answer stopped (else max_new_tokens cut it).

    The convention for bytes that are not UTF-8: the first bytes of a character that an answer cut at the length
    limit ends with (its writer would have gone on to complete it) are no text, and a teacher over characters
    cannot score part of one: the answer is scored and counted up to its last whole character. Any other such
    bytes (in the middle, or ending an answer that stopped) are what the model wrote: the teacher scores the
    replacement characters (U+FFFD) decoding writes for them, and they count the bytes they hold (`text_bytes`),
    not the 3 of a replacement character."""
    words, text, nbytes = _decoded(ids, tokenizer)
    raw = None if ended or "\ufffd" not in text else _held_bytes(words, tokenizer)
    if raw is None:  # (no cut character, or the bytes are unknown: the text as decoded)
        return text, nbytes
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(raw, final=False)
    tail = decoder.getstate()[0]  # the bytes it waits on to finish a character
    if not tail or tail.decode("utf-8", "replace") != "\ufffd":  # (CPython also waits on ED A0-BF: no character)
        return text, nbytes
    whole = raw[: -len(tail)].decode("utf-8", "replace")
    kept = len(whole) - len(whole.rstrip("\ufffd"))  # marks before the tail, genuine or written
    marks = len(text) - len(text.rstrip("\ufffd"))  # those and the tail's one (`_lossy_byte_runs`)
    return text[: len(text) - max(marks - kept, 0)], nbytes - len(tail)


def batch_sample_ids(batches: list) -> np.ndarray:
    """int64 [S]: the distinct sample ids this process's `batches` hold (padding, -1, left out), sorted."""
    ids = [np.asarray(b["sample_ids"], np.int64).reshape(-1) for b in batches]
    ids = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
    return ids[ids >= 0]


def heldout_texts(prepared, cfg, batches: list) -> tuple[list[str], list[str], list[bool]]:
    """(prompts, responses, ended) of the held-out samples the models are scored on (those of `batches`, on
    every process), as the teacher scores them: a response that data.truncate cut up to where its tokens stop,
    and the teacher's <eos> (`ended`) only where prepare made one a target."""
    import collections

    from proxykd_jax.data.corpus import iter_corpus

    wanted = set(hosts.allgather(batch_sample_ids(batches)).tolist())
    held = [s for row in iter_corpus(prepared.manifest["sources"], "skip", collections.Counter()) for s in row]
    held = [s for s in held if s.sample_id in wanted and s.prompt is not None]
    cut = {
        int(r["sample_id"]): int(r["response_chars"])
        for r in prepared.iter_split(cfg.eval.split)
        if "response_chars" in r and int(r["sample_id"]) in wanted
    }
    responses = [s.response[: cut.get(s.sample_id, len(s.response))] for s in held]
    # not after an answer cut at max_tokens, nor after one data.truncate cut
    ended = [s.meta.get("finish_reason") != "length" and s.sample_id not in cut for s in held]
    return [s.prompt for s in held], responses, ended


def model_scores(
    name: str, model, batches: list, tokenizer, scorer, teacher, prompts: list[str], *, max_new_tokens: int, seed: int
) -> dict:
    """Everything model `name` takes part in against a teacher with another tokenizer, with only it in
    memory: its nats per byte of the held-out split and, a student's, the teacher's nats per byte of its
    answers to `prompts`."""
    out = {"heldout_nats_per_byte": heldout_nats_per_byte({name: model}, batches, tokenizer, scorer)[name]}
    if name.startswith("student"):
        gen = generation_nats_per_byte(
            {name: model}, prompts, teacher, tokenizer, max_new_tokens=max_new_tokens, seed=seed
        )
        if name in gen:  # (none without prompts or new tokens)
            out["teacher_nats_per_byte_of_generations"] = gen[name]
    return out


def join_metrics(scores: dict, split: str, teacher_floor: float) -> dict:
    """The eval's per-byte metrics from each model's `model_scores` (by name) and the teacher's own nats
    per byte of the same held-out text."""
    return {"units": "per_byte", "split": split, "models": dict(scores), "teacher_nats_per_byte": teacher_floor}


def teacher_nats_per_byte(teacher, prompts: list[str], responses: list[str], ended=None) -> float:
    """The teacher's own nats per byte of held-out text (the floor every model is measured against);
    its <eos> scored after the responses that `ended` (default: all)."""
    ll, nbytes = teacher.text_logprob(prompts, responses, ended=ended)
    return float(-ll.sum() / max(nbytes.sum(), 1))


# ---------------------------------------------------------------------------------------------
# The character teacher's setup.


def top_logprob_fields(teacher, prompts: list[str], responses: list[str], n: int, *, batch: int = 64) -> list[dict]:
    """OpenAI-style `tokens` + `top_logprobs` (with `bytes`) of each response from the teacher's true
    distributions, as its HTTP server sends them; the final <eos> has no entry (as with an API)."""
    pieces = [teacher.tokenizer.decode([i], skip_special_tokens=False) for i in range(teacher.model_config.vocab_size)]
    out = []
    for lo in range(0, len(prompts), batch):
        ps, rs = prompts[lo : lo + batch], responses[lo : lo + batch]
        ctx = [teacher.encode(p) + teacher.encode(r) for p, r in zip(ps, rs)]
        width = -(-max(len(c) for c in ctx) // 16) * 16  # few distinct shapes, few compilations
        tokens = np.zeros((batch, width), np.int32)
        lengths = np.ones(batch, np.int32)
        for i, c in enumerate(ctx):
            tokens[i, : len(c)], lengths[i] = c, len(c)
        q = teacher.distributions(tokens, lengths)
        for i, (p, r) in enumerate(zip(ps, rs)):
            start, r_ids = len(teacher.encode(p)), teacher.encode(r)
            top = []
            for t in range(len(r_ids)):
                dist = q[i, start + t - 1].astype(np.float64)
                top.append(
                    [
                        {
                            "token": pieces[k],
                            "logprob": float(np.log(max(dist[k], 1e-30))),
                            "bytes": list(pieces[k].encode()),
                        }
                        for k in np.argsort(-dist)[:n]
                    ]
                )
            out.append({"tokens": [pieces[t] for t in r_ids], "top_logprobs": top})
    return out


def char_teacher(seed: int, folder: pathlib.Path, *, vocab_size: int, d_model: int, num_layers: int, proxy_cfg, **kw):
    """A character-level known teacher, saved to `folder` atomically (loaded when it exists)."""
    return saved_teacher(
        seed,
        folder,
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        proxy_cfg=proxy_cfg,
        tokenizer="char",
        **kw,
    )


def bpe_from_teacher(teacher, folder: pathlib.Path, vocab_size: int, *, texts: int = 256, seed: int = 0):
    """Our tokenizer: a byte-level BPE trained on `texts` prompts and answers of the teacher (saved
    atomically; loaded when it exists)."""
    from proxykd_jax.models.tokenizer import build_bpe_tokenizer, load_tokenizer

    if (folder / "tokenizer.json").exists():
        return load_tokenizer(folder)
    prompts = teacher.make_prompts(texts, np.random.default_rng(seed + 17))
    answers = [a for group in teacher.sample(prompts, 1, 48, seed=seed + 17) for a in group]

    def write(tmp):
        build_bpe_tokenizer(prompts + answers, vocab_size, tmp)
        return load_tokenizer(tmp)  # as loaded from the folder, on every process

    return save_atomic(write, folder)


def random_proxy(tokenizer, proxy_cfg, folder: pathlib.Path, seed: int) -> None:
    """A randomly initialised proxy (the `proxy` group's shape and numerics) over `tokenizer`, as an HF folder
    (saved atomically; kept when it exists)."""
    from proxykd_jax.models import hf
    from proxykd_jax.models.llama import Llama, ModelConfig

    if (folder / "config.json").exists():
        return
    cfg = ModelConfig.from_config(proxy_cfg)  # every field: a q/k bias or norm, RoPE, eps, tied embeddings
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"proxy.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens.")
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    save_atomic(lambda tmp: hf.save_hf(model, cfg, str(tmp), tokenizer=tokenizer), folder)


def write_corpus(
    teacher, prompts: list[str], path: pathlib.Path, *, samples: int, max_new_tokens: int, top: int, seed: int
):
    """The teacher's answers with their top log-probs and finish reasons as a corpus JSONL (one line per
    sample, `KnownTeacher.corpus_rows`), as `collect` writes it from the HTTP server (the benchmarks'
    shortcut; tests cover the HTTP path)."""
    rows = teacher.corpus_rows([f"p{i:05d}" for i in range(len(prompts))], prompts, samples, max_new_tokens, seed=seed)
    fields = top_logprob_fields(teacher, [r["prompt"] for r in rows], [r["response"] for r in rows], top)
    with open(path, "w") as f:
        for row, extra in zip(rows, fields):
            f.write(json.dumps(row | extra) + "\n")


# ---------------------------------------------------------------------------------------------
# The posterior itself on held-out text (dense float64: for the small vocabularies of benchmarks).


def dense_projection(q_NxV, head_ids_NxH, head_logprobs_NxH, sym_V=None) -> np.ndarray:
    """The posterior after the teacher head, dense float64: `exact` (sym_V None) fixes the head tokens
    and renormalises the rest to the remaining mass; `bytes` is the first-byte I-projection."""
    q = np.asarray(q_NxV, np.float64)
    out = q.copy()
    for i in range(q.shape[0]):
        ok = np.isfinite(head_logprobs_NxH[i])
        if not ok.any():
            continue
        ids, a = np.asarray(head_ids_NxH[i])[ok], np.exp(np.asarray(head_logprobs_NxH[i], np.float64)[ok])
        if sym_V is None:
            rest = np.ones(q.shape[1], bool)
            rest[ids] = False
            out[i, rest] = q[i, rest] / max(q[i, rest].sum(), 1e-300) * max(1 - a.sum(), 0.0)
            out[i, ids] = 0.0
            np.add.at(out[i], ids, a)
            continue
        groups = np.zeros(byte_head.N_SYMBOLS)
        np.add.at(groups, sym_V, q[i])
        mass = np.zeros(byte_head.N_SYMBOLS)
        np.add.at(mass, ids, a)
        r = max(1.0 - mass.sum(), 0.0)
        mass[groups <= 0] = 0.0
        m = mass + r * groups
        m /= m.sum()
        out[i] = q[i] * np.where(groups > 0, m / np.where(groups > 0, groups, 1.0), 0.0)[sym_V]
    return out


def posterior_heldout_nats_per_byte(
    prepared, tables, est: dict, proxy, data_cfg, *, use_head: bool, split: str = "heldout", batch_size: int = 16
) -> float:
    """Nats per byte of `split`'s responses under the posterior (`expected` mode) built as the store is
    (prior tables of the distillation split, queried `external`; the proxy; N_max w; the teacher
    head where `use_head`), in dense float64; w from the estimate's mu and gamma."""
    from proxykd_jax.bayes import weights as weights_lib
    from proxykd_jax.bayes.estimate import response_spans
    from proxykd_jax.data import pipeline
    from proxykd_jax.models.tokenizer import load_tokenizer

    sym = prepared.head_symbols()
    tok = load_tokenizer(prepared.root / "tokenizer")
    n_max, kappa = min(float(est["n_max"]), 1e9), float(est["kappa"])
    base = np.asarray(tables.base_V, np.float64)
    tokens = base.shape[0]  # the proxy over the tokenizer's ids, as the store is built (`estimate.token_logits`)
    fwd = nnx.jit(
        lambda m, b: jax.nn.log_softmax(m(b["tokens"], b["positions"], b["segment_ids"])[..., :tokens], axis=-1)
    )
    nll = total_bytes = 0.0
    seq_len = int(data_cfg.seq_len)
    keys_of = {int(r["sample_id"]): int(r["prompt_key"]) for r in prepared.iter_split(split)}
    for batch in pipeline.iter_samples(prepared, split, data_cfg, batch_size=batch_size, seq_len=seq_len):
        spans = response_spans(batch)
        if not spans:
            continue
        logp = np.asarray(fwd(proxy, {k: batch[k] for k in ("tokens", "positions", "segment_ids")}), np.float64)
        for row, start, t in spans:
            y = np.asarray(batch["targets"][row, start : start + t], np.int64)
            lp = logp[row, start : start + t]
            w = float(weights_lib.sample_weights(lp[np.arange(t), y].mean(), est["mu"], est["gamma"]))
            pr = tables.query(
                np.asarray([keys_of[int(batch["sample_ids"][row, 0])]], np.int64), [y.astype(np.int32)], mode="external"
            )
            a = kappa * np.asarray(pr.floor_N, np.float64)[:, None] * base[None]
            rows = np.arange(t)[:, None]
            np.add.at(a, (np.broadcast_to(rows, pr.ids_NxS.shape), pr.ids_NxS), np.asarray(pr.counts_NxS, np.float64))
            ng = np.asarray(pr.ngram_probs_NxS2, np.float64)
            np.add.at(a, (np.broadcast_to(rows, pr.ngram_ids_NxS2.shape), pr.ngram_ids_NxS2), kappa * ng)
            post = a + n_max * w * np.exp(lp)
            q = post / post.sum(1, keepdims=True)
            if use_head and prepared.has_teacher_head:
                q = dense_projection(
                    q,
                    batch["teacher_topk_ids"][row, start : start + t],
                    batch["teacher_topk_logprobs"][row, start : start + t],
                    sym,
                )
            nll -= float(np.sum(np.log(np.maximum(q[np.arange(t), y], 1e-300))))
            total_bytes += text_bytes(y, tok)
    return nll / max(total_bytes, 1.0)
