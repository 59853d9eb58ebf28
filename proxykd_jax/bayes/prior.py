"""The corpus prior: per-prompt prefix tries and an interpolated Witten–Bell n-gram
(docs/METHOD.md).

Pseudo-counts at position t of a response to prompt x are

  a_t = exact_t + kappa * p_ngram(. | last n-1 tokens),

where exact_t counts the next tokens among all responses to x that share the prefix y_<t. Both parts
are stored as sorted count tables (`counts.CountTable`) and queried in batches. The n-gram is
represented exactly as a sparse part plus a shared dense floor:

  p_ngram(v | c) = sum_j ngram_probs[j] * [ngram_ids[j] == v] + floor(c) * base(v),

with `base` the Witten–Bell-smoothed unigram distribution. Each order keeps its `ngram_top_s` most
frequent continuations per context; the mass of the rest is moved into `floor` (so the represented
distribution still sums to one). Ids may repeat across orders: consumers sum duplicates. Responses
that are in the tables read the n-gram without their own occurrence (`PriorTables.query`).
"""

import typing

import numpy as np

from proxykd_jax.bayes import counts as counts_lib

QUERY_MODES = ("include_self", "leave_one_out", "external")


def own_weight(own_token: str, counted: bool = True) -> float:
    """What a stored response's own token counts in its exact counts, from `posterior.own_token`: count 1,
    leave_out 0, a number in [0, 1] itself, auto `counted` (the fit's `count_own_token`: 1 where it set the scale)."""
    named = {"count": 1.0, "leave_out": 0.0, "auto": 1.0 if counted else 0.0}
    return named[own_token] if own_token in named else float(own_token)


def prior_query(estimate: dict) -> dict:
    """The `PriorTables.query` arguments the store reads its prior with, from its estimate.json (`own_weight`, or,
    recorded before it, `count_own_token` as `auto` set it)."""
    weight = float(estimate.get("own_weight", own_weight("auto", estimate.get("count_own_token", True))))
    return {"mode": "include_self", "own_weight": weight} if weight > 0 else {"mode": "leave_one_out"}


class SparsePrior(typing.NamedTuple):
    """The prior at N positions, sparse except for `floor_N * base_V` (a pytree, jit-friendly).

    ids_NxS/counts_NxS: exact per-prompt trie counts (padding: id 0, count 0); ngram_ids_NxS2 /
    ngram_probs_NxS2: the n-gram's sparse part (ids may repeat across orders); floor_N: weight of the
    shared dense base distribution in p_ngram.
    """

    ids_NxS: typing.Any
    counts_NxS: typing.Any
    ngram_ids_NxS2: typing.Any
    ngram_probs_NxS2: typing.Any
    floor_N: typing.Any


