"""The token that ends a response (docs/DATA_FORMATS.md): for a row rendered with the tokenizer's chat template,
the template's end of turn (Llama 3's <|eot_id|>, which is not its eos <|end_of_text|>); for a plain-text row, or
a template that writes no special token after a message, the eos; after a cut answer, none."""

import collections
import random

import numpy as np
import pytest
from test_data_common import WORDS, sentence, tiny_cfg, write_jsonl
from tokenizers import AddedToken

from proxykd_jax.data import PreparedData, align, byte_head, corpus, prepare, records
from proxykd_jax.models.tokenizer import (
    CHAT_TEMPLATE,
    build_bpe_tokenizer,
    build_word_tokenizer,
    end_of_turn_id,
    load_tokenizer,
)
from proxykd_jax.npfiles import sha256

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# (added special tokens, eos, chat template, the token that ends a templated response)
KINDS = {
    "llama3": (("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|end_of_text|>", LLAMA3, "<|eot_id|>"),
    "qwen": (("<|im_start|>",), "<|im_end|>", CHATML, "<|im_end|>"),
    "no_template": ((), "<eos>", None, "<eos>"),
    "own": ((), "<eos>", CHAT_TEMPLATE, "<eos>"),  # the project's template writes nothing after a message
}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    rng = random.Random(0)
    texts = [sentence(rng, 12) for _ in range(300)]
    out = {}
    for kind, (added, eos, template, _) in KINDS.items():
        folder = tmp_path_factory.mktemp(kind)
        tok = build_bpe_tokenizer(texts, 320)  # saved once, below (a saved template would stay beside it)
        tok.add_tokens([AddedToken(t, special=True) for t in added])  # not among the named special tokens
        if eos != "<eos>":
            tok.add_special_tokens({"eos_token": eos})
        tok.chat_template = template
        tok.save_pretrained(str(folder))
        out[kind] = load_tokenizer(folder)
        assert bool(out[kind].chat_template) == (template is not None)
    return out


def _rows(rng, n=6):
    rows = [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "system", "content": sentence(rng, 3)},
                {"role": "user", "content": sentence(rng, 5)},
            ],
            "response": sentence(rng, rng.randint(3, 8)),
        }
        for i in range(n)
    ]
    rows.append({"id": "plain", "prompt": sentence(rng, 4), "response": sentence(rng, 5)})
    rows.append(
        {
            "id": "cut",
            "messages": [{"role": "user", "content": "the fox"}],
            "response": "the dog",
            "finish_reason": "length",
        }
    )
    return rows


def _want(tok, row, end):
    """prompt + response (+ end) token ids of one row, built here from the tokenizer alone."""
    if "messages" in row and tok.chat_template:
        text = tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
    elif "messages" in row:
        prompt = tok("\n".join([f"{m['role']}: {m['content']}" for m in row["messages"]] + ["assistant: "]))[
            "input_ids"
        ]
    else:
        prompt = tok(row["prompt"])["input_ids"]
    return prompt + tok(row["response"], add_special_tokens=False)["input_ids"] + ([end] if end is not None else [])


@pytest.mark.parametrize("kind", list(KINDS))
def test_end_of_turn_id_is_the_templates_turn_end(toks, kind):
    tok = toks[kind]
    want = tok.convert_tokens_to_ids(KINDS[kind][3])
    assert end_of_turn_id(tok) == want
    assert (want == tok.eos_token_id) == (kind != "llama3")


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",  # ordinary text after a message
        "{% for m in messages %}{{ m['content'] }} </turn> {% endfor %}",  # text, not a token (word-level: <unk>)
        "{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}",  # an added token (word-level), but whitespace
        "{{ raise_exception('roles must alternate') }}",  # a template that refuses the probe
    ],
)
def test_a_template_without_a_special_turn_end_gives_the_eos(toks, template, tmp_path):
    word = build_word_tokenizer(WORDS)
    word.add_tokens([AddedToken("\n\n")])
    for tok in (toks["own"], word):
        try:
            tok.chat_template = template
            assert end_of_turn_id(tok) == tok.eos_token_id
        finally:
            tok.chat_template = CHAT_TEMPLATE


@pytest.mark.parametrize("kind", list(KINDS))
def test_prepare_ends_templated_responses_with_the_turn_end(toks, kind, tmp_path):
    tok = toks[kind]
    rows = _rows(random.Random(list(KINDS).index(kind)))
    m = prepare([write_jsonl(tmp_path / "c.jsonl", rows)], tok, tmp_path / "out", tiny_cfg(seq_len=256), progress=False)
    pd = PreparedData(tmp_path / "out")
    recs = {r["record_id"]: r for s in pd.manifest["splits"] for r in pd.iter_split(s)}
    turn_end, eos = tok.convert_tokens_to_ids(KINDS[kind][3]), tok.eos_token_id
    assert m["tokenizer"]["end_of_turn_id"] == turn_end and m["tokenizer"]["eos_id"] == eos
    for row in rows:
        end = {"plain": eos, "cut": None}.get(row["id"], turn_end)  # a cut answer gets no end token
        np.testing.assert_array_equal(recs[row["id"]]["tokens"], _want(tok, row, end))
    assert [recs[f"c{i}"]["tokens"][-1] for i in range(6)] == [turn_end] * 6
    assert recs["plain"]["tokens"][-1] == eos


