"""The teacher's final stop-token position in the `exact` head (data/align.py): where a server lists the stop token
it sampled as the answer's last teacher position (`<|im_end|>` with `bytes: []`, vLLM's skip_special_tokens and
`serve`; an end-of-text name; the empty string), that position is kept on our end row (the appended end token,
the row whose target is our end of turn or eos), its stop alternative at our end token and the others at their
ids, as the `bytes` head keeps it on the end symbol. It was dropped and counted as not kept: the teacher's
distribution where it chose to stop was lost, and on short answers `auto` fell below its 0.99 bar and picked the
`bytes` head for a teacher whose tokenizer is ours. A sample without an end row (cut by max_tokens or data.seq_len,
data.add_eos off) still drops it, and a final position that is not a stop token is placed as before."""

import dataclasses
import importlib
import json
import math

import numpy as np
import pytest
from test_data_common import tiny_cfg
from test_serve_special_tokens import WORDS
from test_xtok_align_heads import _assert_heads, _heads
from tokenizers import AddedToken

from proxykd_jax.data import align, byte_head
from proxykd_jax.data.corpus import Sample
from proxykd_jax.models.tokenizer import build_bpe_tokenizer, end_of_turn_id

prepare_mod = importlib.import_module("proxykd_jax.data.prepare")  # (`data.prepare` is also the function)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "hi"}]
UNKNOWN = "<|nope|>"  # a special name that is none of our tokens: unmapped in the exact head, no byte in `bytes`


@pytest.fixture(scope="module")
def tok():
    """Our BPE tokenizer with ChatML's specials and template: a `messages` row ends with `<|im_end|>`, a plain
    `prompt` row with the eos `<eos>`."""
    rng = np.random.default_rng()
    tok = build_bpe_tokenizer([" ".join(rng.choice(WORDS, size=8)) for _ in range(50)], 300)
    tok.add_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.chat_template = CHATML
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>") != tok.eos_token_id
    return tok


def _case(rng, tok, stop: str | None, layout: str = "server", kind: str = "prompt"):
    """A random short answer in our tokens (the teacher's: its tokenizer is ours), each position's alternatives
    the sampled token, another word that does not continue the text there and `UNKNOWN`, then, where `stop` is
    given, a final position whose sampled token is `stop` (the empty bytes a server gives it) among the same
    kind of alternatives. `layout`: "server" (tokens, token_bytes and the alternatives' bytes), "strings" (tokens
    only) or "no_tokens" (the alternatives' bytes only). (sample, our response ids, p [positions, 3], other ids
    [positions])."""
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 12))))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    table = byte_head.token_bytes(tok)
    pieces, resp = [table[i] for i in ids], text.encode()
    assert b"".join(pieces) == resp
    words = sorted(
        {
            (table[t[0]], t[0])
            for t in tok([" " + w for w in WORDS], add_special_tokens=False)["input_ids"]
            if len(t) == 1
        }
    )
    starts = np.cumsum([0] + [len(pc) for pc in pieces]).tolist()
    n = len(ids) + (stop is not None)
    p = rng.dirichlet(np.ones(3), size=n)
    tokens, token_bytes, alts, alt_bytes, others = [], [], [], [], []
    for j in range(n):
        sampled = (pieces[j], pieces[j].decode()) if j < len(ids) else (b"", stop)
        other, other_id = words[
            int(rng.choice([k for k, (w, _) in enumerate(words) if not resp.startswith(w, starts[j])]))
        ]
        others.append(other_id)
        tokens.append(sampled[1])
        token_bytes.append(sampled[0])
        alts.append([(t, math.log(q)) for t, q in zip([sampled[1], other.decode(), UNKNOWN], p[j])])
        alt_bytes.append([sampled[0], other, b""])
    if layout == "strings":
        token_bytes = alt_bytes = None
    if layout == "no_tokens":
        tokens = token_bytes = None
    prompt, messages = ("p", None) if kind == "prompt" else (None, MESSAGES)
    meta = {"finish_reason": "stop"}
    s = Sample("t.jsonl:1", "x", 0, prompt, messages, text, tokens, alts, meta, token_bytes, alt_bytes)
    return s, ids, p, others


def _encode(tok, s, head="exact", **kw):
    return align.SampleEncoder(tok, seq_len=kw.pop("seq_len", 128), head=head, **kw).encode_batch([s])[0]


