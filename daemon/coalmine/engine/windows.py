"""Deployment windows: may a canary advance at this instant?

Local wall-clock time in the policy's timezone decides, so a window written as 10:00-16:00
America/Los_Angeles stays 10:00-16:00 on both sides of a DST change. ``from`` is inclusive and
``to`` exclusive; a window whose ``to`` is earlier than its ``from`` runs past midnight and
belongs to the day it opens on.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

from coalmine.policy import DAYS, DeploymentWindows


def inside_window(windows: DeploymentWindows | None, now: datetime) -> bool:
    """True when advancing is allowed at ``now`` (an aware datetime)."""
    if windows is None:
        return True
    local = now.astimezone(windows.zone())
    today = DAYS[local.weekday()]
    yesterday = DAYS[(local.weekday() - 1) % 7]
    clock = local.time().replace(tzinfo=None)
    for window in windows.allow:
        start, end = window.from_, window.to
        if start < end:
            if today in window.days and start <= clock < end:
                return True
        elif (today in window.days and clock >= start) or (
            yesterday in window.days and clock < end
        ):
            return True
    return False


def next_opening(windows: DeploymentWindows | None, now: datetime) -> datetime | None:
    """The first instant at or after ``now`` inside a window (minute resolution), or None."""
    if windows is None or inside_window(windows, now):
        return now
    zone = windows.zone()
    local = now.astimezone(zone)
    candidates = []
    for offset in range(8):
        day = (local + timedelta(days=offset)).date()
        for window in windows.allow:
            if DAYS[day.weekday()] in window.days and window.from_ != time.max:
                opening = datetime.combine(day, window.from_, tzinfo=zone)
                if opening > now:
                    candidates.append(opening)
    return min(candidates, default=None)


class WindowClock:
    """:func:`inside_window` and :func:`next_opening` for one policy's windows, compiled once.

    The engine asks both at every tick of a canary past its hold, so the timezone, the days
    and the times are looked up once, and the next opening is remembered: within one local
    day (the days :func:`next_opening` searches from), the first opening after ``t0`` is
    also the first after any later ``now`` before it. Pure: the same answers as the
    functions, for any ``now`` in any order (tests/property/test_window_clock.py).
    """

    __slots__ = ("_allow", "_opening", "_windows", "_zone")

    def __init__(self, windows: DeploymentWindows | None) -> None:
        self._windows = windows
        self._zone = windows.zone() if windows is not None else None
        # (from, to, days) with each day as its weekday number
        self._allow = (
            tuple((w.from_, w.to, frozenset(DAYS.index(d) for d in w.days)) for w in windows.allow)
            if windows is not None
            else ()
        )
        # (local date, t0, the next opening after t0): the last opening looked up
        self._opening: tuple[date, datetime, datetime] | None = None

    def inside(self, now: datetime) -> bool:
        """:func:`inside_window` at ``now``."""
        if self._zone is None:
            return True
        return self._inside(now.astimezone(self._zone))

    def _inside(self, local: datetime) -> bool:
        today = local.weekday()
        yesterday = (today - 1) % 7
        clock = local.time().replace(tzinfo=None)
        for start, end, days in self._allow:
            if start < end:
                if today in days and start <= clock < end:
                    return True
            elif (today in days and clock >= start) or (yesterday in days and clock < end):
                return True
        return False

    def next_opening(self, now: datetime) -> datetime | None:
        """:func:`next_opening` at ``now``."""
        if self._zone is None:
            return now
        local = now.astimezone(self._zone)
        if self._inside(local):
            return now
        cached = self._opening
        day = local.date()
        if cached is not None and cached[0] == day and cached[1] <= now < cached[2]:
            return cached[2]
        opening = next_opening(self._windows, now)
        if opening is not None:
            self._opening = (day, now, opening)
        return opening
