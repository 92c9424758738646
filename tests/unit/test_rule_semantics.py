"""DESIGN.md "Rule semantics" and its exact boundaries, one test per sentence.

Each test's docstring quotes the sentence it pins. The clock is virtual: ``at(s)`` is T0 + s.
"""

from __future__ import annotations

import math
from datetime import datetime

import pytest

from coalmine.engine import Observation, RolloutPhase, RuleStatus
from coalmine.policy import Policy
from tests.support import Rollout, at, make_policy

BASE = """
version: 1
name: semantics
scripts: [api]
analysis: {{interval: 10s, warmup: {warmup}, inconclusive_page_after: {page_after}}}
steps: [{{weight: 10, hold: {hold}}}, {{weight: 50, hold: {hold}}}, {{weight: 100}}]
post_promotion: {{watch: {watch}}}
rules:
{rules}
"""
ERR = (
    "  - {name: err, source: prometheus, query: q, samples: s, min_samples: 100,"
    " above: 0.05, for: 30s, on_breach: rollback}"
)


def policy(
    rules: str = ERR,
    warmup: str = "0s",
    hold: str = "10m",
    page_after: str = "1m",
    watch: str = "1h",
) -> Policy:
    """A two-step policy with the given rules (YAML list items) and durations."""
    return make_policy(
        BASE.format(rules=rules, warmup=warmup, hold=hold, page_after=page_after, watch=watch)
    )


def only(decisions: list, action: str) -> list:  # type: ignore[type-arg]
    """The decisions with the given action."""
    return [d for d in decisions if d.action == action]


# --- "Each evaluation of a rule gives a value and, where known, a sample count" -------------


def test_decisions_carry_value_samples_threshold_window_and_breach_start() -> None:
    """ "Each evaluation of a rule gives a value and, where known, a sample count (requests)."

    A trip's decision carries value, samples, threshold, window, breached_since and the stable
    value as context.
    """
    r = Rollout(policy())
    r.tick(10, Observation("err", "canary", 0.2, 500), Observation("err", "stable", 0.01, 4500))
    r.value(20, 0.2, 500)
    (rollback,) = only(r.value(40, 0.3, 600), "rollback")
    assert (rollback.rule, rollback.value, rollback.samples) == ("err", 0.3, 600)
    assert rollback.threshold == 0.05
    assert rollback.window is not None
    assert rollback.window.total_seconds() == 60
    assert rollback.breached_since == at(10)
    assert rollback.stable_value is None  # no stable observation at this tick
    assert r.state.phase is RolloutPhase.ROLLED_BACK


# --- Inconclusive --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "samples", "error", "why"),
    [
        (None, 1000, None, "no data"),
        (math.nan, 1000, None, "value is NaN"),
        (math.inf, 1000, None, "value is +Inf"),
        (-math.inf, 1000, None, "value is -Inf"),
        (0.01, 1000, "timeout", "source error: timeout"),
        (0.01, 99, None, "99 samples < min_samples 100"),
        (0.01, None, None, "no sample count (min_samples 100)"),
        (0.01, math.nan, None, "nan samples < min_samples 100"),
    ],
)
def test_inconclusive_kinds(
    value: float | None, samples: float | None, error: str | None, why: str
) -> None:
    """ "Inconclusive: no data, empty result, NaN, ±Inf, source error or timeout, or fewer samples
    than `min_samples`." Each of these leaves the rule inconclusive, with the reason kept."""
    r = Rollout(policy())
    r.value(10, value, samples, error=error)
    track = r.state.rules["err"]
    assert track.status is RuleStatus.INCONCLUSIVE
    assert track.detail == why


def test_missing_observation_is_inconclusive() -> None:
    """ "a missing rule at a tick is inconclusive" (replay format)."""
    r = Rollout(policy())
    r.tick(10)
    assert r.state.rules["err"].status is RuleStatus.INCONCLUSIVE
    assert r.state.rules["err"].detail == "no observation"


def test_inconclusive_never_passes_a_gate() -> None:
    """ "Inconclusive never passes a gate": with the hold over, an inconclusive gate holds."""
    r = Rollout(policy(hold="30s"))
    decisions = r.value(30, None) + r.value(40, None)
    assert r.actions(decisions) == ["hold"]
    assert "err inconclusive (no data)" in decisions[0].reason
    assert r.state.canary_percent == 10


