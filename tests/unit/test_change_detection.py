"""The compare rule's change detector (DESIGN.md "Compare rules"): a regression that begins late
is caught about as fast, from its onset, as one present from the start, and the false-alarm
guarantee holds over the whole canary."""

from __future__ import annotations

import math
import random

import pytest

from coalmine.engine.compare import (
    AT_STEPS,
    GRID,
    LATER,
    PLANNED,
    SINCE_START,
    Evidence,
    alternative_weights,
    change_weight,
)
from tests.support import T0
from tests.unit.test_compare import binomial

BAR = 100.0  # 1 / (1 - confidence) at confidence 0.99


@pytest.mark.parametrize("scheme", [0, 1])
@pytest.mark.parametrize("horizon", [1, 60, 180, 1000])
def test_the_weights_spend_at_most_the_whole_budget(horizon: int, scheme: int) -> None:
    """The change weights sum to at most 1 whatever the traffic changes (now 0.5 on the start,
    at most 0.1 on the first windows of steps; before: 0.4 and 0.2), so the detector's
    statistic plus the weight still to come is a supermartingale starting at <= 1."""
    weights = [change_weight(j, horizon, 0, scheme) for j in range(1, 200_000)]
    at_steps = sum(
        change_weight(2, horizon, k, scheme) - change_weight(2, horizon, 0, scheme)
        for k in range(1, 60)
    )
    assert weights[0] >= (SINCE_START if scheme else 0.4)
    assert at_steps <= (AT_STEPS if scheme else 0.2) + 1e-12
    assert math.isclose(SINCE_START + AT_STEPS + PLANNED + LATER, 1.0)
    assert sum(weights) + at_steps <= 1.0 + 1e-12
    assert all(w > 0 for w in weights)


@pytest.mark.parametrize("max_ratio", [1.01, 1.2, 1.5, 3.0])
def test_the_prior_over_alternatives_is_a_probability_weighted_to_small_regressions(
    max_ratio: float,
) -> None:
    """The detector's alternatives are weighted in inverse proportion to the ratio and their
    weights sum to 1 (a mixture of supermartingales with weights summing to 1 is one)."""
    weights = [math.exp(w) for w in alternative_weights(max_ratio)]
    assert sum(weights) == pytest.approx(1.0)
    assert weights == sorted(weights, reverse=True)
    assert weights[0] / weights[-1] == pytest.approx(16, rel=0.2)


@pytest.mark.parametrize("ratio", [0.5, 1.0, 1.5])
@pytest.mark.parametrize(("events", "split"), [(1, 0.1), (8, 0.1), (30, 0.5)])
def test_the_detector_grows_by_at_most_the_new_weight_on_average_under_the_null(
    ratio: float, events: int, split: float
) -> None:
    """The Shiryaev-Roberts step, computed exactly after some history: for any true ratio within
    max_ratio, E[alarm after a window] <= alarm before + that window's weight."""
    max_ratio, horizon = 1.5, 60
    history = Evidence()
    for i in range(5):
        history = history.add(max_ratio, i % 3, 100, 4, 900, T0, horizon=horizon)
    canary_requests, stable_requests = 1000 * split, 1000 * (1 - split)
    a = canary_requests / stable_requests
    theta = ratio * a / (ratio * a + 1)
    expected = 0.0
    for k in range(events + 1):
        after = history.add(
            max_ratio, k, canary_requests, events - k, stable_requests, T0, horizon=horizon
        )
        expected += binomial(events, k, theta) * after.alarm(max_ratio)
    assert expected <= history.alarm(max_ratio) + change_weight(6, horizon) + 1e-9


