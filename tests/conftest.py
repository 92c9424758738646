"""Shared fixtures: the repository's policies, an engine factory, a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coalmine.engine import Engine, Options
from coalmine.policy import Policy
from coalmine.policyfile import load_policy

from .integration.postgres import RunningPostgres, postgres_for_tests
from .stores import BACKENDS, Backend
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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[RunningPostgres]:
    """One real PostgreSQL for the whole session (skipped without Debian's package, failed
    when COALMINE_REQUIRE_POSTGRES=1)."""
    with postgres_for_tests() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: RunningPostgres) -> str:
    """The URL of a new, empty database on the session's PostgreSQL (password included)."""
    return postgres_server.new_database()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each state-store backend in turn: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return Backend.sqlite(tmp_path / "state.db")
    return Backend("postgres", request.getfixturevalue("postgres_url"))
