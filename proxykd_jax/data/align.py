"""Tokenisation of samples and alignment of the teacher's top log-probs to our tokens.

The teacher's tokens are not ours. A teacher position is kept when its character span in the
response equals the span of exactly one of our response tokens; its alternatives are mapped where
each is a single token of our vocabulary, and the rest of its probability is counted as unmapped.
Positions whose span covers zero or several of our tokens are dropped and counted.
"""

import dataclasses
import functools

import numpy as np

from proxykd_jax.data.corpus import DataError, Sample


@dataclasses.dataclass
class AlignStats:
    """Counts for the manifest: teacher positions and probability mass seen and kept."""

    positions_total: int = 0
    positions_kept: int = 0
    mass_total: float = 0.0
    mass_kept: float = 0.0
    samples_with_logprobs: int = 0

    def add(self, other: "AlignStats"):
        self.positions_total += other.positions_total
        self.positions_kept += other.positions_kept
        self.mass_total += other.mass_total
        self.mass_kept += other.mass_kept
        self.samples_with_logprobs += other.samples_with_logprobs

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["position_fraction"] = self.positions_kept / max(self.positions_total, 1)
        d["mass_fraction"] = self.mass_kept / max(self.mass_total, 1e-30)
        return d


@dataclasses.dataclass
class Encoded:
    """A tokenised sample: `tokens_L` = prompt + response (+ eos); teacher rows predict token i."""

    sample: Sample
    tokens_L: np.ndarray  # int32
    prompt_len: int
    teacher_topk_ids_LxK: np.ndarray | None  # int32, 0 where absent
    teacher_topk_logprobs_LxK: np.ndarray | None  # float32, -inf where absent
    stats: AlignStats
    truncated: bool


def format_prompt(tokenizer, sample: Sample) -> tuple[str, bool]:
    """(prompt text, whether the tokenizer should add its special tokens) for one sample."""
    if sample.messages is None:
        return sample.prompt, True
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(sample.messages, add_generation_prompt=True, tokenize=False)
        return text, False
    lines = [f"{m['role']}: {m['content']}" for m in sample.messages]
    return "\n".join(lines + ["assistant: "]), True


def _teacher_spans(sample: Sample) -> list[tuple[int, int] | None]:
    """Character span of each teacher token in the response; None once the text stops matching."""
    text, spans, c = sample.response, [], 0
    for i, alts in enumerate(sample.teacher_alts):
        if sample.teacher_tokens is not None:
            tok = sample.teacher_tokens[i]
        else:  # the sampled token: the likeliest alternative that continues the text
            fits = [(lp, t) for t, lp in alts if t and text.startswith(t, c)]
            tok = max(fits)[1] if fits else None
        if tok is None or not tok or not text.startswith(tok, c):
            spans.extend([None] * (len(sample.teacher_alts) - i))
            break
        spans.append((c, c + len(tok)))
        c += len(tok)
    return spans


def _trim_uncovered_space(text: str, span: tuple[int, int], covered) -> tuple[int, int]:
    """A teacher span minus leading whitespace that none of our tokens covers (word-level tokenizers
    drop the separator the teacher's token " dog" carries; the token itself still coincides)."""
    a, b = span
    lead = len(text[a:b]) - len(text[a:b].lstrip())
    if 0 < lead < b - a and not covered[a : a + lead].any():
        return a + lead, b
    return span


