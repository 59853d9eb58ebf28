"""A corpus row's teacher log-probs, read and checked: per teacher token its text, its true bytes and
its alternatives (token, log-prob, bytes), from the OpenAI layout (`logprobs.content`) or the flat one
(`top_logprobs`, `tokens`, `token_bytes`), per response when the row gives several (docs/DATA_FORMATS.md).

A malformed value raises a `DataError` naming the field (`corpus_errors.py`); well-formed alternatives
take a whole-list fast path (`_well_formed_alts`) that gives what the per-field checks give.
"""

import dataclasses
import functools
import itertools
import math

from proxykd_jax.data.corpus_errors import _bad, _show

_MAX_LOGPROB = 1e-4  # log-probs up to this are accepted (rounding in an API's output)


def _logprob(value, where: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(where, field, f"is {_show(value)}, not a number (a log-probability)")
    value = float(value)
    if math.isnan(value) or value > _MAX_LOGPROB:
        raise _bad(where, field, f"holds the log-prob {value}, outside (-inf, 0]")
    return value


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, field, f"is {_show(value)}, not a string (a token's text)")
    return value


def _raw_bytes(value, where: str, field: str) -> bytes | None:
    """A token's true bytes (a list of ints 0-255), or None when not given."""
    if value is None:
        return None
    try:  # bytes() checks every value is an int in 0-255 (in C: one of these per teacher alternative)
        if not isinstance(value, list) or bool in set(map(type, value)):
            raise TypeError
        return bytes(value)
    except (TypeError, ValueError):
        raise _bad(where, field, f"is {_show(value)}, not a list of byte values 0-255") from None


def _list(value, where: str, field: str, what: str) -> list:
    if not isinstance(value, list):
        raise _bad(where, field, f"is {_show(value)}; it must be a list {what}")
    return value


def _alts_of(entries, where: str, field: str) -> tuple[list[tuple[str, float]], list[bytes | None]]:
    """One position's alternatives and their true bytes (None where not given), from a list of
    {token, logprob, bytes?} or a {token: logprob} map."""
    if entries is None:
        return [], []
    if isinstance(entries, dict):
        alts = [(_text(t, where, field), _logprob(lp, where, f"{field}[{t!r}]")) for t, lp in entries.items()]
        return alts, [None] * len(alts)
    _list(entries, where, field, "of {token, logprob} objects or a {token: logprob} object")
    fast = _well_formed_alts(entries)
    if fast is not None:
        return fast
    alts, raws = [], []
    for j, e in enumerate(entries):
        if not isinstance(e, dict) or "token" not in e or "logprob" not in e:
            raise _bad(where, f"{field}[{j}]", f"is {_show(e)}; each alternative needs 'token' and 'logprob'")
        alts.append(
            (_text(e["token"], where, f"{field}[{j}].token"), _logprob(e["logprob"], where, f"{field}[{j}].logprob"))
        )
        raws.append(_raw_bytes(e.get("bytes"), where, f"{field}[{j}].bytes"))
    return alts, raws


def _well_formed_alts(entries: list) -> tuple[list[tuple[str, float]], list[bytes | None]] | None:
    """`_alts_of` for a list of alternatives that pass a few whole-list checks (each a dict with a string
    token, a float log-prob in range and bytes absent or a list of byte values); None when any may be
    malformed: then `_alts_of` checks them one by one and names the first problem. (A position of a
    corpus with top-20 log-probs has 20 alternatives; checked one by one they took a third of prepare.)"""
    if set(map(type, entries)) != {dict}:
        return None
    try:
        texts = [e["token"] for e in entries]
        logprobs = [e["logprob"] for e in entries]
    except KeyError:
        return None
    if (
        set(map(type, texts)) != {str}
        or set(map(type, logprobs)) != {float}
        or any(map(math.isnan, logprobs))
        or max(logprobs) > _MAX_LOGPROB
    ):
        return None
    lists = [e.get("bytes") for e in entries]
    kinds = set(map(type, lists))
    if kinds == {type(None)}:
        return list(zip(texts, logprobs)), lists
    if not kinds <= {list, type(None)}:
        return None
    try:
        raws = [None if r is None else bytes(r) for r in lists]
    except (TypeError, ValueError):
        return None
    # bytes() reads False and True as 0 and 1, which _raw_bytes refuses: looked for where those bytes occur.
    given = b"".join(filter(None, raws))
    if b"\x00" in given or b"\x01" in given:
        values = itertools.chain.from_iterable(filter(None, lists))
        if bool in set(map(type, values)):
            return None
    return list(zip(texts, logprobs)), raws


