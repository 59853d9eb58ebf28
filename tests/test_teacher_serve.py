"""`serve` on its own: the bad-request table, the body limit, tokenisation off the event loop,
token bytes on the wire (chat `bytes`, completions `bytes:` strings and `text_offset`), the byte
table of real tokenizers, `serve` settings that must fail with one sentence (a busy port, an
unwritable request log: before the model loads), and requests without `max_tokens` (to the context)
sharing a few compiled programs."""

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models.tokenizer import build_bpe_tokenizer
from proxykd_jax.teacher.backends import ToyBackend, load_backend
from proxykd_jax.teacher.client import collect
from proxykd_jax.teacher.config import collect_config, serve_config
from proxykd_jax.teacher.listen import ServerThread, serve
from proxykd_jax.teacher.responses import bytes_token
from proxykd_jax.teacher.server import Completion, make_app
from proxykd_jax.teacher.token_bytes import byte_level_alphabet, token_byte_table


def post(port, path, body, headers=None, chunked=False, timeout=10.0):
    """(status, parsed JSON) of one POST; `body` is sent as given (bytes, str, or an iterable of chunks)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(body, str):
            body = body.encode()
        conn.request(
            "POST",
            path,
            body=body,
            headers={"Content-Type": "application/json", **(headers or {})},
            encode_chunked=chunked,
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


class CountingToy(ToyBackend):
    """Counts tokenizer calls, to show a refused request was never tokenised."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.encoded = 0

    def encode(self, text):
        self.encoded += 1
        return super().encode(text)


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
OK_CHAT = '"model": "toy", "messages": [{"role": "user", "content": "hi"}]'
OK_COMPLETION = '"model": "toy", "prompt": "hi"'
LONG_PROMPT = "x" * 100  # over the toy's context of 64 with max_tokens 16

