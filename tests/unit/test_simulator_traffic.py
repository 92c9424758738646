"""The simulator's traffic model: splits, behaviours, faults, counters and minute rows."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from coalmine.simulator import Behaviour, MinuteRow, VirtualClock, World, render
from coalmine.simulator._stats import binomial, lognormal_quantile, mixture_quantile, poisson
from coalmine.simulator.traffic import DEFAULT_START, LATENCY_BUCKETS

HEALTHY = Behaviour(exception_rate=0.0, http_5xx_rate=0.0)


def world_with_canary(
    *, noise: bool = False, seed: int = 0, canary: Behaviour = HEALTHY
) -> tuple[VirtualClock, World]:
    """600 req/min split 90/10 between `stable` and `canary` from the clock's start."""
    clock = VirtualClock()
    world = World(clock, seed=seed, noise=noise)
    world.add_script("api", 600)
    world.add_version("api", "stable", HEALTHY)
    world.add_version("api", "canary", canary)
    world.set_split("api", {"stable": 90, "canary": 10})
    return clock, world


def test_rows_follow_the_split_exactly_without_noise() -> None:
    """Without noise, 10% of 600 req/min is 60 canary requests in every complete minute."""
    clock, world = world_with_canary()
    clock.advance(timedelta(minutes=3, seconds=20))
    rows = world.rows("api", DEFAULT_START, clock())
    assert [(r.minute.minute, r.version, r.requests) for r in rows] == [
        (0, "stable", 540),
        (0, "canary", 60),
        (1, "stable", 540),
        (1, "canary", 60),
        (2, "stable", 540),
        (2, "canary", 60),
    ]


def test_a_split_changing_mid_minute_is_prorated() -> None:
    """A split that changes at :30 gives each version its share of each half of the minute."""
    clock = VirtualClock()
    world = World(clock, noise=False)
    world.add_script("api", 600)
    world.add_version("api", "v1", HEALTHY)
    world.add_version("api", "v2", HEALTHY)
    world.set_split("api", {"v1": 100})
    clock.advance(30)
    world.set_split("api", {"v1": 50, "v2": 50})
    clock.advance(30)
    rows = {r.version: r.requests for r in world.rows("api", DEFAULT_START, clock())}
    assert rows == {"v1": 450, "v2": 150}
    assert world.counters("api", "v2").requests == 150


def test_exceptions_are_cloudflare_errors_and_5xx_are_not() -> None:
    """Thrown requests count as Cloudflare errors; 5xx answers only reach the counters."""
    clock = VirtualClock()
    world = World(clock, noise=False)
    world.add_script("api", 1000)
    world.add_version("api", "throws", Behaviour(exception_rate=0.1, http_5xx_rate=0.0))
    world.add_version("api", "fails", Behaviour(exception_rate=0.0, http_5xx_rate=0.2))
    world.set_split("api", {"throws": 50, "fails": 50})
    clock.advance(60)
    rows = {r.version: r for r in world.rows("api", DEFAULT_START, clock())}
    assert (rows["throws"].requests, rows["throws"].errors) == (500, 50)
    assert (rows["fails"].requests, rows["fails"].errors) == (500, 0)
    throws, fails = world.counters("api", "throws"), world.counters("api", "fails")
    assert (throws.exceptions, throws.http_5xx, throws.ok) == (50, 0, 450)
    assert (fails.exceptions, fails.http_5xx, fails.ok) == (0, 100, 400)


def test_a_fault_changes_behaviour_only_between_its_instants() -> None:
    """A fault from minute 2 to minute 4 raises errors in those minutes only."""
    clock, world = world_with_canary()
    start = DEFAULT_START + timedelta(minutes=2)
    world.schedule_fault("api", "canary", start, start + timedelta(minutes=2), exception_rate=0.5)
    clock.advance(timedelta(minutes=6))
    errors = [r.errors for r in world.rows("api", DEFAULT_START, clock()) if r.version == "canary"]
    assert errors == [0, 0, 30, 30, 0, 0]
    assert world.behaviour("api", "canary").exception_rate == 0.0


def test_faults_cannot_start_in_the_past_and_the_clock_cannot_run_back() -> None:
    """What was counted stays counted: no retroactive faults, no clock going backwards."""
    clock, world = world_with_canary()
    clock.advance(60)
    with pytest.raises(ValueError, match="past"):
        world.schedule_fault("api", "canary", DEFAULT_START, clock(), exception_rate=1.0)
    with pytest.raises(ValueError, match="backwards"):
        clock.set(DEFAULT_START)
    with pytest.raises(ValueError, match="unknown versions"):
        world.set_split("api", {"nope": 100})
    with pytest.raises(ValueError, match="probability"):
        Behaviour(exception_rate=1.5)
    with pytest.raises(TypeError):
        world.schedule_fault("api", "canary", clock(), clock() + timedelta(1), colour=1.0)  # type: ignore[call-arg]


