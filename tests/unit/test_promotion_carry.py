"""At promotion, a rule's phases decide what happens to its pages and clocks.

DESIGN.md: "every other page is resolved when its rule recovers, when its phase ends (canary
rules at promotion)" and "Every traffic change ... clears every rule's breach tracking". A rule
that runs in both the canary and post_promotion phases does not end at promotion: its open pages
and its inconclusive clock carry on, and only its breach tracking is cleared.
"""

from __future__ import annotations

import pytest

from coalmine.engine import RolloutPhase, RuleStatus
from tests.unit.test_lifecycle import ERR, Timeline, acts, adopted, policy

P = RolloutPhase
PG_KEY = "coalmine/api/v2/pg"
TWO_STEPS = "  - {weight: 10, hold: 60s}\n  - {weight: 100}"


def page_rule(phases: str) -> str:
    """A `page` rule `pg` (above 1, for 20s) running in ``phases``."""
    return (
        "  - {name: pg, source: prometheus, query: pg, above: 1, for: 20s, on_breach: page,"
        f" phases: {phases}}}"
    )


def paged_then_promoted(phases: str) -> tuple[Timeline, list[str]]:
    """`pg` breaching from 10s (after the warm-up; paged at 30s where it runs), promoted at 60s; the promotion's
    actions."""
    run = adopted(policy(ERR, page_rule(phases), steps=TWO_STEPS))
    run.tick(10, err=0.01, pg=5)
    assert [d.action for d in run.tick(30, err=0.01, pg=5)] == (
        [] if phases == "[post_promotion]" else ["page"]
    )
    promotion = run.tick(60, err=0.01, pg=5)
    assert run.state.phase is P.PROMOTED
    return run, [d.action for d in promotion]


def test_a_canary_only_rule_ends_at_promotion() -> None:
    """phases [canary]: the open page is resolved at promotion and the rule is not evaluated
    after it."""
    run, actions = paged_then_promoted("[canary]")
    assert actions == ["resolve", "promote"]
    assert "pg" not in run.state.rules
    assert run.tick(90, err=0.01, pg=5) == []
    assert "pg" not in run.state.rules


def test_a_rule_of_both_phases_keeps_its_page_through_promotion() -> None:
    """phases [canary, post_promotion]: promotion neither resolves the open page nor, while the
    rule keeps breaching, sends it again; the page resolves when the rule recovers."""
    run, actions = paged_then_promoted("[canary, post_promotion]")
    assert actions == ["promote"]
    assert run.state.rules["pg"].paged
    assert run.tick(80, pg=5) == []  # breach tracking restarted at 80s
    assert run.state.rules["pg"].breached_since == run.at(80)
    assert run.tick(100, pg=5) == []  # tripped again at 80s + 20s: the page is already open
    assert run.state.rules["pg"].tripped
    (resolve,) = run.tick(110, pg=0.5)
    assert (resolve.action, resolve.dedup_key) == ("resolve", PG_KEY)


def test_a_rule_of_both_phases_has_its_breach_tracking_cleared_at_promotion() -> None:
    """phases [canary, post_promotion]: the traffic change at promotion clears the breach
    (``breached_since``, ``tripped``), so a post-promotion trip needs its own ``for``."""
    run, _ = paged_then_promoted("[canary, post_promotion]")
    track = run.state.rules["pg"]
    assert (track.breached_since, track.tripped) == (None, False)


def test_a_post_promotion_only_rule_starts_at_promotion() -> None:
    """phases [post_promotion]: not evaluated in the canary phase; judged and paged after."""
    run, actions = paged_then_promoted("[post_promotion]")
    assert actions == ["promote"]
    assert "pg" not in run.state.rules
    run.tick(80, pg=5)
    (page,) = run.tick(100, pg=5)
    assert (page.action, page.dedup_key) == ("page", PG_KEY)


@pytest.mark.parametrize(
    ("phases", "carried"), [("[canary]", False), ("[canary, post_promotion]", True)]
)
def test_the_inconclusive_clock_at_promotion(phases: str, carried: bool) -> None:
    """An inconclusive gating rule promoted by an operator: a canary-only rule's clock ends; a
    rule of both phases keeps counting from its first inconclusive evaluation, so its page
    comes at that start + inconclusive_page_after, not later."""
    gate = f"  - {{name: gate, source: prometheus, query: gate, above: 1, phases: {phases}}}"
    run = adopted(policy(gate, steps=TWO_STEPS, page_after="60s"))
    run.tick(10)  # gate inconclusive (no observation) from 10s
    run.command(40, "promote")
    assert run.state.phase is P.PROMOTED
    track = run.state.rules.get("gate")
    if not carried:
        assert track is None
        return
    assert track is not None
    assert (track.status, track.inconclusive_since) == (RuleStatus.INCONCLUSIVE, run.at(10))
    assert run.tick(50) == []
    (page,) = run.tick(70)
    assert (page.action, page.severity) == ("page", "warning")


def test_an_open_inconclusive_page_of_both_phases_carries_on() -> None:
    """phases [canary, post_promotion]: an open inconclusive page is neither resolved at
    promotion nor re-sent after it; it resolves once the rule is conclusive."""
    gate = "  - {name: gate, source: prometheus, query: gate, above: 1, phases: [canary, post_promotion]}"
    run = adopted(policy(gate, steps=TWO_STEPS, page_after="30s"))
    run.tick(0)
    assert [d.action for d in run.tick(30)] == ["page"]
    assert acts(run.command(40, "promote")) == [("promote", 100)]
    assert run.tick(50) == []
    (resolve,) = run.tick(60, gate=0.5)
    assert (resolve.action, resolve.dedup_key) == ("resolve", "coalmine/api/v2/gate/inconclusive")


@pytest.mark.parametrize(
    ("phases", "resolved"), [("[canary]", True), ("[canary, post_promotion]", False)]
)
def test_resume_after_drift_to_the_canary_alone_carries_rules_of_both_phases(
    phases: str, resolved: bool
) -> None:
    """Adopting the canary at 100% after drift is a promotion: the same carry rules apply."""
    run = adopted(policy(ERR, page_rule(phases), steps=TWO_STEPS))
    run.tick(10, err=0.01, pg=5)
    run.tick(30, err=0.01, pg=5)
    run.deploy(35, "v2")
    decisions = run.command(40, "resume")
    assert [d.action for d in decisions] == (["resolve", "resume"] if resolved else ["resume"])
    assert ("pg" in run.state.rules) is not resolved
