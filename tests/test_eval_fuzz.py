"""The eval's scores, fuzzed against independent float64 references on random tiny models and held-out sets.

References: each model's float32 logits for every sample on its own row (unpacked: the sample, then junk tokens a
causal model never reads back), their softmax in float64 numpy; plainly written byte accounting (the UTF-8 bytes
of the response text, an end token adding none but its NLL counting where the response ended); the stored
posterior dense from its top-k and tail as docs/DATA_FORMATS.md stores it (the tail spread evenly over the ids
not stored). The scores: held-out NLL and KL(teacher || model) per response token (averaged over the tokens of
all samples, as README and eval/metrics.py say), the proxy's estimator KL, the teacher's mean log-likelihood per
token of generations, nats per byte of held-out text, of the teacher's own floor and of generations scored by a
character-level teacher, and the estimator KLs of the one-hot label, the prior and the stored posterior. Each is
also scored with another batch size (none dividing the sample count: a padded last batch) on the samples in
another order, or on packed rows. The /tmp fuzz these cases come from ran many more seeds (the session's notes).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_known_cut_generation import reference_generation
from test_nats_per_byte import NLL, _scorer

from proxykd_jax.bayes.prior import PriorTables
from proxykd_jax.data import pipeline
from proxykd_jax.data.store import StoreReader, StoreWriter
from proxykd_jax.eval import metrics as metrics_lib
from proxykd_jax.eval import per_byte
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.tokenizer import build_bpe_tokenizer, build_word_tokenizer
from proxykd_jax.parallel import LOGICAL_RULES
from proxykd_jax.parallel.mesh import make_mesh
from proxykd_jax.teacher.known import CHAR_ALPHABET, KnownTeacher

V = 36  # the teachers' vocabulary (the character teacher's; one shape, one compilation for both)
SEQ = 16  # one-sample rows
WIDTH = 24  # the references' rows: a sample, then junk


@nnx.jit
def _forward(model, rows):
    return model(rows)


def _mesh(shape):
    devices = jax.devices()[: int(np.prod(list(shape.values())))]
    return make_mesh(ml_collections.ConfigDict({"shape": shape}), devices)


def _model(rng, vocab: int, window, max_seq_len: int = 64) -> Llama:
    """A random tiny Llama: random width, depth, heads (grouped-query where kv < heads), tied or not."""
    kv = int(rng.choice([1, 2]))
    cfg = ModelConfig(
        vocab_size=vocab,
        d_model=int(rng.choice([8, 16, 24])),
        num_layers=int(rng.integers(1, 3)),
        num_heads=kv * int(rng.choice([1, 2])),
        num_kv_heads=kv,
        head_dim=int(rng.choice([4, 8])),
        d_ff=16,
        max_seq_len=max_seq_len,
        sliding_window=window,
        tie_embeddings=bool(rng.random() < 0.5),
    )
    model = Llama(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    model.embedding[...] = model.embedding[...] * 3.0  # distributions far from uniform
    return model


def _logp64(model, samples, rng, vocab=None) -> list[np.ndarray]:
    """float64 log-probs [n, V] of each sample's inputs (its tokens but the last), each on a row of its own."""
    width = max(WIDTH, *(len(tokens) for _, tokens, _ in samples))
    rows = rng.integers(4, model.cfg.vocab_size, (max(len(samples), 8), width)).astype(np.int32)
    for i, (_, tokens, _) in enumerate(samples):
        rows[i, : len(tokens) - 1] = tokens[:-1]
    logits = np.asarray(_forward(model, jnp.asarray(rows)), np.float64)[..., :vocab]
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return [logp[i, : len(tokens) - 1] for i, (_, tokens, _) in enumerate(samples)]


def _kl64(logq, logp) -> np.ndarray:
    q = np.exp(logq)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sum(np.where(q > 0, q * (logq - logp), 0.0), -1)


