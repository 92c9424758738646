"""Compare rules: the anytime-valid canary-vs-stable test, in the policy, the engine and replay."""

from __future__ import annotations

import json
import math
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coalmine.cli.replay import parse_records, replay
from coalmine.engine import Engine, Observation, RolloutState, RuleStatus
from coalmine.engine.compare import GRID, SINCE_START, Evidence, _log_e
from coalmine.errors import PolicyError
from coalmine.policyfile import parse_policy
from tests.support import T0, Rollout, at, make_policy

POLICY = """
version: 1
name: compare
scripts: [api]
analysis: {interval: 30s, warmup: 0s}
steps: [{weight: 10, hold: 30m}, {weight: 50, hold: 30m}, {weight: 100}]
rules:
  - name: errs
    source: prometheus
    events: sum(increase(errors_total{version="$version"}[$window]))
    samples: sum(increase(requests_total{version="$version"}[$window]))
    window: 30s
    min_samples: 100
    compare: {max_ratio: 1.5, confidence: 0.99}
    on_breach: rollback
"""


def counts(canary: tuple[float, float], stable: tuple[float, float]) -> list[Observation]:
    """One tick's observations: (events, requests) of each version over the rule's window."""
    return [
        Observation("errs", "canary", None, canary[1], events=canary[0]),
        Observation("errs", "stable", None, stable[1], events=stable[0]),
    ]


# ---- the statistics ----------------------------------------------------------------------


def binomial(n: int, k: int, p: float) -> float:
    """P(X = k) for X ~ Binomial(n, p)."""
    return math.comb(n, k) * p**k * (1 - p) ** (n - k)


@pytest.mark.parametrize("ratio", [0.25, 1.0, 1.5])
@pytest.mark.parametrize(("events", "split"), [(1, 0.1), (5, 0.1), (20, 0.5), (40, 0.02)])
def test_each_window_multiplies_the_e_value_by_at_most_one_on_average_under_the_null(
    ratio: float, events: int, split: float
) -> None:
    """The supermartingale step, computed exactly: for any true ratio within max_ratio, the
    expected factor one window contributes to the e-value is <= 1. This is what makes it safe
    to look at every poll (Ville's inequality)."""
    max_ratio = 1.5
    canary_requests, stable_requests = 1000 * split, 1000 * (1 - split)
    a = canary_requests / stable_requests
    theta = ratio * a / (ratio * a + 1)  # the canary's share of events under the truth
    expected = 0.0
    for k in range(events + 1):
        window = Evidence().add(max_ratio, k, canary_requests, events - k, stable_requests, T0)
        expected += binomial(events, k, theta) * window.e_value(max_ratio)
    assert expected <= 1.0 + 1e-9


def test_no_events_no_evidence() -> None:
    """Requests without a single event say nothing about the ratio: e-value 1, no estimate."""
    evidence = Evidence().add(1.5, 0, 100, 0, 900, T0)
    assert evidence.e_value(1.5) == 1.0
    assert evidence.estimate() is None
    assert evidence.interval(0.99) == (0.0, math.inf)
    assert (evidence.canary_samples, evidence.stable_samples, evidence.windows) == (100, 900, 1)


def test_a_gross_regression_is_rejected_and_the_interval_brackets_it() -> None:
    """Canary at 10x the stable rate over enough traffic: the test rejects and the interval
    holds the truth, above max_ratio."""
    evidence = Evidence()
    for _ in range(10):  # 10 windows of 100 canary and 900 stable requests, 10% vs 1%
        evidence = evidence.add(1.5, 10, 100, 9, 900, T0)
    assert evidence.e_value(1.5) > 100
    assert evidence.estimate() == pytest.approx(10.0)
    low, high = evidence.interval(0.99)
    assert 1.5 < low < 10 < high < 100


def test_equal_rates_are_not_rejected_and_the_interval_holds_one() -> None:
    """Canary and stable alike: the e-value stays small and the interval brackets 1."""
    evidence = Evidence()
    for _ in range(20):
        evidence = evidence.add(1.5, 1, 100, 9, 900, T0)
    assert evidence.e_value(1.5) < 1
    low, high = evidence.interval(0.99)
    assert low < 1 < high


def test_only_canary_events_estimate_infinity() -> None:
    """Events in the canary alone: the ratio estimate is +Inf, not a division error."""
    evidence = Evidence().add(1.5, 3, 100, 0, 900, T0)
    assert evidence.estimate() == math.inf