def test_inconclusive_never_by_itself_trips_a_rollback() -> None:
    """ "...and never by itself trips a rollback: the rollout holds, and pages after
    `analysis.inconclusive_page_after`." An hour of NaN: no rollback, one warning page."""
    r = Rollout(policy(page_after="1m"))
    for s in range(10, 3600, 10):
        r.value(s, math.nan)
    assert "rollback" not in r.actions()
    pages = only(r.decisions, "page")
    assert len(pages) == 1
    assert pages[0].severity == "warning"
    assert pages[0].t == at(70)  # first inconclusive at 10s, + 1m
    assert r.state.phase is RolloutPhase.CANARY


# --- Breaching ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bound", "value", "breaching"),
    [
        ("above: 0.05", 0.0501, True),
        ("above: 0.05", 0.05, False),
        ("above: 0.05", 0.0499, False),
        ("below: 100", 99.9, True),
        ("below: 100", 100, False),
        ("below: 100", 100.1, False),
    ],
)
def test_breaching_is_strictly_the_wrong_side(bound: str, value: float, breaching: bool) -> None:
    """ "`above: x` breaches when value > x; `below: x` when value < x (a value equal to x is not
    breaching)." """
    rules = f"  - {{name: err, source: prometheus, query: q, {bound}, on_breach: page}}"
    r = Rollout(policy(rules))
    r.value(10, value)
    track = r.state.rules["err"]
    assert track.status is (RuleStatus.BREACHING if breaching else RuleStatus.OK)
    assert r.actions() == (["start", "page"] if breaching else ["start"])


def test_absolute_rules_judge_the_canary_not_the_stable() -> None:
    """ "Absolute rules judge the canary's observation; `stable` observations are context." """
    r = Rollout(policy())
    for s in (10, 20, 30, 40, 50):
        r.tick(s, Observation("err", "canary", 0.01, 1000), Observation("err", "stable", 0.9, 9000))
    assert r.state.rules["err"].status is RuleStatus.OK
    assert r.state.rules["err"].stable_value == 0.9
    assert "rollback" not in r.actions()


# --- Tripped ------------------------------------------------------------------------------


def test_first_breach_sets_breached_since() -> None:
    """ "the first breaching evaluation sets `breached_since`" """
    r = Rollout(policy())
    r.value(10, 0.01)
    r.value(20, 0.2)
    r.value(30, 0.3)
    assert r.state.rules["err"].breached_since == at(20)


def test_conclusive_non_breaching_clears_breached_since() -> None:
    """ "a conclusive non-breaching one clears it" — the clock restarts at the next breach."""
    r = Rollout(policy())
    r.value(10, 0.2)
    r.value(20, 0.2)
    r.value(30, 0.01)
    assert r.state.rules["err"].breached_since is None
    r.value(40, 0.2)
    r.value(60, 0.2)
    assert "rollback" not in r.actions()  # 20s since the new breach, for is 30s
    r.value(70, 0.2)
    assert "rollback" in r.actions()


def test_inconclusive_neither_confirms_nor_clears() -> None:
    """ "an inconclusive one neither confirms nor clears it" """
    r = Rollout(policy())
    r.value(10, 0.2)
    r.value(20, None)
    assert r.state.rules["err"].breached_since == at(10)
    r.value(40, math.nan)  # at breached_since + for, but inconclusive: no trip
    assert "rollback" not in r.actions()
    assert r.state.rules["err"].breached_since == at(10)


def test_trips_at_first_conclusive_breach_at_or_after_for() -> None:
    """ "the rule trips at the first conclusive breaching evaluation at or after
    `breached_since + for`" — after an inconclusive gap, the next breach trips."""
    r = Rollout(policy())
    r.value(10, 0.2)
    r.value(30, 0.2)
    assert "rollback" not in r.actions()  # 20s < 30s
    r.value(40, None)
    (rollback,) = only(r.value(50, 0.2), "rollback")
    assert rollback.breached_since == at(10)
    assert rollback.t == at(50)


def test_for_is_inclusive() -> None:
    """ "`for` and `hold` are inclusive (elapsed ≥ duration)": breach at 10s + for 30s = 40s."""
    r = Rollout(policy())
    r.value(10, 0.2)
    assert only(r.value(39.999, 0.2), "rollback") == []
    assert len(only(r.value(40, 0.2), "rollback")) == 1


def test_for_zero_trips_at_once() -> None:
    """ "(`for: 0s` trips at once)" """
    rules = (
        "  - {name: err, source: prometheus, query: q, above: 0.05, for: 0s, on_breach: rollback}"
    )
    r = Rollout(policy(rules))
    assert r.actions(r.value(10, 0.2)) == ["rollback", "page"]


