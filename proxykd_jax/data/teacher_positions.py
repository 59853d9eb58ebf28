"""The teacher's side of a sample, read without our tokenizer: where each teacher token lies in the response's
bytes (its string, the corpus's `token_bytes`, or without `tokens` the likeliest alternative that continues the
text), the true bytes and first-byte symbol of each alternative, and the probabilities and mass of each teacher
position's alternatives. `data/align.py` places these positions on our tokens (docs/TOKENIZERS.md).

The tokens are laid end to end on the response's bytes (the span chain, `_teacher_byte_spans`). Where their bytes
are not UTF-8 (a lead byte never completed, a stray continuation byte) the text holds replacement characters
(U+FFFD) instead: one per maximal invalid subpart (byte-level BPE decoders, Python's errors="replace") or one per
byte of a run of byte tokens (SentencePiece's byte fallback, Gemma's). The chain goes on after them (`_resync`).
Where instead a token's string holds them for part of a character the text holds whole (vLLM's legacy layout writes
"\\ufffd" for a byte-level token of an emoji's first bytes, and sends no `bytes`), the token is read as the text's
bytes that spell its string when decoded on their own (`_split_ends`), and the chain goes on too (`_split_resync`).
"""

import re

import numpy as np

from proxykd_jax.data import byte_head
from proxykd_jax.data.corpus import Sample
from proxykd_jax.teacher.responses import token_bytes_of


def _position_probs(alts: list[list[tuple[str, float]]]) -> tuple[list[list[float]], list[float]]:
    """The probabilities of each teacher position's alternatives and their sum (its mass): np.exp of the
    log-probs and numpy's float64 sum (pairwise, an order the masses in the manifest depend on), taken
    by one call for all the positions with the same number of alternatives instead of one per position."""
    probs: list[list[float]] = [[] for _ in alts]
    masses = [0.0] * len(alts)
    by_count: dict[int, list[int]] = {}
    for i, pos in enumerate(alts):
        by_count.setdefault(len(pos), []).append(i)
    for k, idx in by_count.items():
        p = np.exp(np.array([[lp for _, lp in alts[i]] for i in idx], np.float64).reshape(len(idx), k))
        for i, row, mass in zip(idx, p.tolist(), p.sum(1).tolist()):
            probs[i], masses[i] = row, mass
    return probs, masses


_ENDED = -1  # where `_teacher_ends` puts an end-of-text token: nothing follows it
# A special token's string (`<bos>`, `<start_of_turn>`, `<|im_start|>`): what a server that leaves special tokens out
# of the text (vLLM's skip_special_tokens, `serve`) still names in the token's log-prob entry.
_SPECIAL_TOKEN = re.compile(r"<[^\s<>]+>")
# Special tokens that are not end of text, by the names vLLM and `serve` list them under among the alternatives (with
# their name's bytes): SentencePiece's and Gemma's, and the `<|...|>` / `<｜...｜>` names of GPT-2, ChatML, Llama 3,
# Phi, DeepSeek, gpt-oss, Command R. Not every `<...>` (`_SPECIAL_TOKEN`): an alternative has no text to be checked
# against, and `<table>` or Qwen's `<think>` are text tokens of some teachers.
_SPECIAL_NAMES = frozenset(
    {"<bos>", "<s>", "<pad>", "<unk>", "<mask>", "<start_of_turn>", "<start_of_image>", "<end_of_image>"}
)
_SPECIAL_NAME = re.compile(r"<\|[^\s<>|]+\|>|<\uff5c[^\s<>]+\uff5c>|<unused\d+>|<image_soft_token>")
_REPLACEMENT = "\ufffd".encode()  # U+FFFD: what a decoder writes for bytes that are not UTF-8
_CHECKED = 8  # tokens that must spell the text after replaced bytes (and the character after them) to go on there


