"""Two eval defects found by fuzzing: a per-model scores file (`eval/scored/<model>.json`, `metrics.Kept`) wrote an
infinite KL as `Infinity`, which is not JSON, and the bytes of a response cut inside a multi-byte UTF-8 character
(data.truncate's cut between a byte-level BPE's byte tokens) counted the 3 bytes of the replacement character that
decoding writes instead of the bytes its tokens hold (`per_byte.text_bytes`)."""

from __future__ import annotations

import json
import math
import types

import numpy as np

from proxykd_jax.context import RunContext
from proxykd_jax.data.align import SampleEncoder
from proxykd_jax.data.corpus import Sample
from proxykd_jax.eval import metrics as metrics_lib
from proxykd_jax.eval import per_byte
from proxykd_jax.models.tokenizer import build_bpe_tokenizer


def _strict(constant):
    raise ValueError(f"{constant} is not JSON")


def _same(a, b) -> bool:
    """Equal scores, NaN equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def test_a_scored_file_with_an_infinite_kl_is_strict_json_and_resumes_with_it(tmp_path):
    """Random scores with an infinite KL (and -inf, NaN, a bare number, as any part may hold): the scored file is
    strict JSON with null there, as metrics.json stores it; a resumed eval reads the same scores back without
    scoring again, so its metrics are the ones a run that was not killed writes."""
    rng = np.random.default_rng()
    writer = types.SimpleNamespace(is_writer=True)
    kept = metrics_lib.Kept(tmp_path / "scored", lambda path, obj: RunContext.write_json(writer, path, obj), True)
    scores = {
        "proxy_aligned": {
            "models": {"heldout_nll": float(rng.uniform(1, 5)), "kl_to_teacher": math.inf},
            "estimator": {"kl": float(rng.uniform(0, 2)), "positions": int(rng.integers(1, 99))},
        },
        "student_proxykd": {"models": {"heldout_nll": -math.inf, "kl_to_teacher": math.nan}},
        "teacher": math.inf,
    }
    key = {"folder": str(tmp_path / "model"), "dtype": "float32"}
    first = {name: kept(name, key, lambda s=s: s) for name, s in scores.items()}
    assert _same(first, scores)
    for name in scores:
        written = json.loads((tmp_path / "scored" / f"{name}.json").read_text(), parse_constant=_strict)
        assert written["key"] == key
    written = json.loads((tmp_path / "scored" / "proxy_aligned.json").read_text())
    assert written["scores"]["models"]["kl_to_teacher"] is None
    assert written["scores"]["models"]["heldout_nll"] == scores["proxy_aligned"]["models"]["heldout_nll"]

    def again():
        raise AssertionError("a kept score was scored again")

    resumed = {name: kept(name, key, again) for name in scores}
    assert _same(resumed, scores)
    models = {k: v for k, v in resumed.items() if k != "teacher"}
    fresh = {k: v for k, v in scores.items() if k != "teacher"}
    reference = {"one-hot (smoothed)": 0.5, "positions": scores["proxy_aligned"]["estimator"]["positions"]}
    joined = [metrics_lib.join_metrics(m, "heldout", reference=reference) for m in (models, fresh)]
    assert metrics_lib.finite_or_null(joined[0]) == metrics_lib.finite_or_null(joined[1])
    # a file an eval before this fix wrote (`Infinity`) still resumes
    path = tmp_path / "scored" / "old.json"
    path.write_text(json.dumps({"key": key, "scores": {"models": {"kl_to_teacher": math.inf}}}))
    assert kept("old", key, again) == {"models": {"kl_to_teacher": math.inf}}


def gpt2_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet (`bytes_to_unicode`), character -> byte: the reference's own reading of a
    byte-level BPE token."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


ALPHABET = list("abc xyz.") + ["é", "ß", "文", "語", "😀", "🦊", "\ufffd"]  # 1- to 4-byte characters, U+FFFD itself


def test_text_bytes_of_tokens_cut_inside_a_character_are_the_bytes_they_hold(tmp_path):
    """Random texts of 1- to 4-byte characters (U+FFFD among them) through a byte-level BPE that leaves many
    characters as several byte tokens: every prefix of a text's tokens counts the bytes those tokens hold (GPT-2's
    byte alphabet, read here), a prefix that ends between whole characters its text's UTF-8 bytes; and a response
    data.truncate cuts inside a character counts the bytes its kept tokens hold."""
    rng = np.random.default_rng()
    texts = ["".join(rng.choice(ALPHABET, int(rng.integers(4, 30)))) for _ in range(160)]
    tok = build_bpe_tokenizer(texts[:5], 270, tmp_path / "tok")
    byte_of = gpt2_bytes()
    cut_inside = 0
    for text in texts[:40]:
        ids = tok.encode(text, add_special_tokens=False)
        held = [bytes(byte_of[c] for c in piece) for piece in tok.convert_ids_to_tokens(ids)]
        assert b"".join(held) == text.encode("utf-8")
        for cut in range(1, len(ids) + 1):
            want = sum(len(h) for h in held[:cut])
            assert per_byte.text_bytes(ids[:cut] + [tok.eos_token_id], tok) == want, (text, cut)
            try:
                b"".join(held[:cut]).decode("utf-8")
            except UnicodeDecodeError:
                cut_inside += 1
    assert cut_inside >= 10
    encoder, cut_inside = SampleEncoder(tok, seq_len=4, truncate=True), 0
    for i, text in enumerate(texts):
        sample = Sample(f"f:{i}", f"r{i}", 0, "ab", None, text, None, None, {})
        enc = encoder.encode_batch([sample])[0]
        response = [int(t) for t in enc.tokens_L[enc.prompt_len :]]
        held = b"".join(bytes(byte_of[c] for c in piece) for piece in tok.convert_ids_to_tokens(response))
        assert per_byte.text_bytes(response, tok) == len(held), (text, held)
        try:
            held.decode("utf-8")
        except UnicodeDecodeError:
            cut_inside += 1
    assert cut_inside >= 8  # (about 1 in 6)
