"""Helpers shared by the tests: paths, a virtual clock, inline policies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

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