def _teacher_ends(s: Sample, resp: bytes, i: int, c: int) -> list[int]:
    """Where teacher token `i` ends if it starts at byte `c` of the response, the likeliest first: its
    bytes (the corpus's `token_bytes` where given, else those of its string) if they continue the text;
    without `tokens`, those of each alternative that does (the sampled token is one of them), an alternative
    spelled with replacement characters also where the text's next bytes spell it decoded on their own
    (`_split_ends`: part of a character the text holds whole). `_ENDED`
    for an end-of-text token at the end of the response; given `token_bytes` without `tokens`, one of no bytes
    or of an end-of-text name's (a token of other bytes there is a text token, whose bytes the text replaced or
    cut off) at the last position (nothing follows an end of text: one of no bytes before it is left out of the
    text). `c` itself (it occupies no bytes) for a token whose given bytes are empty, or a special token
    (`_SPECIAL_TOKEN`) whose bytes do not continue the text: one sampled mid-answer that the text leaves out,
    after which the chain goes on. (Not without `tokens` or `token_bytes`: the sampled token is unknown there,
    and the end tokens most positions list would let every position be read as empty, the search growing with
    the text.)"""
    raw = _known_bytes(s, i)
    if raw is not None:
        tok = s.teacher_tokens[i] if s.teacher_tokens is not None else raw.decode("utf-8", errors="replace")
        ends = [c + len(raw)] if raw and resp.startswith(raw, c) else []
    else:
        tok, alts = "", s.teacher_alts[i]
        raws = [_bytes_of(t, _alt_bytes(s, i, j)) for j, (t, _) in enumerate(alts)]
        fits = [
            (lp, t, j, c + len(raws[j]))
            for j, (t, lp) in enumerate(alts)
            if t and raws[j] and resp.startswith(raws[j], c)
        ]
        if not s.response.isascii() and _REPLACEMENT in b"\0".join(raws):  # (fast: isascii is O(1) on a str)
            split = [(j, raw) for j, raw in enumerate(raws) if _REPLACEMENT in raw]
            fits += [(alts[j][1], alts[j][0], j, e) for j, raw in split for e in _split_ends(resp, raw, c)]
        ends = [e for *_, e in sorted(fits, reverse=True)]
    may_end = s.teacher_tokens is not None or raw is None or i == len(s.teacher_alts) - 1  # (`token_bytes` alone)
    if not ends and c == len(resp) and may_end and byte_head.teacher_symbol(tok) == byte_head.END_SYMBOL:
        return [_ENDED]
    if not ends and raw is not None and (not raw or _SPECIAL_TOKEN.fullmatch(tok)):
        return [c]
    return ends


def _teacher_byte_spans(s: Sample) -> list[tuple[int, int] | None]:
    """Byte span of each teacher token in the response; None once its bytes stop matching, and for a
    token that occupies none (a special token the text leaves out, `_teacher_ends`: the tokens after it
    go on). A final end-of-text token has the empty span at the end of the response. A token's bytes are
    the corpus's `token_bytes` where given (exact for a token holding part of a UTF-8 character, which the
    API spells as a replacement character), else those of its string. Where the tokens' bytes are not UTF-8
    and the text holds replacement characters for them, the chain goes on after those (`_resync`; the tokens
    that start inside the replaced bytes get None). Where instead a token's bytes are its string's and hold
    replacement characters for part of a character the text holds whole (no `token_bytes`), the tokens so
    spelled are read as the text's bytes that spell them (`_split_resync`). Without `tokens` each token is read
    as the likeliest alternative that continues the text, so spelled too, and lets the chain go on farthest (a
    likelier " the" that is a prefix of the sampled " there" would stop it at the next token); there (and
    without `token_bytes`) the chain still stops at bytes the text replaced: the sampled token, whose bytes the
    resynchronisation reads, is unknown."""
    resp, n, out, c = s.response.encode("utf-8"), len(s.teacher_alts), [], 0
    while len(out) < n:  # each token's likeliest reading
        ends = _teacher_ends(s, resp, len(out), c)
        resumed = None if ends else _resync(s, resp, len(out), c) or _split_resync(s, resp, len(out), c)
        if resumed is not None:  # the tokens in replaced bytes or spelled as such, and where the next one starts
            spans, c = resumed
            out += spans
            continue
        if not ends or ends[0] == _ENDED:
            out += [(c, c)] if ends else []
            break
        out.append(None if ends[0] == c else (c, ends[0]))
        c = ends[0]
    if s.teacher_tokens is None and (len(out) < n or _cuts_by_alternative(s, resp, out)):
        out = _farthest_chain(s, resp)
    return out + [None] * (n - len(out))


