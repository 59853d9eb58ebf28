"""The teacher's side of a sample, read without our tokenizer: where each teacher token lies in the response's
bytes (its string, the corpus's `token_bytes`, or without `tokens` the likeliest alternative that continues the
text), the true bytes and first-byte symbol of each alternative, and the probabilities and mass of each teacher
position's alternatives. `data/align.py` places these positions on our tokens (docs/TOKENIZERS.md).
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


def _teacher_ends(s: Sample, resp: bytes, i: int, c: int) -> list[int]:
    """Where teacher token `i` ends if it starts at byte `c` of the response, the likeliest first: its
    bytes (the corpus's `token_bytes` where given, else those of its string) if they continue the text;
    without `tokens`, those of each alternative that does (the sampled token is one of them). `_ENDED`
    for an end-of-text token at the end of the response. `c` itself (it occupies no bytes) for a token
    whose given bytes are empty, or a special token (`_SPECIAL_TOKEN`) whose bytes do not continue the
    text: one sampled mid-answer that the text leaves out, after which the chain goes on. (Not without
    `tokens`: the sampled token is unknown there, and the end tokens most positions list would let every
    position be read as empty, the search growing with the text.)"""
    if s.teacher_tokens is not None or _given(s.teacher_token_bytes, i) is not None:
        tok = s.teacher_tokens[i] if s.teacher_tokens is not None else ""
        raw = _bytes_of(tok, _given(s.teacher_token_bytes, i))
        ends = [c + len(raw)] if raw and resp.startswith(raw, c) else []
    else:
        tok, alts, raw = "", s.teacher_alts[i], None
        raws = [_bytes_of(t, _alt_bytes(s, i, j)) for j, (t, _) in enumerate(alts)]
        fits = [(lp, t, j) for j, (t, lp) in enumerate(alts) if t and raws[j] and resp.startswith(raws[j], c)]
        ends = [c + len(raws[j]) for _, _, j in sorted(fits, reverse=True)]
    if not ends and c == len(resp) and byte_head.teacher_symbol(tok) == byte_head.END_SYMBOL:
        return [_ENDED]
    if not ends and raw is not None and (not raw or _SPECIAL_TOKEN.fullmatch(tok)):
        return [c]
    return ends


def _teacher_byte_spans(s: Sample) -> list[tuple[int, int] | None]:
    """Byte span of each teacher token in the response; None once its bytes stop matching, and for a
    token that occupies none (a special token the text leaves out, `_teacher_ends`: the tokens after it
    go on). A final end-of-text token has the empty span at the end of the response. A token's bytes are
    the corpus's `token_bytes` where given (exact for a token holding part of a UTF-8 character, which the
    API spells as a replacement character), else those of its string. Without `tokens` each token is read
    as the likeliest alternative that continues the text and lets the chain go on farthest (a likelier
    " the" that is a prefix of the sampled " there" would stop it at the next token)."""
    resp, n, out, c = s.response.encode("utf-8"), len(s.teacher_alts), [], 0
    for i in range(n):  # each token's likeliest reading
        ends = _teacher_ends(s, resp, i, c)
        if not ends or ends[0] == _ENDED:
            out += [(c, c)] if ends else []
            break
        out.append(None if ends[0] == c else (c, ends[0]))
        c = ends[0]
    if len(out) < n and s.teacher_tokens is None:
        out = _farthest_chain(s, resp)
    return out + [None] * (n - len(out))


def _farthest_chain(s: Sample, resp: bytes) -> list[tuple[int, int] | None]:
    """The spans of the longest chain of teacher tokens laid end to end from the start of the response,
    each token the likeliest reading (`_teacher_ends`) that still reaches the chain's length (None: a
    token of no bytes)."""
    reach, ends = [{0}], {}  # reach[i]: where token i may start; ends[i, c]: `_teacher_ends` there
    while len(reach) <= len(s.teacher_alts):
        i, nxt = len(reach) - 1, set()
        for c in reach[-1] - {_ENDED}:
            ends[i, c] = _teacher_ends(s, resp, i, c)
            nxt.update(ends[i, c])
        if not nxt:
            break
        reach.append(nxt)
    good = [reach[-1]]  # where token i may start on a longest chain, from the last token backwards
    for i in range(len(reach) - 2, -1, -1):
        good.append({c for c in reach[i] - {_ENDED} if any(e in good[-1] for e in ends[i, c])})
    good.reverse()
    out, c = [], 0
    for i in range(len(reach) - 1):
        e = next(e for e in ends[i, c] if e in good[i + 1])
        out.append((c, c) if e == _ENDED else None if e == c else (c, e))
        c = e
    return out


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


def _symbol_of_bytes(text: str, raw: bytes) -> int:
    """`byte_head.teacher_symbol` for an alternative whose true bytes are known (none: end of text)."""
    if text in byte_head.END_STRINGS or not raw:
        return byte_head.END_SYMBOL
    return raw[0]
