"""The true bytes of each token of a Hugging Face tokenizer, from its byte mapping.

Byte-level BPE (GPT-2 style) spells every byte as one printable character, so a vocabulary entry
maps back to its exact bytes even when it holds only part of a UTF-8 sequence, which decoding it
(with replacement characters) would lose. SentencePiece-style byte fallback has one `<0xNN>` token
per byte (its byte also where the tokenizer lists it as an added token, as one trained with the 256
of them as special tokens does). Other added and special tokens stand for the UTF-8 of their text.
Tokens whose bytes depend on their neighbours (word-level vocabularies that decode with separators,
`▁` word starts) have no entry: `None`, for the caller to take from decoding in context. A
SentencePiece-style decoder drops the space of a `▁` word start that opens the text
(`drops_word_start_space`): an answer's first token is spelled after the prompt's tail to keep it.
"""

from __future__ import annotations

import functools
import json
import re

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback token: one byte


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """The character a byte-level BPE spells each byte with, inverted: char -> byte value.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7f-0xa0,
    0xad) take the code points from 256 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def special_ids(tokenizer) -> frozenset[int]:
    """The ids of a tokenizer's special tokens, which spell no text: its named ones (bos, eos, ...) and the
    added tokens marked special (an end of turn such as Llama 3's <|eot_id|>, its header and reserved
    tokens), less the byte-fallback `<0xNN>` tokens some tokenizers list among them, which spell a byte."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids = {int(i) for i, t in added.items() if getattr(t, "special", False)}
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    return frozenset(i for i in ids if not BYTE_TOKEN.fullmatch(str(tokenizer.convert_ids_to_tokens(i))))


def _nodes(node) -> list[dict]:
    """The components of a tokenizer.json node, looking into `Sequence`s."""
    if not isinstance(node, dict):
        return []
    found = [node]
    for child in node.get("pretokenizers", []) + node.get("decoders", []) + node.get("normalizers", []):
        found += _nodes(child)
    return found


def _kinds(node) -> set[str]:
    """Component types in a tokenizer.json node, looking into `Sequence`s."""
    return {n.get("type") for n in _nodes(node)}


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def drops_word_start_space(tokenizer) -> bool:
    """Whether decoding drops the space of a `▁` word start at the start of the text: a `Metaspace`
    decoder that prepends (Mistral's tokenizer.json) or a `Strip` of leading characters (Llama 2's).
    Such a token decoded alone loses the space it holds where it continues a text."""
    for node in _nodes(_spec(tokenizer).get("decoder")):
        kind = node.get("type")
        # (tokenizers before 0.14 wrote `add_prefix_space` instead of a prepend scheme)
        if kind == "Metaspace" and node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", 1):
            return True
        if kind == "Strip" and node.get("start", 0) > 0:
            return True
    return False


def byte_fallback_ids(tokenizer) -> list[int] | None:
    """The id of each byte's `<0xNN>` token, by byte value, of a tokenizer with byte fallback (all 256 in its
    vocabulary); None for any other."""
    if not (_spec(tokenizer).get("model") or {}).get("byte_fallback"):
        return None
    vocab = tokenizer.get_vocab()
    ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
    return None if None in ids else ids


def token_byte_table(tokenizer) -> list[bytes | None]:
    """Per token id: the token's bytes where the byte mapping fixes them, else None."""
    spec = _spec(tokenizer)
    byte_level = "ByteLevel" in _kinds(spec.get("decoder")) | _kinds(spec.get("pre_tokenizer"))
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    alphabet = byte_level_alphabet()
    vocab = tokenizer.get_vocab()
    table: list[bytes | None] = [None] * max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    for piece, i in vocab.items():
        if byte_fallback and BYTE_TOKEN.fullmatch(piece):  # one byte, also where it is listed as an added token
            table[i] = bytes([int(piece[3:5], 16)])
        elif i in added:
            table[i] = added[i].encode("utf-8")
        elif byte_level and all(c in alphabet for c in piece):
            table[i] = bytes(alphabet[c] for c in piece)
    return table