def _resync(s: Sample, resp: bytes, i: int, c: int) -> tuple[list[tuple[int, int] | None], int] | None:
    """Where the span chain goes on when teacher token `i`, at byte `c`, parts from the text at a replacement
    character (U+FFFD) standing for bytes that are not UTF-8 (its own, or the start of a character an earlier
    token began and it does not finish): (the spans of the tokens from `i` up to the one the chain goes on with,
    where that one starts); None where the text holds no replacement character there (the chain stops, as
    before), a token's bytes are not given, or no reading gets past the replacement characters.

    The replaced bytes run from the start of that character to a token's start or, where a token straddles
    their end (b"\xad\xe6\x96\x87" after b"\xe2": "\ufffd文"), to a byte inside it. Each of the k replacement
    characters they became stands for 1 to 3 of them (a maximal invalid subpart; one byte of a byte-fallback
    run), so x replaced bytes give k <= x <= 3k, and the replacement characters after those k are genuine
    U+FFFD of the tokens after. The first point, in the tokens' order, from which the tokens spell the text
    past the replacement characters (`_spells_on`) is taken; replaced bytes that end the answer end the chain.
    Token `i` keeps its start where the replaced bytes begin in it (the text before it is what the teacher had
    read when it sampled the token); its span is the text its bytes became (up to the end of the replaced bytes
    where later tokens hold some of them too). The tokens that start inside the replaced bytes get None: the
    text holds nothing of theirs to start at. (A genuine U+FFFD token next to replaced bytes, a model sampling
    the character itself, may be read as one of them: dropped, or rarely put one replacement character off.)"""
    raw = _known_bytes(s, i)
    q0 = None if raw is None else _replaced_at(resp, raw, c)
    if q0 is None:
        return None
    run_end = q0 + 3
    while resp.startswith(_REPLACEMENT, run_end):
        run_end += 3
    r = (run_end - q0) // 3
    x = c - q0  # replaced bytes before token j (< 1 for token i: they begin in it)
    for j in range(i, len(s.teacher_alts)):
        raw_j = raw if j == i else _known_bytes(s, j)
        if raw_j is None or x > 3 * r:
            return None
        tok = s.teacher_tokens[j] if s.teacher_tokens is not None else ""
        left_out = j > i and (not raw_j or _SPECIAL_TOKEN.fullmatch(tok) is not None)  # a special token, likely
        for b in [0] if left_out else range(max(0, 1 - x), len(raw_j)):
            for k in _replacement_counts(raw_j[b:], x + b, r):
                e = q0 + 3 * k  # where the text goes on
                end = _spells_on(s, resp, j, b, e, run_end)
                if end is None:
                    continue
                if (j, b) == (i, 0):  # token i goes on with the text after bytes an earlier token left unfinished
                    return [], e
                first = (c, end if j == i else e) if c <= q0 else None
                inside = [None] * (j - i - 1 + (b > 0 and j > i))  # token j too where it straddles their end
                return [first] + inside, end if b else e
        x += 0 if left_out else len(raw_j)
    if run_end == len(resp) and _replacement_counts(b"", x, r):  # they end the answer
        return [(c, run_end) if c <= q0 else None] + [None] * (len(s.teacher_alts) - i - 1), run_end
    return None


def _replaced_at(resp: bytes, raw: bytes, c: int) -> int | None:
    """The start of the replacement character in the text where bytes `raw` laid at byte `c` part from it; None
    where they part from it elsewhere, or do not."""
    q = c + next((k for k, (a, b) in enumerate(zip(raw, resp[c:])) if a != b), len(raw))
    q0 = q  # the start of the text's character where they part
    while q - 3 < q0 < len(resp) and q0 > 0 and resp[q0] & 0xC0 == 0x80:
        q0 -= 1
    return q0 if resp.startswith(_REPLACEMENT, q0) and q < q0 + 3 else None


