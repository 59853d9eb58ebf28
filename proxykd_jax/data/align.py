"""Tokenisation of samples and alignment of the teacher's top log-probs to our tokens.

Two rules (docs/TOKENIZERS.md), chosen by `data.teacher_head`:

- `exact` (the teacher's tokenizer is ours): a teacher position is kept when its byte span in the
  response equals the span of exactly one of our response tokens; its alternatives are mapped where
  each is a single token of our vocabulary (a special token given with empty bytes, as a server that leaves
  it out of the text lists `<|im_end|>`, by its name: `SampleEncoder._alt_id`), and the rest of its
  probability is counted as unmapped.
  A final end-of-text position (the stop token a server lists: its empty span at the end of the response) is
  kept on our end row (the appended end token), its stop alternative at our end token (`SampleEncoder._align`).
  Other positions whose span covers zero or several of our tokens are dropped and counted, as is that one
  where the sample has no end row (cut at max_tokens or data.seq_len) or, without the teacher's `tokens`, where
  none of its alternatives is end of text (it may be a text token a stop string cut out of the text).
- `bytes` (another tokenizer): teacher token boundaries are matched to our token starts by byte
  offset; at each of our positions that starts on a teacher boundary the alternatives are summed by
  their first byte (end of text is symbol 256): the head holds (symbol, log mass) pairs, and the
  remainder 1 - sum of the masses is the teacher's unseen tail (with the mass of the alternatives that
  say nothing about our next byte: other special tokens such as `<bos>`, `SampleEncoder._alt_symbols`).

Where the teacher's tokens lie in the response, and their alternatives' bytes, symbols and probabilities, are
read in `data/teacher_positions.py`; this module tokenises and places them on our tokens.
"""

import dataclasses
import functools
import operator

import numpy as np

from proxykd_jax.data import byte_head
from proxykd_jax.data.corpus import DataError, Sample
from proxykd_jax.data.teacher_positions import (
    _alt_bytes_row,
    _bytes_of,
    _position_probs,
    _special,
    _stop_alternative,
    _symbol_of_bytes,
    _teacher_byte_spans,
    _teacher_byte_starts,
)
from proxykd_jax.models.tokenizer import TEMPLATE_ERRORS, chat_prompt, end_of_turn_id
from proxykd_jax.teacher.token_bytes import BYTE_TOKEN, special_ids

HEADS = ("exact", "bytes")
_ALT_CACHE_MAX = 1 << 18  # teacher alternatives whose id an encoder remembers (forgotten when full)
# How far a teacher position's alternatives' probabilities may sum past 1 (an API's rounding of its log-probs):
# beyond it a row is refused as bad log-probs (a head holding more than the whole mass is no distribution).
_MASS_SLACK = 1e-2


@dataclasses.dataclass
class AlignStats:
    """Counts for the manifest: teacher positions and probability mass seen and kept."""

    positions_total: int = 0
    positions_kept: int = 0
    mass_total: float = 0.0
    mass_kept: float = 0.0
    samples_with_logprobs: int = 0
    student_positions_total: int = 0  # our response tokens (end token excluded) of samples with log-probs
    student_positions_covered: int = 0  # of those, the ones that received a teacher head
    mass_matched: float = 0.0  # teacher top-logprob mass at the teacher positions matched to one of ours

    def add(self, other: "AlignStats"):
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["position_fraction"] = self.positions_kept / max(self.positions_total, 1)
        d["mass_fraction"] = self.mass_kept / max(self.mass_total, 1e-30)
        d["student_position_fraction"] = self.student_positions_covered / max(self.student_positions_total, 1)
        d["head_mass_fraction"] = self.mass_kept / max(self.mass_matched, 1e-30)  # of the matched positions' mass
        return d