BAD_REQUESTS = [  # (path, raw JSON body, status, the field the error names)
    (CHAT, '{"model": "toy", "messages": []}', 400, "messages"),
    (CHAT, '{"model": "toy"}', 400, "messages"),
    (CHAT, '{"model": "toy", "messages": [{"role": "user"}]}', 400, "messages.0.content"),
    (CHAT, '{"model": "toy", "messages": [{"role": "user", "content": 5}]}', 400, "messages.0.content"),
    (CHAT, '{"model": "toy", "messages": [{"role": "", "content": "hi"}]}', 400, "messages.0.role"),
    (CHAT, "{" + OK_CHAT + ', "temperature": NaN}', 400, "temperature"),
    (CHAT, "{" + OK_CHAT + ', "temperature": Infinity}', 400, "temperature"),
    (CHAT, "{" + OK_CHAT + ', "temperature": 2.5}', 400, "temperature"),
    (CHAT, "{" + OK_CHAT + ', "temperature": -1}', 400, "temperature"),
    (CHAT, "{" + OK_CHAT + ', "top_p": 0}', 400, "top_p"),
    (CHAT, "{" + OK_CHAT + ', "top_p": NaN}', 400, "top_p"),
    (CHAT, "{" + OK_CHAT + ', "n": 0}', 400, "n"),
    (CHAT, "{" + OK_CHAT + ', "n": 129}', 400, "n"),
    (CHAT, "{" + OK_CHAT + ', "n": "many"}', 400, "n"),
    (CHAT, "{" + OK_CHAT + ', "top_logprobs": 21}', 400, "top_logprobs"),
    (CHAT, "{" + OK_CHAT + ', "max_tokens": 0}', 400, "max_tokens"),
    (CHAT, "{" + OK_CHAT + ', "max_tokens": 5000}', 400, "max_tokens"),
    (CHAT, "{" + OK_CHAT + ', "max_completion_tokens": 5000}', 400, "max_completion_tokens"),
    (CHAT, "{" + OK_CHAT + ', "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (CHAT, '{"model": "other", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
    (CHAT, '{"model": "toy", "messages": [{"role": "user", "content": "' + LONG_PROMPT + '"}]}', 400, "messages"),
    (CHAT, "{", 400, None),
    (CHAT, "[]", 400, None),
    (COMPLETIONS, '{"model": "toy", "prompt": ""}', 400, "prompt"),
    (COMPLETIONS, '{"model": "toy", "prompt": []}', 400, "prompt"),
    (COMPLETIONS, '{"model": "toy", "prompt": ["ok", ""]}', 400, "prompt"),
    (COMPLETIONS, '{"model": "toy", "prompt": [1, 2, 3]}', 400, "prompt"),
    (COMPLETIONS, '{"model": "toy"}', 400, "prompt"),
    (COMPLETIONS, "{" + OK_COMPLETION + ', "logprobs": 21}', 400, "logprobs"),
    (COMPLETIONS, "{" + OK_COMPLETION + ', "temperature": NaN}', 400, "temperature"),
    (COMPLETIONS, "{" + OK_COMPLETION + ', "max_tokens": -3}', 400, "max_tokens"),
    (COMPLETIONS, '{"model": "toy", "prompt": "' + LONG_PROMPT + '"}', 400, "prompt"),
]


def test_bad_request_table():
    backend = CountingToy(max_context=64)
    app = make_app(backend)
    with ServerThread(app) as srv:
        for path, body, status, field in BAD_REQUESTS:
            got, answer = post(srv.port, path, body)
            assert got == status, (body, answer)
            err = answer["error"]
            assert err["param"] == field, (body, err)
            assert err["message"] and (field is None or f"'{field}'" in err["message"] or field == "model"), err
            assert err["type"] == "invalid_request_error"
        got, answer = post(srv.port, "/v1/nothing", "{}")
        assert got == 404 and answer["error"]["code"] == "not_found"
        # the server is still well and answers good requests
        assert post(srv.port, CHAT, "{" + OK_CHAT + ', "max_tokens": 4}')[0] == 200
        assert post(srv.port, COMPLETIONS, "{" + OK_COMPLETION + ', "max_tokens": 4, "n": 2}')[0] == 200
    # the tokenizer saw only the two good and the two over-long prompts; generation only the good ones (n=1, n=2)
    assert sum(app.state.batcher.calls) == 3 and backend.encoded == 4


def test_body_limit_answers_413_before_tokenising():
    backend = CountingToy()
    app = make_app(backend, max_body_bytes=1000)
    big = json.dumps({"model": "toy", "prompt": "y" * 2000, "max_tokens": 2})
    with ServerThread(app) as srv:
        status, answer = post(srv.port, COMPLETIONS, big)  # refused on its Content-Length
        assert status == 413 and "1000 bytes" in answer["error"]["message"]
        chunks = (big[i : i + 300].encode() for i in range(0, len(big), 300))  # no Content-Length
        status, answer = post(srv.port, COMPLETIONS, chunks, chunked=True)
        assert status == 413 and answer["error"]["code"] == "request_too_large"
        assert post(srv.port, COMPLETIONS, json.dumps({"model": "toy", "prompt": "y" * 500, "max_tokens": 2}))[0] == 200
    assert backend.encoded == 1
    assert [e["outcome"] for e in app.state.requests] == ["413", "413", "ok"]


class BlockingTokenizer(ToyBackend):
    """Tokenising a long text blocks until the test releases it: a stand-in for a slow tokenizer."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.started, self.release = threading.Event(), threading.Event()

    def encode(self, text):
        if len(text) > 10_000:
            self.started.set()
            assert self.release.wait(30), "the test never released the large request"
        return super().encode(text)


def test_large_request_does_not_stall_small_ones():
    backend = BlockingTokenizer(max_context=4096)
    app = make_app(backend, max_body_bytes=2_000_000)
    large = json.dumps({"model": "toy", "prompt": "z" * 1_000_000, "max_tokens": 4})  # under the body limit
    small = json.dumps({"model": "toy", "prompt": "hello", "max_tokens": 4})
    with ServerThread(app) as srv:
        result = {}
        thread = threading.Thread(target=lambda: result.update(large=post(srv.port, COMPLETIONS, large, timeout=60)))
        thread.start()
        assert backend.started.wait(30), "the large request never reached the tokenizer"
        start = time.monotonic()
        status, answer = post(srv.port, COMPLETIONS, small, timeout=10)  # would time out on a blocked loop
        latency = time.monotonic() - start
        backend.release.set()
        thread.join(60)
    assert status == 200 and answer["choices"][0]["text"]
    assert latency < 5.0
    status, answer = result["large"]  # tokenised, then refused: far over the context
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"


class Utf8Toy(ToyBackend):
    """Draws bytes of multi-byte characters one token each: most tokens are partial UTF-8."""

    ALPHABET = np.array(list("aé€ ".encode()), np.int64)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = {}

    def complete(self, prompts, **kw):
        out = super().complete(prompts, **kw)
        for p, row in zip(prompts, out):
            self.seen[bytes(x for x in p if x < 256)] = row[0]
        return out


class FixedToy(ToyBackend):
    """Always answers the bytes of 'aé€ b', one token per byte, with two alternatives each."""

    def complete(self, prompts, *, n, logprobs, **kw):
        ids = list("aé€ b".encode())
        top = [[(i, -0.1), (ord("q"), -2.5)] for i in ids]
        c = Completion(ids, "stop", [-0.1] * len(ids) if logprobs else None, top if logprobs else None)
        return [[c] * n for _ in prompts]


class WordToy(ToyBackend):
    """Always answers 'w1 w2 w3' as three word tokens: "w1", " w2", " w3"."""

    WORDS = ["w1", " w2", " w3"]

    def decode(self, ids):
        return "".join(self.WORDS[i] for i in ids)

    def token_bytes(self, context_ids, candidate_ids):
        return [self.WORDS[i].encode() for i in candidate_ids]

    def complete(self, prompts, *, n, logprobs, **kw):
        top = [[(i, -0.2)] for i in range(3)]
        c = Completion([0, 1, 2], "stop", [-0.2, -0.3, -0.4] if logprobs else None, top if logprobs else None)
        return [[c] * n for _ in prompts]


@pytest.mark.parametrize(
    "stop, text, tokens",
    [
        ("w2", "w1 ", ["w1", " w2"]),  # " w2" straddles the cut: kept, the text ends before the stop string
        (" w2", "w1", ["w1"]),  # the stop string begins on a token boundary: the tokens spell the text
        ("w1", "", []),
        ("w9", "w1 w2 w3", ["w1", " w2", " w3"]),
    ],
)
def test_stop_strings_keep_every_token_the_text_needs(stop, text, tokens):
    with ServerThread(make_app(WordToy())) as srv:
        body = {"model": "toy", "prompt": "ab", "logprobs": 1, "stop": stop}
        status, answer = post(srv.port, COMPLETIONS, json.dumps(body))
        assert status == 200
        choice = answer["choices"][0]
        assert choice["text"] == text and choice["logprobs"]["tokens"] == tokens
        assert answer["usage"]["completion_tokens"] == len(tokens) == len(choice["logprobs"]["top_logprobs"])
        chat = {"model": "toy", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "stop": [stop]}
        status, answer = post(srv.port, CHAT, json.dumps(chat))
        assert status == 200 and answer["choices"][0]["message"]["content"] == text
        assert [e["token"] for e in answer["choices"][0]["logprobs"]["content"]] == tokens
        assert answer["usage"]["completion_tokens"] == len(tokens)


def test_token_bytes_and_text_offset_on_the_wire(tmp_path):
    with ServerThread(make_app(FixedToy())) as srv:
        status, answer = post(srv.port, COMPLETIONS, json.dumps({"model": "toy", "prompt": "ab", "logprobs": 2}))
        assert status == 200
        lp = answer["choices"][0]["logprobs"]
        assert answer["choices"][0]["text"] == "aé€ b"
        esc = ["bytes:\\xc3", "bytes:\\xa9", "bytes:\\xe2", "bytes:\\x82", "bytes:\\xac"]
        assert lp["tokens"] == ["a", *esc, " ", "b"]
        # offsets count characters of prompt + text complete before each token: "ab" is 2 long
        assert lp["text_offset"] == [2, 3, 3, 4, 4, 4, 5, 6]
        assert lp["top_logprobs"][1] == {"bytes:\\xc3": -0.1, "q": -2.5}
        status, answer = post(
            srv.port,
            CHAT,
            json.dumps(
                {"model": "toy", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2}
            ),
        )
        content = answer["choices"][0]["logprobs"]["content"]
        assert [c["bytes"] for c in content] == [[b] for b in "aé€ b".encode()]
        assert [c["token"] for c in content] == lp["tokens"]
        assert [a["bytes"] for a in content[2]["top_logprobs"]] == [[0xA9], [ord("q")]]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(6)))
    backend = Utf8Toy()
    with ServerThread(make_app(backend)) as srv:
        for api in ("chat", "completions"):
            cfg = collect_config()
            cfg.prompts, cfg.out, cfg.base_url, cfg.model = (
                str(prompts),
                str(tmp_path / f"{api}.jsonl"),
                srv.base_url,
                "toy",
            )
            cfg.api, cfg.max_tokens, cfg.top_logprobs, cfg.progress, cfg.temperature = api, 12, 3, False, 0.0
            collect(cfg)
            rows = [json.loads(line) for line in open(cfg.out)]
            assert len(rows) == 6
            for r in rows:
                if api == "chat":  # stored as the teacher got it: one user message
                    assert "prompt" not in r and len(r["messages"]) == 1 and r["messages"][0]["role"] == "user"
                    prompt = f"user: {r['messages'][0]['content']}\nassistant:"
                else:
                    prompt = r["prompt"]
                c = backend.seen[prompt.encode()]
                assert r["token_bytes"] == [[t] for t in c.token_ids]  # exact, partial UTF-8 included
                assert r["tokens"] == [bytes_token(bytes([t])) for t in c.token_ids]
                assert r["response"] == bytes(c.token_ids).decode("utf-8", "replace")
                for alts, top in zip(r["top_logprobs"], c.top):
                    assert [a["bytes"] for a in alts] == [[t] for t, _ in top]
                    assert [a["logprob"] for a in alts] == pytest.approx([lp for _, lp in top])


def test_byte_table_of_byte_level_bpe_is_exact(tmp_path):
    tok = build_bpe_tokenizer(["the cat sat on the mat", "a dog ran"] * 20, 300)  # ASCII merges only
    table = token_byte_table(tok)
    text = "the cät sat — on 😀 mat ü\n\tx"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == text.encode()
    assert any(len(table[i]) == 1 and table[i][0] >= 0x80 for i in ids)  # partial UTF-8 tokens occur
    assert table[tok.eos_token_id] == b"<eos>"
    assert sorted(byte_level_alphabet().values()) == list(range(256))


def test_byte_table_of_byte_fallback_tokenizer():
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁": 1, "a": 2, "▁a": 3, **{f"<0x{b:02X}>": 4 + b for b in range(256)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    table = token_byte_table(tok)
    ids = tok("a€", add_special_tokens=False)["input_ids"]
    assert [table[i] for i in ids] == [None, b"\xe2", b"\x82", b"\xac"]  # "▁a" depends on its place
    assert table[0] == b"<unk>"


def test_serve_settings_fail_with_one_sentence(tmp_path, monkeypatch):
    cfg = serve_config()
    with pytest.raises(ProxyKDError, match="serve.path is empty"):
        load_backend(cfg)
    cfg.path = str(tmp_path / "nowhere")
    with pytest.raises(ProxyKDError, match=r"serve.path '.*nowhere' is not a folder"):
        load_backend(cfg)
    cfg.path = str(tmp_path)
    with pytest.raises(ProxyKDError, match=r"has no config.json or tokenizer.json; it must be a model folder"):
        load_backend(cfg)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ProxyKDError, match=r"serve.path '.*' cannot be served"):
        load_backend(cfg)
    cfg.source = "gguf"
    with pytest.raises(ProxyKDError, match="serve.source must be 'hf' or 'known'"):
        load_backend(cfg)
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    cfg.api_key_env = "NO_SUCH_KEY_VAR"
    with pytest.raises(ProxyKDError, match="serve.api_key_env names 'NO_SUCH_KEY_VAR'"):
        serve(cfg, lambda: load_backend(cfg))


def _must_not_load():
    raise AssertionError("serve loaded the model before refusing its settings")


def test_busy_port_and_unwritable_request_log_fail_before_the_model_loads(tmp_path, capsys):
    """A port something listens on, or a request log in a missing folder, is one sentence naming the
    field, raised before the model loads or the banner prints; a refused log file is not created."""
    cfg = serve_config()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg.port = busy.getsockname()[1]
        with pytest.raises(
            ProxyKDError, match=rf"port {cfg.port} is in use on 127.0.0.1; pick another with --config.serve.port"
        ):
            serve(cfg, _must_not_load)
    cfg.port = 0  # any free port: only the log is wrong now
    for log, problem in (
        (tmp_path / "missing" / "requests.jsonl", "is in a folder that does not exist"),
        (tmp_path, "is a folder"),
    ):
        cfg.request_log = str(log)
        with pytest.raises(
            ProxyKDError,
            match=rf"serve.request_log='.*' {problem}.*; create the folder or point --config.serve.request_log",
        ):
            serve(cfg, _must_not_load)
    assert not (tmp_path / "missing").exists()
    assert "[serve]" not in capsys.readouterr().out  # no banner


class BrokenToy(ToyBackend):
    def complete(self, prompts, **kw):
        raise RuntimeError("the accelerator fell over")


def test_backend_error_is_a_500_in_the_api_layout():
    with ServerThread(make_app(BrokenToy())) as srv:
        status, answer = post(srv.port, COMPLETIONS, "{" + OK_COMPLETION + "}")
        assert status == 500 and answer["error"]["code"] == "internal_error"
        assert answer["error"]["type"] == "server_error" and "RuntimeError" in answer["error"]["message"]


def test_lone_surrogates_are_a_400_naming_the_field():
    """JSON can escape half of a UTF-16 pair ("\\ud800"), which no tokenizer can read: a 400 naming the field,
    before tokenising, not a 500; a whole escaped pair (an emoji) is text like any other."""
    backend = CountingToy()
    with ServerThread(make_app(backend)) as srv:
        for path, body, field in [
            (COMPLETIONS, '{"model": "toy", "prompt": "a\\ud800b"}', "prompt"),
            (COMPLETIONS, '{"model": "toy", "prompt": ["ok", "\\udfff"]}', "prompt"),
            (CHAT, '{"model": "toy", "messages": [{"role": "user", "content": "hi \\ud83d"}]}', "messages.0.content"),
            (CHAT, '{"model": "t\\udc00y", "messages": [{"role": "user", "content": "hi"}]}', "model"),
        ]:
            status, answer = post(srv.port, path, body)
            assert status == 400, (body, answer)
            assert answer["error"]["param"] == field and "lone UTF-16 surrogate" in answer["error"]["message"]
        assert backend.encoded == 0
        status, answer = post(
            srv.port, CHAT, '{"model": "toy", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
        )
        assert status == 200 and answer["usage"]["prompt_tokens"] == len("user: 😀\nassistant:".encode())


def test_completions_null_max_tokens_runs_to_the_context():
    """`max_tokens: null` runs up to the context, as in chat (not to serve.max_tokens_limit, which a short prompt
    then overflows)."""
    with ServerThread(make_app(ToyBackend(max_context=64))) as srv:
        status, answer = post(
            srv.port, COMPLETIONS, json.dumps({"model": "toy", "prompt": "y" * 40, "max_tokens": None})
        )
        assert status == 200, answer
        assert answer["usage"]["prompt_tokens"] == 40 and 1 <= answer["usage"]["completion_tokens"] <= 24
        status, answer = post(
            srv.port, CHAT, json.dumps({"model": "toy", "messages": [{"role": "user", "content": "y"}]})
        )
        assert status == 200 and answer["usage"]["total_tokens"] <= 64


def test_completions_logprobs_zero_returns_the_chosen_tokens_logprobs():
    """`logprobs: 0` (legacy completions): each chosen token's log-prob, no alternatives; left out: none."""
    with ServerThread(make_app(ToyBackend())) as srv:
        body = {"model": "toy", "prompt": "ab", "max_tokens": 12, "temperature": 0}
        status, answer = post(srv.port, COMPLETIONS, json.dumps({**body, "logprobs": 0}))
        assert status == 200
        want = ToyBackend()._one(list(b"ab"), 0, 0.0, 12, 0)  # greedy: the same completion on every call
        lp = answer["choices"][0]["logprobs"]
        assert lp["tokens"] == [chr(t) for t in want.token_ids] and lp["top_logprobs"] == [{}] * len(want.token_ids)
        np.testing.assert_allclose(lp["token_logprobs"], want.logprobs, rtol=1e-12)
        status, answer = post(srv.port, COMPLETIONS, json.dumps(body))
        assert status == 200 and answer["choices"][0]["logprobs"] is None


def test_a_cancelled_request_does_not_strand_its_batch():
    """A request cancelled while its batched call runs (its handler's task cancelled) leaves the other requests
    of that call their answers; they do not wait forever."""
    import asyncio

    from proxykd_jax.teacher.server import Batcher

    async def run():
        batcher = Batcher(ToyBackend(latency_s=0.3), 0.05, 32)
        params = dict(n=1, temperature=0.0, top_p=1.0, max_tokens=4, logprobs=True, top_logprobs=0)
        first = asyncio.ensure_future(batcher.submit([list(b"a")], params))
        second = asyncio.ensure_future(batcher.submit([list(b"b")], params))
        await asyncio.sleep(0.15)  # both are in the running call
        first.cancel()
        (got,) = (await asyncio.wait_for(second, 10))[0]
        return batcher.calls, got

    calls, got = asyncio.run(run())
    want = ToyBackend()._one(list(b"b"), 0, 0.0, 4, 0)  # greedy: the same on every call
    assert calls == [2] and got.token_ids == want.token_ids
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-12)


def _tiny_llama_backend(tmp_path, max_seq_len):
    """A one-layer project Llama with a byte-level BPE tokenizer behind `LlamaBackend`."""
    import jax
    from flax import nnx

    from proxykd_jax.models.llama import Llama, ModelConfig
    from proxykd_jax.teacher.backends import LlamaBackend

    words = "the a cat dog sat ran on under mat log red blue big small fast slow one two three".split()
    rng = np.random.default_rng(0)
    tok = build_bpe_tokenizer([" ".join(rng.choice(words, size=8)) for _ in range(100)], 300, tmp_path / "tok")
    cfg = ModelConfig(
        vocab_size=len(tok), d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=64,
        max_seq_len=max_seq_len,
    )  # fmt: skip
    return LlamaBackend(Llama(cfg, rngs=nnx.Rngs(jax.random.key(3))), tok, model_name="m"), words


def test_requests_without_max_tokens_share_a_few_compiled_programs(tmp_path):
    """Without `max_tokens` a request runs to the context: its limit (context - prompt) differs with every prompt
    length, and was the static generation length, so each length compiled its own program. Now prompts of six
    lengths share at most two programs, each answer still runs exactly to the context ("length" there, "stop" at
    an end token), and equals the answer to an explicit `max_tokens` of that limit."""
    from proxykd_jax.models import sampling

    context = 64
    backend, words = _tiny_llama_backend(tmp_path, context)
    rng = np.random.default_rng(1)

    def chat(content, **extra):
        body = {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0, "logprobs": True}
        status, answer = post(srv.port, CHAT, json.dumps({**body, **extra}), timeout=300)
        assert status == 200, answer
        return answer

    contents, lengths = [], set()
    while len(contents) < 6:  # prompts of six token lengths in 17-31 (one power-of-two bucket)
        content = " ".join(rng.choice(words, size=int(rng.integers(2, 12))))
        n = len(backend.chat_ids([{"role": "user", "content": content}]))
        if 17 <= n <= 31 and n not in lengths:
            contents.append(content)
            lengths.add(n)
    with ServerThread(make_app(backend)) as srv:
        before = sampling._generate._cache_size()
        answers = [chat(c) for c in contents]
        programs = sampling._generate._cache_size() - before
        for answer in answers:
            (choice,) = answer["choices"]
            reached = answer["usage"]["total_tokens"] == context
            assert choice["finish_reason"] == ("length" if reached else "stop"), answer["usage"]
        for i in (0, 5):  # an explicit max_tokens of the same limit: the same answer
            explicit = chat(contents[i], max_tokens=context - answers[i]["usage"]["prompt_tokens"])
            got, want = answers[i]["choices"][0], explicit["choices"][0]
            assert got["message"] == want["message"] and got["finish_reason"] == want["finish_reason"]
            np.testing.assert_allclose(
                [t["logprob"] for t in got["logprobs"]["content"]],
                [t["logprob"] for t in want["logprobs"]["content"]],
                rtol=1e-5,
                atol=1e-5,
            )
    assert programs <= 2, programs  # before: one per prompt length (6)


def test_prompts_to_the_context_in_one_call_answer_as_alone(tmp_path):
    """A call whose short and long prompts run to the context is split by each prompt's own shape (one shape
    for both would hold twice the context): each prompt, seeded or greedy, gets what it gets alone, in order,
    running exactly to the context ("length") unless an end token stops it."""
    context = 64
    backend, words = _tiny_llama_backend(tmp_path, context)
    prompts = [backend.encode(" ".join(words[:2])), backend.encode(" ".join(words * 2)[:150])]
    assert len(prompts[0]) < 8 and len(prompts[1]) > 32
    shapes, generate = [], backend._generate
    backend._generate = lambda *args, **kw: shapes.append(args[3]) or generate(*args, **kw)  # (P, T) per call
    for temperature, seeds in ((0.0, None), (1.0, [11, 12])):
        kw = dict(n=2, temperature=temperature, top_p=1.0, max_tokens=1024, logprobs=True, top_logprobs=0)
        shapes.clear()
        both = backend.complete(prompts, **kw, seeds=seeds, to_context=True)
        assert len(shapes) == 2 and max(map(sum, shapes)) <= context * 5 // 4, shapes  # one (P, T) was (64, 63)
        for j, prompt in enumerate(prompts):
            alone = backend.complete([prompt], **kw, seeds=seeds and seeds[j : j + 1], to_context=True)[0]
            for got, want in zip(both[j], alone):
                assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
                np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-6, atol=1e-6)
                reached = len(prompt) + len(got.token_ids) == context
                assert got.finish_reason == ("length" if reached else "stop")