@dataclasses.dataclass
class _TeacherLogprobs:
    tokens: list[str] | None
    token_bytes: list[bytes | None] | None
    alts: list[list[tuple[str, float]]]
    alt_bytes: list[list[bytes | None]]


def _openai_logprobs(content, where: str, field: str) -> _TeacherLogprobs:
    content = content.get("content") if isinstance(content, dict) else content
    if not isinstance(content, list):
        raise _bad(where, field, "must follow the OpenAI layout {'content': [{token, logprob, top_logprobs}, ...]}")
    tokens, token_bytes, alts, alt_bytes = [], [], [], []
    for i, c in enumerate(content):
        at = f"{field}.content[{i}]"
        if not isinstance(c, dict) or "token" not in c or "logprob" not in c:
            raise _bad(where, at, f"is {_show(c)}; each entry needs 'token' and 'logprob'")
        token, logprob = _text(c["token"], where, f"{at}.token"), _logprob(c["logprob"], where, f"{at}.logprob")
        raw = _raw_bytes(c.get("bytes"), where, f"{at}.bytes")
        pos, pos_bytes = _alts_of(c.get("top_logprobs"), where, f"{at}.top_logprobs")
        if not pos:
            pos, pos_bytes = [(token, logprob)], [raw]
        tokens.append(token)
        token_bytes.append(raw)
        alts.append(pos)
        alt_bytes.append(pos_bytes)
    return _TeacherLogprobs(tokens, token_bytes, alts, alt_bytes)


def _per_response(row: dict, key: str, idx: int, n_resp: int, where: str):
    """(field name, value) of `key` for response `idx`: with `responses`, the list's entry `idx`."""
    value = row.get(key)
    if "responses" not in row or value is None:
        return key, value
    if not isinstance(value, list) or len(value) != n_resp:
        raise _bad(
            where, key, f"must be a list with one entry (or null) per response ({n_resp}) when 'responses' is given"
        )
    return f"{key}[{idx}]", value[idx]


def _logprobs_of(row: dict, idx: int, n_resp: int, where: str) -> _TeacherLogprobs | None:
    """The teacher's tokens, their bytes and alternatives for response `idx` (None when not given),
    from either accepted layout."""
    lp = row.get("logprobs")
    if lp is not None and not isinstance(lp, (dict, list)):
        raise _bad(where, "logprobs", f"is {_show(lp)}; it must follow the OpenAI layout {{'content': [...]}}")
    if lp:
        if "responses" in row and isinstance(lp, list):
            field, content = _per_response(row, "logprobs", idx, n_resp, where)
            return None if content is None else _openai_logprobs(content, where, field)
        return _openai_logprobs(lp, where, "logprobs")
    field, top = _per_response(row, "top_logprobs", idx, n_resp, where)
    if top is None:
        return None
    _list(top, where, field, "with one entry per teacher token")
    alts, alt_bytes = [], []
    for i, pos in enumerate(top):
        if isinstance(pos, dict) and "token" in pos and "logprob" in pos:  # not a {token: logprob} map
            raise _bad(
                where,
                f"{field}[{i}]",
                "is an OpenAI `logprobs.content` entry {token, logprob, top_logprobs}: put that list under "
                "'logprobs' as {'content': [...]} ('top_logprobs' holds one list of alternatives per teacher token)",
            )
        a, b = _alts_of(pos, where, f"{field}[{i}]")
        alts.append(a)
        alt_bytes.append(b)
    per_token = functools.partial(_per_token, row, idx, n_resp, where, field, len(alts))
    tokens = per_token("tokens", _text, "of token strings")
    token_bytes = per_token("token_bytes", _raw_bytes, "of byte lists")
    return _TeacherLogprobs(tokens, token_bytes, alts, alt_bytes)


def _per_token(row: dict, idx: int, n_resp: int, where: str, field: str, n: int, key: str, parse, what: str):
    """`key`'s list for response `idx`, one entry per teacher token (as many as `field` has, `n`), each
    read by `parse(value, where, field)`; None when the row does not give it."""
    kfield, values = _per_response(row, key, idx, n_resp, where)
    if values is None:
        return None
    _list(values, where, kfield, f"{what}, parallel to 'top_logprobs'")
    out = [parse(v, where, f"{kfield}[{i}]") for i, v in enumerate(values)]
    if len(out) != n:
        raise _bad(where, kfield, f"has {len(out)} entries but '{field}' {n}")
    return out
