"""Helpers shared by the tests: paths, a virtual clock, inline policies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from coalmine.engine import Command, Decision, Deployment, Engine, Observation, Options, Outcome
from coalmine.policy import Policy
from coalmine.policyfile import parse_policy

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 3, 3, 18, 0, tzinfo=UTC)  # a Tuesday, 10:00 in Los Angeles


def at(seconds: float) -> datetime:
    """T0 plus seconds: the virtual clock of engine tests."""
    return T0 + timedelta(seconds=seconds)


def make_policy(yaml_text: str) -> Policy:
    """Parse a policy written inline in a test."""
    return parse_policy(yaml_text, "<test>")


class Rollout:
    """One script's rollout driven by hand on the virtual clock: adopt, tick, command.

    Keeps the latest state and every decision, so a test reads as a timeline.
    """

    def __init__(self, policy: Policy, percent: int = 10, **options: bool) -> None:
        self.engine = Engine(policy, Options(**options))
        self.state = self.engine.new_state(policy.scripts[0])
        self.decisions: list[Decision] = []
        if percent:
            self.deploy(0, "v1", "v2", percent)

    def _take(self, outcome: Outcome) -> list[Decision]:
        self.state = outcome.state
        self.decisions += outcome.decisions
        return outcome.decisions

    def deploy(
        self, seconds: float, stable: str, canary: str | None, percent: int
    ) -> list[Decision]:
        """The live deployment as read at T0 + seconds."""
        live = Deployment.of(stable, canary, percent)
        return self._take(self.engine.observe_deployment(self.state, live, at(seconds)))

    def command(self, seconds: float, kind: str, version: str | None = None) -> list[Decision]:
        """An operator command at T0 + seconds."""
        return self._take(self.engine.command(self.state, Command(kind, version), at(seconds)))  # type: ignore[arg-type]

    def tick(self, seconds: float, *observations: Observation) -> list[Decision]:
        """One evaluation at T0 + seconds with the given observations."""
        return self._take(self.engine.tick(self.state, at(seconds), observations))

    def value(
        self,
        seconds: float,
        value: float | None,
        samples: float | None = 1000,
        rule: str = "err",
        error: str | None = None,
    ) -> list[Decision]:
        """One evaluation with a single canary observation of one rule."""
        return self.tick(seconds, Observation(rule, "canary", value, samples, error))

    def actions(self, decisions: list[Decision] | None = None) -> list[str]:
        """The actions of the given decisions (default: all so far)."""
        return [d.action for d in (self.decisions if decisions is None else decisions)]
