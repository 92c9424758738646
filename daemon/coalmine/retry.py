"""Bounded retries with full jitter, for every call coalmine makes to another system."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

T = TypeVar("T")


class Retryable(Exception):
    """Raised by a call to ask for another attempt; ``after`` honours a server's retry-after."""

    def __init__(self, reason: str, after: float | None = None, *, sent: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after = after
        self.sent = sent  # the server may have acted on the request (a timeout, a 5xx)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many attempts, and how long to wait between them."""

    attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 10.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


async def with_retries(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> T:
    """Run ``call``; on :class:`Retryable`, wait and try again, up to ``policy.attempts`` times.

    The last :class:`Retryable` propagates when attempts run out, so the caller decides what
    a final failure means (an inconclusive observation, a retried outbox item, ...).
    """
    rng = rng or random.Random()
    for attempt in range(policy.attempts):
        try:
            return await call()
        except Retryable as exc:
            if attempt + 1 >= policy.attempts:
                raise
            wait = exc.after if exc.after is not None else policy.delay(attempt, rng)
            await sleep(min(wait, policy.max_delay) if exc.after is None else wait)
    raise AssertionError("unreachable")  # pragma: no cover
