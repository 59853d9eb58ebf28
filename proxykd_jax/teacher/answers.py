"""The answers `serve` sends (`server.py`): a backend's `Completion`, its text after the prompt cut at a stop
string (`answer_text`, `answer_context`, `apply_stop`), its log-prob entries in the chat and completions
layouts (`chat_logprobs`, `completion_logprobs`, each token's `bytes` too: none for a special token) and the
non-streamed bodies (`chat_body`, `completions_body`); `stream.py` sends the same entries in chunks."""

from __future__ import annotations

import codecs
import dataclasses
import time

from proxykd_jax.teacher.responses import bytes_token

__all__ = ["Completion", "answer_context", "answer_text", "apply_stop", "chat_body", "completions_body"]


@dataclasses.dataclass
class Completion:
    """One generated sequence: ids without end-of-sequence, per-token log-probs and alternatives."""

    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence or stop string) or "length"
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob), most likely first


def answer_text(backend, context_ids: list[int], ids: list[int]) -> str:
    """The text `ids` add after `context_ids` (from `prompt_context`): decode(context + ids) less
    decode(context), or `ids` decoded alone where the context's text is not a prefix of that (no
    context, or a decoder that rewrites across the seam)."""
    if context_ids:
        head, full = backend.decode(context_ids), backend.decode(list(context_ids) + list(ids))
        if full.startswith(head):
            return full[len(head) :]
    return backend.decode(ids)


def answer_context(backend, prompt_ids: list[int], c: Completion) -> list[int]:
    """The tokens the answer `c` to `prompt_ids` is spelled after: the backend's `prompt_context`,
    or none where that context's text is not a prefix of the whole answer's (then its text, tokens'
    bytes and stop cut all spell it alone, and still agree)."""
    ctx = backend.prompt_context(prompt_ids)
    if ctx and not backend.decode(ctx + list(c.token_ids)).startswith(backend.decode(ctx)):
        return []
    return ctx


def apply_stop(backend, c: Completion, stops: list[str], context_ids: list[int] = ()) -> tuple[str, Completion]:
    """Cuts at the earliest stop string: the text ends right before it (the OpenAI API's and vLLM's
    semantics: the stop string is not included), and the tokens are those needed to spell that text.

    A token that straddles the cut (" w2" when "w2" stops "w1 w2 w3") is kept: it was generated and
    paid for, so it counts in `usage.completion_tokens` and has its log-prob row, and the text ("w1 ")
    is a prefix of the kept tokens' text ("w1 w2"). vLLM truncates the text the same way and keeps
    every token id it generated; here the tokens after the straddling one are dropped, so the tokens
    run past the text by at most part of one token, and spell it exactly when the stop string begins
    on a token boundary. The text is the one the answer adds after `context_ids` (`answer_text`).
    """
    text = answer_text(backend, context_ids, c.token_ids)
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not cuts:
        return text, c
    text = text[: min(cuts)]
    keep = next(
        (i for i in range(len(c.token_ids) + 1) if answer_text(backend, context_ids, c.token_ids[:i]).startswith(text)),
        len(c.token_ids),
    )
    return text, Completion(
        c.token_ids[:keep],
        "stop",
        c.logprobs[:keep] if c.logprobs is not None else None,
        c.top[:keep] if c.top is not None else None,
    )


def each_answer(backend, texts, prompts, outs, stops):
    """(prompt text, the answer's context ids, its text cut at a stop string, the completion cut alike) of every
    choice, in order: `outs[i]` the choices to `prompts[i]` (a chat's: its one prompt, `texts` unused)."""
    for prompt_text, prompt_ids, per_prompt in zip(texts, prompts, outs):
        for c in per_prompt:
            ctx = answer_context(backend, prompt_ids, c)
            text, c = apply_stop(backend, c, stops, ctx)
            yield prompt_text, ctx, text, c


def envelope(backend, obj: str, prefix: str) -> dict:
    """The fields an answer (or every chunk of a stream) carries beside its choices: `id`, `object`, `created`,
    `model`."""
    return {"id": f"{prefix}-{time.time_ns()}", "object": obj, "created": int(time.time()), "model": backend.model_name}


