"""What a `collect` corpus's answers cost, and `collect.max_cost`, the cap on it.

The cost counts every answer the corpus was billed for: the stored ones, and those recorded in its failures file
with their usage (declined, or not stored); `journal.read_done_and_billed` reads both. Under a cap each request
reserves the most it may cost (`Spend.worst`: its prompt's bytes, the endpoint's own tokens, `max_tokens`) until
its answer's usage is counted, so the requests in flight can never take the corpus past the cap. A request that
does not fit waits while others in flight may still leave room; one that does not fit even alone is passed over,
and the run stops at the cap only once nothing left fits (a shorter prompt may still fit).
"""

from __future__ import annotations

from proxykd_jax.teacher.prompts import CollectError
from proxykd_jax.teacher.responses import reasoning_tokens

__all__ = ["Spend"]

# Prompt tokens beyond the prompt's UTF-8 bytes that a request's worst cost allows for (a chat template's
# role and turn tokens) before the corpus holds an answer: a byte-level tokenizer makes at most one token per
# byte. The endpoint's own tokens (a template's hidden system prompt) are no more than the fewest prompt tokens
# an answer was billed, so from then on that many are allowed for where it is more (`Spend.worst`).
PROMPT_OVERHEAD_TOKENS = 64


class Spend:
    """A corpus's cost and the cap's bookkeeping for one run: what was billed before it (`billed`, from
    `journal.read_done_and_billed`), the worst cost the requests in flight reserve, the samples passed over."""

    def __init__(self, cfg, billed: tuple, out):
        self.cfg = cfg
        self.cap = float(cfg.get("max_cost", 0.0) or 0.0)
        if self.cap and billed[2]:
            raise CollectError(
                f"collect.max_cost is set but {billed[2]} answers in {out} or its failures file carry no usage "
                "counts (their endpoint sent none), so what the corpus cost is unknown; unset collect.max_cost or "
                "collect into another collect.out"
            )
        passed = billed[4].get(cfg.token_limit, 0)
        if self.cap and passed:
            raise CollectError(
                f"collect.max_cost is set but {passed} answers in {out} or its failures file were billed more "
                f"completion tokens than the collect.max_tokens they were sent with (as {cfg.token_limit}: hidden "
                f"reasoning it does not bound), so what the next answers cost has no bound; {self.unbounded_advice()}"
            )
        self.before = self.cost(*billed[:2])
        self.reserved, self.reservations = 0.0, 0  # the worst cost and the number of the requests in flight
        self.passed_over: list = []  # (prompt, sample_index, key, prompt bytes) that did not fit: `Collector._over_cap`
        self.fewest_prompt_tokens: int | None = billed[3]  # of the corpus's answers: bounds the endpoint's own
        self.unrecorded = [0, 0, 0]  # answers of this run billed and written nowhere, their prompt, completion tokens

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        """What `tokens_in` prompt and `tokens_out` completion tokens cost at the configured prices."""
        return (tokens_in * self.cfg.price_input_per_mtok + tokens_out * self.cfg.price_output_per_mtok) / 1e6

    def spent(self, stats: dict) -> float:
        """What the corpus's answers cost: those billed before this run and every answer of this run (`stats`)."""
        return self.before + self.cost(stats["tokens_in"], stats["tokens_out"])

    def worst(self, prompt_bytes: int) -> float:
        """The most a request for a prompt of `prompt_bytes` UTF-8 bytes may cost: those bytes, the endpoint's own
        tokens, `max_tokens`."""
        own = max(PROMPT_OVERHEAD_TOKENS, self.fewest_prompt_tokens or 0)
        return self.cost(prompt_bytes + own, self.cfg.max_tokens)

    def admit(self, prompt_bytes: int, stats: dict) -> float | None:
        """Reserves a request's worst cost where it may be sent now and returns it; None where it may not.
        Until the corpus holds an answer, one request at a time: what the endpoint adds to a prompt (a chat
        template's hidden system prompt) is unknown, and only one answer may cost more than its reservation."""
        worst = self.worst(prompt_bytes)
        first = self.cap and self.fewest_prompt_tokens is None and self.reservations
        if not self.cap or (not first and self.spent(stats) + self.reserved + worst <= self.cap):
            self.reserved, self.reservations = self.reserved + worst, self.reservations + 1
            return worst
        return None

    def hopeless(self, prompt_bytes: int, stats: dict) -> bool:
        """Whether a request `admit` refused does not fit even alone (or none is in flight to leave room): it is
        passed over, where otherwise it waits for the requests in flight."""
        return not self.reservations or self.spent(stats) + self.worst(prompt_bytes) > self.cap

    def release(self, worst: float):
        """Frees a request's reservation once its answer's usage is counted (or it got none)."""
        self.reservations -= 1
        self.reserved = self.reserved - worst if self.reservations else 0.0  # (no float drift when idle)

    def fitting(self, stats: dict) -> list:
        """The samples passed over that fit now (an answer since billed fewer prompt tokens, which lowers `worst`),
        taken off the passed-over list."""
        fits = [self.spent(stats) + self.worst(left[3]) <= self.cap for left in self.passed_over]
        fitting = [left[:3] for left, fit in zip(self.passed_over, fits) if fit]
        self.passed_over = [left for left, fit in zip(self.passed_over, fits) if not fit]
        return fitting

    def reached(self, stats: dict) -> str:
        """The reason a run stops at the cap with samples passed over: what the cheapest of them may cost."""
        spent = self.spent(stats)
        return (
            f"collect.max_cost={self.cap:g} is reached: this corpus's answers cost {spent:.6g} "
            f"({self.before:.6g} of it before this run) and the next request may cost up to "
            f"{min(self.worst(left[3]) for left in self.passed_over):.6g} more (the cheapest of the "
            f"{len(self.passed_over)} left); raise collect.max_cost to continue"
        )

    def unkept(self, usage: dict) -> str | None:
        """Counts an answer's prompt tokens (the endpoint's own tokens are no more); under a cap, the reason to
        stop where the cap cannot be kept: an answer without usage counts, or one billed past its limit."""
        cfg = self.cfg
        if usage and (self.fewest_prompt_tokens is None or usage["prompt_tokens"] < self.fewest_prompt_tokens):
            self.fewest_prompt_tokens = usage["prompt_tokens"]
        if not self.cap:
            return None
        if not usage:
            return (
                f"{cfg.base_url} sent an answer without usage counts, so collect.max_cost cannot be kept; "
                "unset collect.max_cost for this endpoint (the answers so far are stored)"
            )
        if usage["completion_tokens"] > cfg.max_tokens:
            reasoning = reasoning_tokens(usage)
            of_it = f" ({reasoning} of them reasoning)" if reasoning else ""
            return (
                f"{cfg.base_url} billed {usage['completion_tokens']} completion tokens{of_it} for one answer, more "
                f"than collect.max_tokens={cfg.max_tokens} sent as {cfg.token_limit}, so collect.max_cost "
                f"cannot be kept (the limit does not bound its hidden reasoning); {self.unbounded_advice()} (the "
                "answers so far are stored)"
            )
        return None

    def unbounded_advice(self) -> str:
        """What to do where the limit does not bound what an answer is billed."""
        if self.cfg.token_limit == "max_tokens" and self.cfg.api == "chat":
            return "set collect.token_limit='max_completion_tokens' if the endpoint takes it, or unset collect.max_cost"
        return "unset collect.max_cost for this endpoint"

    def written_nowhere(self, usage: dict):
        """Counts an answer of this run billed and written nowhere (neither corpus nor failures file took it)."""
        n, tokens_in, tokens_out = self.unrecorded
        self.unrecorded = [
            n + 1,
            tokens_in + usage.get("prompt_tokens", 0),
            tokens_out + usage.get("completion_tokens", 0),
        ]

    def lost_note(self, out, fail_path) -> str:
        """What this run was billed for answers that neither the corpus nor its failures file could take: a later
        run cannot count them (nor keep `collect.max_cost` with them); "" where there were none."""
        n, tokens_in, tokens_out = self.unrecorded
        if not n:
            return ""
        priced = self.cfg.price_input_per_mtok or self.cfg.price_output_per_mtok
        billed = f"cost {self.cost(tokens_in, tokens_out):.6g}" if priced else f"{tokens_in}/{tokens_out} tokens in/out"
        capped = " against collect.max_cost" if self.cap else " in the corpus's cost"
        return (
            f"; {n} answers billed this run ({billed}) are stored nowhere ({out} and {fail_path} could not "
            f"be written): a re-run cannot count them{capped}"
        )
