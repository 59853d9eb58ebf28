"""prepare tokenises a response that continues the prompt (" the dog", as API teachers and `serve` spell it) as the
tokenizer does in context: with Llama 2's tokenizer.json layout (a `Prepend("▁")` normalizer: the dummy prefix is
added to a text on its own even where it starts with a space) the response's leading space is the dummy prefix, not
a lone `▁` before `▁the`; the teacher's alternatives spelled " the" are our `▁the`, and both heads sit on the right
rows. Metaspace layouts (the space is the prefix already), byte-level BPE and the word tokenizer are unchanged."""

import json
import string

import numpy as np
import pytest
from test_serve_context_decode import WORDS, sentencepiece_tokenizer

from proxykd_jax.data.align import SampleEncoder
from proxykd_jax.data.corpus import Sample
from proxykd_jax.models.tokenizer import build_bpe_tokenizer, build_word_tokenizer, load_tokenizer

LAYOUTS = ["llama2", "llama2-named", "metaspace"]


def layout(style, folder):
    """A tiny SentencePiece-style tokenizer whose merges stay inside words (as Llama 2's and Mistral's): `metaspace`
    as `sentencepiece_tokenizer` builds it; `llama2` the same vocabulary in Llama 2's tokenizer.json layout (no
    pre-tokenizer, a `▁` normalizer, a decoder that strips the leading space), loaded as written; `llama2-named`
    that folder with tokenizer_config.json naming LlamaTokenizerFast (which transformers rebuilds)."""
    sentencepiece_tokenizer("metaspace", folder)
    if style == "metaspace":
        return load_tokenizer(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    if style == "llama2-named":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast"}))
    return load_tokenizer(folder)


def vocab_words(tok):
    """The words of WORDS that are one `▁word` token."""
    vocab = tok.get_vocab()
    words = [w for w in WORDS if "\u2581" + w in vocab]
    assert len(words) >= 8
    return words


def encode(tok, prompt, response, *, head="exact", tokens=None, alts=None):
    s = Sample("t:1", "r", 0, prompt, None, response, tokens, alts, {})
    return SampleEncoder(tok, seq_len=512, add_eos=False, head=head).encode_batch([s])[0]


@pytest.mark.parametrize("style", LAYOUTS)
def test_a_response_with_a_leading_space_is_tokenised_as_in_context(style, tmp_path):
    rng = np.random.default_rng()
    tok = layout(style, tmp_path / "tok")
    words = vocab_words(tok)
    for _ in range(4):
        prompt = " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
        unknown = "".join(rng.choice(list(string.ascii_uppercase), size=int(rng.integers(1, 4))))  # byte fallback
        body = list(rng.choice(words, size=int(rng.integers(1, 5)))) + [unknown]
        rng.shuffle(body)
        for lead in (" ", "  ", " \n"):
            response = lead + " ".join(body)
            enc = encode(tok, prompt, response)
            ids = enc.tokens_L.tolist()
            joint = tok(prompt + response)["input_ids"]
            assert joint[: enc.prompt_len] == ids[: enc.prompt_len]
            assert ids[enc.prompt_len :] == joint[enc.prompt_len :], (response, tok.convert_ids_to_tokens(ids))
            assert tok.decode(ids, skip_special_tokens=False).removeprefix(tok.bos_token or "") == prompt + response
        # (decided: a response without a leading space keeps the dummy prefix, as after a chat prompt)
        response = " ".join(body)
        enc = encode(tok, prompt, response)
        assert enc.tokens_L[enc.prompt_len :].tolist() == tok(response, add_special_tokens=False)["input_ids"]


def _one_distribution(lps):
    """Log-probs lowered together where needed so that their probabilities sum to at most 0.99, as one
    distribution's top alternatives do (`prepare` refuses a position whose alternatives sum past 1.01)."""
    return lps - max(0.0, float(np.log(np.exp(lps).sum())) - np.log(0.99))


def served_case(rng, tok):
    """A prompt, a response of random vocabulary words with its leading space, the teacher's tokens spelled as
    `serve` spells them (" the") and per token random word-start alternatives, the sampled one among them."""
    words = vocab_words(tok)
    prompt = " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
    body = [str(w) for w in rng.choice(words, size=int(rng.integers(2, 6)))]
    tokens = [" " + w for w in body]
    alts = []
    for w in body:
        others = [str(o) for o in rng.choice([o for o in words if o != w], size=3, replace=False)]
        lps = _one_distribution(np.sort(rng.uniform(-4.0, -0.05, size=4))[::-1])
        alts.append([(" " + a, float(lp)) for a, lp in zip([w, *others], lps)])
    return prompt, "".join(tokens), tokens, alts


@pytest.mark.parametrize("style", LAYOUTS)
def test_the_exact_head_maps_served_alternatives_to_the_right_rows(style, tmp_path):
    rng = np.random.default_rng()
    tok = layout(style, tmp_path / "tok")
    vocab = tok.get_vocab()
    prompt, response, tokens, alts = served_case(rng, tok)
    enc = encode(tok, prompt, response, tokens=tokens, alts=alts)
    p = enc.prompt_len
    assert tok.convert_ids_to_tokens(enc.tokens_L[p:].tolist()) == [t.replace(" ", "\u2581") for t in tokens]
    assert enc.stats.positions_kept == enc.stats.positions_total == len(tokens)
    for j, pos in enumerate(alts):
        got = {
            int(i): float(lp) for i, lp in zip(enc.teacher_topk_ids_LxK[p + j], enc.teacher_topk_logprobs_LxK[p + j])
        }
        got = {i: lp for i, lp in got.items() if np.isfinite(lp)}
        want = {vocab["\u2581" + a.strip()]: lp for a, lp in pos}
        assert got.keys() == want.keys() and np.allclose([got[i] for i in want], list(want.values()), atol=1e-6)
    assert not np.isfinite(enc.teacher_topk_logprobs_LxK[:p]).any()


@pytest.mark.parametrize("style", LAYOUTS)
def test_the_byte_head_puts_the_first_position_on_the_first_word(style, tmp_path):
    """`▁the` holds exactly the response's first bytes " the": it gets the teacher's first head (all its
    alternatives start with a space: one symbol, 32), and each later word its own."""
    rng = np.random.default_rng()
    tok = layout(style, tmp_path / "tok")
    prompt, response, tokens, alts = served_case(rng, tok)
    enc = encode(tok, prompt, response, head="bytes", tokens=tokens, alts=alts)
    p = enc.prompt_len
    assert len(enc.tokens_L) == p + len(tokens)
    rows = np.isfinite(enc.teacher_topk_logprobs_LxK).any(1)
    assert rows[p:].all() and not rows[:p].any()
    assert (enc.teacher_topk_ids_LxK[p:, 0] == ord(" ")).all()
    want = [np.log(np.exp([lp for _, lp in pos]).sum()) for pos in alts]
    assert np.allclose(enc.teacher_topk_logprobs_LxK[p:, 0], want, atol=1e-5)


@pytest.mark.parametrize("kind", ["bpe", "word"])
def test_byte_level_and_word_responses_are_tokenised_alone(kind, tmp_path):
    """Control: these tokenizers add no dummy prefix; a response's tokens are its own, its space included."""
    rng = np.random.default_rng()
    if kind == "bpe":
        tok = build_bpe_tokenizer([" ".join(rng.choice(WORDS, size=8)) for _ in range(50)], 300, tmp_path / "tok")
    else:
        tok = build_word_tokenizer(WORDS, tmp_path / "tok")
    for lead in (" ", "", "\n"):
        prompt, response = " ".join(rng.choice(WORDS, size=3)), lead + " ".join(rng.choice(WORDS, size=4))
        enc = encode(tok, prompt, response)
        assert enc.tokens_L[enc.prompt_len :].tolist() == tok(response, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("style", LAYOUTS)
def test_alternatives_inside_a_word_are_pieces_without_the_word_start(style, tmp_path):
    """A teacher alternative without a leading space ("sat" inside "▁thesat") is our piece `sat`, not the
    word-start `▁sat` that tokenising it on its own gives; a word-start alternative (" sat") stays `▁sat`, and
    "</s>" our eos."""
    rng = np.random.default_rng()
    tok = layout(style, tmp_path / "tok")
    vocab = tok.get_vocab()
    inner = [p for p in vocab if p.isalpha() and "\u2581" + p in vocab]  # pieces with and without the word start
    words = vocab_words(tok)
    pairs = [
        (w, p)
        for w in words
        for p in inner
        if tok.convert_ids_to_tokens(tok(" " + w + p, add_special_tokens=False)["input_ids"])[-2:] == ["\u2581" + w, p]
    ]
    assert len(inner) >= 4 and pairs, (inner, pairs)
    w, p = pairs[int(rng.integers(len(pairs)))]
    others = [str(o) for o in rng.choice([o for o in inner if o != p], size=3, replace=False)]
    lps = _one_distribution(np.sort(rng.uniform(-4.0, -0.05, size=5))[::-1])
    alts = [[(" " + w, -0.1)], [(p, lps[0]), *zip(others, lps[1:4]), (" " + others[0], lps[4]), ("</s>", -6.0)]]
    prompt = " ".join(rng.choice(words, size=2))
    enc = encode(tok, prompt, " " + w + p, tokens=[" " + w, p], alts=alts)
    row = enc.prompt_len + 1
    got = {int(i): float(lp) for i, lp in zip(enc.teacher_topk_ids_LxK[row], enc.teacher_topk_logprobs_LxK[row])}
    want = {vocab[p]: lps[0], **{vocab[o]: lp for o, lp in zip(others, lps[1:4])}, vocab["\u2581" + others[0]]: lps[4]}
    want[tok.eos_token_id] = -6.0  # the teacher's end of text: our eos, a special token and no piece
    assert {i: lp for i, lp in got.items() if np.isfinite(lp)} == pytest.approx(want, abs=1e-6)
