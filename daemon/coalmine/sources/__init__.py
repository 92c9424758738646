"""Metrics sources: one seam, :class:`Source.fetch`, per system that measures a Worker.

A source never raises for a remote failure: whatever goes wrong (timeout, HTTP error, an error
envelope, a malformed body, NaN, an empty or ambiguous result) comes back as an
:class:`~coalmine.engine.Observation` the engine treats as inconclusive, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from coalmine.engine import Observation
from coalmine.engine.model import Role
from coalmine.policy import Rule


@dataclass(frozen=True, slots=True)
class Target:
    """What is measured: one version (by role and id) of one script's rollout."""

    script: str
    role: Role
    version: str
    canary: str
    stable: str
    # where the rollout stands, for webhook rules: step (from 1), canary percent, phase
    step: int = 0
    weight: int = 0
    phase: str = ""


class Source(Protocol):
    """Where a rule's value comes from."""

    name: str

    async def fetch(self, rule: Rule, target: Target, at: datetime) -> Observation:
        """The rule's value (and sample count) for the target at ``at``; never raises."""
        ...