def test_hold_is_inclusive() -> None:
    """ "`for` and `hold` are inclusive (elapsed ≥ duration)": hold 30s advances exactly at 30s."""
    r = Rollout(policy(hold="30s"))
    r.value(20, 0.01)
    assert r.actions(r.value(29, 0.01)) == []
    assert r.actions(r.value(30, 0.01)) == ["set_traffic"]


# --- Warm-up ------------------------------------------------------------------------------


def test_warmup_evaluates_but_does_not_judge() -> None:
    """ "Warm-up: for `analysis.warmup` after each traffic change, rules are evaluated and exported
    but not judged: those evaluations neither start nor clear a breach, and count as inconclusive
    for gates." """
    r = Rollout(policy(warmup="1m", hold="30s"))
    decisions = r.value(30, 0.9) + r.value(50, 0.9)
    track = r.state.rules["err"]
    assert track.status is RuleStatus.WARMUP
    assert track.value == 0.9
    assert track.breaching
    assert track.breached_since is None  # not started
    assert r.actions(decisions) == ["hold"]  # counts as inconclusive for the gate
    assert "err in warm-up" in decisions[0].reason
    r.value(60, 0.9)  # warm-up over: judged from here
    assert r.state.rules["err"].breached_since == at(60)


def test_warmup_does_not_judge_recovery() -> None:
    """Warm-up evaluations are "not judged": a healthy value in the warm-up after a traffic change
    does not count as the recovery of a page opened before it; the first judged one does."""
    rules = "  - {name: p, source: prometheus, query: q, above: 1, on_breach: page}"
    r = Rollout(policy(rules, warmup="30s", hold="40s"))
    r.value(30, 5, rule="p")  # judged: trips at once, pages
    assert r.actions()[-1] == "page"
    r.value(40, 5, rule="p")  # hold over, page rules do not gate: advance to 50%, warm-up to 70s
    assert r.state.canary_percent == 50
    assert only(r.value(50, 0.5, rule="p"), "resolve") == []  # in warm-up: not judged
    assert r.state.rules["p"].status is RuleStatus.WARMUP
    assert len(only(r.value(70, 0.5, rule="p"), "resolve")) == 1


# --- On trip ------------------------------------------------------------------------------


def test_rollback_trip_rolls_back_and_pages_critical() -> None:
    """ "On trip: `rollback` rolls back and pages at critical severity" """
    rules = (
        "  - {name: err, source: prometheus, query: q, above: 0.05, for: 0s, on_breach: rollback,"
        " phases: [canary]}"
    )
    r = Rollout(policy(rules))
    rollback, page = r.value(10, 0.5)
    assert (rollback.action, rollback.canary_percent) == ("rollback", 0)
    assert (page.action, page.severity, page.dedup_key) == (
        "page",
        "critical",
        "coalmine/api/v2/err",
    )
    assert r.state.phase is RolloutPhase.ROLLED_BACK


def test_rollback_trip_with_auto_rollback_off_pages_and_holds() -> None:
    """ "(with auto-rollback off: pages and holds)" """
    rules = (
        "  - {name: err, source: prometheus, query: q, above: 0.05, for: 0s, on_breach: rollback}"
    )
    r = Rollout(policy(rules), auto_rollback=False)
    page, hold = r.value(10, 0.5)
    assert (page.action, page.severity) == ("page", "critical")
    assert hold.action == "hold"
    assert "auto-rollback is off" in hold.reason
    assert r.state.phase is RolloutPhase.CANARY
    assert r.state.canary_percent == 10


def test_hold_trip_blocks_and_pages() -> None:
    """ "`hold` blocks advancement and pages" """
    rules = "  - {name: gate, source: prometheus, query: q, above: 0.05, for: 0s, on_breach: hold}"
    r = Rollout(policy(rules, hold="30s"))
    page, hold = r.value(10, 0.5, rule="gate")
    assert (page.action, page.severity, hold.action) == ("page", "error", "hold")
    r.value(40, 0.5, rule="gate")
    assert r.state.canary_percent == 10
    assert "set_traffic" not in r.actions()


def test_page_rule_pages_and_warn_rule_warns() -> None:
    """ "`page` pages PagerDuty; `warn` posts to Slack." Neither holds nor rolls back."""
    rules = (
        "  - {name: p, source: prometheus, query: q, above: 1, on_breach: page, severity: info}\n"
        "  - {name: w, source: prometheus, query: q, above: 1, on_breach: warn}"
    )
    r = Rollout(policy(rules, hold="20s"))
    decisions = r.tick(20, Observation("p", "canary", 5), Observation("w", "canary", 5))
    assert [(d.action, d.rule, d.severity) for d in decisions] == [
        ("page", "p", "info"),
        ("warn", "w", None),
        ("set_traffic", None, None),
    ]


