"""Token buckets for Cloudflare calls, kept well under the account's budgets.

Cloudflare allows 1,200 REST requests per 5 minutes per token and, over it, refuses *every* call —
a rollback too — for up to 5 minutes. GraphQL analytics has its own budget on top (300 queries
per 5 minutes, or 1 per second when an answer says ``X-Rate-Limit-Type: account-based``). So
coalmine keeps two buckets: REST spends at most ``COALMINE_CLOUDFLARE_RATE_LIMIT`` per 5 minutes,
keeps a reserve that only writes may use, and puts rollbacks first in line; GraphQL spends at
most ``COALMINE_CLOUDFLARE_GRAPHQL_RATE_LIMIT``. A 429 blocks only the bucket it came from until
its ``retry-after`` has passed: a GraphQL 429 never delays a rollback.

Replicas (``COALMINE_STATE_URL=postgresql://...``) share one token, and Cloudflare counts its
budget per token: each replica's buckets are sized for its *share*, the limit divided by the live
replicas (:func:`size`, pure; :meth:`TokenBucket.share` re-sizes a bucket when that count
changes). A share refills at ``limit / replicas`` per 5 minutes, holds that share's burst and
keeps that share's write reserve, so the replicas together never spend more than the token's
limit, and a replica's rollback waits on nothing but its own bucket: its own reserve, never
another replica's reads. A daemon alone (SQLite) has one share: the whole limit.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Literal, NamedTuple

import anyio

Kind = Literal["read", "write", "rollback"]
WINDOW = 300.0  # seconds: Cloudflare's budget period
BURST_FRACTION = 0.1  # a bucket holds this share of its 5 minutes' tokens
RESERVE_FRACTION = 0.1  # of which this share is kept for writes (rollbacks first)


def write_reserve(
    per_window: float, reserve_fraction: float = RESERVE_FRACTION, *, replicas: int = 1
) -> float:
    """The tokens a bucket of ``per_window`` keeps for writes (one replica's share of them when
    ``replicas`` share the token): reads never take them, so neither may the budget plan
    (:mod:`coalmine.cloudflare.plan`)."""
    return size(per_window, replicas=replicas, reserve_fraction=reserve_fraction).reserve


def _capacity(per_window: float, burst_fraction: float) -> float:
    return max(2.0, per_window * burst_fraction)


class Size(NamedTuple):
    """How fast a bucket refills, how much it holds, and how much of that only writes take."""

    rate: float  # tokens per second
    capacity: float
    reserve: float


@functools.lru_cache(maxsize=256)  # the plan's search asks for the same few sizes often
def size(
    per_window: float,
    *,
    replicas: int = 1,
    reserve_fraction: float = RESERVE_FRACTION,
    burst_fraction: float = BURST_FRACTION,
    per_second: float = math.inf,
) -> Size:
    """One replica's bucket when ``replicas`` live replicas share a token's ``per_window``
    calls per 5 minutes (pure). Each share refills at ``per_window / replicas``, holds that
    share's burst (at least 2 tokens: a read and a write) and keeps that share's reserve for
    writes, so the shares' reserves add up to the token's (each at least one token: a whole
    rollback call, when the shares are thin). ``per_second``: Cloudflare limits
    the whole account to that many calls a second (account-based GraphQL), shared alike."""
    replicas = max(1, replicas)
    share = per_window / replicas
    rate, capacity = share / WINDOW, _capacity(share, burst_fraction)
    reserve = capacity * reserve_fraction
    if reserve_fraction > 0:  # at least one whole write, however thin the share
        reserve = min(max(1.0, reserve), capacity - 1.0)
    if per_second < math.inf:
        calls = per_second / replicas
        rate, capacity = min(rate, calls), min(capacity, max(1.0, calls))
        reserve = min(reserve, max(0.0, capacity - 1.0))
    return Size(rate, capacity, reserve)


class BudgetBlocked(Exception):
    """A call would wait longer than its caller allows (a 429's retry-after, mostly)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"budget blocked for {seconds:.0f}s more")
        self.seconds = seconds


class TokenBucket:
    """Refills ``per_window`` tokens per 5 minutes (its share of them, when ``replicas`` share
    the token); reads leave ``reserve`` tokens for writes."""

    def __init__(
        self,
        per_window: int,
        *,
        reserve_fraction: float = RESERVE_FRACTION,
        burst_fraction: float = BURST_FRACTION,
        replicas: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.per_window = per_window  # the token's whole limit
        self.replicas = max(1, replicas)
        self._fractions = (reserve_fraction, burst_fraction)
        self._per_second = math.inf  # Cloudflare's per-second limit, once it names one
        self.rate, self.capacity, self.reserve = self._size()
        self._tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()
        self._blocked_until = 0.0
        self._rollbacks_waiting = 0

    def _size(self) -> Size:
        reserve_fraction, burst_fraction = self._fractions
        return size(
            self.per_window,
            replicas=self.replicas,
            reserve_fraction=reserve_fraction,
            burst_fraction=burst_fraction,
            per_second=self._per_second,
        )

    def share(self, replicas: int) -> None:
        """``replicas`` live replicas share the token now: refill at this replica's share and
        hold at most its burst from now on (the tokens earned so far at the old rate are kept,
        up to the new capacity: a replica that left frees its share gradually, never at once)."""
        replicas = max(1, replicas)
        if replicas == self.replicas:
            return
        self._refill()
        self.replicas = replicas
        self.rate, self.capacity, self.reserve = self._size()
        self._tokens = min(self._tokens, self.capacity)

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
        if calls >= self._per_second:
            return
        self._refill()
        self._per_second = calls
        slower = self._size()
        if slower == (self.rate, self.capacity, self.reserve):
            return  # already this slow
        self.rate, self.capacity, self.reserve = slower
        # the answer that said so spent a token: the next call waits a full interval
        self._tokens = min(self._tokens, self.capacity - 1.0)

    def sibling(self, per_window: int) -> TokenBucket:
        """Another bucket on the same clock and share (GraphQL's, beside REST's): no write
        reserve."""
        return TokenBucket(
            per_window,
            reserve_fraction=0.0,
            replicas=self.replicas,
            clock=self._clock,
            sleep=self._sleep,
        )

    @property
    def tokens(self) -> float:
        """Tokens available now (for /metrics): none while a 429 blocks the bucket."""
        now = self._refill()
        return 0.0 if now < self._blocked_until else self._tokens
