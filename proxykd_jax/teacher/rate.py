"""Rate limits of `collect`: a token bucket per limit (`collect.requests_per_minute`, `collect.tokens_per_minute`)
that keeps any 60 s window under its limit, and `acquire_together`, which takes a request's grants of both at one
instant."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

__all__ = ["RateLimiter", "acquire_together"]


class RateLimiter:
    """Token bucket that never lets more than `per_minute` units through in any 60 s window.

    Capacity (burst) is one second's worth, at least 1; the refill rate is lowered by the capacity
    so that burst + 60 s of refill equals the limit. A request larger than the capacity waits for a
    full bucket and drives it negative (debt), which keeps the long-run rate exact. The bucket alone
    bounds a window by the limit plus the part of its last request above the capacity, so the grants
    of the last 60 s are kept too (at their refunded size) and a request also waits until they leave
    room for it; one larger than the whole limit waits for an empty window.
    """

    def __init__(self, per_minute: float):
        self.per_minute = float(per_minute)
        self.capacity = max(1.0, per_minute / 60.0)
        self.rate = max(per_minute - self.capacity, 1e-9) / 60.0
        self.level = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()
        self.grants: collections.deque = collections.deque()  # [time, amount, in window] of the last 60 s
        self.granted = 0.0  # their amounts' sum

    def _refill(self):
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def _expire(self):
        while self.grants and self.grants[0][0] <= self.stamp - 60.0:
            grant = self.grants.popleft()
            self.granted -= grant[1]
            grant[2] = False
        if not self.grants:
            self.granted = 0.0  # no rounding left over from the sums

    def _delay(self, amount: float) -> float:
        """Seconds until `amount` units may be granted (0: now)."""
        self._refill()
        self._expire()
        if self.level < min(amount, self.capacity):
            return (min(amount, self.capacity) - self.level) / self.rate
        if self.granted > self.per_minute - min(amount, self.per_minute) + 1e-9:  # no room in the window
            return self.grants[0][0] + 60.0 - self.stamp
        return 0.0

    def _take(self, amount: float) -> list:
        self.level -= amount
        grant = [self.stamp, float(amount), True]
        self.grants.append(grant)
        self.granted += amount
        return grant

    async def acquire(self, amount: float = 1.0) -> list:
        """Waits for `amount` units; returns the grant that `refund` adjusts."""
        return (await acquire_together((self, amount)))[0]

    def refund(self, amount: float, grant: list | None = None):
        """Gives back `amount` units of `grant` (negative: takes more, a request that used more than it reserved)."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)
        if grant is not None:
            grant[1] -= amount
            if grant[2]:
                self.granted -= amount


async def acquire_together(*wants: tuple[RateLimiter, float]) -> list[list]:
    """Grants each `(limiter, amount)` at one instant, once every limiter has room; returns their grants.

    A request under both a request and a token limit takes both grants when it is sent: one taken
    early while it waited for the other would count in a window the request was not sent in, and
    the requests that waited together would then leave together (a 10-requests-a-minute limit let
    17 through in one minute behind a large request that the token limit held back). The locks are
    taken in the order given, so callers name the limiters in one order.
    """
    async with contextlib.AsyncExitStack() as locks:
        for limiter, _ in wants:
            await locks.enter_async_context(limiter.lock)  # FIFO: one waiter at a time
        while delay := max(limiter._delay(amount) for limiter, amount in wants):
            await asyncio.sleep(delay)
        return [limiter._take(amount) for limiter, amount in wants]
