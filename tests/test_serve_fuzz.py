"""`serve` under a seeded fuzz: random requests to one in-process server, each either good or holding exactly one
client mistake (a bad value of one field, a wrong type, malformed JSON, an unknown model, a wrong path or method).

A mistake gets its 4xx in OpenAI's error layout, naming the field where it is one, never a 5xx. A good request
gets 200 and an answer in the OpenAI schema (ids, choices of n per prompt, finish reasons, usage counts equal to
the prompt's tokens and the log-prob entries, `top_logprobs` of the asked length, entries' bytes spelling the
text); where its answer is reproducible (a seed, or temperature 0) the streamed twin concatenates to it (text,
finish reason, log-prob entries, usage), a second send returns it again, a stop string cuts the answer of the
request without it at its earliest match (finish "stop" there), and a seeded choice is what its prompt gets
alone with n=1. The backend answers random ids of a real tokenizer (special tokens included); a tiny real Llama
checks greedy and seeded answers against a dense forward. Also the regressions the fuzz found: a body FastAPI
cannot read as JSON (not UTF-8, nested too deeply) was a bare "There was an error parsing the body", and a
completions request without `max_tokens` was refused on a server whose `max_tokens_limit` is below the default
16 that the client never sent."""

import hashlib
import http.client
import json
import random
import types

import numpy as np
import pytest
from test_teacher_serve import _tiny_llama_backend
from test_xtok_token_bytes import byte_fallback_tokenizer
from tokenizers import AddedToken

from proxykd_jax.models.tokenizer import build_bpe_tokenizer
from proxykd_jax.teacher.api import ChatRequest, CompletionRequest
from proxykd_jax.teacher.backends import LlamaBackend, ToyBackend
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.server import Completion, make_app

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
WORDS = "the cat sat on a mat naïve € 😀 中文 dog ran é far".split()
TEXTS = ["hi", "tell me", "the cat sat", "naïve € 😀", "中文 text", " spaced  out ", "é\n\tx"]
STOPS = [None, "a", " ", "e", "é", "€", "😀", "\n", "the c", "", [], ["at", " s"], ["", "x"], ["a", "b", "c", "d"]]
LIMIT, CONTEXT = 32, 256  # the server's max_tokens_limit and the backend's context


class RandomAnswers(LlamaBackend):
    """`LlamaBackend`'s tokenizer side with random answers: words of `WORDS` and random ids (special ones, partial
    UTF-8) with random log-probs, each sample reproducible as the real backend's are (at temperature 0 per prompt,
    with a seed per seed and sample index), each prompt's limit as `complete`'s protocol sets it."""

    def __init__(self, tok):
        model = types.SimpleNamespace(cfg=types.SimpleNamespace(max_seq_len=CONTEXT, vocab_size=len(tok)))
        super().__init__(model, tok, model_name="m")
        self.calls = 0

    def complete(self, prompts, *, n, temperature, top_p, max_tokens, logprobs, top_logprobs, **kw):
        self.calls += 1
        seeds, starts = kw.get("seeds") or [None] * len(prompts), kw.get("starts") or [0] * len(prompts)
        out = []
        for p, seed, start in zip(prompts, seeds, starts):
            limit = min(max_tokens, self.max_context - len(p)) if kw.get("to_context") else max_tokens
            row = []
            for j in range(n):
                key = [-self.calls, j] if seed is None else [seed % (1 << 64), start + j]
                key = [0] if temperature == 0 else key
                digest = hashlib.sha256(json.dumps([p, key, top_p, temperature]).encode()).digest()
                rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
                ids = self.tok(" ".join(rng.choice(WORDS, size=12)), add_special_tokens=False)["input_ids"]
                for _ in range(3):
                    ids.insert(int(rng.integers(len(ids) + 1)), int(rng.integers(self.vocab)))
                ids = ids[: int(rng.integers(0, limit + 1))]
                k = min(top_logprobs, self.vocab)
                lps = np.sort(-rng.exponential(size=(len(ids), k + 1)), axis=1)[:, ::-1]
                top = [list(zip(rng.choice(self.vocab, size=k, replace=False).tolist(), row[:k])) for row in lps]
                chosen = [float(row[-1]) for row in lps]
                finish = "length" if len(ids) == limit else "stop"
                row.append(Completion(ids, finish, chosen if logprobs else None, top if logprobs else None))
            out.append(row)
        return out


