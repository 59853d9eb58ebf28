"""`serve` with a real project Llama behind it, `collect` over loopback, then `prepare`."""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from proxykd_jax.data import config as data_config
from proxykd_jax.data.prepare import prepare
from proxykd_jax.data.records import PreparedData
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.tokenizer import build_bpe_tokenizer
from proxykd_jax.teacher.backends import LlamaBackend
from proxykd_jax.teacher.client import collect
from proxykd_jax.teacher.config import collect_config
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.responses import bytes_token
from proxykd_jax.teacher.server import make_app
from proxykd_jax.teacher.token_bytes import token_byte_table

WORDS = (
    "the a cat dog sat ran on under mat log red blue big small fast slow one two three "
    "four and or but then here there now later up down left right"
).split()
K = 5


class RecordingBackend(LlamaBackend):
    """Remembers each prompt's completion so the test can check the wire against the model."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen = {}

    def complete(self, prompts, **kw):
        out = super().complete(prompts, **kw)
        for p, (c,) in zip(prompts, out):
            self.seen[tuple(p)] = c
        return out


def test_llama_server_logprobs_round_trip_into_corpus_and_prepare(tmp_path):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=8)) for _ in range(200)]
    tok = build_bpe_tokenizer(texts, 300, tmp_path / "tok")  # byte-level: token pieces are exact
    cfg = ModelConfig(
        vocab_size=len(tok), d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=64, max_seq_len=64
    )
    model = Llama(cfg, rngs=nnx.Rngs(jax.random.key(7)))
    backend = RecordingBackend(model, tok, model_name="tiny", seed=1)
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(6):
            words = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
            f.write(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": words}]}) + "\n")
    app = make_app(backend, batch_window_ms=20)
    with ServerThread(app) as srv:
        ccfg = collect_config()
        ccfg.prompts, ccfg.out, ccfg.base_url, ccfg.model = (
            str(prompts),
            str(tmp_path / "c.jsonl"),
            srv.base_url,
            "tiny",
        )
        ccfg.max_tokens, ccfg.top_logprobs, ccfg.concurrency, ccfg.progress = 6, K, 6, False
        ccfg.temperature = 1.0
        stats = collect(ccfg)
        again = ccfg.copy_and_resolve_references()
        again.out, again.concurrency = str(tmp_path / "again.jsonl"), 2  # other batches, same seeds
        collect(again)
    first = {r["key"]: r["response"] for r in map(json.loads, pathlib.Path(ccfg.out).read_text().splitlines())}
    second = {r["key"]: r["response"] for r in map(json.loads, pathlib.Path(again.out).read_text().splitlines())}
    assert first and first == second  # each sample's seed, not its batch, decides its tokens
    # an untrained model may end a response at once (eos first): recorded, not stored, not retried
    assert stats["done"] >= 3 and stats["done"] + stats["declined"].get("no_content", 0) == 6
    assert max(app.state.batcher.calls) > 1  # concurrent requests shared one generate call

    def clean(tid, piece):  # a piece that re-tokenizes to its own id (not a partial UTF-8 byte)
        return "\ufffd" not in piece and tok(piece, add_special_tokens=False)["input_ids"] == [tid]

    table = token_byte_table(tok)

    def mapped(tid):  # an alternative the span rule maps to its id: by its bytes where they are partial UTF-8
        try:
            text = table[tid].decode("utf-8")
        except UnicodeDecodeError:
            return True
        return tok(text, add_special_tokens=False)["input_ids"] == [tid]

    rows = [json.loads(line) for line in pathlib.Path(ccfg.out).read_text().splitlines()]
    seqs = [
        backend.chat_ids(r["messages"]) + backend.seen[tuple(backend.chat_ids(r["messages"]))].token_ids for r in rows
    ]
    batch_BxL = np.zeros((len(rows), 32), np.int32)  # right padding leaves earlier positions alone
    for b, seq in enumerate(seqs):
        batch_BxL[b, : len(seq)] = seq
    logits_BxLxV = np.asarray(nnx.jit(lambda m, x: m(x))(model, batch_BxL), np.float64)
    expected_heads = {}
    for r, logits in zip(rows, logits_BxLxV):
        prompt_ids = backend.chat_ids(r["messages"])
        c = backend.seen[tuple(prompt_ids)]
        # each token's true bytes (byte-level BPE: partial UTF-8 too), and its API string
        # the text leaves special tokens out (as vLLM's and the OpenAI API's does); their entries name them, with
        # no bytes (the chosen tokens' bytes spell the text)
        assert r["token_bytes"] == [[] if t in backend.special_ids else list(table[t]) for t in c.token_ids]
        assert r["tokens"] == [bytes_token(table[t]) for t in c.token_ids]
        assert bytes(b for tb in r["token_bytes"] for b in tb).decode("utf-8", "replace") == r["response"]
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        heads, prefix_clean = [], True
        for j, alts in enumerate(r["top_logprobs"]):
            row = logp[len(prompt_ids) + j - 1]  # the distribution that produced token j
            want = np.argsort(-row)[:K]
            assert [a for a, _ in c.top[j]] == want.tolist()
            np.testing.assert_allclose([a["logprob"] for a in alts], row[want], atol=2e-4)
            assert [a["bytes"] for a in alts] == [list(table[i]) for i in want]
            pieces = [a["token"] for a in alts]
            assert pieces == [bytes_token(table[i]) for i in want]
            prefix_clean = (
                prefix_clean and c.token_ids[j] not in backend.special_ids and clean(c.token_ids[j], r["tokens"][j])
            )
            heads.append({int(i): a["logprob"] for i, a in zip(want, alts) if mapped(i)} if prefix_clean else None)
        expected_heads[r["id"]] = heads

    dcfg = data_config.default_config()
    dcfg.seq_len = 32
    dcfg.teacher_head = "exact"  # the span rule is what this test checks (same tokenizer as the teacher)
    dcfg.split.warmup, dcfg.split.align, dcfg.split.distill, dcfg.split.heldout = 0.25, 0.25, 0.25, 0.25
    prepare([ccfg.out], tok, tmp_path / "prepared", dcfg, progress=False)
    data = PreparedData(tmp_path / "prepared")
    seen = checked = 0
    for split in data.manifest["splits"]:
        for rec in data.iter_split(split):
            heads, p = expected_heads[rec["record_id"]], rec["prompt_len"]
            for j, want in enumerate(heads):  # row i of the teacher head predicts token i
                if want is None:  # after a partial-UTF-8 token the text no longer re-tokenizes alike
                    break
                ids, lps = rec["teacher_topk_ids"][p + j], rec["teacher_topk_logprobs"][p + j]
                got = {int(i): float(lp) for i, lp in zip(ids, lps) if np.isfinite(lp)}
                assert got.keys() == want.keys()
                np.testing.assert_allclose([got[i] for i in want], list(want.values()), atol=1e-5)
                checked += 1
            seen += 1
    assert seen == stats["done"] == len(rows) and checked >= 3


def test_top_logprobs_past_a_tiny_vocabulary_return_all_of_it(tmp_path):
    """A request for more alternatives (up to 20) than the model has tokens gets every token, most likely
    first, with the model's log-probs (a 200, not a 500 from `generate`)."""
    import http.client

    from proxykd_jax.teacher.known import KnownTeacher

    teacher = KnownTeacher.create(
        2, vocab_size=12, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32, max_seq_len=32,
        target_entropy=1.0, folder=tmp_path / "tok",
    )  # fmt: skip
    with ServerThread(make_app(LlamaBackend(teacher.model, teacher.tokenizer, model_name="kt"))) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
        body = {"model": "kt", "prompt": "w1 w2 w3", "max_tokens": 4, "logprobs": 20, "temperature": 0.0}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        conn.close()
    assert resp.status == 200, answer
    lp = answer["choices"][0]["logprobs"]
    ids = teacher.encode("w1 w2 w3") + teacher.encode(answer["choices"][0]["text"])
    probs = teacher.distributions([ids])[0].astype(np.float64)
    for t, alts in enumerate(lp["top_logprobs"]):
        row = np.log(np.maximum(probs[2 + t], 1e-300))
        got, want = np.sort(list(alts.values()))[::-1], np.sort(row)[::-1]
        assert len(got) == 12 and np.all(got[want < -50] < -50)  # <pad> <bos> <unk>: blocked, 0 in float32
        np.testing.assert_allclose(got[want > -50], want[want > -50], atol=1e-4)
        np.testing.assert_allclose(lp["token_logprobs"][t], row[ids[3 + t]], atol=1e-4)