@pytest.mark.parametrize("kind", ["prompt", "messages"])
@pytest.mark.parametrize("layout", ["server", "strings", "no_tokens"])
@pytest.mark.parametrize("stop", ["<|im_end|>", "<eos>", ""])
def test_the_end_row_gets_the_teachers_stop_distribution(tok, stop, layout, kind):
    """The end row holds the final position: its stop alternative at our end token (the row's target: `<|im_end|>`
    after a chat row, the eos after a plain one, whatever the stop token's name), the other word at its id; every
    position is kept, the unknown name's mass alone unmapped, and our response positions all covered (the end row
    is not one of them)."""
    rng = np.random.default_rng()
    s, ids, p, others = _case(rng, tok, stop, layout, kind)
    e = _encode(tok, s)
    end = tok.eos_token_id if kind == "prompt" else end_of_turn_id(tok)
    n0 = e.prompt_len
    assert e.tokens_L[n0:].tolist() == ids + [end]
    want = {n0 + j: {ids[j]: p[j][0], others[j]: p[j][1]} for j in range(len(ids))}
    want[n0 + len(ids)] = {end: p[-1][0], others[-1]: p[-1][1]}
    _assert_heads(_heads(e), want)
    st = e.stats
    assert st.positions_kept == st.positions_total == len(ids) + 1
    np.testing.assert_allclose(st.mass_matched, st.mass_total, rtol=1e-12)
    np.testing.assert_allclose(st.mass_total, p.sum(), rtol=1e-9)
    np.testing.assert_allclose(st.mass_kept, p[:, :2].sum(), rtol=1e-9)
    assert st.student_positions_covered == st.student_positions_total == len(ids)


@pytest.mark.parametrize("add_eos", [True, False])
def test_auto_picks_exact_for_a_teacher_that_lists_its_stop_token(tok, tmp_path, add_eos):
    """`prepare`'s head probe on a corpus of short answers whose last teacher position is `<|im_end|>` with
    `bytes: []` (as `serve` writes it): the span rule keeps every position and all mapped mass, so `auto` picks
    `exact` (it kept 10 of 11 positions of such an answer and picked `bytes`). Also with data.add_eos off: the
    probe appends the end token all the same (without it the stop positions were dropped and it picked `bytes`)."""
    rng = np.random.default_rng()
    lines = []
    for r in range(40):
        kind = ["prompt", "messages"][r % 2]
        s, ids, p, others = _case(rng, tok, "<|im_end|>", "server", kind)
        top = [
            [{"token": t, "logprob": lp, "bytes": list(b)} for (t, lp), b in zip(a, ab)]
            for a, ab in zip(s.teacher_alts, s.teacher_alt_bytes)
        ]
        top = [[x for x in pos if x["token"] != UNKNOWN] for pos in top]  # all the teacher's mass maps
        row = {"id": f"q{r}", "response": s.response, "tokens": s.teacher_tokens, "top_logprobs": top}
        row["token_bytes"] = [list(b) for b in s.teacher_token_bytes]
        row.update({"prompt": "p"} if kind == "prompt" else {"messages": MESSAGES})
        lines.append(json.dumps(row))
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    head, evidence = prepare_mod.decide_head([path], tok, tiny_cfg(add_eos=add_eos))
    assert head == "exact" and evidence["probe_samples"] == 40
    assert evidence["span_position_fraction"] == 1.0 and evidence["span_mass_fraction"] == pytest.approx(1.0)


@pytest.mark.parametrize("why", ["max_tokens", "seq_len", "add_eos_off"])
def test_without_an_end_row_the_stop_position_is_dropped(tok, why):
    """No end row (the API cut the answer at max_tokens, data.truncate cut it at data.seq_len, data.add_eos is off):
    the final stop position is dropped and counted, as before, and no row of ours holds it."""
    rng = np.random.default_rng()
    s, ids, p, others = _case(rng, tok, "<|im_end|>")
    kw = {}
    if why == "max_tokens":
        s.meta["finish_reason"] = "length"
    elif why == "seq_len":
        kw = {"seq_len": 4, "truncate": True}  # the prompt "p" and 4 of the answer's tokens
    else:
        kw = {"add_eos": False}
    e = _encode(tok, s, **kw)
    kept = len(e.tokens_L) - e.prompt_len
    assert e.tokens_L[e.prompt_len :].tolist() == ids[:kept]
    _assert_heads(_heads(e), {e.prompt_len + j: {ids[j]: p[j][0], others[j]: p[j][1]} for j in range(kept)})
    st = e.stats
    assert st.positions_total == len(ids) + 1 and st.positions_kept == kept
    np.testing.assert_allclose(st.mass_total - st.mass_matched, p[kept:].sum(), rtol=1e-9)