def _tokenizer(kind):
    if kind == "sentencepiece":  # `▁` word starts: an answer is spelled after the prompt's tail
        return byte_fallback_tokenizer()
    rng = np.random.default_rng(0)
    tok = build_bpe_tokenizer([" ".join(rng.choice(WORDS, size=8)) for _ in range(100)], 320)
    tok.add_tokens([AddedToken("<|im_end|>", special=True), AddedToken("<tool>", special=False)])
    return tok


def _send(port, method, path, body=b"", headers=None):
    """(status, content type, raw body) of one request; `body` bytes as given, or a dict sent as JSON."""
    if isinstance(body, dict):
        body = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body or None, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type") or "", resp.read()
    finally:
        conn.close()


# --- requests -------------------------------------------------------------------------------------------------


def _good(rng, path):
    """A random request with every field valid (prompt lengths far within the context)."""
    body = {"model": "m", "n": rng.choice([1, 1, 2, 3]), "stop": rng.choice(STOPS)}
    body["max_tokens"] = rng.choice([None, 1, 5, 17, LIMIT, "absent"])
    body["temperature"] = rng.choice([0, 0.0, 0.7, 1, 2, "absent"])
    body["top_p"] = rng.choice([1, 0.5, 0.9, "absent"])
    body["seed"] = rng.choice([None, rng.randrange(1 << 40), -5, 2**70, "absent"])
    body["stream"] = rng.choice([True, False, None, "absent"])
    body["stream_options"] = rng.choice([None, {"include_usage": True}, {"include_usage": False}, "absent"])
    if path == CHAT:
        roles = ["system", "user", "assistant", "user", "tool", "weird"]  # any role a template takes
        parts = [{"type": "text", "text": rng.choice(TEXTS)}, {"type": "text", "text": "x"}]
        body["messages"] = [
            {"role": rng.choice(roles), "content": rng.choice([rng.choice(TEXTS), parts, ""])}
            for _ in range(rng.randrange(1, 5))
        ]
        body["logprobs"] = rng.choice([True, False, "absent"])
        body["top_logprobs"] = rng.choice([0, 1, 2, 20, None, "absent"])
        if rng.random() < 0.15:
            body["max_completion_tokens"] = rng.choice([3, 9])
    else:
        ids = [[rng.randrange(3, 290) for _ in range(rng.randrange(1, 6))] for _ in range(2)]  # (both vocabularies)
        body["prompt"] = rng.choice([rng.choice(TEXTS), [rng.choice(TEXTS), rng.choice(TEXTS)], ids[0], ids])
        body["echo"] = rng.choice([True, False, "absent"])
        body["logprobs"] = "absent" if body["echo"] is True else rng.choice([None, 0, 1, 2, 20, "absent"])
    if rng.random() < 0.2:  # fields that cannot change the answer, known or not
        body[rng.choice(["user", "metadata", "store", "foo"])] = rng.choice(["u", {}, True, 1])
    return {k: v for k, v in body.items() if v != "absent"}


