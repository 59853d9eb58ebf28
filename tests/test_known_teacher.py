"""Known teacher (determinism, sharpness, round trips) and the tokenizer builders."""

import numpy as np
import pytest

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models import hf
from proxykd_jax.models.tokenizer import build_bpe_tokenizer, build_word_tokenizer, load_tokenizer, tokenizer_hash
from proxykd_jax.teacher.known import KnownTeacher

KW = dict(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=128)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return KnownTeacher.create(3, folder=tmp_path_factory.mktemp("teacher_tok"), **KW)


def _contexts(teacher, n=12, seed=0):
    rng = np.random.default_rng(seed)
    prompts = teacher.make_prompts(n, rng)
    return prompts, [teacher.encode(p) for p in prompts]


def test_deterministic_from_seed(teacher, tmp_path):
    again = KnownTeacher.create(3, folder=tmp_path / "a", **KW)
    other = KnownTeacher.create(4, folder=tmp_path / "b", **KW)
    _, ctx = _contexts(teacher)
    p3, p3b, p4 = teacher.distributions(ctx), again.distributions(ctx), other.distributions(ctx)
    np.testing.assert_array_equal(p3, p3b)
    assert np.abs(p3 - p4).max() > 0.5
    assert tokenizer_hash(teacher.tokenizer) == tokenizer_hash(again.tokenizer)


def test_distributions_sharp_structured_and_normalised(teacher):
    _, ctx = _contexts(teacher, n=16)
    lengths = np.array([len(c) for c in ctx])
    probs = teacher.distributions(ctx)
    assert probs.dtype == np.float32 and probs.shape == (16, lengths.max(), 128)
    mask = np.arange(probs.shape[1])[None] < lengths[:, None]
    p = probs[mask].astype(np.float64)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    entropy = -(p * np.log(np.maximum(p, 1e-30))).sum(-1)
    assert 0.5 < entropy.mean() < 2.5 < np.log(124) - 2  # far below uniform over the words
    assert len(set(p.argmax(-1).tolist())) > 0.3 * len(p)  # the likely token depends on the context
    assert p[:, [0, 1, 3]].max() < 1e-6  # <pad> <bos> <unk> practically impossible
    assert 1e-3 < p[:, 2].mean() < 0.2  # <eos> reachable
    # same last token, different earlier context -> different distribution
    a, b = ctx[0][:-1] + [ctx[1][-1]], ctx[2][:-1] + [ctx[1][-1]]
    pa, pb = teacher.distributions([a, b])
    tv = 0.5 * np.abs(pa[len(a) - 1] - pb[len(b) - 1]).sum()
    assert tv > 0.05
    # array + lengths form gives the same numbers
    padded = np.zeros((len(ctx), lengths.max()), np.int32)
    for i, c in enumerate(ctx):
        padded[i, : len(c)] = c
    np.testing.assert_allclose(teacher.distributions(padded, lengths)[mask], probs[mask], atol=1e-6)


def test_sample_round_trip_and_determinism(teacher):
    prompts, _ = _contexts(teacher, n=5, seed=1)
    r1 = teacher.sample(prompts, 3, max_new_tokens=24, seed=7)
    r2 = teacher.sample(prompts, 3, max_new_tokens=24, seed=7)
    r3 = teacher.sample(prompts, 3, max_new_tokens=24, seed=8)
    assert r1 == r2 and r1 != r3
    assert [len(x) for x in r1] == [3] * 5
    lengths = []
    for p, responses in zip(prompts, r1):
        for r in responses:
            ids = teacher.encode(r)
            assert teacher.tokenizer.decode(ids) == r  # text round trip
            assert all(i >= 4 for i in ids) and len(ids) <= 24
            lengths.append(len(ids))
            assert teacher.encode(p + " " + r) == teacher.encode(p) + ids
    assert len(set(lengths)) > 1  # some responses end at <eos>
    # samples follow the true distribution: the teacher likes its own samples far more than random text
    own = teacher.sequence_logprobs([p for p in prompts for _ in range(3)], [r for rs in r1 for r in rs])
    rand = teacher.sequence_logprobs(
        [p for p in prompts for _ in range(3)],
        [" ".join(f"w{i}" for i in np.random.default_rng(0).integers(0, 124, len(r.split()))) for rs in r1 for r in rs],
    )
    assert own.mean() > rand.mean() + 1.0


def test_save_loads_back(teacher, tmp_path):
    teacher.save(tmp_path / "t")
    again = KnownTeacher.load(tmp_path / "t")
    _, ctx = _contexts(teacher)
    np.testing.assert_allclose(again.distributions(ctx), teacher.distributions(ctx), atol=1e-6)
    assert again.tokenizer.encode("w1 w2 w3") == teacher.tokenizer.encode("w1 w2 w3")
    cfg, _ = hf.load_hf(tmp_path / "t")
    assert cfg == teacher.model_config


