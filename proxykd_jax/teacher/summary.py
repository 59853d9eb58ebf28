"""The summary of one `collect` run: its stats dict, the line printed after the run, and its outcome sentence.

The stats dict is what `client.collect` returns and what `CollectError.stats` holds: the samples asked for, done,
failed and declined (by reason), the tokens and requests, and, where prices are set, the cost. The `Collector`
counts into it while it runs; here it is made at the start (`new_stats`), finished at the end (`finish_stats`) and
put into words (`format_summary`, `outcome`). Apart from `collector.py` because it is bookkeeping and wording, not
the requests: nothing here sends, waits or reads a clock (the collector measures the run's time itself), and
`outcome` only reads the finished `Collector`.
"""

from __future__ import annotations

__all__ = ["finish_stats", "format_summary", "new_stats", "outcome", "reason_counts"]


def new_stats(out, work: list, done: set, declined: set, remaining: int) -> dict:
    """The stats of a run before its first request: `work` holds every sample's (prompt, sample index, request key),
    `done` and `declined` the keys the corpus and its failures file hold, `remaining` how many will be sent."""
    return {
        "out": str(out),
        "requested": len(work),
        "already_done": sum(w[2] in done for w in work),
        "already_declined": sum(w[2] in declined and w[2] not in done for w in work),
        "done": 0,
        "declined": {},
        "failed": {},
        "remaining": remaining,
        "lost": 0,
        "tokens_in": 0,
        "tokens_out": 0,
        "reasoning_tokens": 0,  # of tokens_out: hidden reasoning billed as completion tokens
        "requests": 0,
        "retries": 0,
        "without_logprobs": 0,  # stored answers without the log-probs asked for
    }


def finish_stats(stats: dict, cfg, spend, n_todo: int, elapsed: float):
    """Fills in the end of a run's stats: the samples of its `n_todo` left, its speed over `elapsed` seconds, and where
    `cfg` (the `collect` group) sets prices, its cost and the corpus's (`spend`, the run's `Spend`)."""
    stats["remaining"] = n_todo - stats["done"] - sum(stats["failed"].values()) - sum(stats["declined"].values())
    stats["elapsed_s"] = round(elapsed, 3)
    stats["samples_per_s"] = round(stats["done"] / max(elapsed, 1e-9), 3)
    if cfg.price_input_per_mtok or cfg.price_output_per_mtok:
        stats["cost"] = round(spend.cost(stats["tokens_in"], stats["tokens_out"]), 6)
        stats["corpus_cost"] = round(spend.spent(stats), 6)  # of every run (their stored usage) and this run


def outcome(run) -> str | None:
    """The one-sentence error of a run that stopped or left failures; None when all is done. `run`: the
    `collector.Collector` after its run: its stats, why it stopped, its files, whether the endpoint ever answered."""
    s = run.stats
    n_failed = sum(s["failed"].values())
    counts = (
        f"{s['done']} done this run and {s['already_done']} before, {n_failed} failed, "
        f"{s['remaining']} not yet done, of {s['requested']}"
    )
    if run.stop_reason is not None:
        lost = (
            f"; {s['lost']} answers that arrived after that could not be stored and will be requested again"
            if s["lost"]
            else ""
        )
        nowhere = run.spend.lost_note(run.out, run.fail_path)
        return (
            f"collect stopped: {run.stop_reason}; {counts}{lost}{nowhere}; finished samples are safe in "
            f"{run.out} and re-running the same command continues with the rest"
        )
    if n_failed and not run.ever_answered:
        return (
            f"collect stopped: cannot reach {run.cfg.base_url}: no attempt got an answer (last: "
            f"{run.last_failure}); check collect.base_url and that the server is running; {counts}"
        )
    if n_failed:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["failed"].items()))
        return (
            f"collect finished with failures ({reasons}; details in {run.fail_path}); {counts}; "
            "re-running the same command retries the failed samples"
        )
    if s["requested"] and not s["done"] + s["already_done"]:
        return (
            "collect stored nothing: every answer was empty or refused "
            f"({reason_counts(s['declined'])}; details in {run.fail_path}); check the prompts and collect.model"
        )
    return None


def format_summary(stats: dict) -> str:
    """The line `client.collect` prints after a run (stopped or not): its counts, tokens, speed and cost."""
    declined = sum(stats["declined"].values()) + stats["already_declined"]
    reasoning = f" ({stats['reasoning_tokens']} of them reasoning)" if stats.get("reasoning_tokens") else ""
    line = (
        f"[collect] {stats['out']}: {stats['done']} done this run, {stats['already_done']} "
        f"already done, {stats['remaining']} not yet done, of {stats['requested']}; failed: "
        f"{reason_counts(stats['failed'])}; answered without usable text: {declined} "
        f"({reason_counts(stats['declined'])} this run); "
        f"tokens in/out {stats['tokens_in']}/{stats['tokens_out']}{reasoning}; {stats['requests']} requests "
        f"({stats['retries']} retries); {stats['samples_per_s']} samples/s"
    )
    line += f"; {stats['lost']} answers lost (not stored)" if stats.get("lost") else ""
    if stats.get("without_logprobs"):
        line += (
            f"; {stats['without_logprobs']} answers came without the log-probs asked for "
            "(stored as text only: no teacher log-probs for them)"
        )
    if "cost" not in stats:
        return line
    before = stats.get("corpus_cost", stats["cost"]) - stats["cost"]
    return line + f"; cost {stats['cost']}" + (f" ({stats['corpus_cost']} for the whole corpus)" if before > 0 else "")


def reason_counts(by_reason: dict) -> str:
    """`reason: count, ...` of a stats dict's failed or declined samples ("none" where there are none)."""
    return ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items())) or "none"