LONG = "the cat sat " * 200  # past the context
BAD_FIELDS = {  # field: values refused with a 400 naming it
    "model": [5, None, ["m"]],
    "n": [0, -1, 129, "x", 1.5],
    "temperature": [-0.5, 2.5, "NaN", "x", None],
    "top_p": [0, 1.5, -1, "NaN", None],
    "seed": ["x", 1.5],
    "stop": [5, [5], ["a", "b", "c", "d", "e"], {"a": 1}],
    "stream": ["x", 2],
    "stream_options": ["yes", 5, []],
    "max_tokens": [0, -3, LIMIT + 1, 10**6, 2.5, "x"],
    "logit_bias": [{"5": 10}],
}
CHAT_BAD = {
    "messages": [[], "hi", None],
    "logprobs": ["x", [True]],
    "top_logprobs": [21, -1, "x", 2.5],
    "tools": [[{"type": "function", "function": {"name": "f"}}]],
    "max_completion_tokens": [0, LIMIT + 1],
}
COMPLETION_BAD = {
    "prompt": ["", [], ["ok", ""], 5, [[1, "a"]], [-1], [10**6], "\ud800", LONG],
    "logprobs": [21, -1, "x"],
    "echo": ["maybe", 3],
    "best_of": [3],
    "suffix": ["the end"],
}
BAD_MESSAGES = [  # (messages, param)
    ([1], "messages.0"),
    ([{"role": "user"}], "messages.0.content"),
    ([{"role": "user", "content": 5}], "messages.0.content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages.0.content"),
    ([{"role": "user", "content": None}], "messages.0.content"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": "\udc00x"}], "messages.1.content"),
    ([{"role": "", "content": "hi"}], "messages.0.role"),
    ([{"role": 5, "content": "hi"}], "messages.0.role"),
    ([{"role": "user", "content": LONG}], "messages"),
]
BAD_BODIES = [  # (raw body, the error's code)
    *[(raw, "invalid_json") for raw in (b"{", b'{"model": "m",}', b"[" * 50000 + b"]" * 50000, b'{"model": "\xe9"}')],
    *[(raw, "invalid_request") for raw in (b"", b"[]", b"1", b"null")],
]
BAD_ROUTES = [("GET", CHAT, 405), ("PUT", COMPLETIONS, 405), ("POST", "/v1/models", 405), ("POST", "/v1/nothing", 404)]


def _mistake(rng, path, body):
    """`body` with one client mistake: (method, path, body or raw bytes, status, the param the error names, its
    code; None: any)."""
    what = rng.random()
    if what < 0.08:
        raw, code = rng.choice(BAD_BODIES)
        return "POST", path, raw, 400, None, code
    if what < 0.12:
        method, route, status = rng.choice(BAD_ROUTES)
        return method, route, body, status, None, None
    if what < 0.17:
        return "POST", path, dict(body, model="nope"), 404, "model", "model_not_found"
    if path == CHAT and what < 0.3:
        messages, param = rng.choice(BAD_MESSAGES)
        return "POST", path, dict(body, messages=messages), 400, param, None
    if path == COMPLETIONS and what < 0.25:  # echo with logprobs: prompts are not scored
        return "POST", path, dict(body, echo=True, logprobs=1), 400, "echo", "invalid_request"
    table = {**BAD_FIELDS, **(CHAT_BAD if path == CHAT else COMPLETION_BAD)}
    field = rng.choice(sorted(table))
    body = dict(body, **{field: rng.choice(table[field])})
    if field == "max_tokens":
        body.pop("max_completion_tokens", None)
    if field == "best_of":
        body["n"] = 1
    return "POST", path, body, 400, field, None


# --- checks ---------------------------------------------------------------------------------------------------


def _error(status, raw, want_status, want_param, want_code) -> list[str]:
    """What is wrong with a refusal: not the expected status or code, not OpenAI's error layout, not naming the
    field."""
    try:
        err = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return [f"{status}: not an error body: {raw[:200]!r}"]
    problems = [] if status == want_status else [f"status {status}, want {want_status}"]
    if set(err) != {"message", "type", "param", "code"} or not isinstance(err["code"], str):
        return problems + [f"error fields {err}"]
    if not err["message"] or "Traceback" in err["message"] or err["type"] != "invalid_request_error":
        problems.append(f"error {err}")
    if want_code and err["code"] != want_code:
        problems.append(f"code {err['code']!r}, want {want_code!r}: {err['message']}")
    if want_param and (err["param"] != want_param or (status == 400 and f"'{want_param}'" not in err["message"])):
        problems.append(f"the error names {err['param']!r}, not {want_param!r}: {err['message']}")
    return problems


def _meaning(path, body):
    """The request as the server reads it (its own pydantic models: coercions and defaults)."""
    return (ChatRequest if path == CHAT else CompletionRequest).model_validate(body)


def _prompt_texts(backend, req) -> list[str]:
    return [p if isinstance(p, str) else backend.decode(p) for p in req.prompt]


def _prompt_tokens(backend, path, req) -> int:
    if path == CHAT:
        return len(backend.chat_ids([{"role": m.role, "content": m.content} for m in req.messages]))
    return sum(len(backend.encode(p)) if isinstance(p, str) else len(p) for p in req.prompt)


def _generated(backend, path, req, choice) -> str:
    """A choice's generated text (without an echoed prompt)."""
    if path == CHAT:
        return choice["message"]["content"]
    prompt = _prompt_texts(backend, req)[choice["index"] // req.n] if req.echo else ""
    assert choice["text"].startswith(prompt)
    return choice["text"][len(prompt) :]


def _entries(path, choice) -> list:
    """A choice's log-prob entries as one list (completions: one tuple per token)."""
    lp = choice["logprobs"]
    if lp is None or path == CHAT:
        return (lp or {}).get("content") or []
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    assert set(lp) == set(keys) and len({len(lp[k]) for k in keys}) == 1, lp
    return [list(x) for x in zip(*(lp[k] for k in keys))]


def _answer(backend, path, req, answer) -> list[str]:
    """What is wrong with a 200 answer to `req` against the OpenAI schema and the request."""
    chat, problems = path == CHAT, []
    prefix, obj = ("chatcmpl-", "chat.completion") if chat else ("cmpl-", "text_completion")
    if set(answer) != {"id", "object", "created", "model", "choices", "usage"} or answer["object"] != obj:
        return [f"envelope {sorted(answer)} {answer.get('object')}"]
    if not answer["id"].startswith(prefix) or not isinstance(answer["created"], int) or answer["model"] != "m":
        problems.append(f"envelope {answer['id']} {answer['model']}")
    choices = answer["choices"]
    if [c["index"] for c in choices] != list(range(req.n * (1 if chat else len(req.prompt)))):
        return problems + [f"indices {[c['index'] for c in choices]} for n={req.n}"]
    k = (req.top_logprobs or 0) if chat else (req.logprobs or 0)
    asked = (req.logprobs or k > 0) if chat else req.logprobs is not None
    limit = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
    tokens = 0
    for c in choices:
        keys = {"index", "message" if chat else "text", "finish_reason", "logprobs"}
        if set(c) != keys or c["finish_reason"] not in ("stop", "length") or (c["logprobs"] is not None) != asked:
            problems.append(f"choice {c}")
            continue
        if chat and set(c["message"]) != {"role", "content"} or chat and c["message"]["role"] != "assistant":
            problems.append(f"message {c['message']}")
        text, entries = _generated(backend, path, req, c), _entries(path, c)
        problems += [f"stop {s!r} in {text!r}" for s in req.stops if s and s in text]
        tokens += len(entries)
        if asked and limit and (len(entries) > limit or c["finish_reason"] == "length" and len(entries) != limit):
            problems.append(f"{len(entries)} tokens, finish {c['finish_reason']}, max_tokens {limit}")
        for e in entries:
            logprob, top = (e["logprob"], e["top_logprobs"]) if chat else (e[1], e[2])
            values = [a["logprob"] for a in top] if chat else list(top.values())
            if not (logprob <= 0 and all(v <= 0 for v in values) and values == sorted(values, reverse=True)):
                problems.append(f"log-probs {e}")
            if len(values) != k and (chat or len(values) > k):  # (a completions dict merges equal strings)
                problems.append(f"{len(values)} alternatives, asked {k}")
            if chat and any(set(a) != {"token", "logprob", "bytes"} for a in top):
                problems.append(f"alternative fields {top}")
        if chat and asked and "\ufffd" not in text:  # (invalid UTF-8 is the tokenizer's U+FFFD, per byte or per run)
            spelled = b"".join(bytes(e["bytes"]) for e in entries).decode(errors="replace")
            if not spelled.startswith(text) or spelled != text and not any(req.stops):
                problems.append(f"entries spell {spelled!r}, the text is {text!r}")
        if not chat and entries:
            prompt = _prompt_texts(backend, req)[c["index"] // req.n]
            offsets = [e[3] for e in entries]
            if offsets[0] != len(prompt) or offsets != sorted(offsets) or offsets[-1] > len(prompt) + len(text):
                problems.append(f"text_offset {offsets} after a prompt of {len(prompt)}")
    usage, prompt_tokens = answer["usage"], _prompt_tokens(backend, path, req)
    if usage is None:  # (a stream without `include_usage`)
        return problems
    if usage != {"prompt_tokens": prompt_tokens, "completion_tokens": usage["completion_tokens"],
                 "total_tokens": prompt_tokens + usage["completion_tokens"]}:  # fmt: skip
        problems.append(f"usage {usage}, {prompt_tokens} prompt tokens")
    if asked and usage["completion_tokens"] != tokens:
        problems.append(f"usage {usage}, {tokens} log-prob entries")
    return problems


def _joined(path, raw) -> tuple[list[dict], dict | None, list[str]]:
    """A stream's choices joined by index (in the layout of a plain answer's), its usage chunk, and what is wrong."""
    events = raw.decode().split("\n\n")
    if events[-2:] != ["data: [DONE]", ""]:
        return [], None, [f"stream end {events[-3:]}"]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    problems = [] if len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1 else ["envelopes"]
    usage = chunks.pop()["usage"] if chunks and chunks[-1]["choices"] == [] else None
    joined = {}
    for chunk in chunks:
        (x,) = chunk["choices"]
        c = joined.setdefault(x["index"], {"index": x["index"], "finish_reason": None, "logprobs": None, "t": ""})
        if c["finish_reason"] is not None:
            problems.append(f"a chunk after choice {x['index']} finished")
        c["t"] += x["delta"].get("content") or "" if path == CHAT else x["text"]
        c["finish_reason"] = x["finish_reason"]
        if x["logprobs"] is not None:
            c["logprobs"] = c["logprobs"] or {}
            for key, values in x["logprobs"].items():
                c["logprobs"][key] = c["logprobs"].get(key, []) + values
    out = [joined[i] for i in sorted(joined)]
    for c in out:
        t = c.pop("t")
        c.update({"message": {"role": "assistant", "content": t}} if path == CHAT else {"text": t})
    return out, usage, problems


def _same(path, got, want) -> bool:
    """Choices equal in text, finish reason and log-prob entries (a stream of no tokens sends no entries)."""
    key = lambda c: (c.get("text"), c.get("message"), c["finish_reason"], _entries(path, c))  # noqa: E731
    return [key(c) for c in got] == [key(c) for c in want]


def _twins(srv, backend, path, body, req, answer) -> list[str]:
    """Checks of a reproducible answer against its twins: streamed, sent again, without its stops, each prompt
    alone with n=1 (a seeded one)."""
    plain = dict(body, stream=False)
    status, _, raw = _send(srv.port, "POST", path, dict(body, stream=True, stream_options={"include_usage": True}))
    streamed, usage, problems = _joined(path, raw)
    if status != 200 or not _same(path, streamed, answer["choices"]) or usage != answer["usage"]:
        problems.append(f"the stream {streamed} {usage} is not the answer {answer}")
    if not _same(path, json.loads(_send(srv.port, "POST", path, plain)[2])["choices"], answer["choices"]):
        problems.append("sent again, another answer")
    if any(req.stops):
        whole = json.loads(_send(srv.port, "POST", path, dict(plain, stop=None))[2])["choices"]
        for c, w in zip(answer["choices"], whole):
            text = _generated(backend, path, req, w)
            cut = min([text.find(s) for s in req.stops if s and s in text], default=None)
            want = (text[:cut], "stop") if cut is not None else (text, w["finish_reason"])
            if (_generated(backend, path, req, c), c["finish_reason"]) != want:
                problems.append(f"stops {req.stops}: {c} is not {want}")
    if req.seed is not None and req.temperature > 0:
        for i, prompt in enumerate(req.prompt if path == COMPLETIONS else [None]):
            alone = dict(plain, n=1, **({"prompt": prompt} if prompt is not None else {}))
            (got,) = json.loads(_send(srv.port, "POST", path, alone)[2])["choices"]
            if not _same(path, [got], [dict(answer["choices"][i * req.n], index=0)]):
                problems.append(f"the seeded choice of prompt {i} is not its answer alone")
    return problems


def _streamed_answer(path, req, raw) -> tuple[dict, list[str]]:
    """A stream as the plain answer it stands for (its usage None without `include_usage`; a choice of no tokens
    sends no log-prob entries), and what is wrong."""
    choices, usage, problems = _joined(path, raw)
    if (req.logprobs or req.top_logprobs) if path == CHAT else req.logprobs is not None:
        keys = ("content",) if path == CHAT else ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        for c in choices:
            c["logprobs"] = c["logprobs"] or {k: [] for k in keys}
    head = json.loads(raw[len(b"data: ") : raw.index(b"\n")])
    obj = {"chat.completion.chunk": "chat.completion"}.get(head["object"], head["object"])
    answer = {"id": head["id"], "object": obj, "created": head["created"], "model": head["model"]}
    return {**answer, "choices": choices, "usage": usage}, problems


@pytest.mark.parametrize("kind, seed", [("bpe", 1), ("sentencepiece", 2)])
def test_random_requests_get_a_schema_answer_or_one_clear_4xx(kind, seed):
    rng, backend = random.Random(seed), RandomAnswers(_tokenizer(kind))
    failures, seen = [], {"good": 0, "mistakes": 0}
    with ServerThread(make_app(backend, max_tokens_limit=LIMIT, max_batch=4)) as srv:
        for i in range(500):
            path = rng.choice([CHAT, COMPLETIONS])
            body = _good(rng, path)
            if rng.random() < 0.45:
                method, route, sent, status, param, code = _mistake(rng, path, body)
                got, _, raw = _send(srv.port, method, route, sent)
                problems, seen["mistakes"] = _error(got, raw, status, param, code), seen["mistakes"] + 1
                failures += [(i, kind, seed, p, method, route, sent) for p in problems]
                continue
            status, ctype, raw = _send(srv.port, "POST", path, body)
            req, seen["good"] = _meaning(path, body), seen["good"] + 1
            if status != 200 or ctype.startswith("text/event-stream") != bool(req.stream):
                problems = [f"{status} {ctype}: {raw[:300]!r}"]
            elif req.stream:
                answer, problems = _streamed_answer(path, req, raw)
                problems += _answer(backend, path, req, answer)
            else:
                answer = json.loads(raw)
                problems = _answer(backend, path, req, answer)
                if not problems and (req.temperature == 0 or req.seed is not None):
                    problems = _twins(srv, backend, path, body, req, answer)
            failures += [(i, kind, seed, p, body) for p in problems]
    assert not failures, failures[:5]
    assert seen["good"] > 200 and seen["mistakes"] > 170, seen  # both halves ran


def test_a_real_llama_answers_as_its_dense_forward(tmp_path):
    """A tiny real Llama through both endpoints, on fresh random prompts: each answer token's log-prob and its
    alternatives are those of a dense forward over prompt + answer (float64 log-softmax of its logits), a greedy
    token is that row's argmax and a sampled one (temperature 0.8, top_p 0.5) lies in its nucleus (to 1e-4 of
    mass: the server's is float32); a greedy answer is the same twice, and a seeded stream is its plain answer."""
    import jax

    backend, words = _tiny_llama_backend(tmp_path, 64)
    answers, complete = [], backend.complete
    backend.complete = lambda *a, **kw: answers.append(complete(*a, **kw)) or answers[-1]  # the ids served
    rng = np.random.default_rng()
    with ServerThread(make_app(backend)) as srv:
        for path in (COMPLETIONS, CHAT) * 2:
            text = " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
            temperature, seed = float(rng.choice([0.0, 0.8])), int(rng.integers(1 << 40))
            body = {"model": "m", "max_tokens": 6, "temperature": temperature, "top_p": 0.5, "seed": seed}
            if path == COMPLETIONS:
                body.update(prompt=text, logprobs=3)
            else:
                body.update(messages=[{"role": "user", "content": text}], logprobs=True, top_logprobs=3)
            status, _, raw = _send(srv.port, "POST", path, body)
            assert status == 200, raw
            answer, (((served,),),) = json.loads(raw), answers[-1:]
            req = _meaning(path, body)
            assert not _answer(backend, path, req, answer), (body, answer)
            if temperature == 0:
                assert _same(path, json.loads(_send(srv.port, "POST", path, body)[2])["choices"], answer["choices"])
            streamed, _ = _streamed_answer(path, req, _send(srv.port, "POST", path, dict(body, stream=True))[2])
            assert _same(path, streamed["choices"], answer["choices"]), body
            prompt = backend.encode(text) if path == COMPLETIONS else backend.chat_ids(body["messages"])
            ids = prompt + served.token_ids
            logits = np.asarray(backend.model(np.asarray([ids], np.int32)), np.float64)[0]
            rows = np.asarray(jax.nn.log_softmax(logits, -1))[len(prompt) - 1 : -1]
            entries = _entries(path, answer["choices"][0])
            assert len(entries) == len(served.token_ids) and entries, (body, answer)
            for tid, row, e in zip(served.token_ids, rows, entries):
                logprob, top = (e["logprob"], e["top_logprobs"]) if path == CHAT else (e[1], e[2])
                alternatives = [a["logprob"] for a in top] if path == CHAT else list(top.values())
                np.testing.assert_allclose(logprob, row[tid], atol=1e-4, err_msg=str(body))
                np.testing.assert_allclose(alternatives, np.sort(row)[::-1][:3], atol=1e-4, err_msg=str(body))
                p = np.exp((row - row.max()) / max(temperature, 1e-6))
                order = np.argsort(-p)
                before = np.cumsum(p[order] / p.sum()) - p[order] / p.sum()
                assert tid in order[(before < 0.5 + 1e-4) | (np.arange(len(p)) == 0)], (body, tid)  # greedy: order[0]


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b'{"model": "m", "prompt": "caf\xe9"}', "byte 29 is not UTF-8"),
        (b'{"model": "m", "prompt": "hi", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"model": "m", "prompt": "hi", "seed": ' + b"7" * 5000 + b"}", "value has 5000 digits"),
    ],
)
def test_a_body_that_cannot_be_read_as_json_is_an_invalid_json_400_saying_why(raw, reason):
    """Bodies that are no JSON syntax error yet cannot be read (Latin-1 text, nesting past Python's recursion limit,
    an integer past its digit limit) were FastAPI's bare 400 "There was an error parsing the body", code "error";
    now the `invalid_json` 400 a syntax error gets, saying why."""
    with ServerThread(make_app(ToyBackend(model_name="m"))) as srv:
        status, _, answer = _send(srv.port, "POST", COMPLETIONS, raw)
    err = json.loads(answer)["error"]
    assert status == 400 and err["code"] == "invalid_json" and err["param"] is None, err
    assert err["message"].startswith("the request body cannot be read as JSON (") and reason in err["message"], err


