"""Reading one OpenAI-compatible completion body into the fields of a corpus record.

The body is checked field by field rather than trusted: a 200 whose JSON does not parse, whose
choice has no `message` with a `content` field (chat) or no `text` string (completions), or whose
log-probs are not in the API's layout raises `MalformedResponse`, which `collect` retries like a
5xx. A well-formed answer without text (an empty string, or a chat `content` of null, e.g. with a
`refusal`) is a real answer (`Answer.text` is empty) and is not retried.

Token bytes. The chat layout sends each token's true bytes (`bytes`, a list of ints: a byte-level
BPE token may hold part of a UTF-8 sequence). The legacy completions layout has no bytes field;
like the OpenAI API, a server may spell a token that is not valid UTF-8 on its own as
`bytes:\\xe2\\x80` (the escaped bytes), which `token_bytes_of` turns back into its bytes. Any other
token string stands for its own UTF-8.

Tokens past a stop cut. With stop strings, servers (vLLM, `serve`) cut the text right before the stop
string but keep the token that straddles the cut ('w12' answered with the tokens ['w124']). When the
tokens spell the text and then more, the record keeps the tokens (and their rows) that spell a prefix
of the text and drops the straddling one and any after it; that stretch of the text has no teacher
log-probs. Tokens that spell some other text are left as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

_BYTES_TOKEN = re.compile(r"bytes:((?:\\x[0-9a-fA-F]{2})+)")


class MalformedResponse(Exception):
    """A 200 response whose body is not a usable completion."""


@dataclasses.dataclass
class Answer:
    """The fields of one completion choice that a corpus record keeps."""

    text: str
    finish_reason: str | None
    usage: dict  # prompt_tokens, completion_tokens (reasoning: completion_tokens_details); empty when none sent
    refusal: str | None = None
    logprobs: dict = dataclasses.field(default_factory=dict)  # tokens, token_bytes, top_logprobs


def token_bytes_of(token: str) -> list[int]:
    """The bytes a token string stands for: `bytes:\\xNN...` spelled out, else the string's UTF-8."""
    m = _BYTES_TOKEN.fullmatch(token)
    if m:
        return list(bytes.fromhex(m.group(1).replace("\\x", "")))
    return list(token.encode("utf-8"))