def windows_to_trip(healthy: int, *, horizon: int = 180) -> tuple[int | None, int | None]:
    """Windows after a 3x regression's onset (after ``healthy`` healthy windows) until the
    detector trips, and until the since-start test alone would, at 0.5% stable errors, 1,000
    req/min, a 10% split, 30 s windows, expected counts."""
    evidence, detector, since = Evidence(), None, None
    canary, stable = 50.0, 450.0
    for i in range(healthy + 120):
        factor = 3.0 if i >= healthy else 1.0
        ce, se = canary * 0.005 * factor, stable * 0.005
        evidence = evidence.add(1.5, ce, canary, se, stable, T0, horizon=horizon)
        after = i - healthy + 1
        if i >= healthy and detector is None and evidence.alarm(1.5) >= BAR:
            detector = after
        if i >= healthy and since is None and evidence.e_value(1.5) >= 2 * BAR:
            since = after
    return detector, since


def test_a_late_regression_is_caught_about_as_fast_as_an_early_one() -> None:
    """A regression starting 40 minutes in is caught, from its onset, within half as long again
    as one present from the start (the price of not knowing when it starts), where the
    since-start test alone would take far longer (an hour of healthy evidence to outweigh)."""
    early, _ = windows_to_trip(0)
    late, since_alone = windows_to_trip(80)
    assert early is not None and late is not None
    assert late <= 1.5 * early
    assert since_alone is None or since_alone > late + 20


def test_evidence_saved_before_the_tuning_keeps_its_split_and_even_prior() -> None:
    """Evidence saved without a scheme (before 2026-12-03) goes on with the split and the even
    prior it started with, so a canary in flight across an upgrade keeps its guarantee; new
    evidence uses the new ones; an unknown scheme is an error, not a guess."""
    old = Evidence(scheme=0).add(1.5, 9, 100, 4, 900, T0, horizon=60)
    saved = old.to_json()
    del saved["scheme"]
    loaded = Evidence.from_json(saved)
    assert loaded == old
    grown = loaded.add(1.5, 9, 100, 4, 900, T0, horizon=60)
    # the old statistic: the even average over the 16 alternatives, the old weights 0.4 + 0.3/60
    terms = [d for d, r in zip(grown.detector, GRID, strict=True) if 1.5 < r <= 24]
    assert len(terms) == 16
    assert grown.alarm(1.5) == pytest.approx(sum(math.exp(d) for d in terms) / 16)
    fresh = Evidence().add(1.5, 9, 100, 4, 900, T0, horizon=60)
    assert Evidence().scheme == 1
    gap = math.log((0.5 + 0.35 / 60) / (0.4 + 0.3 / 60))  # the first window's weight, new / old
    assert all(
        n - o == pytest.approx(gap) for n, o in zip(fresh.detector, old.detector, strict=True)
    )
    with pytest.raises(ValueError, match="scheme"):
        Evidence.from_json({**saved, "scheme": 7})


def test_evidence_persists_with_the_detector() -> None:
    """The detector's state round-trips through JSON (a start's -inf as null)."""
    evidence = Evidence().add(1.5, 0, 0, 0, 0, T0).add(1.5, 2, 50, 3, 450, T0)
    assert Evidence.from_json(evidence.to_json()) == evidence
    assert math.isfinite(evidence.alarm(1.5))


@pytest.mark.parametrize("scheme", [0, 1])
def test_the_reported_lower_bound_exceeds_max_ratio_exactly_when_the_rule_breaches(
    scheme: int,
) -> None:
    """Over random canaries (splits, ratios, lengths), an evaluation's lower bound is at least
    max_ratio exactly when the detector breaches, though the interval and the detector mix the
    alternatives differently."""
    rng = random.Random(f"interval/{scheme}")
    for _ in range(150):
        evidence, max_ratio = Evidence(scheme=scheme), rng.choice([1.2, 1.5, 2.0])
        factor = rng.choice([1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0])
        for _ in range(rng.randint(1, 40)):
            canary, stable = rng.choice([(50, 450), (250, 250), (10, 90)])
            canary_events = sum(rng.random() < 0.005 * factor for _ in range(canary))
            stable_events = sum(rng.random() < 0.005 for _ in range(stable))
            evidence = evidence.add(
                max_ratio, canary_events, canary, stable_events, stable, T0, horizon=180
            )
            low, high = evidence.interval(0.99, max_ratio)
            assert (low >= max_ratio) == (evidence.alarm(max_ratio) >= BAR)
            assert low <= high