def _rows(samples, batch_size: int) -> list[dict]:
    """One sample per row as `pipeline.iter_samples` lays it out (`_PadBatch`), the last batch padded with
    empty rows. samples: (sample id, tokens, prompt length)."""
    collate = pipeline._PadBatch(batch_size, SEQ, 0)
    out = []
    for lo in range(0, len(samples), batch_size):
        examples = []
        for sid, tokens, p in samples[lo : lo + batch_size]:
            tokens = np.asarray(tokens, np.int32)
            mask = (np.arange(len(tokens)) >= p).astype(np.float32)
            ex = {"tokens": tokens[:-1], "targets": tokens[1:], "loss_mask": mask[1:]}
            examples.append(ex | {"sample_ids": np.full(len(tokens) - 1, sid, np.int64)})
        out.append(collate(examples))
    return out


def _packed(samples, rows: int, width: int) -> dict:
    """The samples packed first fit into `rows` rows (segments 1, 2, ..., positions restarting)."""
    out = {k: np.zeros((rows, width), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    out["loss_mask"], out["sample_ids"] = np.zeros((rows, width), np.float32), np.full((rows, width), -1, np.int64)
    fill = np.zeros(rows, int)
    for sid, tokens, p in samples:
        n = len(tokens) - 1
        r = int(np.flatnonzero(fill + n <= width)[0])
        at = slice(fill[r], fill[r] + n)
        out["tokens"][r, at], out["targets"][r, at] = tokens[:-1], tokens[1:]
        out["loss_mask"][r, at] = np.arange(1, n + 1) >= p
        out["segment_ids"][r, at] = out["segment_ids"][r].max() + 1
        out["positions"][r, at], out["sample_ids"][r, at] = np.arange(n), sid
        fill[r] += n
    return out


def _samples(rng, vocab: int, count: int, eos: int) -> list[tuple]:
    """Random samples: a prompt of 1-5 tokens, a response of 1-8, ended (its eos a target) or cut."""
    out = []
    for i in range(count):
        p, r = int(rng.integers(1, 6)), int(rng.integers(1, 9))
        tokens = rng.integers(4, vocab, p + r).tolist() + ([eos] if rng.random() < 0.6 else [])
        out.append((3 * i + 1, tokens, p))
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return KnownTeacher.create(
        3, vocab_size=V, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32, max_seq_len=64,
        eos_rate=0.2, folder=tmp_path_factory.mktemp("teacher"),
    )  # fmt: skip


@pytest.mark.parametrize(
    "seed, window, pad, mesh, sizes",
    [(0, 3, 3, {"data": 1, "fsdp": 1, "tensor": 1}, (3, 5)), (1, None, 0, {"data": 2, "fsdp": 2, "tensor": 2}, (4, 8))],
    ids=["window-padded-vocab", "sharded"],
)
def test_token_scores_match_float64(teacher, seed, window, pad, mesh, sizes):
    """Held-out NLL and KL per token, the proxy's estimator KL and the teacher's log-likelihood of generations
    agree with float64 to 1e-5, whatever the batch size (7 samples: a padded last batch), the order of the samples,
    or packing (the NLL)."""
    rng = np.random.default_rng(seed)
    model = _model(rng, V + pad, window)
    samples = _samples(rng, V, 7, teacher.eos_id)
    assert len({tokens[-1] == teacher.eos_id for _, tokens, _ in samples}) == 2  # ended and cut responses
    nll = kl = count = 0.0
    for (_, tokens, p), lp, lq in zip(samples, _logp64(model, samples, rng, V), _logp64(teacher.model, samples, rng)):
        at, y = np.arange(p - 1, len(tokens) - 1), np.asarray(tokens[p:])
        nll, kl, count = nll - lp[at, y].sum(), kl + _kl64(lq[at], lp[at]).sum(), count + len(at)
    want = {"heldout_nll": nll / count, "kl_to_teacher": kl / count}
    scorer = metrics_lib.Scorer(_mesh(mesh), LOGICAL_RULES, vocab=V)
    shuffled = [samples[i] for i in rng.permutation(len(samples))]
    for order, size in ((samples, sizes[0]), (shuffled, sizes[1])):
        got = metrics_lib.model_metrics({"m": model}, _rows(order, size), teacher, scorer)["m"]
        assert got == pytest.approx(want, rel=1e-5)
    est = metrics_lib.proxy_estimator_kl(model, teacher, _rows(samples, sizes[0]), scorer)
    assert est == {"kl": pytest.approx(want["kl_to_teacher"], rel=1e-5), "positions": count}
    packed = _packed(samples, 4, 32)
    assert packed["segment_ids"].max() > 1  # several samples share a row
    got = metrics_lib.model_metrics({"m": model}, [packed], None, scorer)["m"]["heldout_nll"]
    assert got == pytest.approx(want["heldout_nll"], rel=1e-5)
    if mesh["data"] > 1:
        return  # generations run on no mesh
    # the teacher's mean log-likelihood per token of a student's answers, their eos where they stopped: the teacher's
    # own (answers that stop; a random student's, with the character teacher below)
    student = teacher.model
    prompts = [np.asarray(tokens[:p], np.int32) for _, tokens, p in samples]
    got = metrics_lib.generation_metrics({"s": student}, prompts, teacher, max_new_tokens=3, seed=seed)["s"]
    answers = metrics_lib.sample_answers(
        student, prompts, teacher.tokenizer, teacher.eos_id, max_new_tokens=3, seed=seed
    )
    assert len({a[-1] == teacher.eos_id for a in answers}) == 2  # ended and cut answers
    contexts = [(0, list(p) + a + [0], len(p)) for p, a in zip(prompts, answers)]
    lls = [
        lq[np.arange(p - 1, len(c) - 2), c[p:-1]]
        for (_, c, p), lq in zip(contexts, _logp64(teacher.model, contexts, rng))
    ]
    assert got == pytest.approx(np.concatenate(lls).mean(), rel=1e-5)


def _byte_of():
    """GPT-2's byte-to-character map (a byte-level BPE's token strings), inverted."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = bs + [256 + i for i in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    return {chr(c): b for b, c in zip(bs, chars)}


def test_per_byte_scores_match_float64_on_a_char_teacher_and_bpe_student(tmp_path):
    """Nats per byte of held-out text (two batch sizes, shuffled), the character teacher's floor and its nats per
    byte of a byte-level BPE student's generations, on text with two-byte characters."""
    rng = np.random.default_rng(5)
    teacher = KnownTeacher.create(
        4, vocab_size=36, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32, max_seq_len=64,
        tokenizer="char", eos_rate=0.2, folder=tmp_path / "teacher",
    )  # fmt: skip
    alphabet = list(CHAR_ALPHABET[:32])
    assert {"é", "ü", "ß"} <= set(alphabet)
    text = lambda lo, hi: "".join(rng.choice(alphabet, int(rng.integers(lo, hi))))  # noqa: E731
    tok = build_bpe_tokenizer([text(5, 30) for _ in range(100)], 300, tmp_path / "bpe")
    model = _model(rng, len(tok) + 4, None)
    prompts = [text(1, 6) for _ in range(6)]
    responses, ended = [text(1, 7) for _ in range(6)], [bool(e) for e in rng.random(6) < 0.5]
    assert any(len(r.encode()) > len(r) for r in responses) and any(ended) and not all(ended)
    samples = []
    for i, (p, r, e) in enumerate(zip(prompts, responses, ended)):
        p_ids, r_ids = tok(p)["input_ids"], tok(r, add_special_tokens=False)["input_ids"]
        samples.append((i, p_ids + r_ids + [tok.eos_token_id] * e, len(p_ids)))
    nll = -sum(
        lp[np.arange(p - 1, len(t) - 1), t[p:]].sum()
        for (_, t, p), lp in zip(samples, _logp64(model, samples, rng, len(tok)))
    )
    want = nll / sum(len(r.encode("utf-8")) for r in responses)
    scorer = metrics_lib.Scorer(_mesh({"data": 1, "fsdp": 1, "tensor": 1}), LOGICAL_RULES, vocab=len(tok))
    for order, size in ((samples, 4), ([samples[i] for i in rng.permutation(6)], 5)):
        assert per_byte.heldout_nats_per_byte({"m": model}, _rows(order, size), tok, scorer)["m"] == pytest.approx(
            want, rel=1e-5
        )

    def teacher_ll(prompt, texts, ends):
        """float64 log-likelihood of each text (its <eos> where it ended) and its bytes; as `text_logprob`, a
        token's probability floored at 1e-30 (float32 probabilities of a character the teacher never writes)."""
        ctx = [
            (0, teacher.encode(p) + teacher.encode(t) + [teacher.eos_id] * e + [0], len(teacher.encode(p)))
            for p, t, e in zip(prompt, texts, ends)
        ]
        lls = [
            np.maximum(lq[np.arange(p - 1, len(c) - 2), c[p:-1]], np.log(1e-30)).sum()
            for (_, c, p), lq in zip(ctx, _logp64(teacher.model, ctx, rng))
        ]
        return sum(lls), sum(len(t.encode("utf-8")) for t in texts)

    ll, nbytes = teacher_ll(prompts, responses, ended)
    assert per_byte.teacher_nats_per_byte(teacher, prompts, responses, ended) == pytest.approx(-ll / nbytes, rel=1e-5)
    got = per_byte.generation_nats_per_byte({"s": model}, prompts, teacher, tok, max_new_tokens=6, seed=0)["s"]
    stops = (tok.eos_token_id,)
    answers = metrics_lib.sample_answers(
        model, [tok(p)["input_ids"] for p in prompts], tok, stops, max_new_tokens=6, seed=0
    )
    byte_of, special = _byte_of(), set(tok.all_special_ids)
    texts = [
        b"".join(bytes(byte_of[c] for c in tok.convert_ids_to_tokens(i)) for i in a if i not in special)
        for a in answers
    ]
    ends = [a[-1] in stops for a in answers]
    refs = [reference_generation(t, e) for t, e in zip(texts, ends)]  # (a cut answer: up to its last whole character)
    ll, _ = teacher_ll(prompts, [t for t, _ in refs], ends)
    assert got == pytest.approx(-ll / sum(n for _, n in refs), rel=1e-5)


def test_estimator_kl_matches_float64_from_the_stored_top_k_and_tail(teacher, tmp_path):
    """The one-hot, prior and stored-posterior KLs on random stores (absent entries, each value dtype's
    rounding read back as stored; the prior's own token counted 0, 1 or a weight between, as estimate.json
    says), and an infinite KL, not a floored number, where a stored row gives no
    probability to a token the teacher writes (no tail mass)."""
    rng = np.random.default_rng(7)
    samples = _samples(rng, V, 9, teacher.eos_id)
    keys = {sid: int(rng.integers(3)) for sid, _, _ in samples}  # prompts shared by several responses
    responses = [np.asarray(t[p:], np.int32) for _, t, p in samples]
    tables = PriorTables.build(np.asarray([keys[s] for s, _, _ in samples]), responses, vocab_size=V, order=3)
    prepared = types.SimpleNamespace(
        iter_split=lambda split: [{"sample_id": s, "prompt_key": k} for s, k in keys.items()]
    )
    lqs = _logp64(teacher.model, samples, rng)
    for case, (value_dtype, k, no_tail) in enumerate(
        [("uint8", 6, False), ("float32", 3, False), ("float32", 3, True)]
    ):
        with StoreWriter(
            tmp_path / f"store{case}", k=k, vocab_size=V, tokenizer_hash="h", value_dtype=value_dtype
        ) as w:
            for (sid, _, _), y in zip(samples, responses):
                p = rng.dirichlet(np.full(k + 1, 0.5), len(y))
                lps = np.where(rng.random((len(y), k)) < 0.2, -np.inf, np.log(p[:, :k]))
                lps = -np.sort(-lps, 1)
                tail = np.zeros(len(y)) if no_tail else 1 - np.exp(lps).sum(1)
                w.add(sid, np.stack([rng.choice(V, k, replace=False) for _ in y]), lps, tail)
        store = StoreReader(tmp_path / f"store{case}")
        kappa, own = float(rng.uniform(0.2, 4)), [0.0, 1.0, float(rng.uniform(0.1, 0.9))][case]
        # what estimate.json says: recorded before posterior.own_token had weights, or with a weight
        estimate = {"kappa": kappa, "count_own_token": bool(own)} if case < 2 else {"kappa": kappa, "own_weight": own}
        sums = dict.fromkeys(("one-hot (smoothed)", "prior", "posterior (store)"), 0.0)
        for (sid, _, p), y, lq in zip(samples, responses, lqs):
            lq, n = lq[p - 1 :], len(y)
            entry, one_hot, dense = store.get(sid), np.full((n, V), 0.1 / V), np.zeros((n, V))
            one_hot[np.arange(n), y] += 0.9
            for t in range(n):
                ok = np.isfinite(entry.logprobs_TxK[t])
                dense[t] = float(entry.tail_T[t]) / (V - ok.sum())
                dense[t, entry.ids_TxK[t][ok]] = np.exp(entry.logprobs_TxK[t][ok].astype(np.float64))
            prior = tables.query(np.asarray([keys[sid]]), [y], mode="leave_one_out")
            a = kappa * np.asarray(prior.floor_N, np.float64)[:, None] * tables.base_V[None]
            a[np.arange(n), y] += own  # the own token's count, on top of the others'
            for t in range(n):
                np.add.at(a[t], prior.ngram_ids_NxS2[t], kappa * np.asarray(prior.ngram_probs_NxS2[t], np.float64))
                np.add.at(a[t], prior.ids_NxS[t], np.asarray(prior.counts_NxS[t], np.float64))
            with np.errstate(divide="ignore"):
                for name, e in (
                    ("one-hot (smoothed)", one_hot),
                    ("prior", a / a.sum(1, keepdims=True)),
                    ("posterior (store)", dense),
                ):
                    sums[name] += _kl64(lq, np.log(e)).sum()
        count = sum(len(y) for y in responses)
        for size in (2, 4):
            got = metrics_lib.reference_estimator_kl(prepared, tables, store, teacher, estimate, _rows(samples, size))
            assert got == pytest.approx({name: s / count for name, s in sums.items()} | {"positions": count}, rel=1e-5)
        assert np.isinf(got["posterior (store)"]) == no_tail


def test_packed_rows_count_each_responses_bytes_once(tmp_path):
    """Bytes of packed rows are their responses' UTF-8 bytes, as with one sample per row: each response decoded on
    its own (a word tokenizer decoding two as one text would put a space between them)."""
    tok = build_word_tokenizer([f"w{i}" for i in range(20)] + ["wé"], tmp_path / "tok")
    responses, ended = ["w1 w2 w3", "w10 wé", "w7", "wé"], [True, False, True, True]
    samples = []
    for i, (p, r, e) in enumerate(zip(["w5 w6", "w7", "w8 w9", "w1"], responses, ended)):
        p_ids, r_ids = tok.encode(p, add_special_tokens=False), tok.encode(r, add_special_tokens=False)
        samples.append((i, p_ids + r_ids + [tok.eos_token_id] * e, len(p_ids)))
    nbytes, targets = sum(len(r.encode()) for r in responses), sum(len(r.split()) + e for r, e in zip(responses, ended))
    packed = _packed(samples, 2, 16)
    assert packed["segment_ids"].max() > 1
    assert sum(per_byte.target_bytes(b, tok) for b in _rows(samples, 3)) == per_byte.target_bytes(packed, tok) == nbytes
    got = per_byte.heldout_nats_per_byte({"m": None}, [packed], tok, _scorer)["m"]
    assert got == pytest.approx(NLL * targets / nbytes)
