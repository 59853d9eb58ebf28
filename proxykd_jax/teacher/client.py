"""`collect`: prompts JSONL + an OpenAI-compatible endpoint -> teacher corpus JSONL.

Each (prompt, sample_index) is one request with a content key (sha256 of model, prompt, sampling
parameters and sample index). Finished samples are appended to the corpus with flush + fsync, so a
crash loses at most the requests in flight and a re-run skips every key already in the file.
Retryable failures (429, 5xx, timeouts, dropped connections, malformed 200 bodies) back off
exponentially with full jitter, honouring Retry-After; the rest are recorded in
`<out>.failures.jsonl` and counted in the summary. A well-formed answer without usable text (empty,
or stopped by a content filter) is final: recorded there as `"final": true` and not asked again by a
re-run, since asking again would pay again for the same answer. The row of an answer billed but not stored
(final, or one the corpus could not take) keeps its `usage`, which later runs count in the corpus's cost.

A circuit breaker keeps a dead or broken endpoint from holding the run: until the endpoint has
answered once, and again whenever an attempt gets no answer at all, one request at a time probes
it, the probes spaced by doubling waits (`backoff_initial_s` up to `backoff_max_s`, no jitter: one
prober) and each announced on stdout; `breaker_failures` probes in a row without an answer (the
default spans about two minutes: a server restart), or `breaker_no_success_s` seconds of failures
without a single finished sample (refused connections excepted: the probes count those), stop the
run; an endpoint that never answered, `collector.UNREACHED_PROBES` probes (a wrong URL or port). A probe without
an answer does not use up its sample's `max_attempts`. A run that stops, or ends with failed samples, raises
`CollectError` after printing its summary; a re-run continues where it stopped.

A run that asks for log-probs (`top_logprobs` > 0) stops once its first `collector.LOGPROBS_CHECK` stored answers
all came without them (an endpoint that ignores the parameter would otherwise be paid for a whole
corpus without them); those answers stay in the corpus as text-only records. Answers without log-probs
among answers with them are stored and counted in the summary (`without_logprobs`).
The API key is read from config or the environment and never written anywhere (a server's error
message that repeats it is shown with the key masked).

Reasoning models (OpenAI o-series and gpt-5) take the limit as `max_completion_tokens` (`collect.token_limit`),
which bounds their hidden reasoning too, and some refuse temperature and top_p at any value
(`collect.send_sampling=False` leaves both out). A 400 that calls a field the run sends unsupported would
come for every request alike: the first one stops the run with the setting to change. Under a spend cap, an
answer billed more completion tokens than its limit (reasoning the limit does not bound) stops the run too.

This module checks a run's settings (`check`, without the official client imported) and runs it (`collect`); the
run itself is `collector.Collector`, with `rate.py`, `failures.py`, `spend.py` (the cap's bookkeeping) and
`summary.py` (its stats and their wording).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import pathlib
import urllib.parse

from proxykd_jax.teacher.config import TOKEN_LIMITS
from proxykd_jax.teacher.journal import read_declined, read_done
from proxykd_jax.teacher.prompts import CollectError, Prompt, read_prompts, request_key, sampling_params
from proxykd_jax.teacher.rate import RateLimiter

__all__ = ["CollectError", "RateLimiter", "carry_over", "check", "collect", "resolve_api_key"]


def resolve_api_key(cfg) -> str:
    """The key from config or the named environment variable; loopback endpoints may go without."""
    key = cfg.api_key or os.environ.get(cfg.api_key_env or "", "")
    if key:
        return key
    host = urllib.parse.urlparse(cfg.base_url).hostname or ""
    if host in ("localhost", "::1") or host.startswith("127."):
        return "no-key"
    raise CollectError(
        f"no API key for {cfg.base_url}: set collect.api_key or the environment variable {cfg.api_key_env!r}"
    )


def _check_config(cfg):
    if cfg.api not in ("chat", "completions"):
        raise CollectError(f"collect.api must be 'chat' or 'completions', not {cfg.api!r}")
    if cfg.token_limit not in TOKEN_LIMITS:
        raise CollectError(
            f"collect.token_limit must be {' or '.join(map(repr, TOKEN_LIMITS))}, not {cfg.token_limit!r}"
        )
    if cfg.token_limit == "max_completion_tokens" and cfg.api != "chat":
        raise CollectError(
            "collect.token_limit='max_completion_tokens' needs collect.api='chat' (the completions API takes "
            "max_tokens only); set one of them"
        )
    for field in ("temperature", "top_p"):
        if not cfg.send_sampling and float(cfg[field]) != 1.0:
            raise CollectError(
                f"collect.{field}={cfg[field]} is not sent with collect.send_sampling=False (the endpoint samples at "
                f"its own settings); set collect.{field}=1.0, or collect.send_sampling=True to send it"
            )
    if not 0 <= cfg.top_logprobs <= 20:
        raise CollectError(f"collect.top_logprobs must be within 0-20, not {cfg.top_logprobs}")
    if not cfg.out:
        raise CollectError("collect.out is empty; set it to the corpus JSONL path to write")
    if not cfg.model:
        raise CollectError("collect.model is empty; set it to the endpoint's model name")
    for field, low in (("samples_per_prompt", 1), ("max_attempts", 1), ("breaker_failures", 1), ("concurrency", 1)):
        if cfg[field] < low:
            raise CollectError(f"collect.{field} is {cfg[field]}; it must be at least {low}")
    for field in ("breaker_no_success_s", "request_timeout_s"):
        if not cfg[field] > 0:
            raise CollectError(f"collect.{field} is {cfg[field]}; it must be a positive number of seconds")
    for field in ("price_input_per_mtok", "price_output_per_mtok", "max_cost"):
        if not 0 <= float(cfg.get(field, 0.0)) < math.inf:
            raise CollectError(f"collect.{field} is {cfg[field]}; it must be a number >= 0")
    if cfg.get("max_cost", 0.0) and not (cfg.price_input_per_mtok or cfg.price_output_per_mtok):
        raise CollectError(
            f"collect.max_cost is {cfg.max_cost} but no price is set; set collect.price_input_per_mtok and "
            "collect.price_output_per_mtok (the endpoint's prices per million tokens) for the cap to count against"
        )


def check(cfg) -> tuple[list[Prompt], str]:
    """(prompts, API key) of the `collect` config group, or CollectError with one sentence for a bad
    field, a bad prompts file or a missing key; reads only, so a caller checks before writing anything."""
    _check_config(cfg)
    prompts = read_prompts(cfg.prompts, cfg.api)
    return prompts, resolve_api_key(cfg)


def _wanted(cfg, prompts: list[Prompt]) -> set[str]:
    params = sampling_params(cfg)
    return {request_key(cfg.model, p, params, s) for p in prompts for s in range(cfg.samples_per_prompt)}


def carry_over(cfg, prompts: list[Prompt], source: pathlib.Path, dest: pathlib.Path) -> int:
    """Copies into the corpus `dest` the samples of an earlier corpus `source` that `cfg` still asks for,
    so a redo never pays again for a sample already paid for; returns how many it copied.

    A sample's content key covers everything its answer depends on (model, prompt, sampling
    parameters, sample index), so a stored line with a key the new settings want is exactly the answer
    the redo would request: raising `samples_per_prompt`, adding prompts or changing `max_tokens`
    requests only the samples whose keys are new. The final answers without usable text recorded
    in `source`'s failures file come along too (`"final": true` rows). Resumable: lines already in
    `dest` are not copied twice, and a line torn by a crash is cut off by the next `read_done`.
    """
    source, dest = pathlib.Path(source), pathlib.Path(dest)
    wanted = _wanted(cfg, prompts)
    fails = lambda path: path.with_name(path.name + ".failures.jsonl")  # noqa: E731
    have = read_done(dest)
    copied = _copy_lines(source, dest, lambda row: row.get("key") in wanted and row["key"] not in have)
    declined = read_declined(fails(dest)) | have
    _copy_lines(
        fails(source),
        fails(dest),
        lambda row: row.get("final") is True and row.get("key") in wanted and row["key"] not in declined,
    )
    if copied:
        print(f"[collect] {dest}: kept {copied} samples of {source} that these settings still ask for (not paid again)")
    return copied


def _copy_lines(source: pathlib.Path, dest: pathlib.Path, keep) -> int:
    """Appends (and fsyncs) the whole JSON lines of `source` for which `keep(row)` holds, each key once."""
    if not source.exists():
        return 0
    seen, n = set(), 0
    try:
        with open(source, "rb") as src, open(dest, "ab") as out:
            for raw in src:
                if not raw.endswith(b"\n"):  # a torn last line left by a crash
                    continue
                try:
                    row = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("key"), str) and row["key"] not in seen and keep(row):
                    seen.add(row["key"])
                    out.write(raw)
                    n += 1
            out.flush()
            os.fsync(out.fileno())
    except OSError as err:
        raise CollectError(
            f"cannot copy the samples of {source} into {dest} ({err.strerror or err}); free space or fix the "
            "folder's permissions, then re-run the same command"
        ) from None
    return n


def collect(cfg, *, prompts: list[Prompt] | None = None, api_key: str | None = None) -> dict:
    """Runs the `collect` stage on the `collect` config group; returns (and prints) the summary.

    Raises CollectError with one clear sentence for a bad prompts file, a missing key, an
    unreachable endpoint or a rejected key, for a run the breaker or a full disk stopped, and for a
    run that ended with failed samples; every record finished before that stays in the corpus.
    `prompts` and `api_key` are `check(cfg)`'s, when the caller has checked already.
    """
    from proxykd_jax.teacher.collector import Collector, format_summary  # `check` (and status) go without openai

    if prompts is None or api_key is None:
        prompts, api_key = check(cfg)
    collector = Collector(cfg, prompts, api_key)
    try:
        stats = asyncio.run(collector.run())
    except KeyboardInterrupt:
        stats = collector.stats
        collector.stop_reason = collector.stop_reason or "interrupted"
    print(format_summary(stats))
    message = collector.outcome()
    if message:
        raise CollectError(message, stats)
    return stats
