"""Preference pairs for the DPO rounds: teacher response (chosen) vs a proxy sample (rejected).

Everything here is per-sample padded rows (no packing): row b holds prompt + response, then pad;
like the distill rows, a row of L positions holds up to L + 1 tokens (L targets), the longest sample
`prepare` accepts at data.seq_len = L. A row dict has, all [B, L]: `tokens`, `targets` (the tokens
shifted left by one: the last target is the (L + 1)-th token), `segment_ids`
(1 on real tokens, 0 on padding), `loss_mask` (float32, 1 where the *target* is a response token).
A pair batch has the same fields prefixed `chosen_` and `rejected_`.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from proxykd_jax.errors import ConfigError, InputFileError
from proxykd_jax.npfiles import read_npz
from proxykd_jax.parallel.hosts import to_host

ROW_FIELDS = ("tokens", "targets", "segment_ids", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt with one teacher response, as token ids (response includes the final eos)."""

    sample_id: int
    prompt_id: int
    prompt: tuple[int, ...]
    response: tuple[int, ...]


def examples_from_records(records) -> list[Example]:
    """Splits prepared records (`tokens`, `loss_mask` on response tokens) into prompt and response.

    The response is the span from the first to the last masked token; the prompt is everything
    before it. Records without response tokens or without a prompt are skipped.
    """
    out = []
    for rec in records:
        tokens = np.asarray(rec["tokens"]).reshape(-1)
        mask = np.asarray(rec["loss_mask"]).reshape(-1).astype(bool)
        where = np.nonzero(mask)[0]
        if where.size == 0 or where[0] == 0:
            continue
        start, stop = int(where[0]), int(where[-1]) + 1
        out.append(
            Example(
                sample_id=int(rec["sample_id"]),
                prompt_id=int(rec.get("prompt_key", rec.get("prompt_id", 0))),
                prompt=tuple(int(t) for t in tokens[:start]),
                response=tuple(int(t) for t in tokens[start:stop]),
            )
        )
    return out


def pad_rows(prompts, responses, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Rows prompt + response padded to `length` positions (`length` + 1 tokens fit: the last one is
    only a target; responses cut to fit), with response-target mask."""
    b = len(prompts)
    rows = {
        "tokens": np.full((b, length), pad_id, np.int32),
        "targets": np.full((b, length), pad_id, np.int32),
        "segment_ids": np.zeros((b, length), np.int32),
        "loss_mask": np.zeros((b, length), np.float32),
    }
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        p = len(prompt)
        if p >= length:
            raise ConfigError(
                f"a prompt of {p} tokens does not fit rows of align.seq_len={length} tokens (0 = data.seq_len); "
                "raise align.seq_len."
            )
        seq = np.asarray(list(prompt) + list(response)[: length + 1 - p], np.int32)
        n = len(seq)
        rows["tokens"][i, : min(n, length)] = seq[:length]
        rows["targets"][i, : n - 1] = seq[1:]
        rows["segment_ids"][i, : min(n, length)] = 1
        rows["loss_mask"][i, p - 1 : n - 1] = 1.0
    return rows


def row_lengths(segment_ids: np.ndarray) -> np.ndarray:
    """Positions each row uses, its padding left out: its last nonzero segment id's index + 1 (0 for a row of padding
    alone), over the last axis of `segment_ids` [..., L]."""
    used = segment_ids != 0
    return np.where(used.any(-1), used.shape[-1] - np.argmax(used[..., ::-1], axis=-1), 0)


def example_rows(examples, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """SFT rows of (prompt, teacher response) examples."""
    return pad_rows([e.prompt for e in examples], [e.response for e in examples], length, pad_id)


def left_aligned_prompts(prompts, width: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_tokens_BxP, prompt_lengths_B) as `models.sampling.generate` expects them."""
    out = np.full((len(prompts), width), pad_id, np.int32)
    lengths = np.zeros((len(prompts),), np.int32)
    for i, prompt in enumerate(prompts):
        if len(prompt) > width:
            raise ValueError(f"prompt of {len(prompt)} tokens is longer than the sampling width {width}.")
        out[i, : len(prompt)] = prompt
        lengths[i] = len(prompt)
    return out, lengths


def sample_responses(sample_fn, prompts, rng, *, batch_size: int, width: int, pad_id: int = 0):
    """Samples one response per prompt with `sample_fn(prompt_BxP, lengths_B, rng) -> (tokens_BxT, lengths_B)`.

    Prompts go in fixed-shape batches of `batch_size` (the last one padded with copies of the
    first prompt, whose outputs are dropped) so the sampler compiles once. Each batch uses
    `fold_in(rng, batch index)`. Returns a list of token tuples (a final stop token included).
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        n_real = len(chunk)
        chunk += [chunk[0]] * (batch_size - n_real)
        prompt_BxP, lengths_B = left_aligned_prompts(chunk, width, pad_id)
        tokens_BxT, gen_lengths_B = sample_fn(prompt_BxP, lengths_B, jax.random.fold_in(rng, start // batch_size))
        tokens_BxT, gen_lengths_B = to_host(tokens_BxT), to_host(gen_lengths_B)
        out.extend(tuple(int(t) for t in tokens_BxT[i, : gen_lengths_B[i]]) for i in range(n_real))
    return out


def build_pairs(examples, rejected_per_example, length: int | None = None) -> tuple[list[tuple], int]:
    """[(prompt, chosen, rejected)] for every example and each of its samples, dropping samples
    equal to the teacher response (and empty ones). With `length` (the row length of `pair_rows`)
    they are compared as the rows hold them, cut to `length + 1 - len(prompt)` tokens: a sample that
    differs from the teacher response only past the row's end would make two identical rows.
    Returns (pairs, number dropped)."""
    pairs, dropped = [], 0
    for example, samples in zip(examples, rejected_per_example):
        cut = None if length is None else max(length + 1 - len(example.prompt), 0)
        for rejected in samples:
            if tuple(rejected)[:cut] == tuple(example.response)[:cut] or len(rejected) == 0:
                dropped += 1
                continue
            pairs.append((example.prompt, example.response, tuple(rejected)))
    return pairs, dropped


def pair_rows(pairs, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Arrays {chosen_*, rejected_*} [S, L] for a list of (prompt, chosen, rejected) pairs."""
    prompts = [p for p, _, _ in pairs]
    chosen = pad_rows(prompts, [c for _, c, _ in pairs], length, pad_id)
    rejected = pad_rows(prompts, [r for _, _, r in pairs], length, pad_id)
    out = {f"chosen_{k}": v for k, v in chosen.items()}
    out.update({f"rejected_{k}": v for k, v in rejected.items()})
    return out


def save_pairs(path, rows: dict[str, np.ndarray], dropped: int) -> None:
    """Writes the round's pair arrays atomically (tmp file + rename)."""
    path = str(path)
    tmp = path + ".tmp.npz"
    np.savez(tmp, dropped=np.asarray(dropped), **rows)
    os.replace(tmp, path)


def load_pairs(path) -> tuple[dict[str, np.ndarray], int]:
    """(pair arrays, pairs dropped) of a round's `save_pairs` file; a damaged one is `InputFileError`."""
    fix = "delete it and run the same command again: the round samples its pairs again."
    rows = read_npz(path, fix=fix)
    if "dropped" not in rows:
        raise InputFileError(f"{path}: the file is damaged (it has no 'dropped' array); {fix}")
    return {k: v for k, v in rows.items() if k != "dropped"}, int(rows["dropped"])
