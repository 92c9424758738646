"""When a script's tick is judged: the schedule's small corrections, kept out of the loop."""

from __future__ import annotations

from datetime import datetime, timedelta


def scheduled(now: datetime, lateness: float, interval: timedelta) -> datetime:
    """The time a tick was due, when it runs a little late: ``now`` less the lateness.

    A tick starts a few milliseconds after it is due. Judged at the wall clock, a rule's
    ``for`` (a multiple of the interval) would end a hair after the tick due at its end, half
    the time, and trip one interval late. Only small lateness is taken back (under a tenth of
    the interval, at most a second); a tick that waited longer is judged when it runs.
    """
    if 0.0 < lateness < min(1.0, interval.total_seconds() / 10):
        return now - timedelta(seconds=lateness)
    return now
