"""First-byte symbols: the bridge between a teacher's tokens and ours (docs/TOKENIZERS.md).

Every token string, ours or the teacher's, starts with one byte; the symbol of a token is that byte
(0-255), `END_SYMBOL` (256) for end of text and `OTHER_SYMBOL` (257) for other special tokens and
tokens without bytes. The next-token distribution of any model fixes the distribution of the next
symbol exactly (a sum over the tokens of each symbol), which is what a teacher with another
tokenizer can tell us about our next token.
"""

from __future__ import annotations

import numpy as np

from proxykd_jax.bayes.posterior_bytes import END_SYMBOL, N_SYMBOLS, OTHER_SYMBOL
from proxykd_jax.models.tokenizer import end_of_turn_id
from proxykd_jax.teacher.responses import token_bytes_of
from proxykd_jax.teacher.token_bytes import special_ids, token_byte_table

__all__ = ["END_SYMBOL", "N_SYMBOLS", "OTHER_SYMBOL", "symbols_from_bytes", "token_symbols", "teacher_symbol"]

# Strings a teacher API may use for its end-of-text alternative (the stop tokens of common open model families:
# GPT-2/Qwen/Phi, Llama 3, ChatML, Phi-3/gpt-oss, Llama 2/Mistral, Gemma, DeepSeek, Command R).
END_STRINGS = frozenset(
    {
        "<|endoftext|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end_of_text|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "</s>",
        "<eos>",
        "<end_of_turn>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",
        "<|END_OF_TURN_TOKEN|>",
    }
)


def symbols_from_bytes(table, eos_ids=(), special_ids=()) -> np.ndarray:
    """int32 [V]: the first-byte symbol of each token from its bytes (None or b"" -> OTHER_SYMBOL)."""
    sym = np.full(len(table), OTHER_SYMBOL, np.int32)
    for i, b in enumerate(table):
        if b:
            sym[i] = b[0]
    for i in special_ids:
        sym[i] = OTHER_SYMBOL
    for i in eos_ids:
        if i is not None:
            sym[i] = END_SYMBOL
    return sym


def token_bytes(tokenizer) -> list[bytes | None]:
    """Bytes of each of our tokens: the byte mapping where it fixes them, else the token's own text
    (word-level pieces; SentencePiece's `▁` read as a space); special tokens (`special_ids`) are None."""
    table = token_byte_table(tokenizer)
    special = special_ids(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(table))))
    out: list[bytes | None] = []
    for i, (b, piece) in enumerate(zip(table, pieces)):
        if i in special:
            out.append(None)
        elif b is not None:
            out.append(b)
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8") if piece else None)
    return out


def token_symbols(tokenizer) -> np.ndarray:
    """int32 [V] first-byte symbols of a Hugging Face tokenizer's tokens (the eos and the chat template's end of
    turn, `end_of_turn_id`, which `prepare` ends templated answers with -> END_SYMBOL; other special tokens ->
    OTHER_SYMBOL)."""
    ends = (tokenizer.eos_token_id, end_of_turn_id(tokenizer))
    return symbols_from_bytes(token_bytes(tokenizer), eos_ids=ends, special_ids=special_ids(tokenizer))


def teacher_symbol(text: str) -> int:
    """The symbol of one teacher alternative (an API token string, `bytes:\\xNN` spellings read as
    their bytes): its first byte, END_SYMBOL for end of text (the empty string or a known
    end-of-text marker)."""
    if text in END_STRINGS or not text:
        return END_SYMBOL
    return token_bytes_of(text)[0] if token_bytes_of(text) else END_SYMBOL
