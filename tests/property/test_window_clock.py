"""The engine's compiled deployment windows answer exactly as the plain functions, at any instant.

:class:`~coalmine.engine.windows.WindowClock` remembers the next opening it looked up; these
properties ask it at generated instants (across DST changes, past midnight, in any order, many
times within a day as a daemon's ticks do) and compare every answer with
:func:`inside_window` and :func:`next_opening`, which compute from scratch.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from coalmine.engine.windows import WindowClock, inside_window, next_opening
from coalmine.policy import DAYS, DeploymentWindows

ZONES = ("America/Los_Angeles", "Europe/London", "Australia/Lord_Howe", "Asia/Kolkata", "UTC")
# Around the 2026 DST changes in the US (8 Mar, 1 Nov) and Europe (29 Mar, 25 Oct).
STARTS = [datetime(2026, m, d, tzinfo=UTC) for m, d in ((3, 6), (3, 27), (10, 23), (10, 30))]
CLOCK_TIMES = st.sampled_from(["00:00", "01:30", "01:59", "02:00", "02:30", "09:45", "23:59"])


@st.composite
def windows(draw: st.DrawFn) -> DeploymentWindows:
    """One to three windows on random days; some past midnight, some to 24:00."""
    allow = []
    for _ in range(draw(st.integers(1, 3))):
        days = draw(st.lists(st.sampled_from(DAYS), min_size=1, max_size=7, unique=True))
        start = draw(st.one_of(CLOCK_TIMES, st.sampled_from(["10:00", "16:00", "22:00"])))
        end = draw(st.one_of(CLOCK_TIMES, st.sampled_from(["03:00", "16:00", "24:00"])))
        allow.append({"days": days, "from": start, "to": end})
    zone = draw(st.sampled_from(ZONES))
    return DeploymentWindows.model_validate({"timezone": zone, "allow": allow})


@st.composite
def instants(draw: st.DrawFn) -> list[datetime]:
    """Ticks as a daemon makes them (steps of seconds to hours, forward) with some jumps back."""
    t = draw(st.sampled_from(STARTS)) + timedelta(minutes=draw(st.integers(0, 3 * 24 * 60)))
    out = []
    for _ in range(draw(st.integers(1, 60))):
        step = draw(
            st.one_of(
                st.integers(0, 120),  # seconds: ticks
                st.integers(0, 36 * 3600),  # up to a day and a half
                st.integers(-6 * 3600, 0),  # back in time: a replay of another rollout
            )
        )
        t += timedelta(seconds=step, microseconds=draw(st.sampled_from([0, 1, 999_999])))
        out.append(t)
    return out


@settings(max_examples=300, deadline=None)
@given(windows(), instants())
def test_the_window_clock_answers_as_the_functions(
    allowed: DeploymentWindows, times: list[datetime]
) -> None:
    """At every instant, in any order: inside and the next opening equal the uncached answer."""
    clock = WindowClock(allowed)
    for now in times:
        assert clock.inside(now) == inside_window(allowed, now), now
        assert clock.next_opening(now) == next_opening(allowed, now), now


def test_no_windows_is_always_inside() -> None:
    """Without deployment windows every instant is inside, and opens at once."""
    clock = WindowClock(None)
    now = datetime(2026, 3, 3, 18, tzinfo=UTC)
    assert clock.inside(now) and clock.next_opening(now) == now


def test_an_earlier_instant_after_a_later_one_gets_its_own_opening() -> None:
    """Asked at 17:00 (next opening tomorrow 10:00), then at 09:00 the same day: today 10:00."""
    allowed = DeploymentWindows.model_validate(
        {
            "timezone": "America/Los_Angeles",
            "allow": [{"days": list(DAYS), "from": "10:00", "to": "16:00"}],
        }
    )
    clock = WindowClock(allowed)
    evening, morning = datetime(2026, 3, 4, 1, tzinfo=UTC), datetime(2026, 3, 3, 17, tzinfo=UTC)
    assert clock.next_opening(evening) == datetime(2026, 3, 4, 18, tzinfo=UTC)
    assert clock.next_opening(morning) == datetime(2026, 3, 3, 18, tzinfo=UTC)
    assert clock.next_opening(evening) == next_opening(allowed, evening)
