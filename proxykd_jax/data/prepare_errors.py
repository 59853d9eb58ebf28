"""The sentences the `prepare` stage says about bad input: the `DataError`s it raises or keeps (a duplicate
sample naming where it was first read, the chat template's refusals counted over the corpus, the summary of
`check_corpus`, a prompt too long to keep, an empty corpus) and the lines printed after it on the rows it
skipped or truncated. The pipeline itself (reading, tokenising, splitting, writing) is in `data/prepare.py`.
"""

import collections
import re

from proxykd_jax.data import align, corpus, corpus_errors
from proxykd_jax.models.tokenizer import TEMPLATE_ERRORS

MAX_ERRORS_KEPT = 20  # bad rows' messages kept (in manifest.json counts.errors) under data.on_error=skip
BAD_LINES_SHOWN = 5  # bad lines named in one refusal of `check_corpus`
SKIPS_SHOWN = 3  # skipped (or truncated) samples named on the line printed after prepare


def _where(err: corpus.DataError) -> str:
    """The `file:line` (`file:row N`, `file:item N`) a row's message starts with."""
    m = re.match(r"(.*?:(?:row |item )?\d+): ", str(err))
    return m.group(1) if m else "?"


def _file_of(where: str) -> str:
    """The file of a `file:line` (`file:row N`, `file:item N`) place."""
    m = re.fullmatch(r"(.*?):(?:row |item )?\d+", where)
    return m.group(1) if m else where


def first_places(corpus_paths, sample_ids, logprobs: bool) -> dict[int, str]:
    """{sample id: the place its first sample is read from} for `sample_ids`: a second pass over the corpus
    (only when a duplicate is found: the first pass keeps 8 bytes per id, not places), reading the log-probs
    where that pass did (a row it skipped for them is skipped here too)."""
    wanted, found = set(sample_ids), {}
    for row in corpus.iter_corpus(corpus_paths, "skip", collections.Counter(), logprobs=logprobs):
        for s in row:
            if s.sample_id in wanted and s.sample_id not in found:
                found[s.sample_id] = s.where
        if len(found) == len(wanted):
            break
    return found


def duplicate(dup: corpus.Sample, first: str | None = None) -> corpus.DataError:
    """A sample given twice, naming both places (`first`: where it was read before) and what to do. Two
    files (one prompts file collected as chat and as completions) need ids unique across them: the id fixes
    the prompt key, the split and the sample id (docs/DATA_FORMATS.md)."""
    said = f"{dup.where}: duplicate sample: prompt id {dup.record_id!r} response {dup.response_index}"
    if first is None:
        said += " appears twice"
    elif first == dup.where:
        return corpus.DataError(
            f"{said} is read twice from {first}: the same file is given twice; list it once in data.corpus.",
            "duplicate_id",
        )
    elif _file_of(first) != _file_of(dup.where):
        return corpus.DataError(
            f"{said} was given before, at {first} in another corpus file (prompt ids must be unique across the "
            "data.corpus files: rename one file's ids, e.g. with a prefix).",
            "duplicate_id",
        )
    else:
        said += f" was given before, at {first}"
    return corpus.DataError(
        f"{said} (give each line of a prompt its own `sample_index`, or list all responses in one row).",
        "duplicate_id",
    )


def name_first_places(corpus_paths, errors: list, dups: dict[int, corpus.Sample], logprobs: bool) -> None:
    """Rewrites the duplicate messages in `errors` (`dups`: their index -> the duplicate sample) to name the
    place each sample was first read from."""
    if dups:
        first = first_places(corpus_paths, {s.sample_id for s in dups.values()}, logprobs)
        for i, s in dups.items():
            errors[i] = duplicate(s, first.get(s.sample_id))


