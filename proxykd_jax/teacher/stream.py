"""`stream: true` answers of `serve` (`server.py`): the OpenAI API's server-sent events, built once the whole
answer is generated (`chat_stream`, `completions_stream`, sent by `streamed`).

A choice is sent in one chunk per generated token's text (`_token_pieces`): a token that ends mid-character
is merged with the next, a special token (no text) goes with the chunk of the next token with text (the last
chunk where none follows). With log-probs each chunk carries the entries (`answers.chat_logprobs`,
`answers.completion_logprobs`) of the tokens it holds, so a stream's entries concatenate to the non-streamed
answer's. The choices of n > 1 are sent one after another, not interleaved as the OpenAI API does: the answer
is whole before its first chunk, and a client that joins chunks by `index` (the `openai` client's
`ChatCompletionStreamState`) gets the same answer in either order.
"""

from __future__ import annotations

import codecs
import json

from fastapi.responses import StreamingResponse

from proxykd_jax.teacher.answers import chat_logprobs, completion_logprobs, each_answer, envelope, usage

__all__ = ["chat_stream", "completions_stream", "streamed"]


def _token_pieces(backend, c, context_ids: list[int], text: str) -> list[tuple[str, int, int]]:
    """`text`, the answer `c` adds after `context_ids` (cut at a stop string), in pieces (text, first token,
    end token) that together hold every token of `c`: one per token with text (its bytes as `token_bytes`
    gives them), a token that ends mid-character merged with the next, a special token (no text) with the
    next token that has text, or the last piece. One piece of all tokens where a decoder spells the text
    otherwise; a piece of no text only where the answer has none but has tokens."""
    decoder, context_ids, ids = codecs.getincrementaldecoder("utf-8")(errors="replace"), list(context_ids), c.token_ids
    pieces, start = [], 0
    for j, tid in enumerate(ids):
        if tid not in backend.special_ids:
            piece = decoder.decode(backend.token_bytes(context_ids + ids[:j], [tid])[0])
            if piece:
                pieces.append((piece, start, j + 1))
                start = j + 1
    tail = decoder.decode(b"", final=True)
    if tail or (start < len(ids) and not pieces):
        pieces.append((tail, start, len(ids)))
    elif start < len(ids):  # trailing special tokens
        pieces[-1] = (pieces[-1][0], pieces[-1][1], len(ids))
    kept, size = [], 0
    for piece, a, b in pieces:  # up to the stop cut, which may fall inside a token
        piece = piece[: len(text) - size]
        if piece or not kept:
            kept.append((piece, a, b))
            size += len(piece)
        else:
            kept[-1] = (kept[-1][0], kept[-1][1], b)
    if "".join(p for p, _, _ in kept) == text:
        return kept
    return [(text, 0, len(ids))] if text or ids else []


def _events(chunks: list[dict]) -> list[bytes]:
    """Server-sent events of the OpenAI API's streams: one `data:` line per chunk, then `data: [DONE]`."""
    return [b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def _stream_events(backend, req, obj: str, prefix: str, choices: list[dict], prompts, counts) -> list[bytes]:
    """Each choice chunk in an envelope (one `id`, `created`, `model`), then a usage chunk with
    `stream_options.include_usage` (the other chunks then carry `usage: null`, as in the OpenAI API)."""
    head = envelope(backend, obj, prefix)
    extra = {"usage": None} if req.include_usage else {}
    chunks = [{**head, "choices": [choice], **extra} for choice in choices]
    if req.include_usage:
        chunks.append({**head, "choices": [], "usage": usage(prompts, counts)})
    return _events(chunks)


def chat_stream(backend, req, prompts, outs) -> list[bytes]:
    """Per choice: a `role` delta, one `content` delta per token's text (with its tokens' `logprobs.content`
    where asked), an empty delta with `finish_reason`."""
    choices, counts = [], []
    for _, ctx, text, c in each_answer(backend, [None], prompts, [outs], req.stops):
        counts.append(len(c.token_ids))
        i = len(counts) - 1
        entries = chat_logprobs(backend, c, ctx)["content"] if c.logprobs is not None else None
        role = {"role": "assistant", "content": ""}
        choices.append({"index": i, "delta": role, "logprobs": None, "finish_reason": None})
        for piece, a, b in _token_pieces(backend, c, ctx, text):
            if piece or entries is not None:
                logprobs = {"content": entries[a:b]} if entries is not None else None
                choices.append({"index": i, "delta": {"content": piece}, "logprobs": logprobs, "finish_reason": None})
        choices.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason})
    return _stream_events(backend, req, "chat.completion.chunk", "chatcmpl", choices, prompts, counts)


def completions_stream(backend, req, texts, prompts, outs) -> list[bytes]:
    """Per choice: its echoed prompt, one `text` per token's text (with its tokens' `logprobs` lists where
    asked), an empty `text` with `finish_reason`."""
    choices, counts = [], []
    for prompt_text, ctx, text, c in each_answer(backend, texts, prompts, outs, req.stops):
        counts.append(len(c.token_ids))
        index = len(counts) - 1
        lists = completion_logprobs(backend, c, ctx, prompt_text) if c.logprobs is not None else None
        if req.echo:  # (echo has no log-probs: api.py)
            choices.append({"index": index, "text": prompt_text, "logprobs": None, "finish_reason": None})
        for piece, a, b in _token_pieces(backend, c, ctx, text):
            if piece or lists is not None:
                logprobs = {k: v[a:b] for k, v in lists.items()} if lists is not None else None
                choices.append({"index": index, "text": piece, "logprobs": logprobs, "finish_reason": None})
        choices.append({"index": index, "text": "", "logprobs": None, "finish_reason": c.finish_reason})
    return _stream_events(backend, req, "text_completion", "cmpl", choices, prompts, counts)


def streamed(events: list[bytes]) -> StreamingResponse:
    """`events` as a `text/event-stream` response."""

    async def each():  # an async generator: a plain iterator would hop to a thread per event
        for event in events:
            yield event

    return StreamingResponse(each(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