def test_generation_config_end_tokens_stop_an_answer(tmp_path):
    """A folder's generation_config.json may name several `eos_token_id`s (an instruct model ends its turn
    with its own token, Llama 3's <|eot_id|>): each ends an answer ("stop", the token left out, as the eos);
    before, only the tokenizer's eos did and the answer ran on to max_tokens."""
    import pytest

    from proxykd_jax.errors import ProxyKDError
    from proxykd_jax.models.hf import generation_stop_ids

    rng = np.random.default_rng(1)
    tok = build_bpe_tokenizer([" ".join(rng.choice(WORDS, size=8)) for _ in range(100)], 300, tmp_path / "tok")
    cfg = ModelConfig(
        vocab_size=len(tok), d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=64, max_seq_len=64
    )
    model = Llama(cfg, rngs=nnx.Rngs(jax.random.key(3)))
    prompt = [tok.encode("the cat sat on")]
    kw = dict(n=1, temperature=0.0, top_p=1.0, max_tokens=12, logprobs=False, top_logprobs=0)
    (free,) = LlamaBackend(model, tok, model_name="m").complete(prompt, **kw)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    j = next(i for i in range(1, 12) if free.token_ids[i] not in free.token_ids[:i])  # a token's first use
    (cut,) = LlamaBackend(model, tok, model_name="m", stop_ids=(free.token_ids[j],)).complete(prompt, **kw)[0]
    assert cut.finish_reason == "stop" and cut.token_ids == free.token_ids[:j]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert generation_stop_ids(tmp_path) == (2, 7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5, "bos_token_id": 1}))
    assert generation_stop_ids(tmp_path) == (5,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["<eot>"]}))
    with pytest.raises(ProxyKDError, match=r"generation_config.json: eos_token_id must be a token id or a list"):
        generation_stop_ids(tmp_path)


@pytest.mark.parametrize("template", [True, False])
def test_serve_prompts_a_chat_as_prepare_trained_on_it(tmp_path, template):
    """A served model gets, for chat messages, the very token ids `prepare` trained it on: the tokenizer's
    chat template, or without one the same `role: content` lines ending "assistant: " (serve ended them
    "assistant:", a prompt the model never saw)."""
    from proxykd_jax.data.align import format_prompt
    from proxykd_jax.data.corpus import Sample

    tok = build_bpe_tokenizer(["user: what is the cat on? assistant: the mat"] * 20, 300)
    if not template:
        tok.chat_template = None
    cfg = ModelConfig(vocab_size=len(tok), d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32, head_dim=8)
    backend = LlamaBackend(Llama(cfg, rngs=nnx.Rngs(0)), tok, model_name="m")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is the cat on?"}]
    sample = Sample("f:1", "q1", 0, None, messages, "the mat", None, None, {})
    text, special = format_prompt(tok, sample)
    assert text.endswith("assistant: ") != template
    assert backend.chat_ids(messages) == list(tok.encode(text, add_special_tokens=special))
