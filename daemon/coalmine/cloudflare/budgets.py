"""Token buckets for Cloudflare calls, kept well under the account's budgets.

Cloudflare allows 1,200 REST requests per 5 minutes per token and, over it, refuses *every* call —
a rollback too — for up to 5 minutes. GraphQL analytics has its own budget on top (300 queries
per 5 minutes, or 1 per second when an answer says ``X-Rate-Limit-Type: account-based``). So
coalmine keeps two buckets: REST spends at most ``COALMINE_CLOUDFLARE_RATE_LIMIT`` per 5 minutes,
keeps a reserve that only writes may use, and puts rollbacks first in line; GraphQL spends at
most ``COALMINE_CLOUDFLARE_GRAPHQL_RATE_LIMIT``. A 429 blocks only the bucket it came from until
its ``retry-after`` has passed: a GraphQL 429 never delays a rollback.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Literal

import anyio

Kind = Literal["read", "write", "rollback"]
WINDOW = 300.0  # seconds: Cloudflare's budget period
BURST_FRACTION = 0.1  # a bucket holds this share of its 5 minutes' tokens
RESERVE_FRACTION = 0.1  # of which this share is kept for writes (rollbacks first)


def write_reserve(per_window: int, reserve_fraction: float = RESERVE_FRACTION) -> float:
    """The tokens a bucket of ``per_window`` keeps for writes: reads never take them, so
    neither may the budget plan (:mod:`coalmine.cloudflare.plan`)."""
    return _capacity(per_window, BURST_FRACTION) * reserve_fraction


def _capacity(per_window: int, burst_fraction: float) -> float:
    return max(2.0, per_window * burst_fraction)


class BudgetBlocked(Exception):
    """A call would wait longer than its caller allows (a 429's retry-after, mostly)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"budget blocked for {seconds:.0f}s more")
        self.seconds = seconds


class TokenBucket:
    """Refills ``per_window`` tokens per 5 minutes; reads leave ``reserve`` tokens for writes."""

    def __init__(
        self,
        per_window: int,
        *,
        reserve_fraction: float = RESERVE_FRACTION,
        burst_fraction: float = BURST_FRACTION,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.rate = per_window / WINDOW
        self.capacity = _capacity(per_window, burst_fraction)
        self.reserve = self.capacity * reserve_fraction
        self._tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()
        self._blocked_until = 0.0
        self._rollbacks_waiting = 0

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        return now

    def wait_for(self, kind: Kind) -> float:
        """Take a token now and return 0, or return how long to wait before trying again."""
        now = self._refill()
        if now < self._blocked_until:
            return self._blocked_until - now
        if kind != "rollback" and self._rollbacks_waiting:
            return 1.0 / self.rate
        floor = self.reserve if kind == "read" else 0.0
        if self._tokens - 1.0 >= floor:
            self._tokens -= 1.0
            return 0.0
        return (floor + 1.0 - self._tokens) / self.rate

    async def take(self, kind: Kind, *, max_wait: float | None = None) -> None:
        """Wait until a call of ``kind`` may go; raise :class:`BudgetBlocked` instead of
        waiting longer than ``max_wait`` seconds."""
        if kind == "rollback":
            self._rollbacks_waiting += 1
        try:
            while (wait := self.wait_for(kind)) > 0:
                if max_wait is not None and wait > max_wait:
                    raise BudgetBlocked(wait)
                await self._sleep(wait)
        finally:
            if kind == "rollback":
                self._rollbacks_waiting -= 1

    def block(self, seconds: float) -> None:
        """Cloudflare said 429: nothing goes for ``seconds``."""
        self._blocked_until = max(self._blocked_until, self._clock() + seconds)

    def at_most_per_second(self, calls: float) -> None:
        """Cloudflare switched the budget to ``calls`` per second (account-based GraphQL
        limits): no faster than that, and no burst."""
        capacity = max(1.0, calls)
        if self.rate <= calls and self.capacity <= capacity:
            return  # already this slow
        self._refill()
        self.rate = min(self.rate, calls)
        self.capacity = min(self.capacity, capacity)
        self.reserve = min(self.reserve, max(0.0, self.capacity - 1.0))
        # the answer that said so spent a token: the next call waits a full interval
        self._tokens = min(self._tokens, self.capacity - 1.0)

    def sibling(self, per_window: int) -> TokenBucket:
        """Another bucket on the same clock (GraphQL's, beside REST's): no write reserve."""
        return TokenBucket(per_window, reserve_fraction=0.0, clock=self._clock, sleep=self._sleep)

    @property
    def tokens(self) -> float:
        """Tokens available now (for /metrics): none while a 429 blocks the bucket."""
        now = self._refill()
        return 0.0 if now < self._blocked_until else self._tokens
