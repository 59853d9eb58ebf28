"""Our tokens' bytes and the teacher's end-of-text alternatives for the first-byte head: a byte-fallback
tokenizer whose `<0xNN>` tokens are added tokens spells its text with their bytes, and the stop tokens
of common teacher families are end of text (symbol 256), in the head and at the end of a response."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from proxykd_jax.data import align, byte_head
from proxykd_jax.data.corpus import Sample
from proxykd_jax.models.tokenizer import build_bpe_tokenizer
from proxykd_jax.teacher.token_bytes import token_byte_table


def byte_fallback_tokenizer():
    """A SentencePiece-style BPE (▁ word starts, byte fallback) trained with its 256 `<0xNN>` tokens
    given as special tokens, the way the `tokenizers` trainer adds them: they become added tokens."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(["hello world the end", "the theme there"] * 30, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_byte_fallback_tokens_listed_as_added_tokens_are_their_byte():
    tok = byte_fallback_tokenizer()
    table, pieces = token_byte_table(tok), byte_head.token_bytes(tok)
    sym = byte_head.token_symbols(tok)
    for b in (0x0A, 0x61, 0xC3, 0xE4, 0xFF):
        i = tok.convert_tokens_to_ids(f"<0x{b:02X}>")
        assert table[i] == pieces[i] == bytes([b]) and sym[i] == b
    for text in ("the end\nhello 中文", "é\tthere ü", "héllo wörld"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        spelled = b"".join(pieces[i] for i in ids)
        assert spelled == b" " + text.encode()  # the ▁ the normalizer puts before the text, then the text


def test_added_special_tokens_are_no_text():
    """Added tokens flagged special (Llama 3's header and reserved tokens, not named bos/eos) spell no text: no
    bytes, the OTHER symbol (they took the byte "<" of their text); an added token not flagged special keeps
    its text, and a `<0xNN>` listed as special its byte (above)."""
    from tokenizers import AddedToken

    tok = build_bpe_tokenizer(["ab ab cd the end"] * 20, vocab_size=280)
    tok.add_tokens([AddedToken(t, special=True) for t in ("<|start_header_id|>", "<|reserved_special_token_7|>")])
    tok.add_tokens(["<tag>"])
    pieces, sym = byte_head.token_bytes(tok), byte_head.token_symbols(tok)
    for t in ("<|start_header_id|>", "<|reserved_special_token_7|>"):
        i = tok.convert_tokens_to_ids(t)
        assert pieces[i] is None and sym[i] == byte_head.OTHER_SYMBOL
    i = tok.convert_tokens_to_ids("<tag>")
    assert pieces[i] == b"<tag>" and sym[i] == ord("<")
    assert sym[tok.eos_token_id] == byte_head.END_SYMBOL


@pytest.mark.parametrize(
    "stop", ["<|eot_id|>", "<end_of_turn>", "<|eom_id|>", "<|return|>", "<\uff5cend\u2581of\u2581sentence\uff5c>"]
)
def test_a_teachers_stop_token_is_end_of_text(stop):
    """Response "ab" from a teacher that stops with `stop`: its alternative at the first position is end
    of text (not the byte "<"), and the stop position gives our appended eos its head."""
    assert byte_head.teacher_symbol(stop) == byte_head.END_SYMBOL
    tok = build_bpe_tokenizer(["ab ab cd the end"] * 20, vocab_size=280)
    enc = align.SampleEncoder(tok, seq_len=64, head="bytes")
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(3), 2)[:, :2]
    alts = [
        [("ab", math.log(p[0, 0])), (stop, math.log(p[0, 1]))],
        [(stop, math.log(p[1, 0])), (" c", math.log(p[1, 1]))],
    ]
    e = enc.encode_batch([Sample("x:1", "p", 0, "q", None, "ab", ["ab", stop], alts, {})])[0]
    assert e.tokens_L.tolist()[e.prompt_len :] == [tok.convert_tokens_to_ids("ab"), tok.eos_token_id]
    for row, want in (
        (e.prompt_len, {ord("a"): p[0, 0], 256: p[0, 1]}),
        (e.prompt_len + 1, {256: p[1, 0], 32: p[1, 1]}),
    ):
        ok = np.isfinite(e.teacher_topk_logprobs_LxK[row])
        got = dict(zip(e.teacher_topk_ids_LxK[row][ok].tolist(), np.exp(e.teacher_topk_logprobs_LxK[row][ok])))
        assert got.keys() == want.keys(), (row, got)
        np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-6)