def test_counters_rise_smoothly_never_fall_and_stay_cumulative() -> None:
    """Counters grow within a minute, never decrease, and the histogram stays cumulative."""
    clock, world = world_with_canary(noise=True, canary=Behaviour(http_5xx_rate=0.05))
    previous = world.counters("api", "canary")
    for _ in range(200):
        clock.advance(7)
        now = world.counters("api", "canary")
        assert now.requests >= previous.requests
        assert now.http_5xx >= previous.http_5xx and now.ok >= previous.ok
        assert now.latency_sum >= previous.latency_sum
        assert list(now.latency_buckets) == sorted(now.latency_buckets)
        assert now.latency_buckets[-1] <= now.requests
        assert all(
            a >= b for a, b in zip(now.latency_buckets, previous.latency_buckets, strict=True)
        )
        previous = now
    assert previous.requests > 0


def test_counters_do_not_depend_on_when_they_were_read() -> None:
    """Reading counters often or once gives the same numbers, and rows are a pure function."""
    clock_a, often = world_with_canary(noise=True, seed=3)
    clock_b, once = world_with_canary(noise=True, seed=3)
    for _ in range(50):
        clock_a.advance(11)
        clock_b.advance(11)
        often.counters("api", "canary")
    assert often.counters("api", "canary") == once.counters("api", "canary")
    assert often.rows("api", DEFAULT_START, clock_a()) == once.rows("api", DEFAULT_START, clock_b())
    at = DEFAULT_START + timedelta(minutes=2, seconds=5)
    assert once.counters("api", "canary", at) == often.counters("api", "canary", at)


def test_the_seed_decides_the_noise() -> None:
    """Same seed, same rows; another seed, other rows; the mean stays the split's."""
    rows: dict[int, list[list[MinuteRow]]] = {}
    for seed in (1, 1, 2):
        clock, world = world_with_canary(noise=True, seed=seed)
        clock.advance(timedelta(minutes=30))
        rows.setdefault(seed, []).append(world.rows("api", DEFAULT_START, clock()))
    assert rows[1][0] == rows[1][1]
    assert rows[1][0] != rows[2][0]
    canary = [r.requests for r in rows[1][0] if r.version == "canary"]
    assert 50 < sum(canary) / len(canary) < 70


def test_rows_report_complete_minutes_and_clip_to_the_range() -> None:
    """Only complete minutes before the cutoff; a range starting mid-minute is clipped."""
    clock, world = world_with_canary()
    clock.advance(timedelta(minutes=5, seconds=30))
    cutoff = clock() - timedelta(minutes=2)
    minutes = {
        r.minute.minute for r in world.rows("api", DEFAULT_START, clock(), complete_before=cutoff)
    }
    assert minutes == {0, 1, 2}
    clipped = world.rows(
        "api",
        DEFAULT_START + timedelta(seconds=30),
        DEFAULT_START + timedelta(minutes=1),
        versions=["canary"],
    )
    assert [(r.version, r.requests) for r in clipped] == [("canary", 30)]
    assert world.rows("nope", DEFAULT_START, clock()) == []


def test_quantiles_are_microseconds_and_mix_behaviours() -> None:
    """CPU and wall time come in microseconds; a half-minute fault lands between both p99s."""
    clock, world = world_with_canary(canary=Behaviour(latency_p50=0.1, latency_p99=0.5))
    clock.advance(30)
    world.schedule_fault("api", "canary", clock(), clock() + timedelta(seconds=30), latency_p99=5.0)
    clock.advance(30)
    (row,) = world.rows("api", DEFAULT_START, clock(), versions=["canary"])
    assert row.cpu_time_p50 == pytest.approx(1500.0)
    assert row.wall_time_p50 == pytest.approx(100_000.0, rel=0.05)
    assert 500_000 < row.wall_time_p99 < 5_000_000


def test_a_thousand_scripts_are_cheap() -> None:
    """A thousand scripts over ten minutes export one series set each."""
    clock = VirtualClock()
    world = World(clock, seed=5)
    for i in range(1000):
        world.add_script(f"s{i}", 120)
        world.add_version(f"s{i}", "v1", Behaviour())
        world.set_split(f"s{i}", {"v1": 100})
    clock.advance(timedelta(minutes=10))
    text = render(world)
    assert text.count("_count{") == 1000
    assert text.count("_bucket{") == 1000 * (len(LATENCY_BUCKETS) + 1)


def test_samplers_have_the_right_means() -> None:
    """Poisson and binomial samples average to their means; quantiles invert the lognormal."""
    rng = random.Random(0)
    assert sum(poisson(rng, 4.0) for _ in range(4000)) / 4000 == pytest.approx(4.0, rel=0.05)
    assert sum(poisson(rng, 400.0) for _ in range(2000)) / 2000 == pytest.approx(400.0, rel=0.01)
    assert sum(binomial(rng, 1000, 0.01) for _ in range(2000)) / 2000 == pytest.approx(10, rel=0.05)
    assert sum(binomial(rng, 10, 0.5) for _ in range(2000)) / 2000 == pytest.approx(5, rel=0.05)
    assert lognormal_quantile(0.99, 0.1, 0.8) == pytest.approx(0.8)
    assert mixture_quantile(0.5, [(1.0, 0.1, 0.8), (0.0, 9.0, 10.0)]) == pytest.approx(0.1)
