"""The Cloudflare token bucket: the budget, the write reserve, rollbacks first, 429 blocks."""

from __future__ import annotations

import pytest

from coalmine.cloudflare.budgets import TokenBucket

pytestmark = pytest.mark.anyio


class Clock:
    """A virtual monotonic clock whose sleep advances it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_budget_is_never_exceeded_over_five_minutes() -> None:
    """However fast calls come, no more than the budget (plus the burst) go in 300 s."""
    clock = Clock()
    bucket = TokenBucket(600, clock=clock)
    taken = 0
    while clock.now < 300:
        if bucket.wait_for("write") == 0:
            taken += 1
        else:
            clock.now += 0.01
    assert 600 <= taken <= 600 + bucket.capacity


def test_reads_leave_a_reserve_for_writes() -> None:
    """Reads stop at the reserve; a write still gets a token."""
    clock = Clock()
    bucket = TokenBucket(600, clock=clock)
    reads = 0
    while bucket.wait_for("read") == 0:
        reads += 1
    assert reads == int(bucket.capacity - bucket.reserve)
    assert bucket.wait_for("write") == 0


def test_a_waiting_rollback_goes_first() -> None:
    """While a rollback waits, reads and writes are held back."""
    clock = Clock()
    bucket = TokenBucket(600, clock=clock)
    bucket._rollbacks_waiting = 1  # a rollback is queued
    assert bucket.wait_for("write") > 0
    assert bucket.wait_for("rollback") == 0


async def test_429_blocks_every_call_until_retry_after() -> None:
    """After Cloudflare's 429, even a rollback waits out retry-after."""
    clock = Clock()
    bucket = TokenBucket(600, clock=clock, sleep=clock.sleep)
    bucket.block(120)
    await bucket.take("rollback")
    assert clock.now == pytest.approx(120)