def test_evidence_round_trips_through_json() -> None:
    """The evidence persists with the rollout state without loss."""
    evidence = Evidence().add(1.5, 4, 120, 7, 880, T0).add(1.5, 0, 0, 2, 30, at(30))
    text = json.dumps(evidence.to_json(), allow_nan=False)
    assert Evidence.from_json(json.loads(text)) == evidence
    assert len(evidence.loglik) == len(GRID)


# ---- the policy ---------------------------------------------------------------------------


def test_the_issue_examples_parse() -> None:
    """The two rules of the issue load, side by side with an absolute rule."""
    policy = make_policy(
        POLICY
        + """
  - name: exceptions_vs_stable
    source: cloudflare
    signal: errors
    compare: {max_ratio: 1.5}
    on_breach: rollback
  - {name: absolute, source: cloudflare, signal: error_ratio, above: 0.01}
"""
    )
    rule = policy.rules[1]
    assert rule.compare is not None
    assert (rule.compare.max_ratio, rule.compare.confidence) == (1.5, 0.99)
    assert rule.threshold == 1.5


@pytest.mark.parametrize(
    ("rule", "field", "message"),
    [
        (
            "{name: c, source: cloudflare, signal: errors, above: 1, compare: {max_ratio: 2}}",
            "above",
            "not above/below",
        ),
        (
            "{name: c, source: cloudflare, signal: error_ratio, compare: {max_ratio: 2}}",
            "signal",
            "signal errors",
        ),
        ("{name: c, source: prometheus, samples: x, compare: {max_ratio: 2}}", "events", "events"),
        ("{name: c, source: prometheus, events: x, compare: {max_ratio: 2}}", "samples", "samples"),
        (
            "{name: c, source: prometheus, query: x, events: x, samples: y, "
            "compare: {max_ratio: 2}}",
            "query",
            "no `query`",
        ),
        ("{name: c, source: prometheus, query: x, events: y, above: 1}", "events", "compare"),
        (
            "{name: c, source: cloudflare, signal: errors, compare: {max_ratio: 2}, "
            "phases: [canary, post_promotion]}",
            "phases",
            "canary phase only",
        ),
        (
            "{name: c, source: cloudflare, signal: errors, compare: {max_ratio: 0}}",
            "max_ratio",
            "greater than 0",
        ),
        (
            "{name: c, source: cloudflare, signal: errors, compare: {max_ratio: 2, confidence: 1}}",
            "confidence",
            "less than 1",
        ),
    ],
)
def test_bad_compare_rules_name_the_field(rule: str, field: str, message: str) -> None:
    """Every misuse of a compare rule is an error naming the file, line and field."""
    text = "version: 1\nname: p\nscripts: [api]\nsteps: [{weight: 10}, {weight: 100}]\n"
    text += f"rules:\n  - {rule}\n"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    problems = [str(p) for p in caught.value.problems]
    assert any(p.startswith("p.yaml:6:") and field in p and message in p for p in problems), (
        problems
    )


# ---- the engine ---------------------------------------------------------------------------


def test_a_ten_times_worse_canary_is_rolled_back_with_the_ratio_and_interval() -> None:
    """Stable at 0.5%, canary at 5%, 1,000 req/min at a 10% split: rolled back within
    minutes, and the decision carries the estimate, its interval and the counts."""
    rollout = Rollout(make_policy(POLICY))
    for i in range(1, 60):
        rollout.tick(30 * i, *counts((2.5, 50), (2.25, 450)))
        if rollout.state.phase.value == "rolled_back":
            break
    rollback = next(d for d in rollout.decisions if d.action == "rollback")
    assert rollback.t <= at(4 * 60)
    assert rollback.rule == "errs"
    assert rollback.threshold == 1.5
    assert rollback.value is not None and rollback.value > 5
    assert rollback.interval is not None and rollback.interval[0] >= 1.5
    assert "canary/stable rate ratio" in rollback.reason
    assert "since the canary started" in rollback.reason
    page = next(d for d in rollout.decisions if d.action == "page")
    assert page.to_dict()["interval"] == list(rollback.interval)


def test_a_shared_incident_does_not_trip_a_compare_rule() -> None:
    """Both versions at 10x their usual error rate together: the ratio stays near 1."""
    rollout = Rollout(make_policy(POLICY))
    for i in range(1, 120):
        rollout.tick(30 * i, *counts((2.5, 50), (22.5, 450)))
    assert "rollback" not in rollout.actions()
    assert rollout.state.rules["errs"].status in (RuleStatus.OK, RuleStatus.INCONCLUSIVE)