def _replacement_counts(rest: bytes, x: int, r: int) -> range | list[int]:
    """The numbers k of replacement characters (of the run of `r`) that `x` replaced bytes may have become, the
    text going on with `rest`: k <= x <= 3k, and all `r` unless `rest` starts with a genuine one."""
    lo, hi = max(1, -(-x // 3)), min(x, r)
    if rest.startswith(_REPLACEMENT):
        return range(lo, hi + 1)
    return [r] if lo <= r <= hi else []


def _spells_on(s: Sample, resp: bytes, j: int, b: int, e: int, run_end: int) -> int | None:
    """Where token `j` ends if its bytes from `b` on start at byte `e` of the response, and the tokens from there
    spell the text past the replacement characters that end at `run_end`: the whole character after them, then
    `_CHECKED` more tokens, or up to the end of the text, the tokens' end, or where they part from it at other
    replacement characters (the next `_resync`'s). None where they do not (a zero-width reading of token `j` is
    no evidence). More than the next byte: the lead byte of an emoji that an invalid token left unfinished
    matches the first byte of the next one, and a byte-fallback run of invalid bytes may hold the character that
    follows it."""
    if b == 0:
        ends = _teacher_ends(s, resp, j, e)
        if not ends or ends[0] == e:
            return None
        pos = e if ends[0] == _ENDED else ends[0]
    else:
        rest = _known_bytes(s, j)[b:]
        if not resp.startswith(rest, e):
            return None
        pos = e + len(rest)
    lead = resp[run_end] if run_end < len(resp) else 0
    past = min(len(resp), run_end + 1 + (lead >= 0xC0) + (lead >= 0xE0) + (lead >= 0xF0))
    end, t, checked = pos, j + 1, 0
    while pos < len(resp) and t < len(s.teacher_alts) and checked < _CHECKED:
        ends = _teacher_ends(s, resp, t, pos)
        if not ends:  # past them, at more replaced bytes (the next `_resync`'s or `_split_resync`'s), else wrong
            raw = _known_bytes(s, t)
            more = raw is None or _replaced_at(resp, raw, pos) is not None or _split_ends(resp, raw, pos)
            return end if pos >= past and more else None
        pos, t, checked = ends[0], t + 1, checked + (pos >= past)
    return end if pos >= past else None


def _split_ends(resp: bytes, raw: bytes, c: int) -> list[int]:
    """Where a token whose bytes `raw` (its string's) hold replacement characters ends if it starts at byte `c`,
    read as part of a character the text holds whole: each end whose bytes from `c`, decoded on their own, spell
    its string, and are not `raw` (what a decoder writes for a token of a character's first or last bytes: one
    U+FFFD per maximal invalid subpart, as Python's errors="replace" and Rust's from_utf8_lossy do). Not into a
    replacement character of the text: bytes it replaced are `_resync`'s, whose own bytes are unknown here."""
    at = raw.find(_REPLACEMENT)
    if at < 0 or c + at >= len(resp) or resp[c + at] < 0x80 or not resp.startswith(raw[:at], c):
        return []
    return [
        e
        for e in range(c + at + 1, min(len(resp), c + len(raw)) + 1)  # each U+FFFD (3 bytes) stands for 1 to 3
        if resp[c:e] != raw
        and resp[c:e].decode("utf-8", errors="replace").encode("utf-8") == raw
        and _REPLACEMENT not in resp[_char_start(resp, c) : _char_end(resp, e)]
    ]


def _inside(resp: bytes, p: int) -> bool:
    """Whether byte `p` of the text lies inside a character (a UTF-8 continuation byte)."""
    return 0 <= p < len(resp) and 0x80 <= resp[p] < 0xC0


def _char_start(resp: bytes, p: int) -> int:
    """The start of the character of the text that byte `p` lies in."""
    while p > 0 and _inside(resp, p):
        p -= 1
    return p


def _char_end(resp: bytes, p: int) -> int:
    """The end of the character of the text that byte `p - 1` lies in, or `p` where a character starts there."""
    while _inside(resp, p):
        p += 1
    return p


def _cuts_by_alternative(s: Sample, resp: bytes, spans: list[tuple[int, int] | None]) -> bool:
    """Whether a token read as an alternative (no `token_bytes`) is read as part of a character (`_split_ends`: its
    span ends inside one, and no alternative's bytes are its span's): there the readings may be several, which
    `_farthest_chain` looks at."""
    if s.response.isascii() or (s.teacher_token_bytes is not None and None not in s.teacher_token_bytes):
        return False
    return any(
        span is not None
        and _inside(resp, span[1])
        and _known_bytes(s, i) is None
        and not _spelled(s, i, resp[slice(*span)])
        for i, span in enumerate(spans)
    )


def _split_resync(s: Sample, resp: bytes, i: int, c: int) -> tuple[list[tuple[int, int] | None], int] | None:
    """Where the span chain goes on when teacher token `i`, at byte `c`, is spelled with replacement characters
    for part of a character the text holds whole (a byte-level token of an emoji's first bytes, which vLLM's legacy
    layout writes as "\\ufffd" and sends without `bytes`): (the spans of tokens `i`.. up to the one the chain goes
    on with, where that one starts); None where no single reading gets past them.

    Each token from `i` on is read as any stretch of the text that spells it (`_split_ends`; a special token the
    text leaves out as none), up to the first token from which the tokens spell the text again (`_spells_on`: the
    next character and `_CHECKED` more tokens) or, where the tokens run out, the end of the text. A token gets the
    span that every such reading gives it, else None (a token of a character's first bytes decodes to one U+FFFD
    whatever their number, which only the tokens after it may fix); the chain stops where two readings go on at
    different bytes."""
    n, layers, at = len(s.teacher_alts), [{c: set()}], []  # layers[t]: token i + t's starts -> token i + t - 1's
    for k in range(i, n + 1):
        if k > i:
            at = [p for p in layers[-1] if (_spells_on(s, resp, k, 0, p, p) is not None if k < n else p == len(resp))]
        if at or k == n:
            break
        raw, tok = _known_bytes(s, k), s.teacher_tokens[k] if s.teacher_tokens is not None else ""
        if raw is None:
            return None
        nxt: dict[int, set[int]] = {}
        for p in layers[-1]:
            for e in _split_ends(resp, raw, p):
                nxt.setdefault(e, set()).add(p)
        if not nxt and k > i and (not raw or _SPECIAL_TOKEN.fullmatch(tok)):  # a special token, likely: no bytes
            nxt = {p: {p} for p in layers[-1]}
        if not nxt:
            return None
        layers.append(nxt)
    if len(at) != 1:
        return None
    spans, good = [], set(at)
    for layer in reversed(layers[1:]):  # from the last token read so backwards, on the readings that go on there
        pairs = {(a, e) for e in good for a in layer[e]}
        (a, e), *other = pairs
        spans.append(None if other or a == e else (a, e))
        good = {a for a, _ in pairs}
    return spans[::-1], at[0]


def _known_bytes(s: Sample, i: int) -> bytes | None:
    """Teacher token `i`'s bytes where the corpus says which token it is (`tokens` or `token_bytes`), else None."""
    if s.teacher_tokens is None and _given(s.teacher_token_bytes, i) is None:
        return None
    return _bytes_of(s.teacher_tokens[i] if s.teacher_tokens is not None else "", _given(s.teacher_token_bytes, i))


def _farthest_chain(s: Sample, resp: bytes) -> list[tuple[int, int] | None]:
    """The spans of the longest chain of teacher tokens laid end to end from the start of the response (of those,
    one that spells it farthest), each token the likeliest reading (`_teacher_ends`) that is still on such a chain
    (None: a token of no bytes). A token read as part of a character (`_split_ends`: no alternative's bytes are
    its span's) gets None where the longest chains give it different spans: a token of a character's first
    bytes, spelled "\\ufffd" without `bytes`, decodes so whatever their number, and the likeliest reading of the
    tokens after it need not be the sampled one; in a chain that stops short of the end of the text such
    readings count only where the tokens after them follow on (`_unproven_from`)."""
    reach, ends = [{0}], {}  # reach[i]: where token i may start; ends[i, c]: `_teacher_ends` there
    while len(reach) <= len(s.teacher_alts):
        i, nxt = len(reach) - 1, set()
        for c in reach[-1] - {_ENDED}:
            ends[i, c] = _teacher_ends(s, resp, i, c)
            nxt.update(ends[i, c])
        if not nxt:
            break
        reach.append(nxt)
    upto = {e: len(resp) if e == _ENDED else e for e in reach[-1]}  # of the longest chains, the farthest spelling
    good = [{e for e in upto if upto[e] == max(upto.values())}]  # where token i may start on one, from the last back
    for i in range(len(reach) - 2, -1, -1):
        good.append({c for c in reach[i] - {_ENDED} if any(e in good[-1] for e in ends[i, c])})
    good.reverse()
    out, cuts, c = [], [], 0
    for i in range(len(reach) - 1):
        e = next(e for e in ends[i, c] if e in good[i + 1])
        span = (c, c) if e == _ENDED else None if e == c else (c, e)
        cuts.append(span is not None and (_inside(resp, c) or _inside(resp, e)) and not _spelled(s, i, resp[c:e]))
        if cuts[-1] and len({(a, b) for a in good[i] for b in ends[i, a] if b in good[i + 1]}) > 1:
            span = None
        out.append(span)
        c = e
    if max(upto.values()) < len(resp):  # a chain that stops short of the end: only what the tokens after prove
        unproven = _unproven_from(cuts)
        out[unproven:] = [None] * (len(out) - unproven)
    return out


def _spelled(s: Sample, i: int, piece: bytes) -> bool:
    """Whether an alternative of teacher position `i` has the bytes `piece`."""
    return any(_bytes_of(t, _alt_bytes(s, i, j)) == piece for j, (t, _) in enumerate(s.teacher_alts[i]))


def _unproven_from(cuts: list[bool]) -> int:
    """Where a chain of alternatives that does not spell the whole text stops being evidence (`cuts`: which
    tokens are read as part of a character, `_split_ends`): at the first run of such tokens that the tokens after
    do not follow for `_CHECKED` tokens, or for at least one up to a run that is so followed (`_spells_on`'s rule).
    A "\\ufffd" alternative reads any lone lead or continuation byte, so it also stretches a chain whose sampled
    token is not among the alternatives a few tokens into the next whole character."""
    runs: list[list[int]] = []  # [first, last + 1] of each run of tokens that cut characters
    for i, cut in enumerate(cuts):
        if cut and runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        elif cut:
            runs.append([i, i + 1])
    unproven, proven, after = len(cuts), False, len(cuts)  # `after`: where the next run starts
    for first, end in reversed(runs):
        proven = after - end >= _CHECKED or (after > end and proven)
        unproven, after = unproven if proven else first, first
    return unproven


def _teacher_byte_starts(s: Sample) -> list[int | None]:
    """Byte offset of each teacher token in the response (`_teacher_byte_spans`' starts)."""
    return [None if span is None else span[0] for span in _teacher_byte_spans(s)]


def _given(values: list | None, i: int):
    return values[i] if values is not None and i < len(values) else None


def _alt_bytes(s: Sample, i: int, j: int) -> bytes | None:
    """The corpus's true bytes of alternative `j` at teacher position `i` (None when not given)."""
    return _given(_given(s.teacher_alt_bytes, i), j)


def _alt_bytes_row(s: Sample, i: int, n: int) -> list[bytes | None]:
    """`_alt_bytes(s, i, j)` for j < n."""
    raws = _given(s.teacher_alt_bytes, i)
    if raws is None:
        return [None] * n
    return raws if len(raws) >= n else list(raws) + [None] * (n - len(raws))


def _bytes_of(token: str, raw: bytes | None) -> bytes:
    """A teacher token's bytes: `raw` when the corpus gives them, else those its string stands for."""
    return raw if raw is not None else bytes(token_bytes_of(token))


def _special(text: str, raw: bytes | None) -> bool:
    """Whether a teacher alternative is a special token that is not end of text: its given bytes are none (it
    spells no text) and its string is not empty (the end of text), or it is a known special token's name
    (`_SPECIAL_NAMES`) with no other bytes than the name's."""
    if raw == b"":
        return text != "" and text not in byte_head.END_STRINGS
    known = text in _SPECIAL_NAMES or _SPECIAL_NAME.fullmatch(text) is not None
    return known and text not in byte_head.END_STRINGS and raw in (None, text.encode("utf-8"))


def _stop_alternative(s: Sample, i: int, raws: list[bytes | None]) -> int | None:
    """Which alternative of teacher position `i`, read as end of text at the end of the response, is the stop token
    sampled there (`raws`: the alternatives' bytes, `_alt_bytes_row`): the likeliest one of the position's string
    where `tokens` gives it, else (not given, or not among the alternatives) the likeliest end-of-text alternative
    (the empty string, an end-of-text name: `_symbol_of_bytes`); None where there is none."""
    alts, tok = s.teacher_alts[i], _given(s.teacher_tokens, i)
    named = [j for j, (text, _) in enumerate(alts) if tok is not None and text == tok]
    ends = named or [
        j
        for j, ((text, _), raw) in enumerate(zip(alts, raws))
        if (byte_head.teacher_symbol(text) if raw is None else _symbol_of_bytes(text, raw)) == byte_head.END_SYMBOL
    ]
    return max(ends, key=lambda j: alts[j][1], default=None)


def _symbol_of_bytes(text: str, raw: bytes) -> int | None:
    """`byte_head.teacher_symbol` for an alternative whose true bytes are known (none and no string, or an
    end-of-text name: end of text); None for a special token that is not end of text (`_special`)."""
    if text in byte_head.END_STRINGS or (not raw and not text):
        return byte_head.END_SYMBOL
    return None if _special(text, raw) else raw[0]