def template_refusals(corpus_paths, tokenizer, first: corpus.DataError) -> corpus.DataError:
    """The chat template's refusal of one row (`first`) as one sentence on all the rows it refuses: how many,
    the first few and the fix; `first` itself when it is the only one. Renders the prompts once more
    without tokenising, only on the way to this refusal."""
    rows = refused = 0
    shown, reason, all_system = [], "", True
    for row in corpus.iter_corpus(corpus_paths, "skip", collections.Counter(), logprobs=False):
        rows += 1
        for s in row:
            if s.messages is None:
                continue
            try:
                align.format_prompt(tokenizer, s)
            except TEMPLATE_ERRORS as e:
                refused += 1
                if len(shown) < BAD_LINES_SHOWN:
                    shown.append(s.where)
                reason = reason or " ".join(str(e).split()) or type(e).__name__
                head = s.messages[0] if s.messages else None
                all_system = all_system and isinstance(head, dict) and head.get("role") == "system"
                break
    if refused < 2:
        return first
    fix = (
        "merge each system message's text into the first user message yourself (this template takes no system "
        "message), or set data.on_error=skip to leave these rows out"
        if all_system
        else "fix or remove these rows, or set data.on_error=skip to leave them out"
    )
    return corpus.DataError(
        f"{refused} of {rows} rows of the corpus have 'messages' the tokenizer's chat template refuses ({reason}): "
        f"{', '.join(shown)}{', ...' if refused > len(shown) else ''}; {fix}.",
        "bad_messages",
    )


def bad_lines(total: int, errors: list[corpus.DataError]) -> corpus.DataError:
    """`check_corpus`'s one refusal of the `total` bad lines it found (`errors`: the first few): a bad line's
    own sentence, or for several how many and the first few."""
    if total == 1:
        return errors[0]
    listed = " ".join(f"({i}) {corpus_errors.without_advice(str(e))}" for i, e in enumerate(errors, 1))
    shown = f" (the first {len(errors)} listed)" if total > len(errors) else ""
    return corpus.DataError(
        f"{total} bad lines in the corpus{shown}; fix or remove them, or set data.on_error=skip: {listed}",
        errors[0].reason,
    )


def prompt_too_long(s: corpus.Sample, seq_len: int) -> corpus.DataError:
    """A sample whose prompt alone fills data.seq_len, so data.truncate (which cuts only responses) cannot keep it."""
    return corpus.DataError(
        f"{s.where}: the prompt of sample {s.record_id!r}/{s.response_index} alone has more than "
        f"data.seq_len = {seq_len} tokens, and data.truncate cuts only responses; raise "
        "data.seq_len, shorten or drop the prompt, or set data.on_error=skip.",
        "too_long",
    )


def empty_corpus(sources: list[str], rows: int, skipped: collections.Counter, errors: list) -> corpus.DataError:
    """A corpus that gave no samples: how many rows were read and skipped, and the first skip's reason."""
    return corpus.DataError(
        f"{', '.join(sources)}: the corpus gave no samples ({rows} rows read, "
        f"{sum(skipped.values())} samples skipped{': ' + str(errors[0]) if errors else ''}); "
        "give a corpus with at least one prompt and response.",
        "empty_corpus",
    )


def skipped_line(skipped: collections.Counter, errors: list[corpus.DataError]) -> str | None:
    """One line on the rows data.on_error=skip dropped (None when none): how many, why, the first few."""
    total = sum(skipped.values())
    if not total:
        return None
    reasons = ", ".join(f"{reason} {n}" for reason, n in skipped.most_common())
    shown = errors[:SKIPS_SHOWN]
    first = ", ".join(f"{_where(e)} ({e.reason})" for e in shown) + (", ..." if total > len(shown) else "")
    return (
        f"prepare: skipped {total} bad rows (data.on_error=skip; {reasons}): {first}; the first "
        f"{MAX_ERRORS_KEPT} messages are in manifest.json counts.errors"
    )


def truncated_line(n: int, first: list[str], seq_len: int) -> str | None:
    """One line on the responses data.truncate cut (None when none)."""
    if not n:
        return None
    where = ", ".join(first) + (", ..." if n > len(first) else "")
    return f"prepare: data.truncate cut {n} response{'s' if n > 1 else ''} to fit data.seq_len = {seq_len}: {where}"