def usage(prompts, choices_tokens) -> dict:
    p, c = sum(len(x) for x in prompts), sum(choices_tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _token_rows(backend, c: Completion, context_ids: list[int]) -> list[tuple[bytes, float, list[tuple[bytes, float]]]]:
    """Per generated token: its bytes after `context_ids` and the answer before it, its log-prob, and
    its alternatives' bytes and log-probs."""
    rows, context_ids = [], list(context_ids)
    for j, (tid, lp) in enumerate(zip(c.token_ids, c.logprobs)):
        alts = c.top[j] if c.top else []
        raw = backend.token_bytes(context_ids + c.token_ids[:j], [tid] + [a for a, _ in alts])
        rows.append((raw[0], lp, [(b, alp) for b, (_, alp) in zip(raw[1:], alts)]))
    return rows


def _text_offsets(start: int, token_bytes: list[bytes], in_text: list[bool]) -> list[int]:
    """Character offset of each token in prompt + text: the characters complete before it begins
    (a token that finishes a character another token began points at that character; one not
    `in_text`, a special token, adds none)."""
    decoder, offsets, n = codecs.getincrementaldecoder("utf-8")(errors="replace"), [], start
    for raw, kept in zip(token_bytes, in_text):
        offsets.append(n)
        n += len(decoder.decode(raw)) if kept else 0
    return offsets


def _entry(raw: bytes, lp: float, in_text: bool = True) -> dict:
    return {"token": bytes_token(raw), "logprob": lp, "bytes": list(raw) if in_text else []}


def chat_logprobs(backend, c: Completion, ctx: list[int]) -> dict:
    """A chat choice's `logprobs`: one entry per generated token (`content`), with its alternatives. A special
    token, which the text leaves out, is named by its own text with empty `bytes` (the entries' bytes concatenate
    to the text's UTF-8, as the OpenAI API's do); an alternative keeps its text's bytes."""
    rows = _token_rows(backend, c, ctx)
    return {
        "content": [
            {**_entry(raw, lp, tid not in backend.special_ids), "top_logprobs": [_entry(*a) for a in alts]}
            for tid, (raw, lp, alts) in zip(c.token_ids, rows)
        ]
    }


def completion_logprobs(backend, c: Completion, ctx: list[int], prompt_text: str) -> dict:
    """A completions choice's `logprobs`: per generated token its string, log-prob, alternatives (a dict keyed
    by token string, likeliest first) and character offset in the prompt + text."""
    rows = _token_rows(backend, c, ctx)
    alternatives = []
    for _, _, alts in rows:
        top: dict[str, float] = {}
        for raw, alp in alts:
            top.setdefault(bytes_token(raw), alp)
        alternatives.append(top)
    return {
        "tokens": [bytes_token(raw) for raw, _, _ in rows],
        "token_logprobs": [lp for _, lp, _ in rows],
        "text_offset": _text_offsets(
            len(prompt_text), [raw for raw, _, _ in rows], [t not in backend.special_ids for t in c.token_ids]
        ),
        "top_logprobs": alternatives,
    }


def chat_body(backend, req, prompts, outs) -> dict:
    """The `chat.completion` answer to `req` (an `api.ChatRequest`): the choices `outs` to its prompt."""
    choices, counts = [], []
    for _, ctx, text, c in each_answer(backend, [None], prompts, [outs], req.stops):
        counts.append(len(c.token_ids))
        logprobs = chat_logprobs(backend, c, ctx) if c.logprobs is not None else None
        message = {"role": "assistant", "content": text}
        choices.append(
            {"index": len(choices), "message": message, "finish_reason": c.finish_reason, "logprobs": logprobs}
        )
    return {**envelope(backend, "chat.completion", "chatcmpl"), "choices": choices, "usage": usage(prompts, counts)}


def completions_body(backend, req, texts, prompts, outs) -> dict:
    """The `text_completion` answer to `req` (an `api.CompletionRequest`): per prompt its choices in `outs`."""
    choices, counts = [], []
    for prompt_text, ctx, text, c in each_answer(backend, texts, prompts, outs, req.stops):
        counts.append(len(c.token_ids))
        text = prompt_text + text if req.echo else text  # (echo has no log-probs: api.py)
        logprobs = completion_logprobs(backend, c, ctx, prompt_text) if c.logprobs is not None else None
        choices.append({"index": len(choices), "text": text, "finish_reason": c.finish_reason, "logprobs": logprobs})
    return {**envelope(backend, "text_completion", "cmpl"), "choices": choices, "usage": usage(prompts, counts)}