def test_completions_without_max_tokens_get_the_default_within_the_server_limit():
    """A completions request that leaves out `max_tokens` asks for the API's default of 16: on a server whose
    `max_tokens_limit` is 5 it was refused for a max_tokens it never sent ("must be 1-5 on this server, got 16");
    now it gets up to the limit, as a chat request without one does. An explicit 16 is still refused."""
    backend, asked = ToyBackend(model_name="m"), []
    complete = backend.complete
    backend.complete = lambda prompts, **kw: asked.append(kw["max_tokens"]) or complete(prompts, **kw)
    with ServerThread(make_app(backend, max_tokens_limit=5)) as srv:
        status, _, raw = _send(srv.port, "POST", COMPLETIONS, {"model": "m", "prompt": "hi", "logprobs": 0})
        assert status == 200 and asked == [5], raw
        assert len(json.loads(raw)["choices"][0]["logprobs"]["tokens"]) <= 5
        status, _, raw = _send(srv.port, "POST", COMPLETIONS, {"model": "m", "prompt": "hi", "max_tokens": 16})
        assert status == 400 and json.loads(raw)["error"]["param"] == "max_tokens" and asked == [5], raw
    with ServerThread(make_app(backend, max_tokens_limit=LIMIT)) as srv:  # a limit over 16: the default as before
        assert _send(srv.port, "POST", COMPLETIONS, {"model": "m", "prompt": "hi"})[0] == 200 and asked == [5, 16]