def bytes_token(raw: bytes) -> str:
    """The API's token string for `raw`: its text when valid UTF-8, else `bytes:\\xNN...`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _logprob(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value > 1e-4:
        raise MalformedResponse(f"{where} is {value!r}, not a log-probability")
    return float(value)


def _str(value, where: str) -> str:
    if not isinstance(value, str):
        raise MalformedResponse(f"{where} is {type(value).__name__}, not a string")
    return value


def _bytes(value, token: str, where: str) -> list[int]:
    if value is None:
        return token_bytes_of(token)
    if not isinstance(value, list) or not all(isinstance(b, int) and 0 <= b < 256 for b in value):
        raise MalformedResponse(f"{where}.bytes is not a list of byte values")
    return list(value)


def _chat_logprobs(lp) -> dict:
    if lp is None:
        return {}
    if not isinstance(lp, dict) or not isinstance(lp.get("content", []), (list, type(None))):
        raise MalformedResponse("choices[0].logprobs is not an object with a 'content' list")
    content = lp.get("content") or []
    if not content:
        return {}
    tokens, token_bytes, tops = [], [], []
    for i, entry in enumerate(content):
        where = f"logprobs.content[{i}]"
        if not isinstance(entry, dict):
            raise MalformedResponse(f"{where} is not an object")
        token = _str(entry.get("token"), f"{where}.token")
        tokens.append(token)
        token_bytes.append(_bytes(entry.get("bytes"), token, where))
        alts = entry.get("top_logprobs") or []
        if not isinstance(alts, list):
            raise MalformedResponse(f"{where}.top_logprobs is not a list")
        row = []
        for j, alt in enumerate(alts):
            w = f"{where}.top_logprobs[{j}]"
            if not isinstance(alt, dict):
                raise MalformedResponse(f"{w} is not an object")
            t = _str(alt.get("token"), f"{w}.token")
            row.append(
                {
                    "token": t,
                    "logprob": _logprob(alt.get("logprob"), f"{w}.logprob"),
                    "bytes": _bytes(alt.get("bytes"), t, w),
                }
            )
        tops.append(row)
    return {"tokens": tokens, "token_bytes": token_bytes, "top_logprobs": tops}


def _completion_logprobs(lp) -> dict:
    if lp is None:
        return {}
    if not isinstance(lp, dict):
        raise MalformedResponse("choices[0].logprobs is not an object")
    tokens, tops = lp.get("tokens"), lp.get("top_logprobs")
    if not tokens or tops is None:
        return {}
    if not isinstance(tokens, list) or not isinstance(tops, list) or len(tops) != len(tokens):
        raise MalformedResponse("logprobs.tokens and logprobs.top_logprobs are not lists of one length")
    tokens = [_str(t, f"logprobs.tokens[{i}]") for i, t in enumerate(tokens)]
    rows = []
    for i, alts in enumerate(tops):
        if not isinstance(alts, (dict, type(None))):
            raise MalformedResponse(f"logprobs.top_logprobs[{i}] is not an object")
        pairs = [
            (_str(t, "a top_logprobs key"), _logprob(v, f"logprobs.top_logprobs[{i}]")) for t, v in (alts or {}).items()
        ]
        pairs.sort(key=lambda kv: -kv[1])
        rows.append([{"token": t, "logprob": v, "bytes": token_bytes_of(t)} for t, v in pairs])
    return {"tokens": tokens, "token_bytes": [token_bytes_of(t) for t in tokens], "top_logprobs": rows}


def spelled_prefix(logprobs: dict, text: str) -> dict:
    """`logprobs` cut to the tokens that spell a prefix of `text`, when all of them spell `text` and more
    (a stop cut inside a token); else `logprobs` unchanged."""
    token_bytes = logprobs.get("token_bytes")
    if not token_bytes:
        return logprobs
    want = text.encode("utf-8")
    spelled = b"".join(bytes(b) for b in token_bytes)
    if len(spelled) <= len(want) or not spelled.startswith(want):
        return logprobs
    keep, end = 0, 0
    while end + len(token_bytes[keep]) <= len(want):
        end += len(token_bytes[keep])
        keep += 1
    return {name: rows[:keep] for name, rows in logprobs.items()}


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def usage_counts(usage) -> dict:
    """{prompt_tokens, completion_tokens} of an answer's `usage` where both are counts (whole numbers >= 0),
    else {} (the endpoint sent none, or something else): what an answer and a stored record were billed. A
    reasoning model's hidden tokens, billed among the completion tokens, are kept as the API spells them
    (`completion_tokens_details.reasoning_tokens`) where they are a count within the completion tokens."""
    if not isinstance(usage, dict):
        return {}
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not (_count(p) and _count(c)):
        return {}
    counts = {"prompt_tokens": p, "completion_tokens": c}
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    if _count(reasoning) and reasoning <= c:
        counts["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return counts


def reasoning_tokens(usage: dict) -> int | None:
    """The hidden reasoning tokens among a `usage_counts` usage's completion tokens, or None where not given."""
    return usage.get("completion_tokens_details", {}).get("reasoning_tokens")


def parse_answer(raw: bytes, api: str, with_logprobs: bool) -> Answer:
    """The first choice of a completion body; raises MalformedResponse when it is not usable."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise MalformedResponse(f"the body is not JSON ({err})") from None
    if not isinstance(data, dict):
        raise MalformedResponse(f"the body is a JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse("the body has no 'choices' list with an object in it")
    choice = choices[0]
    finish = choice.get("finish_reason")
    finish = finish if isinstance(finish, str) else None
    refusal = None
    if api == "chat":
        message = choice.get("message")
        if not isinstance(message, dict) or "content" not in message:
            raise MalformedResponse("choices[0] has no 'message' object with a 'content' field")
        text = message.get("content")  # null with a refusal (or with nothing) is a real answer
        refusal = message.get("refusal") if isinstance(message.get("refusal"), str) else None
        if text is not None and not isinstance(text, str):
            raise MalformedResponse(f"choices[0].message.content is a {type(text).__name__}, not a string")
    else:
        text = choice.get("text")
        if not isinstance(text, str):  # the completions layout always has a text string, even ""
            what = "missing" if "text" not in choice else f"a {type(text).__name__}, not a string"
            raise MalformedResponse(f"choices[0].text is {what}")
    logprobs = {}
    if with_logprobs:
        parse = _chat_logprobs if api == "chat" else _completion_logprobs
        logprobs = spelled_prefix(parse(choice.get("logprobs")), text or "")
    return Answer(text or "", finish, usage_counts(data.get("usage")), refusal, logprobs)