@dataclasses.dataclass
class Encoded:
    """A tokenised sample: `tokens_L` = prompt + response (+ its end token: `SampleEncoder`); teacher rows predict
    token i."""

    sample: Sample
    tokens_L: np.ndarray  # int32
    prompt_len: int
    teacher_topk_ids_LxK: np.ndarray | None  # int32, 0 where absent
    teacher_topk_logprobs_LxK: np.ndarray | None  # float32, -inf where absent
    stats: AlignStats
    truncated: bool
    response_chars: int | None = None  # where `truncated`: the characters of the response its tokens cover


def format_prompt(tokenizer, sample: Sample) -> tuple[str, bool]:
    """(prompt text, whether the tokenizer should add its special tokens) for one sample."""
    if sample.messages is None:
        return sample.prompt, True
    return chat_prompt(tokenizer, sample.messages)


def _trim_uncovered_space(resp: bytes, span: tuple[int, int], covered) -> tuple[int, int]:
    """A teacher byte span minus leading whitespace that none of our tokens covers (word-level
    tokenizers drop the separator the teacher's token " dog" carries; the token itself still coincides)."""
    a, b = span
    text = resp[a:b].decode("utf-8", errors="replace")  # whitespace is whole characters, decoded as is
    lead = len(text[: len(text) - len(text.lstrip())].encode("utf-8"))
    if 0 < lead < b - a and not covered[a : a + lead].any():
        return a + lead, b
    return span


def _prefixes_alone(tokenizer, token_bytes: list[bytes | None]) -> bool:
    """Whether a text on its own starts with a token holding a space (SentencePiece's word-start `▁`: "ing"
    alone is `▁ing`). Probed once, on "a"."""
    alone = tokenizer("a", add_special_tokens=False)["input_ids"]
    first = token_bytes[alone[0]] if alone and 0 <= alone[0] < len(token_bytes) else None
    return bool(first and first.startswith(b" "))


def _adds_dummy_prefix(tokenizer, token_bytes: list[bytes | None]) -> bool:
    """Whether the tokenizer writes a dummy-prefix space before a text on its own even where the text starts with
    a space (Llama 2's tokenizer.json layout, a `Prepend("▁")` normalizer: " a" is `▁ ▁a`, where after a prompt
    the same text is `▁a`). Probed once: "a" alone starts with a token holding a space (`_prefixes_alone`), and
    " a" differs from it. (A Metaspace pre-tokenizer adds no prefix to a text that starts with a space: " a" is
    `▁a` there too.)"""
    spaced, alone = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (" a", "a"))
    return _prefixes_alone(tokenizer, token_bytes) and spaced != alone


def _char_to_byte(text: str) -> np.ndarray:
    """int64 [len(text) + 1]: the byte offset in `text`'s UTF-8 of each character offset."""
    return np.concatenate([[0], np.cumsum([len(ch.encode("utf-8")) for ch in text], dtype=np.int64)])


