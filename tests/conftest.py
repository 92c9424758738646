"""Shared fixtures: the repository's policies and an engine factory."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from coalmine.engine import Engine, Options
from coalmine.policy import Policy
from coalmine.policyfile import load_policy

from .support import ROOT

EngineFactory = Callable[..., Engine]


@pytest.fixture
def runbook() -> Policy:
    """policies/runbook.yaml."""
    return load_policy(ROOT / "policies" / "runbook.yaml")


@pytest.fixture
def fast() -> Policy:
    """policies/examples/fast.yaml."""
    return load_policy(ROOT / "policies" / "examples" / "fast.yaml")


@pytest.fixture
def engine_for() -> EngineFactory:
    """Build an engine for a policy with options given as keywords."""

    def build(policy: Policy, **options: bool) -> Engine:
        return Engine(policy, Options(**options))

    return build


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (the daemon's backend)."""
    return "asyncio"