def test_word_tokenizer(tmp_path):
    tok = build_word_tokenizer(["apple", "b", "c9"], tmp_path / "w")
    loaded = load_tokenizer(tmp_path / "w")
    ids = loaded.encode("c9 apple b b")
    assert ids == [6, 4, 5, 5] and loaded.decode(ids) == "c9 apple b b"
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert loaded.encode("zzz") == [3]
    chat = loaded.apply_chat_template(
        [{"role": "user", "content": "b apple"}], tokenize=False, add_generation_prompt=True
    )
    assert loaded.encode(chat) == loaded.encode("b apple")
    assert tokenizer_hash(tok) == tokenizer_hash(loaded)
    assert tokenizer_hash(tok) != tokenizer_hash(build_word_tokenizer(["apple", "c9", "b"]))
    with pytest.raises(ValueError, match="special tokens"):
        build_word_tokenizer(["<eos>", "a"])
    with pytest.raises(ValueError, match="starting with '##'"):  # decoded "a ##x" as "ax"
        build_word_tokenizer(["a", "##x"])


def test_bpe_tokenizer(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 20
    tok = build_bpe_tokenizer(texts, 300, tmp_path / "b")
    loaded = load_tokenizer(tmp_path / "b")
    for s in ["the lazy fox", "unseen wörds, ünïcode!"]:
        assert loaded.decode(loaded.encode(s)) == s
    assert len(loaded.encode("the quick brown fox")) < len("the quick brown fox")  # merges were learnt
    assert tokenizer_hash(tok) == tokenizer_hash(loaded)
    with pytest.raises(ValueError, match="vocab_size"):
        build_bpe_tokenizer(texts, 100)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_sample_uses_the_whole_context(teacher):
    """A prompt that fits with its new tokens is sampled even where the rounded-up batch width would not fit
    (115 + 10 <= 128; 115 rounded up to 128 + 10 would not): greedy equals the argmax of `distributions`."""
    rng = np.random.default_rng(5)
    prompt = " ".join(f"w{i}" for i in rng.integers(0, 124, 115))
    (answer,) = teacher.sample([prompt], 1, max_new_tokens=10, temperature=0.0)[0]
    ids, want = teacher.encode(prompt), []
    assert len(ids) == 115
    padded = np.zeros((1, 128), np.int32)
    for _ in range(10):  # greedy reference from full forwards at one padded width
        padded[0, : len(ids)] = ids
        next_id = int(np.argmax(teacher.distributions(padded, [len(ids)])[0, len(ids) - 1].astype(np.float64)))
        if next_id == teacher.eos_id:
            break
        ids, want = ids + [next_id], want + [next_id]
    assert teacher.encode(answer) == want


def test_scoring_refuses_an_empty_prompt(teacher):
    """A text after an empty prompt has no context for its first token (there is no <bos>): refused, not
    scored from a padding position."""
    prompts, _ = _contexts(teacher, n=2, seed=2)
    with pytest.raises(ProxyKDError, match=r"text_logprob got an empty prompt \(index 1\)"):
        teacher.text_logprob([prompts[0], ""], ["w1 w2", "w1 w2"])
    with pytest.raises(ProxyKDError, match="sequence_logprobs got an empty prompt"):
        teacher.sequence_logprobs(["  "], ["w1 w2"])
    # a one-token prompt scores its text from that token on: float64 sums of the distributions' log-probs
    ll, nbytes = teacher.text_logprob(["w5"], ["w1 w2"], ended=[False])
    probs = teacher.distributions([teacher.encode("w5 w1")])[0].astype(np.float64)
    w1, w2 = teacher.encode("w1 w2")
    np.testing.assert_allclose(ll, [np.log(probs[0, w1]) + np.log(probs[1, w2])], rtol=1e-6)
    assert nbytes.tolist() == [5]


def test_a_teacher_of_a_short_context_can_be_made(tmp_path):
    """Its output is shaped on rows of at most its context (rows of 32 were refused by a model of 16)."""
    short = KnownTeacher.create(5, folder=tmp_path / "tok", **{**KW, "max_seq_len": 16})
    assert short.model_config.max_seq_len == 16
    probs = short.distributions([[4, 5, 6], list(range(4, 20))]).astype(np.float64)
    assert probs.shape == (2, 16, 128)
    np.testing.assert_allclose(probs[1].sum(-1), 1.0, atol=1e-5)
