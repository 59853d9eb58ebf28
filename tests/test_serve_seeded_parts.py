"""`serve` splits a seeded request whose `n` exceeds `serve.max_batch` into parts of `n`, as it does an unseeded
one, and each sample keeps the answer of its seed: the Batcher gives the backend, per prompt, the index of the
part's first sample (`starts`), so sample i of the request gets the same key wherever it runs."""

import asyncio

from fastapi.testclient import TestClient
from test_teacher_serve import _tiny_llama_backend

from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.server import Batcher, make_app


def _params(n):
    return dict(n=n, temperature=1.0, top_p=1.0, max_tokens=6, logprobs=False, top_logprobs=0, to_context=False)


def _submit_all(backend, max_batch, requests):
    """Each (prompts, params, seed) submitted at once to one Batcher; their answers and the call sizes."""

    async def run():
        batcher = Batcher(backend, 0.001, max_batch)
        return await asyncio.gather(*(batcher.submit(p, params, seed) for p, params, seed in requests)), batcher.calls

    return asyncio.run(run())


def _tokens(rows):
    return [[c.token_ids for c in row] for row in rows]


def test_a_seeded_n_over_max_batch_runs_in_parts_with_the_answers_of_one_call(tmp_path):
    """n=6 with a seed and max_batch=4 (two seeded requests and an unseeded one at once): every call holds at most
    4 sequences, and each seeded prompt gets the answers it gets in one call of all 18, and alone (as before)."""
    backend, _ = _tiny_llama_backend(tmp_path, 64)
    one, two = backend.encode("the cat sat"), backend.encode("a dog ran on")
    requests = [([one], _params(6), 123), ([two], _params(6), 2**63 + 5), ([one], _params(6), None)]
    split, calls = _submit_all(backend, 4, requests)
    whole, whole_calls = _submit_all(backend, 64, requests)
    alone = backend.complete([one], seeds=[123], **_params(6))
    assert max(calls) <= 4 and sum(calls) == 18, calls
    assert whole_calls == [18]
    assert _tokens(split[0]) == _tokens(whole[0]) == _tokens(alone)
    assert _tokens(split[1]) == _tokens(whole[1])
    assert len({tuple(t) for t in _tokens(alone)[0]}) > 1  # sampled, not one answer repeated
    # the backend's contract: a part's samples are numbered from its start, whatever shares the call
    part = backend.complete([two, one], seeds=[None, 123], starts=[0, 3], **_params(3))
    assert _tokens(part)[1] == _tokens(alone)[0][3:]


def test_the_toy_backend_over_http_splits_a_seeded_n_and_keeps_its_answers():
    """The same through the app with `ToyBackend`: 2 prompts x n=10 with a seed and max_batch=4 run in calls of
    at most 4, and every choice (text and log-probs) equals that of the unsplit request."""
    body = {"model": "toy", "prompt": ["ab", "cd"], "n": 10, "max_tokens": 5, "temperature": 1.0, "seed": 42}
    choices, calls = {}, {}
    for max_batch in (4, 64):
        app = make_app(ToyBackend(), max_batch=max_batch)
        answer = TestClient(app).post("/v1/completions", json=dict(body, logprobs=2))
        assert answer.status_code == 200, answer.text
        choices[max_batch], calls[max_batch] = answer.json()["choices"], app.state.batcher.calls
    assert max(calls[4]) <= 4 and sum(calls[4]) == 20, calls
    assert calls[64] == [20]
    assert choices[4] == choices[64]
    assert len({c["text"] for c in choices[64]}) > 1
    toy = ToyBackend()
    alone = toy.complete([[1, 2]], seeds=[9], **_params(6))
    part = toy.complete([[3], [1, 2]], seeds=[None, 9], starts=[0, 4], **_params(2))
    assert _tokens(part)[1] == _tokens(alone)[0][4:]