class SampleEncoder:
    """Tokenises samples in batches with a Hugging Face fast tokenizer and aligns teacher log-probs.

    With `add_eos`, a response the teacher finished ends with one more token: the chat template's end of turn
    (`end_of_turn_id`: Llama 3's <|eot_id|>, not its eos <|end_of_text|>) for a row the template formats, the
    eos for a plain-text row (a `prompt`, or `messages` without a template)."""

    def __init__(
        self,
        tokenizer,
        *,
        seq_len: int,
        teacher_topk: int = 20,
        add_eos: bool = True,
        truncate: bool = False,
        head: str = "exact",
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "data.prepare needs a fast (Rust) tokenizer for character offsets; load it with use_fast=True."
            )
        self.tok = tokenizer
        self.seq_len = seq_len
        self.topk = teacher_topk
        self.eos = tokenizer.eos_token_id if add_eos else None
        self.end_of_turn = end_of_turn_id(tokenizer) if add_eos else None  # ends the answers of templated rows
        self.truncate = truncate
        if head not in HEADS:
            raise ValueError(f"data.teacher_head={head!r} is not one of {('auto',) + HEADS}.")
        self.head = head
        self._single_id = functools.lru_cache(maxsize=1 << 16)(self._single_id_uncached)
        self._token_bytes = byte_head.token_bytes(tokenizer)
        self._ids_by_bytes: dict[bytes, int] | None = None  # built on the first partial-UTF-8 alternative
        self._symbol = functools.lru_cache(maxsize=1 << 16)(lambda t: byte_head.teacher_symbol(t))
        self._alt_ids_seen: dict[str | bytes | tuple[str], int] = {}  # `_alt_id` by what it depends on: `_alt_ids`
        self._dummy_prefix = _adds_dummy_prefix(tokenizer, self._token_bytes)
        self._prefixes_alone = _prefixes_alone(tokenizer, self._token_bytes)
        self._added = tokenizer.get_added_vocab()  # "</s>" is the eos, tokenised alone as it is
        # Our special and added tokens by name: what a teacher alternative with empty bytes is read as (`_alt_id`).
        self._named = {**{tokenizer.convert_ids_to_tokens(i): i for i in special_ids(tokenizer)}, **self._added}

    def _in_context(self, text: str) -> str:
        """The text to tokenise for `text` as it reads after a prompt: without its leading space where our
        tokenizer's dummy prefix stands for it (`_adds_dummy_prefix`; its tokens then start one character later)."""
        return text[1:] if self._dummy_prefix and len(text) > 1 and text[0] == " " else text

    def _shift_offsets(self, r_ids, offs) -> list:
        """Offsets of the tokens of a response tokenised without its leading space (`_in_context`), in the response:
        one character later, and the first token, whose dummy prefix is the response's space, from its start (a lone
        `▁` holds only that space)."""
        offs = [(int(a) + 1, int(b) + 1) for a, b in offs]
        first = self._token_bytes[r_ids[0]] if r_ids and 0 <= r_ids[0] < len(self._token_bytes) else None
        if first and first.startswith(b" "):
            offs[0] = (0, 1 if first == b" " else offs[0][1])
        return offs

    def _single_id_uncached(self, text: str) -> int:
        if self._prefixes_alone and text and not text[0].isspace() and text not in self._added:
            # inside a word ("ing" after "▁walk"): the piece without `▁`, which tokenising it alone never gives
            return self._id_of_bytes(text.encode("utf-8"))
        ids = self.tok(self._in_context(text), add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else -1

    def _id_of_bytes(self, raw: bytes) -> int:
        """The token whose bytes are `raw` (-1: none): an ordinary piece before a byte-fallback `<0xNN>` one."""
        if self._ids_by_bytes is None:
            self._ids_by_bytes = {}
            pieces = self.tok.convert_ids_to_tokens(list(range(len(self._token_bytes))))
            for fallback in (False, True):
                for i, (b, piece) in enumerate(zip(self._token_bytes, pieces)):
                    if b and bool(piece and BYTE_TOKEN.fullmatch(piece)) == fallback:
                        self._ids_by_bytes.setdefault(b, i)
        return self._ids_by_bytes.get(raw, -1)

    def _alt_id(self, text: str, raw: bytes | None) -> int:
        """Our token id of a teacher alternative (-1: not one of our tokens), from its bytes (`raw`
        where the corpus gives them): by tokenising their text, or, for bytes that are not whole
        UTF-8 (which an API spells as a replacement character or `bytes:\\xNN`), by our tokens' bytes.

        Given empty bytes, by its name: a special token that the server leaves out of the text (vLLM's
        skip_special_tokens, `serve`) still names it, `<|im_end|>` with `bytes: []`, and the teacher's tokenizer
        is ours here, so the name is our special or added token of that string (the end of turn's probability is
        what teaches the student to stop). A name that is none of ours, or the empty string (end of text, which
        names no token; with its bytes omitted it is not mapped either), stays unmapped."""
        if raw == b"":
            return self._named.get(text, -1)
        raw = _bytes_of(text, raw)
        try:
            return self._single_id(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return self._id_of_bytes(raw)

    def _alt_ids(self, alts, raws) -> list[int]:
        """`_alt_id` of each alternative of one teacher position (`raws`: their bytes, None where not
        given), remembered by what it depends on: the bytes where given and not empty, else the text (in a
        1-tuple where the bytes are empty: read by its name, another rule than for the text without bytes)."""
        seen = self._alt_ids_seen
        if len(seen) > _ALT_CACHE_MAX:
            seen.clear()
        keys = [text if raw is None else raw if raw else (text,) for (text, _), raw in zip(alts, raws)]
        out = list(map(seen.get, keys))
        if None in out:
            for j, key in enumerate(keys):
                if out[j] is None:
                    out[j] = seen[key] = self._alt_id(alts[j][0], raws[j])
        return out

    def _alt_symbols(self, alts, raws) -> list[int | None]:
        """The first-byte symbol of each alternative of one teacher position; None where it says nothing about
        our next byte: an alternative spelled with a leading replacement character and no `bytes` (part of a
        UTF-8 character, as vLLM's legacy layout spells it: its first byte is unknown), or a special token that
        is not end of text (`<bos>`, `<start_of_turn>`: `teacher_positions._special`), which spells no text. Their
        mass is left in the teacher's unseen remainder (1 - the head's sum, spread by the posterior as our own
        first-byte distribution), the rest not renormalised, as for the alternatives below the teacher's top-k."""
        out: list[int | None] = []
        for (text, _), raw in zip(alts, raws):
            if raw is not None:
                out.append(_symbol_of_bytes(text, raw))
            else:
                out.append(None if text.startswith("\ufffd") or _special(text, None) else self._symbol(text))
        return out

    def encode_batch(self, samples: list[Sample]) -> list[Encoded | DataError]:
        """Encodes samples; an over-long sample yields a DataError in its place (unless truncating)."""
        if not samples:
            return []
        # The chat template is rendered once per conversation of the batch (the rows of one prompt repeat it), known
        # by its repr: it tells apart the 1, 1.0 and True that are equal in Python (and that a template writes apart).
        prompts, bad, rendered = [], {}, {}
        for i, s in enumerate(samples):
            key = None if s.messages is None else repr(s.messages)
            prompt = rendered.get(key) if key is not None else None
            if prompt is None:
                try:
                    prompt = format_prompt(self.tok, s)
                except TEMPLATE_ERRORS as e:  # the chat template refuses these messages
                    prompt = e
                if key is not None:
                    rendered[key] = prompt
            if isinstance(prompt, Exception):
                bad[i] = DataError(
                    f"{s.where}: the tokenizer's chat template cannot format this row's 'messages' "
                    f"({' '.join(str(prompt).split()) or type(prompt).__name__}); fix or remove the line, or set "
                    "data.on_error=skip.",
                    "bad_messages",
                )
                prompt = ("", True)
            prompts.append(prompt)
        out = []
        ids_of = {}  # each distinct prompt tokenised once; its samples share the list
        for special in (True, False):
            texts = list(dict.fromkeys(text for text, sp in prompts if sp == special))
            if texts:
                ids_of.update(
                    zip([(t, special) for t in texts], self.tok(texts, add_special_tokens=special)["input_ids"])
                )
        prompt_ids = [ids_of[p] for p in prompts]
        # A response tokenised as it reads after the prompt (" the dog" as `▁the ▁dog`, not `▁ ▁the ▁dog`).
        texts = [self._in_context(s.response) for s in samples]
        resp = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        for i, (s, p_ids, r_ids, offs) in enumerate(
            zip(samples, prompt_ids, resp["input_ids"], resp["offset_mapping"])
        ):
            end = self.eos if prompts[i][1] else self.end_of_turn  # a templated row: the template's turn end
            r_ids, offs = list(r_ids), list(offs)
            if len(texts[i]) < len(s.response):
                offs = self._shift_offsets(r_ids, offs)
            out.append(bad[i] if i in bad else self._encode_one(s, p_ids, r_ids, offs, end))
        return out

    def _encode_one(self, s: Sample, p_ids, r_ids, offs, end: int | None) -> Encoded | DataError:
        # The end token (`end`: the eos, or the chat template's end of turn) is a target only where the teacher
        # stopped: not after a response the API cut at its max_tokens (finish_reason "length"), nor after one
        # data.truncate cuts at data.seq_len, whose teacher went on writing. (An end there taught the student to
        # stop where the teacher did not.)
        ended = s.meta.get("finish_reason") != "length"
        n_extra = 1 if end is not None and ended else 0
        n = len(p_ids) + len(r_ids) + n_extra
        truncated = False  # by data.seq_len (counted in the manifest)
        n_resp, kept_chars = len(r_ids), None
        if n > self.seq_len + 1:
            n_extra = 0
            keep = self.seq_len + 1 - len(p_ids)
            if not self.truncate or keep < 1:
                return DataError(
                    f"{s.where}: sample {s.record_id!r}/{s.response_index} has {n} tokens, more than "
                    f"data.seq_len + 1 = {self.seq_len + 1}; raise data.seq_len, set data.truncate=True, "
                    "or data.on_error=skip.",
                    "too_long",
                )
            r_ids, offs, truncated = r_ids[:keep], offs[:keep], True
            kept_chars = int(offs[-1][1]) if len(r_ids) < n_resp else len(s.response)
        tokens = np.asarray(p_ids + r_ids + ([end] if n_extra else []), np.int32)
        stats = AlignStats()
        t_ids = t_lps = None
        if s.teacher_alts is not None:
            probs, masses = _position_probs(s.teacher_alts)
            over = next((i for i, mass in enumerate(masses) if mass > 1.0 + _MASS_SLACK), None)
            if over is not None:
                return DataError(
                    f"{s.where}: sample {s.record_id!r}/{s.response_index}: the alternatives of teacher token {over} "
                    f"(its entry {over} of the top log-probs) have probabilities summing to {masses[over]:.4f}, "
                    "more than 1, so they are not the log-probs of one distribution; fix or remove the line, or set "
                    "data.on_error=skip.",
                    "bad_logprobs",
                )
            if self.head == "bytes":
                eos_row = bool(n_extra)
                t_ids, t_lps = self._align_bytes(s, probs, masses, len(p_ids), r_ids, offs, len(tokens), stats, eos_row)
            else:
                end_id = end if n_extra else None
                t_ids, t_lps = self._align(s, probs, masses, len(p_ids), r_ids, offs, len(tokens), stats, end_id)
            # Our response tokens, the appended end token excluded (its head, where a server lists the stop token,
            # is counted with the teacher's positions).
            resp_rows = slice(len(p_ids), len(p_ids) + len(r_ids))
            stats.student_positions_total = len(r_ids)
            stats.student_positions_covered = int(np.isfinite(t_lps[resp_rows]).any(1).sum())
        return Encoded(s, tokens, len(p_ids), t_ids, t_lps, stats, truncated, kept_chars)

    def _align(
        self, s: Sample, probs, masses, prompt_len: int, r_ids, offs, n: int, stats: AlignStats, end_id: int | None
    ):
        """Teacher head rows [n, K] (row i predicts token i) and alignment counts for one sample; `probs`,
        `masses`: its positions' alternatives' probabilities and their sums (`_position_probs`).

        `end_id`: the appended end token, the last row's target (None: the sample has none). The teacher's final
        end-of-text position (the stop token it sampled, as a server that lists it reports it: the empty span at
        the end of the response) goes on that row, as in the `bytes` head: its distribution where it chose to
        stop is what teaches the student when to stop (dropped, it also cost a same-tokenizer teacher 1 of 11
        positions of a short answer, below `choose_head`'s bar). Its stop alternative (`_stop_alternative`) maps
        to `end_id` whatever its name (a chat teacher's `<|im_end|>` on a plain-text row that ends with our eos),
        the others as at every position. Without `tokens` it is kept only where one of its alternatives is end of
        text: there any position left at the end of the text reads as end of text, a text token too (one that a
        stop string cut out of the text), whose head on the end row would say the teacher did not stop.

        Spans are in bytes, so a teacher token holding part of a UTF-8 character (spelled as a
        replacement character by vLLM) is placed by its `token_bytes` like any other, and the tokens
        after bytes that are not UTF-8 (which the text holds as replacement characters) keep their places
        (`teacher_positions._resync`)."""
        t_ids = np.zeros((n, self.topk), np.int32)
        t_lps = np.full((n, self.topk), -np.inf, np.float32)
        ours_spans = self._student_byte_spans(s.response, r_ids, offs)
        by_span: dict[tuple[int, int], list[int]] = {}
        for j, span in enumerate(ours_spans):
            by_span.setdefault(span, []).append(j)
        stats.samples_with_logprobs = 1
        resp = s.response.encode("utf-8")
        covered = np.zeros(len(resp) + 1, bool)
        for a, b in ours_spans:
            covered[a:b] = True
        heads = []
        for i, (span, alts) in enumerate(zip(_teacher_byte_spans(s), s.teacher_alts)):
            stats.positions_total += 1
            stats.mass_total += masses[i]
            raws, row, stop = _alt_bytes_row(s, i, len(alts)), None, None
            if span is not None and span[0] == span[1]:  # end of text: none of our tokens; our end row, if any
                span, stop = None, _stop_alternative(s, i, raws)
                # Without `tokens` any position left at the end of the text reads as end of text (one a stop string
                # cut off, one whose text a likelier reading took): only one with an end-of-text alternative is kept.
                if end_id is not None and (stop is not None or s.teacher_tokens is not None):
                    row = n - 1
            if span is not None and span not in by_span:
                span = _trim_uncovered_space(resp, span, covered)
            ours = by_span.get(span) if span is not None else None
            if row is None and (not ours or len(ours) != 1):
                continue
            stats.mass_matched += masses[i]
            ids = self._alt_ids(alts, raws)
            if row is None:
                row = prompt_len + ours[0]
            elif stop is not None:
                ids[stop] = end_id
            merged: dict[int, float] = {}
            for tid, p in zip(ids, probs[i]):
                if tid >= 0:
                    merged[tid] = merged.get(tid, 0.0) + p
            best = _top(merged, self.topk)
            stats.positions_kept += 1
            stats.mass_kept += sum([p for _, p in best])
            heads.append((row, best))
        _write_heads(t_ids, t_lps, heads)
        return t_ids, t_lps

    def _spelled_starts(self, text: str, r_ids) -> list[int] | None:
        """Byte offsets in the response where each of our response tokens starts, and the end, from
        our tokens' bytes; None when they do not spell the response (not byte-level BPE)."""
        pieces = [self._token_bytes[t] if 0 <= t < len(self._token_bytes) else None for t in r_ids]
        if any(p is None for p in pieces):
            return None
        starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces], dtype=np.int64)]).tolist()
        return starts if b"".join(pieces) == text.encode("utf-8")[: starts[-1]] else None

    def _student_byte_starts(self, text: str, r_ids, offs) -> list[int | None]:
        """Byte offset in the response where each of our response tokens starts (None: inside a character,
        or a token whose bytes are not the response's there).

        Exact from our tokens' bytes when they spell the response (byte-level BPE); else from the
        character offsets, where a token that starts where the one before it starts begins inside
        a character, and a token whose bytes differ from the text at its start gets None: a first-byte
        head there would not be about its first byte (SentencePiece's first token `▁the` holds a dummy
        space that the response "the ..." does not; its tokens without bytes, such as `<unk>`)."""
        starts = self._spelled_starts(text, r_ids)
        if starts is not None:
            return starts[:-1]
        c2b, resp, pieces = _char_to_byte(text), text.encode("utf-8"), self._token_bytes
        starts, prev = [], None
        for t, (a, _) in zip(r_ids, offs):
            b = int(c2b[int(a)])
            piece = pieces[t] if 0 <= t < len(pieces) else None
            starts.append(b if a != prev and piece and resp.startswith(piece, b) else None)
            prev = a
        return starts

    def _student_byte_spans(self, text: str, r_ids, offs) -> list[tuple[int, int]]:
        """Byte span in the response of each of our response tokens: from our tokens' bytes when they
        spell the response (byte-level BPE: exact also for a token holding part of a character); else
        from the character offsets, where the tokens of one character share its span (and are dropped)."""
        starts = self._spelled_starts(text, r_ids)
        if starts is not None:
            return list(zip(starts[:-1], starts[1:]))
        c2b = _char_to_byte(text)
        return [(int(c2b[int(a)]), int(c2b[int(b)])) for a, b in offs]

    def _align_bytes(
        self, s: Sample, probs, masses, prompt_len: int, r_ids, offs, n: int, stats: AlignStats, eos_row: bool
    ):
        """First-byte head rows [n, K] (row i predicts token i: symbols and log masses), `probs` and `masses` as for
        `_align`; `eos_row`: the last row is an appended end token (eos or end of turn), where the teacher's
        end-of-text mass goes."""
        t_ids = np.zeros((n, self.topk), np.int32)
        t_lps = np.full((n, self.topk), -np.inf, np.float32)
        row_at = {b: prompt_len + j for j, b in enumerate(self._student_byte_starts(s.response, r_ids, offs))}
        row_at.pop(None, None)
        if eos_row:
            row_at[len(s.response.encode("utf-8"))] = n - 1
        stats.samples_with_logprobs = 1
        heads = []
        for i, (start, alts) in enumerate(zip(_teacher_byte_starts(s), s.teacher_alts)):
            stats.positions_total += 1
            stats.mass_total += masses[i]
            row = row_at.get(start) if start is not None else None
            syms = self._alt_symbols(alts, _alt_bytes_row(s, i, len(alts))) if row is not None else []
            if row == n - 1 and eos_row and s.teacher_tokens is None and byte_head.END_SYMBOL not in syms:
                row = None  # without `tokens` a text token a stop string cut from the text also starts there (`_align`)
            if row is None:
                continue
            stats.mass_matched += masses[i]
            merged: dict[int, float] = {}
            for sym, p in zip(syms, probs[i]):
                if sym is not None:
                    merged[sym] = merged.get(sym, 0.0) + p
            best = _top(merged, self.topk)
            stats.positions_kept += 1
            stats.mass_kept += sum([p for _, p in best])
            heads.append((row, best))
        _write_heads(t_ids, t_lps, heads)
        return t_ids, t_lps


def _top(merged: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The `k` most probable (id or symbol, probability) pairs, the first seen first among equals."""
    return sorted(merged.items(), key=operator.itemgetter(1), reverse=True)[:k]


def _write_heads(t_ids: np.ndarray, t_lps: np.ndarray, heads: list[tuple[int, list[tuple[int, float]]]]):
    """Writes each (row, [(id or symbol, probability), ...]) into the head rows (log-probabilities by
    one np.log call per sample)."""
    rows = [row for row, best in heads for _ in best]
    cols = [c for _, best in heads for c in range(len(best))]
    t_ids[rows, cols] = [tid for _, best in heads for tid, _ in best]
    t_lps[rows, cols] = np.log(np.array([p for _, best in heads for _, p in best], np.float64))


def choose_head(stats: AlignStats, threshold: float = 0.99) -> str:
    """`exact` when the span rule keeps nearly every teacher position and nearly all its mass (the
    teacher tokenises like us), else `bytes`."""
    if not stats.positions_total:
        return "exact"
    d = stats.as_dict()
    return "exact" if d["position_fraction"] >= threshold and d["mass_fraction"] >= threshold else "bytes"