def test_too_few_canary_requests_is_inconclusive_never_a_pass() -> None:
    """Below min_samples (here 100) in the step the rule holds the rollout."""
    rollout = Rollout(make_policy(POLICY))
    rollout.tick(30, *counts((0, 40), (0, 360)))
    track = rollout.state.rules["errs"]
    assert track.status is RuleStatus.INCONCLUSIVE
    assert "40 canary requests since the canary started < min_samples 100" in track.detail
    rollout.tick(60, *counts((0, 40), (0, 360)))
    rollout.tick(90, *counts((0, 40), (0, 360)))
    assert rollout.state.rules["errs"].status is RuleStatus.OK  # 120 requests, no events


@pytest.mark.parametrize(
    ("canary", "why"),
    [
        (Observation("errs", "canary", None, 50, "timeout"), "source error: timeout"),
        (Observation("errs", "canary", None, 50), "no data"),
        (Observation("errs", "canary", None, 50, events=math.nan), "events is nan"),
        (Observation("errs", "canary", None, None, events=3), "no sample count"),
    ],
)
def test_missing_or_broken_counts_are_inconclusive(canary: Observation, why: str) -> None:
    """A failed or malformed observation of either version is inconclusive."""
    rollout = Rollout(make_policy(POLICY))
    rollout.tick(30, *counts((0, 500), (0, 4500)))
    assert rollout.state.rules["errs"].status is RuleStatus.OK
    rollout.tick(60, canary, Observation("errs", "stable", None, 450, events=2))
    track = rollout.state.rules["errs"]
    assert track.status is RuleStatus.INCONCLUSIVE
    assert why in track.detail
    rollout.tick(90, *counts((0, 50), (0, 450)))
    rollout.tick(120, Observation("errs", "canary", None, 50, events=0))  # no stable at all
    assert rollout.state.rules["errs"].detail == "stable: no observation"


def test_a_window_is_counted_once() -> None:
    """An observation of a window already counted (an early tick, a repeated analytics window)
    adds nothing; the next window does."""
    rollout = Rollout(make_policy(POLICY))
    span = (at(0), at(60))
    repeated = [
        Observation("errs", "canary", None, 100, events=1, span=span),
        Observation("errs", "stable", None, 900, events=9, span=span),
    ]
    rollout.tick(60, *repeated)
    rollout.tick(90, *repeated)
    evidence = rollout.state.rules["errs"].evidence
    assert evidence is not None
    assert (evidence.canary_samples, evidence.windows, evidence.covered_until) == (100, 1, at(60))
    rollout.tick(120, *counts((1, 100), (9, 900)))  # window 90..120 starts after 60
    evidence = rollout.state.rules["errs"].evidence
    assert evidence is not None
    assert (evidence.canary_samples, evidence.windows) == (200, 2)


def test_evidence_carries_across_traffic_changes() -> None:
    """Evidence gathered at 10% is kept at 50%: each window counts at its own split."""
    rollout = Rollout(make_policy(POLICY))
    for i in range(1, 61):
        rollout.tick(30 * i, *counts((0, 50), (2, 450)))
    assert rollout.state.canary_percent == 50
    before = rollout.state.rules["errs"].evidence
    assert before is not None
    rollout.tick(30 * 61, *counts((0, 250), (1, 250)))
    evidence = rollout.state.rules["errs"].evidence
    assert evidence is not None
    assert evidence.canary_samples == before.canary_samples + 250
    assert evidence.stable_samples == before.stable_samples + 250


def test_state_with_evidence_round_trips() -> None:
    """A rollout mid-comparison persists and resumes with the same evidence."""
    rollout = Rollout(make_policy(POLICY))
    rollout.tick(30, *counts((3, 120), (5, 880)))
    text = json.dumps(rollout.state.to_json(), allow_nan=False)
    restored = RolloutState.from_json(json.loads(text))
    assert restored.rules == rollout.state.rules


def test_an_absolute_rule_says_when_both_versions_breach() -> None:
    """A shared incident tripping an absolute rule says so in the page."""
    rollout = Rollout(
        make_policy(
            """
version: 1
name: abs
scripts: [api]
analysis: {interval: 30s, warmup: 0s}
steps: [{weight: 10, hold: 30m}, {weight: 100}]
rules:
  - {name: err, source: cloudflare, signal: error_ratio, above: 0.01, on_breach: page}
"""
        )
    )
    rollout.tick(
        30,
        Observation("err", "canary", 0.05, 100),
        Observation("err", "stable", 0.04, 900),
    )
    page = next(d for d in rollout.decisions if d.action == "page")
    assert "stable 0.04 breaches too: both versions are affected" in page.reason
    rollout2 = Rollout(rollout.engine.policy)
    rollout2.tick(
        30, Observation("err", "canary", 0.05, 100), Observation("err", "stable", 0.001, 900)
    )
    page = next(d for d in rollout2.decisions if d.action == "page")
    assert "both versions" not in page.reason