def test_page_resolved_under_same_key_when_rule_recovers() -> None:
    """ "A page is resolved, under the same dedup key, when its rule recovers" """
    rules = "  - {name: gate, source: prometheus, query: q, above: 0.05, on_breach: hold}"
    r = Rollout(policy(rules))
    (page, _) = r.value(10, 0.5, rule="gate")
    (resolve,) = r.value(20, 0.01, rule="gate")
    assert resolve.action == "resolve"
    assert resolve.dedup_key == page.dedup_key
    assert resolve.dedup_key == "coalmine/api/v2/gate"


def test_page_resolved_when_rollout_ends() -> None:
    """ "...or the rollout ends": an open hold page is resolved by a rollback."""
    rules = "  - {name: gate, source: prometheus, query: q, above: 0.05, on_breach: hold}"
    r = Rollout(policy(rules))
    r.value(10, 0.5, rule="gate")
    decisions = r.command(20, "rollback")
    assert [(d.action, d.dedup_key) for d in decisions] == [
        ("rollback", None),
        ("resolve", "coalmine/api/v2/gate"),
    ]


def test_rollback_page_stays_open() -> None:
    """ "A rollback's page stays open for a person to resolve" — never auto-resolved."""
    rules = "  - {name: err, source: prometheus, query: q, above: 0.05, on_breach: rollback}"
    r = Rollout(policy(rules))
    r.value(10, 0.5)
    r.value(20, 0.01)
    r.deploy(30, "v1", "v3", 10)  # a new rollout
    r.value(40, 0.01)
    assert only(r.decisions, "resolve") == []


def test_pages_of_canary_rules_resolve_at_promotion() -> None:
    """ "every other page is resolved ... when its phase ends (canary rules at promotion)" """
    rules = "  - {name: p, source: prometheus, query: q, above: 1, on_breach: page}"
    r = Rollout(policy(rules, hold="10s"))
    r.value(5, 5, rule="p")
    r.value(10, 5, rule="p")  # step 2
    decisions = r.value(20, 5, rule="p")  # step 3 = promote
    assert r.actions(decisions) == ["resolve", "promote"]
    assert decisions[0].dedup_key == "coalmine/api/v2/p"


# --- Exact semantics: severities, keys, inconclusive pages ----------------------------------


@pytest.mark.parametrize(
    ("on_breach", "severity", "expected"),
    [
        ("hold", None, "error"),
        ("page", None, "error"),
        ("hold", "warning", "warning"),
        ("page", "critical", "critical"),
    ],
)
def test_page_severity(on_breach: str, severity: str | None, expected: str) -> None:
    """ "severity `critical` for a tripped `rollback` rule ..., `error` for `hold` trips and `page`
    rules unless the rule sets `severity`" """
    extra = f", severity: {severity}" if severity else ""
    rules = (
        f"  - {{name: r, source: prometheus, query: q, above: 1, on_breach: {on_breach}{extra}}}"
    )
    r = Rollout(policy(rules))
    (page,) = only(r.value(10, 5, rule="r"), "page")
    assert page.severity == expected


def test_inconclusive_page_counts_from_first_inconclusive_including_warmup() -> None:
    """ "The inconclusive page fires once a gating rule has been inconclusive continuously for
    `inconclusive_page_after`, counted from its first inconclusive evaluation (warm-up evaluations
    included); severity `warning`; resolved when the rule is conclusive again." """
    r = Rollout(policy(warmup="1m", page_after="1m"))
    r.value(10, None)  # inside warm-up: the clock starts here
    assert only(r.value(69, None), "page") == []
    (page,) = only(r.value(70, None), "page")
    assert (page.severity, page.dedup_key) == ("warning", "coalmine/api/v2/err/inconclusive")
    assert only(r.value(80, None), "page") == []  # once
    (resolve,) = only(r.value(90, 0.01), "resolve")
    assert resolve.dedup_key == page.dedup_key


def test_conclusive_evaluation_restarts_the_inconclusive_clock() -> None:
    """Inconclusive "continuously": a conclusive evaluation in between restarts the count."""
    r = Rollout(policy(page_after="1m"))
    r.value(10, None)
    r.value(50, 0.01)
    r.value(60, None)
    assert only(r.value(110, None), "page") == []
    assert len(only(r.value(120, None), "page")) == 1


def test_non_gating_rules_do_not_page_when_inconclusive() -> None:
    """The inconclusive page is for gating rules: a `page` rule without data stays quiet."""
    rules = "  - {name: p, source: prometheus, query: q, above: 1, on_breach: page}"
    r = Rollout(policy(rules, page_after="1m"))
    for s in range(10, 300, 10):
        r.value(s, None, rule="p")
    assert only(r.decisions, "page") == []