def test_turn_end_changes_the_tokenizer_hash_and_the_byte_symbols(toks, tmp_path):
    """The same vocabulary with a template that ends turns with the eos: another hash; with the bytes head, the
    turn end is an end of text like the eos (the teacher's end-of-text mass is predicted there)."""
    tok = toks["llama3"]
    rows = _rows(random.Random(3))
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    a = prepare([path], tok, tmp_path / "a", tiny_cfg(teacher_head="bytes", seq_len=256), progress=False)
    sym = PreparedData(tmp_path / "a").head_symbols()  # checked against the manifest's sha256
    assert a["checksums"][records.SYMBOLS] == sha256(tmp_path / "a" / records.SYMBOLS)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert sym[eot] == sym[tok.eos_token_id] == byte_head.END_SYMBOL
    try:
        tok.chat_template = LLAMA3.replace("<|eot_id|>' }}", "<|end_of_text|>' }}")
        b = prepare([path], tok, tmp_path / "b", tiny_cfg(teacher_head="bytes", seq_len=256), progress=False)
    finally:
        tok.chat_template = LLAMA3
    assert b["tokenizer"]["end_of_turn_id"] == tok.eos_token_id != a["tokenizer"]["end_of_turn_id"]
    assert a["tokenizer"]["hash"] != b["tokenizer"]["hash"]
    assert np.load(tmp_path / "b" / records.SYMBOLS)[eot] != byte_head.END_SYMBOL


@pytest.mark.parametrize("kind", ["llama3", "qwen", "no_template"])
def test_alignment_encoding_ends_with_the_turn_end(toks, kind, tmp_path):
    """`align.SampleEncoder`, which the SFT and DPO pairs come from: the turn end after templated responses,
    the eos after plain ones, none after a cut answer, a truncated one or with add_eos=False."""
    tok = toks[kind]
    rows = _rows(random.Random(7))
    samples = [
        s
        for r in corpus.iter_corpus(write_jsonl(tmp_path / "c.jsonl", rows), "error", collections.Counter())
        for s in r
    ]
    turn_end, eos = tok.convert_tokens_to_ids(KINDS[kind][3]), tok.eos_token_id
    encoded = align.SampleEncoder(tok, seq_len=256).encode_batch(samples)
    for s, enc, row in zip(samples, encoded, rows):
        end = {"plain": eos, "cut": None}.get(s.record_id, turn_end)
        np.testing.assert_array_equal(enc.tokens_L, _want(tok, row, end))
    for enc in align.SampleEncoder(tok, seq_len=256, add_eos=False).encode_batch(samples):
        assert enc.tokens_L[-1] not in (turn_end, eos)
    short = len(_want(tok, rows[0], None)) - 2  # the response cut by two tokens
    enc = align.SampleEncoder(tok, seq_len=short, truncate=True).encode_batch(samples[:1])[0]
    assert enc.truncated and len(enc.tokens_L) == short + 1 and enc.tokens_L[-1] not in (turn_end, eos)


def test_sampled_answers_end_at_the_turn_end(toks, tmp_path, monkeypatch):
    """What the student learnt to end with ends its sampled answers: DPO's rejected answers (`AlignData`'s stop
    tokens, from the manifest) and eval's generations stop at the turn end as at the eos, and eval samples it
    (it was suppressed as a special token other than the eos)."""
    from proxykd_jax.align.rounds import AlignData
    from proxykd_jax.eval import metrics, per_byte
    from proxykd_jax.models import sampling

    tok = toks["llama3"]
    eot, eos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(_rows(random.Random(5), n=24))]
    prepare([write_jsonl(tmp_path / "c.jsonl", rows)], tok, tmp_path / "out", tiny_cfg(seq_len=256), progress=False)
    assert AlignData.load(tmp_path / "out").stop_tokens == (eos, eot)

    seen = {}

    def fake_generate(model, tokens, lengths, rng, *, stop_tokens, suppress_tokens, **kw):
        seen.update(stop=stop_tokens, suppress=suppress_tokens)
        answers = np.asarray([[5, 6, eot], [7, eos, 0]], np.int32)
        return sampling.GenerateOutput(answers, np.asarray([3, 2], np.int32), None, None, None)

    monkeypatch.setattr(sampling, "generate", fake_generate)

    class Model:
        cfg = type("Cfg", (), {"vocab_size": len(tok)})

    class Teacher:
        def text_logprob(self, prompts, texts, ended):
            seen.update(texts=texts, ended=ended)
            return np.zeros(len(texts)), np.ones(len(texts))

    per_byte.generation_nats_per_byte({"s": Model()}, ["a b", "c"], Teacher(), tok, max_new_tokens=3, seed=0)
    assert set(seen["stop"]) == {eos, eot} and eot not in seen["suppress"] and eos not in seen["suppress"]
    assert seen["ended"] == [True, True] and seen["texts"] == [tok.decode([5, 6]), tok.decode([7])]
    metrics.sample_answers(Model(), [[4, 5]], tok, eos, max_new_tokens=3, seed=0)
    assert seen["stop"] == (eos,)
