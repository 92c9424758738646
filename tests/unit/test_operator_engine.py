"""The engine's side of the operator's issue: one page per source outage, idempotent commands,
and who asked and why carried on every decision a command makes."""

from __future__ import annotations

from coalmine.engine import Command
from tests.unit.test_lifecycle import ERR, GATE, Timeline, acts, adopted, policy

OTHER = "  - {name: cf, source: cloudflare, signal: errors, above: 5, on_breach: hold}"


def test_one_source_outage_sends_one_inconclusive_page() -> None:
    """Two Prometheus rules inconclusive together page once, naming both; resolved once."""
    run = adopted(policy(ERR, GATE, page_after="30s"))
    assert run.tick(0) == []
    paged = run.tick(30)
    assert acts(paged) == [("page", None)]
    assert paged[0].dedup_key == "coalmine/api/v2/err/inconclusive"
    assert "prometheus rules err, gate inconclusive since" in paged[0].reason
    assert run.tick(40) == []  # still out: no second page for gate
    resolved = run.tick(50, err=0.01, gate=0.1)
    assert [(d.action, d.dedup_key) for d in resolved] == [
        ("resolve", "coalmine/api/v2/err/inconclusive")
    ]


def test_each_source_pages_its_own_outage() -> None:
    """Rules of different sources are different outages: one page each."""
    run = adopted(policy(ERR, OTHER, page_after="30s"))
    run.tick(0)
    keys = [d.dedup_key for d in run.tick(30)]
    assert keys == ["coalmine/api/v2/err/inconclusive", "coalmine/api/v2/cf/inconclusive"]


def test_a_rule_still_inconclusive_after_the_outage_page_resolves_pages_on_its_own() -> None:
    """When the paged rule recovers and another stays inconclusive, that one pages."""
    run = adopted(policy(ERR, GATE, page_after="30s"))
    run.tick(0)
    run.tick(30)
    decisions = run.tick(40, err=0.01)
    assert [(d.action, d.dedup_key) for d in decisions] == [
        ("resolve", "coalmine/api/v2/err/inconclusive"),
        ("page", "coalmine/api/v2/gate/inconclusive"),
    ]


def test_pause_and_resume_are_idempotent() -> None:
    """Pausing a paused rollout, or resuming a running one, decides nothing (not a refusal)."""
    run = adopted()
    assert acts(run.command(5, "resume")) == []
    assert acts(run.command(6, "pause")) == [("pause", None)]
    assert acts(run.command(7, "pause")) == []
    assert acts(run.command(8, "resume")) == [("resume", None)]


def test_a_command_carries_who_and_why_onto_its_decisions() -> None:
    """`requested_by` and `reason` of a command appear on each decision and in its JSON."""
    run: Timeline = adopted()
    outcome = run.engine.command(
        run.state, Command("pause", requested_by="ana", reason="INC-42"), run.at(5)
    )
    (decision,) = outcome.decisions
    assert (decision.actor, decision.requested_by, decision.request_reason) == (
        "operator",
        "ana",
        "INC-42",
    )
    assert decision.to_dict()["requested_by"] == "ana"