class SampleEncoder:
    """Tokenises samples in batches with a Hugging Face fast tokenizer and aligns teacher log-probs."""

    def __init__(
        self, tokenizer, *, seq_len: int, teacher_topk: int = 20, add_eos: bool = True, truncate: bool = False
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "data.prepare needs a fast (Rust) tokenizer for character offsets; load it with use_fast=True."
            )
        self.tok = tokenizer
        self.seq_len = seq_len
        self.topk = teacher_topk
        self.eos = tokenizer.eos_token_id if add_eos else None
        self.truncate = truncate
        self._single_id = functools.lru_cache(maxsize=1 << 16)(self._single_id_uncached)

    def _single_id_uncached(self, text: str) -> int:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else -1

    def encode_batch(self, samples: list[Sample]) -> list[Encoded | DataError]:
        """Encodes samples; an over-long sample yields a DataError in its place (unless truncating)."""
        if not samples:
            return []
        prompts = [format_prompt(self.tok, s) for s in samples]
        out = []
        plain = [i for i, (_, special) in enumerate(prompts) if special]
        chat = [i for i, (_, special) in enumerate(prompts) if not special]
        prompt_ids = [None] * len(samples)
        for idx, special in ((plain, True), (chat, False)):
            if idx:
                enc = self.tok([prompts[i][0] for i in idx], add_special_tokens=special)["input_ids"]
                for i, ids in zip(idx, enc):
                    prompt_ids[i] = ids
        resp = self.tok([s.response for s in samples], add_special_tokens=False, return_offsets_mapping=True)
        for s, p_ids, r_ids, offs in zip(samples, prompt_ids, resp["input_ids"], resp["offset_mapping"]):
            out.append(self._encode_one(s, p_ids, list(r_ids), list(offs)))
        return out

    def _encode_one(self, s: Sample, p_ids, r_ids, offs) -> Encoded | DataError:
        n_extra = 1 if self.eos is not None else 0
        n = len(p_ids) + len(r_ids) + n_extra
        truncated = False
        if n > self.seq_len + 1:
            keep = self.seq_len + 1 - len(p_ids) - n_extra
            if not self.truncate or keep < 1:
                return DataError(
                    f"{s.where}: sample {s.record_id!r}/{s.response_index} has {n} tokens, more than "
                    f"data.seq_len + 1 = {self.seq_len + 1}; raise data.seq_len, set data.truncate=True, "
                    "or data.on_error=skip.",
                    "too_long",
                )
            r_ids, offs, truncated = r_ids[:keep], offs[:keep], True
        tokens = np.asarray(p_ids + r_ids + ([self.eos] if n_extra else []), np.int32)
        stats = AlignStats()
        t_ids = t_lps = None
        if s.teacher_alts is not None:
            t_ids, t_lps = self._align(s, len(p_ids), offs, len(tokens), stats)
        return Encoded(s, tokens, len(p_ids), t_ids, t_lps, stats, truncated)

    def _align(self, s: Sample, prompt_len: int, offs, n: int, stats: AlignStats):
        """Teacher head rows [n, K] (row i predicts token i) and alignment counts for one sample."""
        t_ids = np.zeros((n, self.topk), np.int32)
        t_lps = np.full((n, self.topk), -np.inf, np.float32)
        by_span: dict[tuple[int, int], list[int]] = {}
        for j, (a, b) in enumerate(offs):
            by_span.setdefault((int(a), int(b)), []).append(j)
        stats.samples_with_logprobs = 1
        covered = np.zeros(len(s.response) + 1, bool)
        for a, b in offs:
            covered[int(a) : int(b)] = True
        for span, alts in zip(_teacher_spans(s), s.teacher_alts):
            probs = np.exp(np.asarray([lp for _, lp in alts], np.float64))
            stats.positions_total += 1
            stats.mass_total += float(probs.sum())
            if span is not None and span not in by_span:
                span = _trim_uncovered_space(s.response, span, covered)
            ours = by_span.get(span) if span is not None else None
            if not ours or len(ours) != 1:
                continue
            merged: dict[int, float] = {}
            for (text, _), p in zip(alts, probs):
                tid = self._single_id(text)
                if tid >= 0:
                    merged[tid] = merged.get(tid, 0.0) + float(p)
            best = sorted(merged.items(), key=lambda kv: -kv[1])[: self.topk]
            stats.positions_kept += 1
            stats.mass_kept += sum(p for _, p in best)
            row = prompt_len + ours[0]
            for c, (tid, p) in enumerate(best):
                t_ids[row, c] = tid
                t_lps[row, c] = np.log(p)
        return t_ids, t_lps
