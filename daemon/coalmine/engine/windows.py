"""Deployment windows: may a canary advance at this instant?

Local wall-clock time in the policy's timezone decides, so a window written as 10:00-16:00
America/Los_Angeles stays 10:00-16:00 on both sides of a DST change. ``from`` is inclusive and
``to`` exclusive; a window whose ``to`` is earlier than its ``from`` runs past midnight and
belongs to the day it opens on.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta

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