def _cut_case(tok, layout: str):
    """`_case` without a stop token, its last token cut from the text (as a stop string cuts it) while the teacher
    still lists it; `layout`: "server" (with `tokens`), "bytes_only" (`token_bytes` and the alternatives' bytes) or
    "no_tokens" (the alternatives' bytes only)."""
    s, ids, p, others = _case(np.random.default_rng(), tok, None, "server")
    cut = s.response.encode()[: -len(byte_head.token_bytes(tok)[ids[-1]])].decode()
    tokens = s.teacher_tokens if layout == "server" else None
    token_bytes = None if layout == "no_tokens" else s.teacher_token_bytes
    return dataclasses.replace(s, response=cut, teacher_tokens=tokens, teacher_token_bytes=token_bytes), ids, p, others


@pytest.mark.parametrize("layout", ["no_tokens", "bytes_only", "server"])
def test_a_text_token_a_stop_string_cut_from_the_text_is_not_the_stop(tok, layout):
    """A stop string cut the answer's last token out of the text, the teacher listing that token (vLLM's `stop`):
    the last position lies at the end of the text. Without `tokens` (only the alternatives' bytes, or `token_bytes`
    too) it read as end of text there and its head, none of whose alternatives is end of text, went on the end row
    (target: our eos), saying the teacher did not stop; it is dropped, as where `tokens` say which token it is."""
    s, ids, p, others = _cut_case(tok, layout)
    e = _encode(tok, s)
    n0 = e.prompt_len
    assert e.tokens_L[n0:].tolist() == ids[:-1] + [tok.eos_token_id]
    _assert_heads(_heads(e), {n0 + j: {ids[j]: p[j][0], others[j]: p[j][1]} for j in range(len(ids) - 1)})
    assert e.stats.positions_kept == len(ids) - 1 and e.stats.positions_total == len(ids)
    np.testing.assert_allclose(e.stats.mass_total - e.stats.mass_matched, p[-1].sum(), rtol=1e-9)


@pytest.mark.parametrize("layout", ["no_tokens", "bytes_only", "server"])
def test_the_bytes_head_keeps_no_text_token_cut_from_the_text_on_the_end_row(tok, layout):
    """As above, in the `bytes` head: the cut token's first bytes went on the end row without `tokens`."""
    s, ids, p, _ = _cut_case(tok, layout)
    e = _encode(tok, s, head="bytes")
    n0 = e.prompt_len
    assert e.tokens_L[n0:].tolist() == ids[:-1] + [tok.eos_token_id]
    assert sorted(_heads(e)) == [n0 + j for j in range(len(ids) - 1)]  # the end row holds no head
    assert e.stats.positions_kept == len(ids) - 1 and e.stats.positions_total == len(ids)
    np.testing.assert_allclose(e.stats.mass_total - e.stats.mass_matched, p[-1].sum(), rtol=1e-9)


@pytest.mark.parametrize("final", ["none", "<|im_start|>"])
def test_a_final_position_that_is_no_stop_token_is_placed_as_before(tok, final):
    """A teacher that lists no stop token: the end row gets no head. One whose last position is a special token
    that is not end of text (`<|im_start|>` with empty bytes: it spells no text, and ends nothing): dropped."""
    rng = np.random.default_rng()
    s, ids, p, others = _case(rng, tok, None if final == "none" else final)
    e = _encode(tok, s)
    n0 = e.prompt_len
    assert e.tokens_L[n0:].tolist() == ids + [tok.eos_token_id]
    _assert_heads(_heads(e), {n0 + j: {ids[j]: p[j][0], others[j]: p[j][1]} for j in range(len(ids))})
    assert e.stats.positions_kept == len(ids) and e.stats.positions_total == len(p)


def test_bytes_head_is_unchanged(tok):
    """The `bytes` head already kept the stop position on the end row: the end symbol for the stop alternative,
    the other word's first byte, the unknown name on no byte."""
    rng = np.random.default_rng()
    s, ids, p, others = _case(rng, tok, "<|im_end|>")
    e = _encode(tok, s, head="bytes")
    table = byte_head.token_bytes(tok)
    n0, words = e.prompt_len, [table[o] for o in others]
    assert e.tokens_L[n0:].tolist() == ids + [tok.eos_token_id]
    want = {}
    for j, (q, w) in enumerate(zip(p, words)):
        first = table[ids[j]][0] if j < len(ids) else byte_head.END_SYMBOL
        want[n0 + j] = {first: q[0], w[0]: q[1]} if first != w[0] else {first: q[0] + q[1]}
    _assert_heads(_heads(e), want)
    assert e.stats.positions_kept == e.stats.positions_total == len(ids) + 1
    np.testing.assert_allclose(e.stats.mass_kept, p[:, :2].sum(), rtol=1e-9)
