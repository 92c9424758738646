"""The tick's time: the scheduled time when the tick runs a little late."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from coalmine.engine import Observation
from coalmine.schedule import scheduled
from tests.support import Rollout, at, make_policy

NOW = datetime(2026, 3, 3, 18, 0, 5, 2000, tzinfo=UTC)


def test_a_slightly_late_tick_is_judged_at_its_due_time() -> None:
    """2 ms late on a 5 s interval: the tick is judged at the time it was due."""
    assert scheduled(NOW, 0.002, timedelta(seconds=5)) == NOW - timedelta(seconds=0.002)


def test_a_tick_that_waited_long_is_judged_when_it_runs() -> None:
    """Lateness beyond a tenth of the interval (or a second) is not taken back; nor is none."""
    assert scheduled(NOW, 0.6, timedelta(seconds=5)) == NOW
    assert scheduled(NOW, 1.5, timedelta(seconds=30)) == NOW
    assert scheduled(NOW, 0.0, timedelta(seconds=5)) == NOW
    assert scheduled(NOW, -0.001, timedelta(seconds=5)) == NOW


def test_for_ends_on_the_tick_due_at_its_end() -> None:
    """Why: with ticks judged at their due times, `for: 10s` on a 5 s interval trips on the
    third breaching tick, not the fourth, however late each tick started."""
    rollout = Rollout(
        make_policy(
            """
version: 1
name: p
scripts: [api]
analysis: {interval: 5s, warmup: 0s}
steps: [{weight: 10, hold: 1h}, {weight: 100}]
rules:
  - {name: err, source: prometheus, query: x, above: 0.01, for: 10s, on_breach: page}
"""
        )
    )
    for k in (1, 2, 3):  # each tick a little less late than the one before
        lateness = 0.0026 - 0.0002 * k
        late = at(5 * k) + timedelta(seconds=lateness)
        now = scheduled(late, lateness, timedelta(seconds=5))
        rollout.tick((now - at(0)).total_seconds(), Observation("err", "canary", 0.5, 100))
    assert [d.action for d in rollout.decisions][-1] == "page"
    assert rollout.decisions[-1].t == at(15)
