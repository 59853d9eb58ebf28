"""Seeded fuzzing of the cross-tokenizer alignment (data/align.py, data/teacher_positions.py; docs/TOKENIZERS.md,
docs/DATA_FORMATS.md): teacher samples from a byte-level BPE teacher trained on other text than ours (another
vocabulary size), or from our own tokenizer, checked against a reference written from the docs.

A sample: a random answer (ASCII words, CJK, emoji, combining marks, digits, newlines, runs of spaces) tokenised by
the teacher (emoji split across byte tokens where its vocabulary lacks them); now and then bytes that are not UTF-8
between its tokens (the text holds U+FFFD for them), special tokens the text leaves out (empty bytes, as vLLM sends
them) and a stop token at the end; each position a random top-k (k 1..20) of teacher tokens with random log-probs,
the sampled token among them or not. The layouts vary what the corpus gives (`tokens`, `token_bytes`, the
alternatives' `bytes`) and how a token of part of a UTF-8 character is spelled (`bytes:\\xNN`, as OpenAI, or U+FFFD,
as vLLM); the configurations data.teacher_head, data.add_eos, data.teacher_topk and a data.seq_len that truncates.

The reference: where the corpus spells each sampled token's bytes the span of each teacher token is known (replaced
bytes: their first token spans their replacement characters, the others none; a left-out special token none; the
stop token the empty span at the end); elsewhere the chain the code read must be a reading of each position. A
position goes on the one of our tokens with its span (`exact`: each alternative on our token of exactly its bytes, a
special one by its name, the stop alternative on our end row) or starting there (`bytes`: probabilities summed by
first byte, end of text 256, other special tokens on none). Left out of the checks here: how many positions a token
spelled U+FFFD without bytes keeps (placed only where every reading of it agrees; tests/test_teacher_span_replaced.py
checks those spans against every reading), and replaced bytes without `tokens` and `token_bytes`, which still stop
the chain where the text holds fewer replacement characters than the tokens spell (docs/DATA_FORMATS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
from tokenizers import AddedToken

from proxykd_jax.data import align, byte_head, teacher_positions
from proxykd_jax.data.corpus import Sample
from proxykd_jax.models.tokenizer import build_bpe_tokenizer
from proxykd_jax.teacher.responses import token_bytes_of

END = byte_head.END_SYMBOL
STOPS = ("<|im_end|>", "<|endoftext|>", "<eos>", "")  # stop tokens a teacher lists at the end (empty bytes)
LEFT_OUT = ("<|im_start|>", "<bos>", "<start_of_turn>")  # special tokens sampled mid-answer, not in the text
INVALID = (b"\xf0\x9f\x98", b"\xf0\x9f", b"\xe4\xb8", b"\x80", b"\xff", b"\xc3")  # never UTF-8 before a character
LAYOUTS = ("full", "tokens", "tokens_alt_bytes", "bytes_only", "alt_bytes", "bare")  # `tokens` given in the first 3
SEQ_LEN = 512
# (data.teacher_head, data.add_eos, data.teacher_topk, data.seq_len: 24 truncates long answers); `exact` ones first
CONFIGS = [(h, eos, k, n) for h in align.HEADS for eos in (True, False) for k in (20, 4) for n in (SEQ_LEN, 24)]


def random_text(rng: np.random.Generator, pieces: int) -> str:
    """`pieces` random pieces of text: words, CJK, emoji (ZWJ-joined now and then), combining marks, newlines,
    runs of spaces and tabs, punctuation, numbers."""
    out = []
    for kind in rng.choice(12, size=pieces):
        if kind < 5:
            out.append(" " * (rng.random() < 0.8) + "".join(rng.choice(list("etaoinshrdlucmwfgy"), rng.integers(1, 8))))
        elif kind == 5:
            out.append("".join(chr(0x4E00 + int(c)) for c in rng.integers(0, 40, rng.integers(1, 4))))
        elif kind == 6:
            out.append("\u200d"[: rng.random() < 0.3].join(chr(0x1F600 + int(c)) for c in rng.integers(0, 80, 2)))
        elif kind == 7:
            out.append(str(rng.choice(list("eaon"))) + str(rng.choice(["\u0301", "\u0308", "\u0303"])))
        elif kind == 8:
            out.append(str(rng.choice(["\n", "\n\n", "\r\n"])))
        elif kind == 9:
            out.append(" " * int(rng.integers(2, 6)) + "\t" * (rng.random() < 0.3))
        elif kind == 10:
            out.append(str(rng.choice([".", ",", "!", "?", ":", "'s", '"', "(", ")"])))
        else:
            out.append(f" {rng.integers(0, 10_000)}")
    return "".join(out)


@functools.cache
def tokenizers_pair():
    """(ours, the teacher's): byte-level BPEs of 360 and 700 tokens trained on different random text; ours also
    holds `<|im_end|>` (an added special token: where an empty-bytes alternative of that name maps)."""
    ours = build_bpe_tokenizer([random_text(np.random.default_rng(i), 30) for i in range(60)], 360)
    ours.add_tokens([AddedToken("<|im_end|>", special=True)])
    rng = np.random.default_rng(1000)
    teacher = build_bpe_tokenizer([random_text(rng, 60) + "😀😁中文" for _ in range(120)], 700)
    return ours, teacher


@functools.cache
def _table(tok) -> list[bytes | None]:
    return byte_head.token_bytes(tok)


@dataclasses.dataclass
class Case:
    sample: Sample
    raws: list[bytes]  # the true bytes of each teacher token (b"" for the special tokens)
    spans: list[tuple[int, int] | None]  # the reference span of each teacher token
    known: int  # how many positions from the start the corpus spells exactly (`tokens` / `token_bytes`)


def _spell(raw: bytes, name: str, spelling: str) -> str:
    """An API's token string: the special token's name, else the text, else `bytes:\\xNN` or U+FFFD."""
    try:
        return raw.decode("utf-8") if raw else name
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw) if spelling == "openai" else raw.decode(errors="replace")


def make_case(rng: np.random.Generator, teacher, layout: str, spelling: str, clean: bool) -> Case:
    """A random teacher sample (`clean`: no replaced bytes nor left-out tokens, the sampled token an alternative)."""
    table = _table(teacher)
    vocab = [i for i, b in enumerate(table) if b]
    text = ""
    while not text.strip():
        text = random_text(rng, int(rng.integers(1, 14)))
    toks = [(table[i], "", "text") for i in teacher(text, add_special_tokens=False)["input_ids"]]  # (bytes, name, kind)
    if not clean:
        whole, bounds = b"", [0]  # the start, and after each token that ends a character
        for k, (raw, _, _) in enumerate(toks):
            whole += raw
            bounds += [k + 1] * (whole.decode(errors="ignore").encode() == whole)
        for at in sorted(rng.choice(bounds, min(len(bounds), int(rng.integers(0, 3))), replace=False))[::-1]:
            run = INVALID[int(rng.integers(len(INVALID)))]
            left_out = [(b"", str(rng.choice(LEFT_OUT)), "")]  # (kind "": a special token the text leaves out)
            toks[at:at] = [(bytes([b]), "", "run") for b in run] if rng.random() < 0.5 else left_out
    if rng.random() < 0.5:
        toks.append((b"", str(rng.choice(STOPS)), "stop"))
    raws = [raw for raw, _, _ in toks]
    resp = b"".join(raws).decode(errors="replace").encode()
    spans, c, k = [], 0, 0
    while k < len(toks):
        m = k + 1
        while toks[k][2] == "run" and m < len(toks) and toks[m][2] == "run":
            m += 1
        replaced = b"".join(raws[k:m]).decode(errors="replace").encode()  # (a run: its replacement characters)
        width = len(replaced if toks[k][2] == "run" else raws[k])
        spans += [None if toks[k][2] == "" else (c, c + width)] + [None] * (m - k - 1)
        c, k = c + width, m
    tokens, alts, alt_raws = [], [], []
    for (raw, name, _), span in zip(toks, spans):
        tokens.append(_spell(raw, name, spelling))
        cands = {raw or name: raw} if clean or rng.random() < 0.85 else {}  # by bytes, or a special token's name
        if span is not None and span[0] < len(resp):  # tokens that continue the text there
            for i in rng.permutation([i for i in vocab if resp.startswith(table[i], span[0])])[: rng.integers(0, 4)]:
                cands.setdefault(table[i], table[i])
        size = int(rng.integers(1, 21))
        while len(cands) < size:
            other = str(rng.choice(STOPS + LEFT_OUT)) if rng.random() < 0.1 else table[int(rng.choice(vocab))]
            cands.setdefault(other, other if isinstance(other, bytes) else b"")
        keys = list(cands)[:size]
        p = rng.dirichlet(np.full(len(keys) + 1, float(rng.choice([0.3, 1.0, 3.0]))))[rng.permutation(len(keys))]
        if len(keys) == 1 and rng.random() < 0.3:
            p[0] = 1.0  # log-prob 0: the API is sure
        pos = sorted(zip(keys, np.log(p).tolist()), key=lambda kv: -kv[1])
        alts.append([(_spell(cands[key], key if isinstance(key, str) else "", spelling), lp) for key, lp in pos])
        alt_raws.append([cands[key] for key, _ in pos])
    with_tokens, with_bytes = layout in LAYOUTS[:3], layout in ("full", "bytes_only")
    known = 0
    while (with_tokens or with_bytes) and known < len(toks):
        if not (with_bytes or toks[known][2] in ("", "stop") or bytes(token_bytes_of(tokens[known])) == raws[known]):
            break
        known += 1
    alt_bytes = alt_raws if layout in ("full", "tokens_alt_bytes", "bytes_only", "alt_bytes") else None
    sample = Sample(
        "fuzz:1",
        "f",
        0,
        "p",
        None,
        resp.decode(),
        tokens if with_tokens else None,
        alts,
        {},
        raws if with_bytes else None,
        alt_bytes,
    )
    if not with_tokens and toks[-1][2] == "":
        spans[-1] = (c, c)  # without `tokens` an empty last token is read as the end (its alternatives decide)
    return Case(sample, raws, spans, known)


# --- the reference ---


def _ref_bytes(text: str, raw: bytes | None) -> bytes:
    return raw if raw is not None else bytes(token_bytes_of(text))


def _ref_symbol(text: str, raw: bytes | None) -> int | None:
    """First byte; END for the empty string or an end-of-text name; None for another special token (empty bytes,
    a known name) or a leading U+FFFD without bytes (its first byte unknown)."""
    if text in byte_head.END_STRINGS or (not text and not raw):
        return END
    if raw == b"" or (text in LEFT_OUT and raw in (None, text.encode())) or (raw is None and text[0] == "\ufffd"):
        return None
    return _ref_bytes(text, raw)[0]


def _stop_index(s: Sample, i: int, raws) -> int | None:
    """The stop alternative: the likeliest of the sampled token's string (given `tokens`), else of end of text."""
    alts, tok = s.teacher_alts[i], s.teacher_tokens[i] if s.teacher_tokens is not None else None
    named = [j for j, (t, _) in enumerate(alts) if t == tok]
    ends = named or [j for j, ((t, _), r) in enumerate(zip(alts, raws)) if _ref_symbol(t, r) == END]
    return max(ends, key=lambda j: alts[j][1], default=None)


@functools.cache
def _ours_by(ours) -> tuple[dict[bytes, int], dict[str, int]]:
    """Our tokens by their bytes, and our special tokens (no bytes) by name."""
    table = _table(ours)
    return {b: i for i, b in enumerate(table) if b}, {t: i for t, i in ours.get_vocab().items() if table[i] is None}


def _ref_alt_id(ours, text: str, raw: bytes | None) -> int:
    by_bytes, named = _ours_by(ours)
    if raw == b"" or (raw is None and text in named):
        return named.get(text, -1)
    return by_bytes.get(_ref_bytes(text, raw), -1)


def reference_heads(ours, case: Case, spans, e, head: str, end_row: bool, k: int) -> dict[int, dict[int, float]]:
    """{row: {id or symbol: probability}} of each kept position, from the teacher spans `spans` (`end_row`: our
    end token was appended; `k`: data.teacher_topk)."""
    s, P, n, table = case.sample, e.prompt_len, len(e.tokens_L), _table(ours)
    r_ids = e.tokens_L[P : n - end_row].tolist()
    starts = np.cumsum([0] + [len(table[t]) for t in r_ids]).tolist()
    resp = s.response.encode()
    assert resp.startswith(b"".join(table[t] for t in r_ids))  # (all of it unless truncated)
    row_of_span = {sp: P + j for j, sp in enumerate(zip(starts[:-1], starts[1:]))}  # (byte-level: spans distinct)
    row_at = {b: P + j for j, b in enumerate(starts[:-1])} | ({len(resp): n - 1} if end_row else {})
    out = {}
    for i, span in enumerate(spans):
        if span is None:
            continue
        alts = s.teacher_alts[i]
        raws = s.teacher_alt_bytes[i] if s.teacher_alt_bytes is not None else [None] * len(alts)
        merged: dict[int, float] = {}
        if head == "exact":
            stop = _stop_index(s, i, raws) if span[0] == span[1] else None
            if span[0] == span[1] and (not end_row or (stop is None and s.teacher_tokens is None)):
                continue
            row = n - 1 if span[0] == span[1] else row_of_span.get(span)
            keys = [
                ours.eos_token_id if j == stop else _ref_alt_id(ours, t, r)
                for j, ((t, _), r) in enumerate(zip(alts, raws))
            ]
        else:
            row, keys = row_at.get(span[0]), [_ref_symbol(t, r) for (t, _), r in zip(alts, raws)]
            if row == n - 1 and end_row and s.teacher_tokens is None and END not in keys:
                continue
        if row is None:
            continue
        for key, (_, lp) in zip(keys, alts):
            if key is not None and key >= 0:
                merged[key] = merged.get(key, 0.0) + math.exp(lp)
        out[row] = dict(sorted(merged.items(), key=lambda kv: -kv[1])[:k])
    return out


def got_heads(e) -> dict[int, dict[int, float]]:
    """{row: {id or symbol: probability}} of the rows of `e` that hold a head."""
    out, ok = {}, np.isfinite(e.teacher_topk_logprobs_LxK)
    for row in np.flatnonzero(ok.any(1)).tolist():
        ids, lps = e.teacher_topk_ids_LxK[row][ok[row]].tolist(), e.teacher_topk_logprobs_LxK[row][ok[row]]
        assert ok[row][: len(ids)].all() and (np.diff(lps) <= 0).all() and len(set(ids)) == len(ids), row
        out[row] = dict(zip(ids, np.exp(lps.astype(np.float64)).tolist()))
    return out


def violations(ours, case: Case, e, head: str, end_row: bool, k: int, clean: bool) -> list[str]:
    """What in the encoded sample `e` breaks the docs' promises (empty: nothing)."""
    s, out = case.sample, []
    resp, spans, n_pos = s.response.encode(), teacher_positions._teacher_byte_spans(s), len(s.teacher_alts)
    raws_of = [s.teacher_alt_bytes[i] if s.teacher_alt_bytes else [None] * len(a) for i, a in enumerate(s.teacher_alts)]
    c = 0
    for i, span in enumerate(spans):  # monotone, in the text, and each a reading of its position
        if span is not None:
            text = resp[span[0] : span[1]]
            readings = {_ref_bytes(t, r) for (t, _), r in zip(s.teacher_alts[i], raws_of[i])} | {case.raws[i], b""}
            if span[0] < c or span[1] < span[0] or span[1] > len(resp):
                out.append(f"span {i} {span} after {c}")
            elif text not in readings and set(text.decode(errors="replace")) != {"\ufffd"}:
                out.append(f"span {i} {span} spells none of the position's readings")
            c = span[1]
    if any(spans[i] not in (None, case.spans[i]) for i in range(case.known)) or (
        case.known == n_pos and spans != case.spans
    ):
        out.append(f"spans {spans}, the reference {case.spans} (known {case.known})")
    readable = s.teacher_alt_bytes is not None or not any("\ufffd" in t for pos in s.teacher_alts for t, _ in pos)
    if clean and readable and s.teacher_tokens is None and None in spans:
        out.append(f"the chain stopped in a clean sample: {spans}")
    want = reference_heads(ours, case, case.spans if case.known == n_pos else spans, e, head, end_row, k)
    got, kept = got_heads(e), len(want)  # (a kept position with no alternative mapped writes no head)
    want = {row: w for row, w in want.items() if w}
    for row in sorted(set(want) | set(got)):
        w, g = want.get(row, {}), got.get(row, {})
        if w.keys() != g.keys() or not np.allclose([g[x] for x in w], list(w.values()), rtol=2e-6, atol=0):
            out.append(f"row {row}: head {g}, the reference {w}")
        if sum(g.values()) > 1 + 2e-6:
            out.append(f"row {row}: mass {sum(g.values())} > 1")
    st, P, n = e.stats, e.prompt_len, len(e.tokens_L)
    n_resp = n - P - end_row
    checks = {
        "positions_total": st.positions_total == n_pos,
        "positions_kept": st.positions_kept == kept,
        "mass_total": math.isclose(
            st.mass_total, sum(math.exp(lp) for a in s.teacher_alts for _, lp in a), rel_tol=1e-9
        ),
        "mass_kept": math.isclose(st.mass_kept, sum(sum(g.values()) for g in got.values()), rel_tol=1e-5, abs_tol=1e-9),
        "mass_order": st.mass_kept <= st.mass_matched * (1 + 1e-9) + 1e-12 <= st.mass_total * (1 + 1e-9) + 2e-12,
        "student_total": st.student_positions_total == n_resp,
        "student_covered": st.student_positions_covered == sum(P <= r < P + n_resp for r in got),
        "rows": all(P <= r < n for r in got),
    }
    return out + [f"stats: {name} ({dataclasses.asdict(st)})" for name, ok in checks.items() if not ok]


@functools.cache
def _encoder(ours, head: str, add_eos: bool, k: int, seq_len: int) -> align.SampleEncoder:
    return align.SampleEncoder(ours, seq_len=seq_len, teacher_topk=k, head=head, add_eos=add_eos, truncate=True)


def draw(seed: int, count: int, same: bool = False) -> list[tuple[Case, str, str, bool, tuple]]:
    """`count` random samples: (case, layout, spelling, clean, an `exact` configuration). `same`: the teacher's
    tokenizer is ours (the `exact` head at the defaults, the `tokens` layouts, clean samples 70%)."""
    ours, teacher = tokenizers_pair()
    rng, out = np.random.default_rng(seed), []
    for _ in range(count):
        layout, spelling = str(rng.choice(LAYOUTS[: 3 if same else 6])), str(rng.choice(["openai", "vllm"]))
        clean = rng.random() < (0.7 if same else 0.25)
        case = make_case(rng, ours if same else teacher, layout, spelling, clean)
        if not same and rng.random() < 0.15:
            case.sample.meta["finish_reason"] = "length"
        out.append((case, layout, spelling, clean, CONFIGS[0 if same else int(rng.integers(len(CONFIGS) // 2))]))
    return out


def fuzz(seed: int, count: int, same: bool = False) -> list[tuple[int, str, str, tuple, list[str]]]:
    """`draw`'s samples through both heads, a batch per configuration: (sample, layout, spelling, configuration,
    violations) of each that breaks a promise (a traceback too). `same`: clean samples keep every `exact` position
    (where the corpus spells every sampled token's bytes)."""
    ours, _ = tokenizers_pair()
    cases, batches, bad = draw(seed, count, same), {}, []
    for j, (*_, config) in enumerate(cases):
        for head in align.HEADS:
            batches.setdefault((head,) + config[1:], []).append(j)
    for config, idx in batches.items():
        encode = _encoder(ours, *config).encode_batch
        try:
            encoded = encode([cases[j][0].sample for j in idx])
        except Exception:  # found again sample by sample
            encoded = [None] * len(idx)
        for j, e in zip(idx, encoded):
            case, layout, spelling, clean, _ = cases[j]
            try:
                e = e or encode([case.sample])[0]
                end_row = config[1] and case.sample.meta.get("finish_reason") != "length" and not e.truncated
                problems = violations(ours, case, e, config[0], end_row, config[2], clean)
                spelled = layout == "full" or spelling == "openai"  # (U+FFFD tokens without bytes: unreadable)
                if same and clean and spelled and e.stats.positions_kept != e.stats.positions_total:
                    problems.append(f"same tokenizer: kept {e.stats.positions_kept} of {e.stats.positions_total}")
            except Exception as err:
                problems = [f"raised {type(err).__name__}: {err}"]
            if problems:
                bad.append((j, layout, spelling, config, problems))
    return bad


# --- the tests ---


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_other_tokenizer(seed):
    """100 samples of a teacher with its own tokenizer per seed, both heads: no promise broken, no traceback."""
    assert fuzz(seed, 100) == []


@pytest.mark.parametrize("seed", range(2))
def test_fuzz_same_tokenizer(seed):
    """The teacher's tokenizer is ours: also every `exact` position of a clean sample kept (where the corpus spells
    each sampled token's bytes), at exactly the teacher's probabilities of the same ids (the reference maps by
    bytes)."""
    assert fuzz(seed, 100, same=True) == []


# --- defects the fuzzing found (teacher_positions._teacher_ends), each as the fuzz found it reduced ---


def _given_bytes_case(seed: int, raws: list[bytes], names: list[str], spans, with_tokens: bool, text=None) -> Case:
    """A sample of teacher tokens `raws` (their strings `names`; the text theirs unless given) with `token_bytes`,
    with or without `tokens`: each position's alternatives its sampled token and two text tokens, at random
    probabilities."""
    rng = np.random.default_rng(seed)
    alts, alt_bytes = [], []
    for raw, name in zip(raws, names):
        p = rng.dirichlet(np.ones(4))[:3]
        others = [bytes(rng.choice(list(b"xyz "), 2).tolist()) for _ in range(2)]
        alts.append([(t, math.log(x)) for t, x in zip([name] + [o.decode() for o in others], p)])
        alt_bytes.append([raw] + others)
    text = text or b"".join(raws).decode(errors="replace")
    tokens = names if with_tokens else None
    return Case(Sample("x:1", "p", 0, "q", None, text, tokens, alts, {}, raws, alt_bytes), raws, spans, len(raws))


def _check(case: Case) -> dict:
    """The spans, and both heads against the reference; {head: {row: head}} for a closer look."""
    ours, _ = tokenizers_pair()
    assert teacher_positions._teacher_byte_spans(case.sample) == case.spans
    out = {}
    for head in align.HEADS:
        e = _encoder(ours, head, True, 20, SEQ_LEN).encode_batch([case.sample])[0]
        assert violations(ours, case, e, head, True, 20, False) == []
        out[head] = got_heads(e)
    return out


@pytest.mark.parametrize("with_tokens", [True, False])
def test_replaced_bytes_before_the_stop_token(with_tokens):
    """The answer "😎", then the bytes F0 9F that the text holds as one U+FFFD, then the stop token (empty bytes).
    Given `token_bytes` without `tokens`, the token of 9F, at the end of the text, was read as end of text (its
    string taken as ""): the replaced bytes lost their span and the stop token its place on our end row."""
    raws = ["😎".encode(), b"\xf0", b"\x9f", b""]
    case = _given_bytes_case(
        1, raws, ["😎", "bytes:\\xf0", "bytes:\\x9f", "<|im_end|>"], [(0, 4), (4, 7), None, (7, 7)], with_tokens
    )
    heads = _check(case)
    stop_p = math.exp(case.sample.teacher_alts[3][0][1])
    assert max(heads["bytes"].items())[1][END] == pytest.approx(stop_p, rel=1e-6)  # the end row
    assert max(heads["exact"].items())[1][tokenizers_pair()[0].eos_token_id] == pytest.approx(stop_p, rel=1e-6)


@pytest.mark.parametrize("with_tokens", [True, False])
def test_left_out_special_token_before_the_stop_token(with_tokens):
    """The answer "ab", `<|im_start|>` left out of the text (empty bytes), then the stop token: given `token_bytes`
    without `tokens`, the left-out token was read as the end of text, its alternatives put on our end row and the
    stop token's dropped; it takes no bytes, as with `tokens`, and the stop token is the end."""
    case = _given_bytes_case(
        2, [b"ab", b"", b""], ["ab", "<|im_start|>", "<|im_end|>"], [(0, 2), None, (2, 2)], with_tokens
    )
    heads = _check(case)
    stop = case.sample.teacher_alts[2]
    want = {END: math.exp(stop[0][1])} | {ord(t[0]): 0.0 for t, _ in stop[1:]}
    for t, lp in stop[1:]:
        want[ord(t[0])] += math.exp(lp)
    assert max(heads["bytes"].items())[1] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("with_tokens", [True, False])
def test_special_token_given_by_its_name_bytes(with_tokens):
    """A left-out special token whose `token_bytes` are its name's (`<|im_start|>`, which the text "abcd" does not
    hold): without `tokens` the chain stopped there, where the token's string would have made it take no bytes."""
    raws = [b"ab", b"<|im_start|>", b"cd", b""]
    _check(
        _given_bytes_case(
            3, raws, ["ab", "<|im_start|>", "cd", "<eos>"], [(0, 2), None, (2, 4), (4, 4)], with_tokens, "abcd"
        )
    )