def test_replay_reads_events_lines() -> None:
    """The replay format carries events and samples per version per tick."""
    policy = make_policy(POLICY)
    lines = [
        '{"t": "2026-03-03T18:00:00Z", "deployment": {"canary": "v2", "stable": "v1", '
        '"canary_percent": 10}}'
    ]
    for i in range(1, 11):
        t = (T0 + timedelta(seconds=30 * i)).isoformat().replace("+00:00", "Z")
        lines.append(
            f'{{"t": "{t}", "rule": "errs", "version": "canary", "events": 3, "samples": 50}}'
        )
        lines.append(
            f'{{"t": "{t}", "rule": "errs", "version": "stable", "events": 2, "samples": 450}}'
        )
    records = list(parse_records(lines, "in.jsonl", [r.name for r in policy.rules]))
    assert records[1].observation is not None
    assert records[1].observation.events == 3
    assert records[1].observation.value == pytest.approx(0.06)
    assert json.loads(records[1].to_json())["events"] == 3
    decisions = list(replay(Engine(policy), records, "api"))
    assert [d.action for d in decisions if d.action == "rollback"] == ["rollback"]


def test_the_interval_agrees_with_the_test() -> None:
    """The lower bound exceeds max_ratio exactly when the rule's test rejects; bounds found by
    bisection equal those found by trying every grid ratio."""
    evidence = Evidence()
    for step in range(40):
        evidence = evidence.add(1.5, step % 4, 100, 3, 900, T0)
        rejects = evidence.alarm(1.5) >= 100
        low, high = evidence.interval(0.99, 1.5)
        assert (low >= 1.5) == rejects
        assert low <= high
        plain_low, plain_high = evidence.interval(0.99)
        bar = math.log(100 / SINCE_START)  # the since-start share of the budget
        everywhere = [
            GRID[k]
            for k in range(len(GRID))
            if _log_e(evidence.loglik, evidence.loglik[k], k, True) >= bar
        ]
        assert plain_low == (max(everywhere) if everywhere else 0.0)
        assert plain_high >= plain_low


COUNT = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1e7),
    st.integers(min_value=0, max_value=10**6).map(float),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(COUNT, COUNT, COUNT, COUNT), min_size=1, max_size=12))
def test_any_counts_never_crash_and_broken_ones_never_pass(
    ticks: list[tuple[float | None, float | None, float | None, float | None]],
) -> None:
    """Whatever the sources hand over, the judge answers; a tick with a count that is not a
    count (missing, NaN, infinite, negative) is inconclusive, never a pass."""
    rollout = Rollout(make_policy(POLICY))
    for i, (ce, cs, se, ss) in enumerate(ticks, start=1):
        rollout.tick(
            30 * i,
            Observation("errs", "canary", None, cs, events=ce),
            Observation("errs", "stable", None, ss, events=se),
        )
        track = rollout.state.rules.get("errs")
        if track is None:  # rolled back: the rollout is over
            break
        broken = any(v is None or not math.isfinite(v) or v < 0 for v in (ce, cs, se, ss))
        if broken:
            assert track.status is RuleStatus.INCONCLUSIVE
        json.dumps(rollout.state.to_json(), allow_nan=False)


def test_by_default_a_thousand_canary_requests_before_a_pass_but_a_breach_at_once() -> None:
    """Without min_samples a compare rule needs 1,000 canary requests in the step to pass;
    a rejection needs no minimum (the test is valid at any sample size)."""
    policy = make_policy(POLICY.replace("    min_samples: 100\n", ""))
    quiet = Rollout(policy)
    for i in range(1, 10):
        quiet.tick(30 * i, *counts((0, 100), (1, 900)))
    assert quiet.state.rules["errs"].status is RuleStatus.INCONCLUSIVE
    assert (
        "900 canary requests since the canary started < min_samples 1000"
        in quiet.state.rules["errs"].detail
    )
    quiet.tick(300, *counts((0, 100), (1, 900)))
    assert quiet.state.rules["errs"].status is RuleStatus.OK
    bad = Rollout(policy)
    for i in range(1, 10):
        bad.tick(30 * i, *counts((10, 50), (1, 450)))
        if "rollback" in bad.actions():
            break
    assert "rollback" in bad.actions()
    assert bad.decisions[-2].samples is not None and bad.decisions[-2].samples < 1000
