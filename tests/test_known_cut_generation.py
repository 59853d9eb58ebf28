"""The teacher's nats per byte of a student's generations that are not UTF-8 (eval/per_byte.py `generation_text`).

A generation max_new_tokens cut inside a multi-byte character (a byte-level BPE's byte tokens) decodes with a
replacement character, which the character teacher scored as a character it never writes (69 nats) and which
counted 3 bytes for the 1 to 3 its tokens held. The convention: such a cut answer is scored and counted up to its
last whole character; other bytes that are not UTF-8 (in the middle, or ending an answer that stopped) are scored
as the replacement characters decoding writes and count the bytes they hold. A byte-fallback tokenizer's decoder
turns every byte of a run of `<0xNN>` tokens that is not UTF-8 into a replacement character; its generations are
read as Python decodes their bytes, as a byte-level BPE's are. The reference is written plainly:
the bytes of each generation as the test builds them, the incomplete tail found among all proper prefixes of every
character's UTF-8, the character teacher's ids spelled from its alphabet, its float64 log-probs.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from test_eval_small_fixes import gpt2_bytes
from test_xtok_token_bytes import byte_fallback_tokenizer

from proxykd_jax.eval import per_byte
from proxykd_jax.models.tokenizer import SPECIAL_TOKENS, build_bpe_tokenizer
from proxykd_jax.teacher.known import CHAR_ALPHABET, KnownTeacher

V = 36  # the character teacher's vocabulary: its first 32 characters (é ü ß ø among them, two bytes each)
# the student's characters: 1 to 4 bytes, some the teacher never writes, U+FFFD itself
ALPHABET = list(CHAR_ALPHABET[:20]) + ["é", "ü", "ß", "文", "語", "😀", "🦊", "\ufffd", "Ω"]


@functools.cache
def incomplete_prefixes() -> frozenset[bytes]:
    """Every proper prefix of the UTF-8 of every character (surrogates are none): the bytes that start a
    character and stop before its end."""
    out = set()
    for cp in range(0x80, 0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        enc = chr(cp).encode("utf-8")
        out.update(enc[:k] for k in range(1, len(enc)))
    return frozenset(out)


def reference_generation(raw: bytes, ended: bool) -> tuple[str, int]:
    """(text, bytes) a generation holding `raw` is scored and counted as: a cut answer (not `ended`) up to its
    last whole character; the rest decoded with a replacement character for each bytes that are not UTF-8, its
    bytes the bytes held."""
    cuts = [k for k in (1, 2, 3) if k <= len(raw) and raw[-k:] in incomplete_prefixes()]
    tail = 0 if ended else max(cuts, default=0)
    kept = raw[: len(raw) - tail]
    return kept.decode("utf-8", errors="replace"), len(kept)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cut")
    teacher = KnownTeacher.create(
        4, vocab_size=V, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32, max_seq_len=64,
        tokenizer="char", eos_rate=0.2, folder=root / "teacher",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    tok = build_bpe_tokenizer(["".join(rng.choice(ALPHABET, 20)) for _ in range(20)], 280, root / "bpe")
    return teacher, tok


def _random_bytes(rng) -> tuple[list[bytes], bytes]:
    """(pieces, raw): random characters' UTF-8, some with a random non-ASCII byte put in at a character boundary,
    and their bytes cut at a random offset (half the time one inside a character, where there is one)."""
    pieces = [c.encode("utf-8") for c in rng.choice(ALPHABET, int(rng.integers(1, 8)))]
    if rng.random() < 0.4:
        pieces.insert(int(rng.integers(0, len(pieces) + 1)), bytes([int(rng.integers(0x80, 0x100))]))
    whole = b"".join(pieces)
    inside = sorted(set(range(1, len(whole))) - set(np.cumsum([len(x) for x in pieces]).tolist()))
    cut = int(rng.choice(inside)) if inside and rng.random() < 0.5 else int(rng.integers(1, len(whole) + 1))
    return pieces, whole[:cut]


def _references(gens) -> tuple[list[tuple[str, int]], int, int]:
    """(each generation's reference reading, how many were cut inside a character, how many hold a stray byte)."""
    refs = [reference_generation(raw, ended) for _, raw, ended in gens]
    cut = sum(len(text.encode("utf-8")) < len(raw) for (text, _), (_, raw, e) in zip(refs, gens) if not e)
    stray = sum(text.count("\ufffd") > raw.count("\ufffd".encode()) for (text, _), (_, raw, _) in zip(refs, gens))
    return refs, cut, stray


def _generations(rng, tok, n: int) -> list[tuple[list[int], bytes, bool]]:
    """`n` random generations (our token ids, the bytes they hold, whether they ended) of `_random_bytes` (whole
    characters through the BPE, the bytes past the last whole one and a stray byte as single byte tokens), some
    ended (our eos after them)."""
    byte_token = {b: tok.convert_tokens_to_ids(c) for c, b in gpt2_bytes().items()}
    out = []
    for _ in range(n):
        pieces, raw = _random_bytes(rng)
        ids, done = [], 0
        for piece in pieces:  # whole characters through the BPE, any other byte on its own
            if done + len(piece) <= len(raw) and _is_utf8(piece):
                ids += tok.encode(piece.decode("utf-8"), add_special_tokens=False)
            else:
                ids += [byte_token[b] for b in piece[: len(raw) - done]]
            done += len(piece)
            if done >= len(raw):
                break
        ended = bool(rng.random() < 0.3)
        out.append((ids + [tok.eos_token_id] * ended, raw, ended))
    return out


def _is_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _teacher_ll(teacher, prompts: list[str], texts: list[str], ended: list[bool]) -> float:
    """float64 log-likelihood of each text after its prompt (the teacher's <eos> where it ended), the teacher's
    ids spelled from its alphabet (<unk> for any other character), each probability floored at 1e-30."""
    chars = CHAR_ALPHABET[: V - len(SPECIAL_TOKENS)]
    ids = lambda s: [len(SPECIAL_TOKENS) + chars.index(c) if c in chars else 3 for c in s]  # noqa: E731
    contexts = [ids(p) + ids(t) + [teacher.eos_id] * e for p, t, e in zip(prompts, texts, ended)]
    q = teacher.distributions([c[:-1] for c in contexts])
    total = 0.0
    for i, (p, c) in enumerate(zip(prompts, contexts)):
        rows = np.arange(len(p) - 1, len(c) - 1)
        total += np.log(np.maximum(q[i, rows, c[len(p) :]].astype(np.float64), 1e-30)).sum()
    return float(total)


def test_generations_cut_inside_a_character_score_and_count_their_whole_characters(setup, monkeypatch):
    """Random generations cut at random byte offsets, some with a stray byte in the middle, some ended: the
    teacher's nats per byte of them (`generation_nats_per_byte`, the eval's and the report's) and each one's text
    and bytes (`generation_text`) are the reference's."""
    teacher, tok = setup
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    rng = np.random.default_rng(seed)
    gens = _generations(rng, tok, 48)
    prompts = ["".join(rng.choice(list(CHAR_ALPHABET[:32]), int(rng.integers(2, 8)))) for _ in gens]
    refs, cut_inside, stray = _references(gens)
    assert cut_inside >= 3 and stray >= 3, (seed, cut_inside, stray)  # (over 2000 seeds: at least 4 and 5)
    for (ids, raw, ended), want in zip(gens, refs):
        assert per_byte.generation_text(ids, tok, ended) == want, (seed, raw, ended)

    monkeypatch.setattr(per_byte, "sample_answers", lambda *a, **k: [ids for ids, _, _ in gens])
    got = per_byte.generation_nats_per_byte({"s": None}, prompts, teacher, tok, max_new_tokens=32, seed=0)["s"]
    ll = _teacher_ll(teacher, prompts, [t for t, _ in refs], [e for _, _, e in gens])
    assert got == pytest.approx(-ll / sum(n for _, n in refs), rel=1e-5), seed


def test_an_answer_of_one_cut_character_scores_nothing(setup, monkeypatch):
    """A cut answer that holds only the first bytes of one character is no text: no log-likelihood and no byte
    (nats per byte 0 over it alone), where the teacher scored a replacement character over 3 bytes."""
    teacher, tok = setup
    table = per_byte._token_bytes(tok)
    lead = table.index("😀".encode()[:1])
    assert per_byte.generation_text([lead], tok, False) == ("", 0)
    monkeypatch.setattr(per_byte, "sample_answers", lambda *a, **k: [[lead]])
    assert per_byte.generation_nats_per_byte({"s": None}, ["ab"], teacher, tok, max_new_tokens=1, seed=0) == {"s": 0.0}


def _fallback_generations(rng, tok, n: int) -> list[tuple[list[int], bytes, bool]]:
    """`n` random generations of a byte-fallback tokenizer (our token ids, the bytes they hold, whether they
    ended) of `_random_bytes`: each byte its `<0xNN>` token or, half the time for a letter the vocabulary holds, that
    letter's piece (which ends a run of byte tokens); some ended."""
    pieces = tok.get_vocab()
    out = []
    for _ in range(n):
        raw = _random_bytes(rng)[1]
        ids = [
            pieces[chr(b)] if chr(b) in pieces and rng.random() < 0.5 else tok.convert_tokens_to_ids(f"<0x{b:02X}>")
            for b in raw
        ]
        ended = bool(rng.random() < 0.3)
        out.append((ids + [tok.eos_token_id] * ended, raw, ended))
    return out


def test_byte_fallback_generations_score_and_count_like_byte_level_ones():
    """A SentencePiece-style byte-fallback decoder writes a replacement character for every byte of a run of byte
    tokens that is not UTF-8, the run's whole characters too: `é` then a cut character's first byte decoded as three
    marks, scored as no text and counted as no byte. Random generations of such a tokenizer (whole characters as
    byte runs or letter pieces, stray bytes, cuts inside a character, some ended) are scored and counted as the
    reference reads their bytes (`generation_text`), and every byte they hold counts in `text_bytes`."""
    tok = byte_fallback_tokenizer()
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    gens = _fallback_generations(np.random.default_rng(seed), tok, 64)
    refs, cut, stray = _references(gens)
    assert cut >= 3 and stray >= 3, (seed, cut, stray)  # (over 300 seeds: at least 8 and 12)
    for (ids, raw, ended), want in zip(gens, refs):
        assert per_byte.generation_text(ids, tok, ended) == want, (seed, raw, ended)
        assert per_byte.text_bytes(ids, tok) == len(raw), (seed, raw)
    e_cut = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "é文".encode()[:3]]
    assert tok.decode(e_cut) == "\ufffd" * 3  # the decoder's reading, which lost the é
    assert per_byte.generation_text(e_cut, tok, False) == ("é", 2)
