"""Sorted-array count tables keyed by 64-bit context hashes (numpy, host side).

A table maps a context key (uint64 hash of a prompt + prefix, or of the last j tokens) to the counts
of the tokens that followed it. It is built by reducing (key, next_token) pairs with a stable sort
and stored as flat sorted arrays, so a batch of queries is one `np.searchsorted` plus gathers.
"""

import dataclasses

import numpy as np

_GOLD = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x):
    """The splitmix64 finaliser, element-wise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def position_multipliers(n):
    """Pseudo-random odd uint64 multipliers R_0..R_{n-1} for position-weighted sums."""
    return splitmix64(np.arange(n, dtype=np.uint64) + np.uint64(12345)) | np.uint64(1)


@dataclasses.dataclass
class FlatTokens:
    """A batch of ragged token sequences laid out flat.

    tokens_N: all tokens concatenated; pos_N: position within its sequence; start_N: flat index where
    its sequence starts; prompt_N: the sequence's prompt key (int64).
    """

    tokens_N: np.ndarray
    pos_N: np.ndarray
    start_N: np.ndarray
    prompt_N: np.ndarray

    @classmethod
    def from_sequences(cls, prompt_keys, sequences):
        """Lays out `sequences` (iterable of int arrays) with one int64 prompt key each."""
        seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
        keys = np.asarray(prompt_keys, dtype=np.int64).reshape(-1)
        if keys.shape[0] != len(seqs):
            raise ValueError(
                f"prior: got {keys.shape[0]} prompt keys for {len(seqs)} token sequences; "
                "pass exactly one prompt key per response."
            )
        lengths = np.array([s.shape[0] for s in seqs], dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        tokens = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
        if tokens.size and tokens.min() < 0:
            raise ValueError("prior: token ids must be non-negative; check the tokenized records.")
        start_n = np.repeat(starts, lengths)
        pos = np.arange(tokens.shape[0], dtype=np.int64) - start_n
        return cls(tokens, pos, start_n, np.repeat(keys, lengths))


def prefix_keys(flat: FlatTokens):
    """Key of (prompt, y_<t) for every flat position t: a hash of the prompt and the whole prefix."""
    n = flat.tokens_N.shape[0]
    if n == 0:
        return np.zeros(0, np.uint64)
    mult = position_multipliers(int(flat.pos_N.max()) + 1)
    with np.errstate(over="ignore"):
        term = (flat.tokens_N.astype(np.uint64) + np.uint64(1)) * mult[flat.pos_N]
        incl = np.cumsum(term, dtype=np.uint64)
        excl = incl - term
        prefix = excl - excl[flat.start_N]
        salt = splitmix64(splitmix64(flat.prompt_N.astype(np.uint64)) ^ flat.pos_N.astype(np.uint64))
        return splitmix64(prefix + salt)


def ngram_keys(flat: FlatTokens, order):
    """Keys of the last j tokens before every position, for j = 1..order-1 (j-th row = context j).

    Positions before the start of a response read a begin-of-sequence marker.
    """
    n = flat.tokens_N.shape[0]
    mult = position_multipliers(order)
    keys = np.zeros((max(order - 1, 0), n), np.uint64)
    acc = np.zeros(n, np.uint64)
    idx = np.arange(n, dtype=np.int64)
    with np.errstate(over="ignore"):
        for j in range(1, order):
            inside = flat.pos_N >= j
            prev = np.where(inside, flat.tokens_N[np.maximum(idx - j, 0)] + 2, 1).astype(np.uint64)
            acc = acc + prev * mult[j]
            keys[j - 1] = splitmix64(acc + np.uint64(j) * _GOLD)
    return keys


def reduce_pairs(keys, nexts, counts=None):
    """Sorts (key, next) pairs and sums the counts of equal pairs.

    Returns (keys uint64, nexts int32, counts int64), sorted by key then next.
    """
    keys = np.asarray(keys, np.uint64)
    nexts = np.asarray(nexts, np.int32)
    counts = np.ones(keys.shape[0], np.int64) if counts is None else np.asarray(counts, np.int64)
    if keys.shape[0] == 0:
        return keys, nexts, counts
    order = np.lexsort((nexts, keys))
    keys, nexts, counts = keys[order], nexts[order], counts[order]
    new = np.ones(keys.shape[0], bool)
    new[1:] = (keys[1:] != keys[:-1]) | (nexts[1:] != nexts[:-1])
    starts = np.flatnonzero(new)
    return keys[starts], nexts[starts], np.add.reduceat(counts, starts)


class PairAccumulator:
    """Streams (key, next) pairs into a reduced sorted table with bounded buffering.

    Raw pairs are buffered up to `buffer_pairs`, then reduced into a sorted run; a run is merged with the one
    before it once it is at least half that one's size, so runs shrink geometrically and every pair is
    re-sorted O(log n) times (merging each buffer into the whole table re-sorted the table at every flush:
    quadratic in the corpus). `flush` merges the runs into `keys`, `nexts`, `counts`. Memory stays within
    about twice the table's size (distinct pairs, some in two runs) plus one buffer.
    """

    def __init__(self, buffer_pairs=2_000_000):
        self.buffer_pairs = int(buffer_pairs)
        self._raw_keys, self._raw_next, self._raw_n = [], [], 0
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.keys = np.zeros(0, np.uint64)
        self.nexts = np.zeros(0, np.int32)
        self.counts = np.zeros(0, np.int64)

    def add(self, keys, nexts):
        self._raw_keys.append(np.asarray(keys, np.uint64))
        self._raw_next.append(np.asarray(nexts, np.int32))
        self._raw_n += len(keys)
        if self._raw_n >= self.buffer_pairs:
            self._spill()

    def _spill(self):
        if self._raw_n:
            self._runs.append(reduce_pairs(np.concatenate(self._raw_keys), np.concatenate(self._raw_next)))
            self._raw_keys, self._raw_next, self._raw_n = [], [], 0
        while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            self._merge_last_two()

    def _merge_last_two(self):
        (k2, n2, c2), (k1, n1, c1) = self._runs.pop(), self._runs.pop()
        self._runs.append(reduce_pairs(np.concatenate([k1, k2]), np.concatenate([n1, n2]), np.concatenate([c1, c2])))

    def flush(self):
        """Reduces every pair added so far into `keys`, `nexts`, `counts`."""
        self._spill()
        while len(self._runs) > 1:
            self._merge_last_two()
        if self._runs:
            self.keys, self.nexts, self.counts = self._runs[0]

    @property
    def nbytes(self):
        return sum(a.nbytes for run in self._runs for a in run)


@dataclasses.dataclass
class CountTable:
    """Per-context continuation counts, truncated to the `top_s` most frequent per context.

    ctx_keys_C: sorted unique context keys; ctx_total_C: all continuations counted (before
    truncation); ctx_distinct_C: number of distinct continuations; ctx_start_C / ctx_len_C: slice of
    the kept continuations in cont_ids / cont_counts (sorted by count, descending).
    """

    ctx_keys_C: np.ndarray
    ctx_total_C: np.ndarray
    ctx_distinct_C: np.ndarray
    ctx_start_C: np.ndarray
    ctx_len_C: np.ndarray
    cont_ids: np.ndarray
    cont_counts: np.ndarray

    @classmethod
    def from_pairs(cls, keys, nexts, counts, top_s, min_total=1):
        """Builds the table from reduced sorted pairs, dropping contexts seen fewer than `min_total`."""
        if keys.shape[0] == 0:
            z = np.zeros(0, np.int64)
            return cls(np.zeros(0, np.uint64), z, z, z, z, np.zeros(0, np.int32), np.zeros(0, np.int32))
        new = np.ones(keys.shape[0], bool)
        new[1:] = keys[1:] != keys[:-1]
        starts = np.flatnonzero(new)
        total = np.add.reduceat(counts, starts)
        distinct = np.diff(np.append(starts, keys.shape[0]))
        ctx = np.cumsum(new) - 1
        order = np.lexsort((-counts, ctx))
        rank = np.arange(keys.shape[0]) - starts[ctx[order]]
        keep_ctx = total >= min_total
        keep = (rank < top_s) & keep_ctx[ctx[order]]
        kept = order[keep]
        lens = np.minimum(distinct, top_s)[keep_ctx]
        idx_t = np.int32 if kept.shape[0] < 2**31 else np.int64
        ctx_start = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(idx_t)
        return cls(
            keys[starts][keep_ctx],
            total[keep_ctx].astype(np.int32),
            distinct[keep_ctx].astype(np.int32),
            ctx_start,
            lens.astype(np.int32),
            nexts[kept].astype(np.int32),
            counts[kept].astype(np.int32),
        )

    def lookup(self, query_keys_N, width):
        """Gathers up to `width` continuations per query key.

        Returns (found_N bool, total_N, distinct_N, ids_NxW int32, counts_NxW int32); missing or padding
        entries have id 0 and count 0.
        """
        q = np.asarray(query_keys_N, np.uint64)
        n = q.shape[0]
        if self.ctx_keys_C.shape[0] == 0:
            z = np.zeros(n, np.int64)
            return (np.zeros(n, bool), z, z, np.zeros((n, width), np.int32), np.zeros((n, width), np.int32))
        pos = np.minimum(np.searchsorted(self.ctx_keys_C, q), self.ctx_keys_C.shape[0] - 1)
        found = self.ctx_keys_C[pos] == q
        total = np.where(found, self.ctx_total_C[pos], 0)
        distinct = np.where(found, self.ctx_distinct_C[pos], 0)
        lens = np.where(found, np.minimum(self.ctx_len_C[pos], width), 0)
        cols = np.arange(width)
        valid = cols[None, :] < lens[:, None]
        flat = np.where(valid, self.ctx_start_C[pos].astype(np.int64)[:, None] + cols[None, :], 0)
        if self.cont_ids.shape[0] == 0:
            return found, total, distinct, np.zeros((n, width), np.int32), np.zeros((n, width), np.int32)
        ids = np.where(valid, self.cont_ids[flat], 0).astype(np.int32)
        cnt = np.where(valid, self.cont_counts[flat], 0).astype(np.int32)
        return found, total, distinct, ids, cnt

    def lookup_without_own(self, query_keys_N, own_N, width):
        """`lookup` without one occurrence of (query key, own id): the table as built without it, for a
        position whose own pair the table counted (a leave-one-out query).

        count(own) - 1, total - 1, and distinct - 1 where the own count was 1; a context whose total drops to 0
        is returned as not found (it passes all its mass down). Exact where the context's continuations all
        fit in the table's top s. Beyond that two cases are approximate, with totals that stay consistent (an
        n-gram built on them still sums to one): `own` kept, but a pruned continuation would take its rank
        after the decrement (that one stays pruned: its id is not stored); `own` pruned (its count is not
        stored, so distinct drops by the pruned continuations' distinct / total: exact, 1, when all of them
        were seen once, otherwise an estimate; the kept entries and total - 1 are exact). Where the context is
        unknown, or `own` is neither kept nor possibly pruned, nothing is taken out (the pair was never
        counted). Returns (found_N bool, total_N float64, distinct_N float64, ids_NxW int32, counts_NxW
        int32); an entry whose count drops to 0 becomes padding (id 0, count 0).
        """
        found, total, distinct, ids, cnt = self.lookup(query_keys_N, width)
        rows = np.arange(ids.shape[0])
        match = ids == np.asarray(own_N)[:, None]
        col = np.argmax(match, axis=1)  # kept ids are unique and come before the padding (id 0, count 0)
        own_count = np.where(match[rows, col], cnt[rows, col], 0)
        kept = own_count > 0
        pruned_total = total - cnt.sum(axis=1)
        pruned_distinct = distinct - np.count_nonzero(cnt, axis=1)
        in_pruned = found & ~kept & (pruned_total > 0)
        singleton = np.where(in_pruned, pruned_distinct / np.maximum(pruned_total, 1), 0.0)
        total = (total - (kept | in_pruned)).astype(np.float64)
        distinct = distinct - np.where(kept, own_count == 1, singleton)
        cnt[rows[kept], col[kept]] -= 1
        gone = kept & (own_count == 1)
        ids[rows[gone], col[gone]] = 0
        return found & (total > 0), total, distinct, ids, cnt

    @property
    def nbytes(self):
        return sum(a.nbytes for a in dataclasses.astuple(self))