class PriorTables:
    """Finished prior tables: one exact-prefix table, one table per n-gram context length, base_V."""

    def __init__(
        self, vocab_size, order, exact_top_s, ngram_top_s, exact, ngrams, base_V, num_tokens, exact_min_count=1
    ):
        self.vocab_size, self.order = int(vocab_size), int(order)
        self.exact_min_count = int(exact_min_count)
        self.exact_top_s, self.ngram_top_s = int(exact_top_s), int(ngram_top_s)
        self.exact: counts_lib.CountTable = exact
        self.ngrams: list[counts_lib.CountTable] = ngrams
        self.base_V = base_V
        self.num_tokens = int(num_tokens)

    @classmethod
    def build(
        cls,
        prompt_keys,
        sequences,
        *,
        vocab_size,
        order=4,
        exact_top_s=16,
        ngram_top_s=32,
        exact_min_count=1,
        buffer_pairs=2_000_000,
    ):
        """Builds the tables from one batch of responses (see `PriorBuilder` for streaming)."""
        b = PriorBuilder(
            vocab_size=vocab_size,
            order=order,
            exact_top_s=exact_top_s,
            ngram_top_s=ngram_top_s,
            exact_min_count=exact_min_count,
            buffer_pairs=buffer_pairs,
        )
        b.add(prompt_keys, sequences)
        return b.finalize()

    @property
    def nbytes(self):
        return self.exact.nbytes + sum(t.nbytes for t in self.ngrams) + self.base_V.nbytes

    def save(self, directory):
        """Writes the tables to `directory/tables.npz` (arrays) and `tables.json` (scalars), atomically."""
        import dataclasses
        import json
        import os
        import pathlib  # pylint: disable=import-outside-toplevel,multiple-imports

        out = pathlib.Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {"base_V": self.base_V}
        for name, table in [("exact", self.exact)] + [(f"ngram{j}", t) for j, t in enumerate(self.ngrams)]:
            for field in dataclasses.fields(table):
                arrays[f"{name}.{field.name}"] = getattr(table, field.name)
        tmp = out / "tables.tmp.npz"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(out / "tables.npz")
        meta = {
            "vocab_size": self.vocab_size,
            "order": self.order,
            "exact_top_s": self.exact_top_s,
            "ngram_top_s": self.ngram_top_s,
            "num_tokens": self.num_tokens,
            "exact_min_count": self.exact_min_count,
        }
        (out / "tables.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory) -> "PriorTables":
        """Reads tables written by `save`; a damaged file raises `InputFileError` naming it."""
        import dataclasses
        import json
        import pathlib  # pylint: disable=import-outside-toplevel,multiple-imports

        from proxykd_jax.errors import InputFileError
        from proxykd_jax.npfiles import detail, read_npz

        src = pathlib.Path(directory)
        if not (src / "tables.json").exists() or not (src / "tables.npz").exists():
            raise FileNotFoundError(f"{src}: no prior tables (tables.json + tables.npz); run the `prior` stage first.")
        fix = f"delete the folder {src} and re-run `proxykd prior`."
        keys = ("vocab_size", "order", "exact_top_s", "ngram_top_s", "num_tokens", "exact_min_count")
        try:
            meta = json.loads((src / "tables.json").read_text())
            meta = {key: int(meta[key]) for key in keys}
        except (ValueError, KeyError, TypeError) as e:  # (JSON and UTF-8 decoding errors are ValueErrors)
            raise InputFileError(f"{src / 'tables.json'}: the file is damaged ({detail(e)}); {fix}") from None
        fields = [f.name for f in dataclasses.fields(counts_lib.CountTable)]
        prefixes = ["exact", *(f"ngram{j}" for j in range(meta["order"] - 1))]
        arrays = read_npz(
            src / "tables.npz", fix=fix, names=[*(f"{p}.{n}" for p in prefixes for n in fields), "base_V"]
        )

        def table(prefix):
            return counts_lib.CountTable(*(arrays[f"{prefix}.{n}"] for n in fields))

        return cls(
            meta["vocab_size"],
            meta["order"],
            meta["exact_top_s"],
            meta["ngram_top_s"],
            table("exact"),
            [table(p) for p in prefixes[1:]],
            arrays["base_V"],
            meta["num_tokens"],
            meta["exact_min_count"],
        )

    def query(self, prompt_keys, sequences, *, mode="include_self", own_weight: float = 1.0) -> SparsePrior:
        """The prior at every position of the given responses, flattened (N = total tokens).

        mode: "include_self" — the responses were in the tables, the exact counts include their own
        token (the observed token always counts 1); "leave_one_out" — they were in the tables and
        their own token is subtracted from the exact counts; "external" — they were not in the tables
        (held-out scoring). `own_weight` (include_self only): what the own token counts, from 0 (as
        leave_one_out) to 1.

        In both modes for responses in the tables the n-gram is read leave-one-out: at every order the
        position's own (context, y_t) occurrence is taken out, as if the tables were built without it, so
        that kappa * p_ngram does not count y_t a second time (the empirical-Bayes fit scored n-grams that
        never held it). This is exact without top-s truncation; with it, see
        `CountTable.lookup_without_own` for the two cases that are approximated (the result still sums
        to one). The shared base (the smoothed unigram) keeps the own
        token, so that it stays one dense vector for all positions: taking the token out would move it by
        at most 2 / (num_tokens + distinct tokens - 2) in total variation.
        """
        if mode not in QUERY_MODES:
            raise ValueError(f"prior.query: mode={mode!r} is not one of {QUERY_MODES}.")
        if mode == "external" and self.exact_min_count > 1:
            raise ValueError(
                "prior.query: mode='external' needs the prefixes seen once; rebuild the "
                "tables with prior.exact_min_count = 1."
            )
        flat = counts_lib.FlatTokens.from_sequences(prompt_keys, sequences)
        if flat.tokens_N.size and flat.tokens_N.max() >= self.vocab_size:
            raise ValueError(
                f"prior.query: token id {int(flat.tokens_N.max())} >= vocab_size "
                f"{self.vocab_size}; the records and the prior tables use different vocabularies."
            )
        if not 0.0 <= own_weight <= 1.0 or (own_weight != 1.0 and mode != "include_self"):
            raise ValueError(f"prior.query: own_weight={own_weight} needs mode='include_self' and a value in [0, 1].")
        ids, cnts = self._exact(flat, mode, own_weight)
        ng_ids, ng_probs, floor = self._ngram(flat, without_own=mode != "external")
        return SparsePrior(ids, cnts, ng_ids, ng_probs, floor)

    def _exact(self, flat, mode, own_weight=1.0):
        """Exact trie counts (prefixes seen fewer than exact_min_count times are not stored)."""
        y = flat.tokens_N.astype(np.int32)
        found, _, _, ids, cnt = self.exact.lookup(counts_lib.prefix_keys(flat), self.exact_top_s)
        cnt = cnt.astype(np.float32)
        own = (ids == y[:, None]) & (cnt > 0)
        if mode == "leave_one_out":
            cnt = np.where(own, cnt - 1.0, cnt)
        elif mode == "include_self":
            # A prefix absent from the table was pruned as seen once: by this response, with its token.
            ids[~found, 0] = y[~found]
            cnt[~found, 0] = 1.0
            if own_weight != 1.0:
                cnt = np.where((ids == y[:, None]) & (cnt > 0), cnt - (1.0 - own_weight), cnt)
        return ids, cnt

    def _ngram(self, flat, without_own=False):
        """Interpolated Witten–Bell, highest order first, as sparse entries plus a floor weight.

        without_own: every order's table is read without this position's own (context, y_t) occurrence
        (`CountTable.lookup_without_own`, exact up to the top-s truncation it describes); the shared base
        keeps it (see `query`)."""
        n = flat.tokens_N.shape[0]
        keys = counts_lib.ngram_keys(flat, self.order)
        remaining = np.ones(n, np.float64)
        dropped = np.zeros(n, np.float64)
        all_ids, all_probs = [], []
        for j in range(self.order - 1, 0, -1):
            if without_own:
                table = self.ngrams[j - 1].lookup_without_own(keys[j - 1], flat.tokens_N, self.ngram_top_s)
            else:
                table = self.ngrams[j - 1].lookup(keys[j - 1], self.ngram_top_s)
            found, total, distinct, ids, cnt = table
            tot = np.maximum(total, 1).astype(np.float64)
            lam = np.where(found, total / np.maximum(total + distinct, 1), 0.0)
            scale = remaining * lam / tot
            probs = cnt * scale[:, None]
            all_ids.append(ids)
            all_probs.append(probs)
            dropped += remaining * lam - probs.sum(axis=1)
            remaining = remaining * (1.0 - lam)
        if not all_ids:
            return (np.zeros((n, 1), np.int32), np.zeros((n, 1), np.float32), np.ones(n, np.float32))
        floor = remaining + np.maximum(dropped, 0.0)
        return (
            np.concatenate(all_ids, axis=1),
            np.concatenate(all_probs, axis=1).astype(np.float32),
            floor.astype(np.float32),
        )

    def dense_ngram(self, prior: SparsePrior):
        """p_ngram as a dense float64 [N, V] array (a reference for tests; small inputs only)."""
        n = prior.floor_N.shape[0]
        out = np.asarray(prior.floor_N, np.float64)[:, None] * self.base_V[None, :].astype(np.float64)
        np.add.at(
            out,
            (np.repeat(np.arange(n), prior.ngram_ids_NxS2.shape[1]), np.asarray(prior.ngram_ids_NxS2).reshape(-1)),
            np.asarray(prior.ngram_probs_NxS2, np.float64).reshape(-1),
        )
        return out


class PriorBuilder:
    """Streams responses into the prior tables; memory ~ distinct (context, next) pairs + one buffer."""

    def __init__(
        self, *, vocab_size, order=4, exact_top_s=16, ngram_top_s=32, exact_min_count=1, buffer_pairs=2_000_000
    ):
        if order < 1:
            raise ValueError(f"prior: ngram_order must be >= 1 (1 = unigram only), got {order}.")
        if vocab_size < 2:
            raise ValueError(f"prior: vocab_size must be >= 2, got {vocab_size}.")
        if min(exact_top_s, ngram_top_s) < 1:  # 0 switches nothing off: the posterior could not use the tables
            raise ValueError(f"prior: exact_top_s and ngram_top_s must be >= 1, got {exact_top_s} and {ngram_top_s}.")
        self.vocab_size, self.order = int(vocab_size), int(order)
        self.exact_top_s, self.ngram_top_s = int(exact_top_s), int(ngram_top_s)
        self.exact_min_count = int(exact_min_count)
        self._exact = counts_lib.PairAccumulator(buffer_pairs)
        self._ngrams = [counts_lib.PairAccumulator(buffer_pairs) for _ in range(order - 1)]
        self._unigram = np.zeros(self.vocab_size, np.int64)
        self._num_tokens = 0

    def add(self, prompt_keys, sequences):
        """Adds a batch of responses: one int64 prompt key and one token sequence each."""
        flat = counts_lib.FlatTokens.from_sequences(prompt_keys, sequences)
        if flat.tokens_N.size == 0:
            return
        if flat.tokens_N.max() >= self.vocab_size:
            raise ValueError(
                f"prior: token id {int(flat.tokens_N.max())} >= vocab_size "
                f"{self.vocab_size}; set prior vocab_size to the tokenizer's vocabulary size."
            )
        y = flat.tokens_N
        self._exact.add(counts_lib.prefix_keys(flat), y)
        keys = counts_lib.ngram_keys(flat, self.order)
        for j, acc in enumerate(self._ngrams):
            acc.add(keys[j], y)
        self._unigram += np.bincount(y, minlength=self.vocab_size)
        self._num_tokens += y.shape[0]

    @property
    def nbytes(self):
        return self._exact.nbytes + sum(a.nbytes for a in self._ngrams) + self._unigram.nbytes

    def finalize(self) -> PriorTables:
        """Reduces the buffers and returns the query-ready tables."""
        self._exact.flush()
        exact = counts_lib.CountTable.from_pairs(
            self._exact.keys, self._exact.nexts, self._exact.counts, self.exact_top_s, min_total=self.exact_min_count
        )
        ngrams = []
        for acc in self._ngrams:
            acc.flush()
            ngrams.append(counts_lib.CountTable.from_pairs(acc.keys, acc.nexts, acc.counts, self.ngram_top_s))
        return PriorTables(
            self.vocab_size,
            self.order,
            self.exact_top_s,
            self.ngram_top_s,
            exact,
            ngrams,
            witten_bell_unigram(self._unigram),
            self._num_tokens,
            self.exact_min_count,
        )


def witten_bell_unigram(unigram_counts_V):
    """Unigram probabilities interpolated with the uniform distribution (Witten–Bell weights)."""
    c = np.asarray(unigram_counts_V, np.float64)
    v = c.shape[0]
    total, distinct = c.sum(), float((c > 0).sum())
    if total == 0:
        return np.full(v, 1.0 / v, np.float32)
    return ((c + distinct / v) / (total + distinct)).astype(np.float32)
