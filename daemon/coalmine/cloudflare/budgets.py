"""One token bucket for every Cloudflare call, kept well under the account's budget.

Cloudflare allows 1,200 requests per 5 minutes per token and, over it, refuses *every* call —
a rollback too — for up to 5 minutes. So coalmine spends at most ``COALMINE_CLOUDFLARE_RATE_LIMIT``
per 5 minutes, keeps a reserve that only writes may use, and puts rollbacks first in line. A 429
from Cloudflare blocks the bucket until its ``retry-after`` has passed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Literal

import anyio

Kind = Literal["read", "write", "rollback"]
WINDOW = 300.0  # seconds: Cloudflare's budget period


class TokenBucket:
    """Refills ``per_window`` tokens per 5 minutes; reads leave ``reserve`` tokens for writes."""

    def __init__(
        self,
        per_window: int,
        *,
        reserve_fraction: float = 0.1,
        burst_fraction: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.rate = per_window / WINDOW
        self.capacity = max(2.0, per_window * burst_fraction)
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

    async def take(self, kind: Kind) -> None:
        """Wait until a call of ``kind`` may go."""
        if kind == "rollback":
            self._rollbacks_waiting += 1
        try:
            while (wait := self.wait_for(kind)) > 0:
                await self._sleep(wait)
        finally:
            if kind == "rollback":
                self._rollbacks_waiting -= 1

    def block(self, seconds: float) -> None:
        """Cloudflare said 429: nothing goes for ``seconds``."""
        self._blocked_until = max(self._blocked_until, self._clock() + seconds)

    @property
    def tokens(self) -> float:
        """Tokens available now (for /metrics)."""
        self._refill()
        return self._tokens