def test_min_samples_without_sample_count_is_inconclusive() -> None:
    """ "A rule with `min_samples` whose observation has no sample count is inconclusive." """
    r = Rollout(policy())
    r.value(10, 0.9, samples=None)
    assert r.state.rules["err"].status is RuleStatus.INCONCLUSIVE


def test_duplicate_observations_last_wins() -> None:
    """ "Duplicate observations of one rule, version and tick: the last wins." """
    r = Rollout(policy())
    r.tick(10, Observation("err", "canary", 0.9, 1000), Observation("err", "canary", 0.01, 1000))
    assert r.state.rules["err"].status is RuleStatus.OK
    r.tick(20, Observation("err", "canary", 0.01, 1000), Observation("err", "canary", 0.9, 1000))
    assert r.state.rules["err"].status is RuleStatus.BREACHING


def test_traffic_change_starts_warmup_and_clears_breaches() -> None:
    """ "Every traffic change — adoption included — starts a warm-up and clears every rule's breach
    tracking." """
    r = Rollout(policy(warmup="20s", hold="30s"), auto_promote=True)
    assert r.state.warmup_until == at(20)  # adoption started one
    r.value(20, 0.01)
    r.value(30, 0.01)  # advances to 50%
    assert r.state.canary_percent == 50
    assert r.state.warmup_until == at(50)


# --- Deployment windows --------------------------------------------------------------------

WINDOWED = """
version: 1
name: windows
scripts: [api]
analysis: {interval: 10s, warmup: 0s}
steps: [{weight: 10, hold: 0s}, {weight: 100}]
post_promotion: {watch: 1h}
deployment_windows:
  timezone: America/Los_Angeles
  allow: [{days: [tue, wed, thu], from: "10:00", to: "16:00"}]
rules: []
"""


@pytest.mark.parametrize(
    ("utc", "inside"),
    [
        ("2026-03-03T18:00:00+00:00", True),  # Tue 10:00 PST: `from` is inclusive
        ("2026-03-03T17:59:59+00:00", False),  # Tue 09:59:59 PST
        ("2026-03-03T23:59:59+00:00", True),  # Tue 15:59:59 PST
        ("2026-03-04T00:00:00+00:00", False),  # Tue 16:00 PST: `to` is exclusive
        ("2026-03-10T17:00:00+00:00", True),  # Tue 10:00 PDT (DST began Sun 8 March)
        ("2026-03-10T18:00:00+00:00", True),  # Tue 11:00 PDT
        ("2026-03-10T23:00:00+00:00", False),  # Tue 16:00 PDT
        ("2026-11-03T18:00:00+00:00", True),  # Tue 10:00 PST (DST ended Sun 1 November)
        ("2026-11-03T17:00:00+00:00", False),  # Tue 09:00 PST
        ("2026-03-06T19:00:00+00:00", False),  # Fri 11:00 PST
    ],
)
def test_window_in_policy_timezone_across_dst(utc: str, inside: bool) -> None:
    """ "a deployment window's `from` is inclusive, its `to` exclusive, both in the policy's
    timezone" — local wall-clock time on both sides of the DST changes."""
    r = Rollout(make_policy(WINDOWED), percent=0)
    seconds = (datetime.fromisoformat(utc) - at(0)).total_seconds()
    r.deploy(seconds, "v1", "v2", 10)
    decisions = r.tick(seconds)
    assert r.actions(decisions) == (["promote"] if inside else ["hold"])


def test_hold_outside_window_names_next_opening() -> None:
    """Outside the window the hold decision says when the next window opens."""
    r = Rollout(make_policy(WINDOWED), percent=0)
    friday = (datetime.fromisoformat("2026-03-06T19:00:00+00:00") - at(0)).total_seconds()
    r.deploy(friday, "v1", "v2", 10)
    (hold,) = r.tick(friday)
    assert "next opens 2026-03-10T17:00:00Z" in hold.reason  # Tue 10:00 PDT


def test_critical_page_stays_open_after_an_operator_rollback() -> None:
    """ "A rollback's page stays open for a person to resolve": with auto-rollback off, the
    critical page of a tripped rollback rule stays open when an operator then rolls back."""
    rules = "  - {name: err, source: prometheus, query: q, above: 0.05, on_breach: rollback}"
    r = Rollout(policy(rules), auto_rollback=False)
    r.value(10, 0.5)
    decisions = r.command(20, "rollback")
    assert r.actions(decisions) == ["rollback"]
    assert only(r.decisions, "resolve") == []
