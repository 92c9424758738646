"""Metrics sources: one seam, :class:`Source.fetch`, per system that measures a Worker.

A source never raises for a remote failure: whatever goes wrong (timeout, HTTP error, an error
envelope, a malformed body, NaN, an empty or ambiguous result) comes back as an
:class:`~coalmine.engine.Observation` the engine treats as inconclusive, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, cast

import anyio
import structlog

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


class Ready(Protocol):
    """A source that can sometimes answer without I/O (its answer is in already): the
    optional method :func:`observe` looks for."""

    def ready(self, rule: Rule, target: Target, at: datetime) -> Observation | None:
        """What ``fetch`` would return, when known without waiting; else None."""
        ...


async def observe(
    sources: Mapping[str, Source],
    pairs: Iterable[tuple[Rule, Target]],
    at: datetime,
    timeout: float,
) -> list[Observation]:
    """Every pair's observation (in no particular order): those a source has in already at
    once, the others fetched concurrently with :func:`fetch_safely`."""
    results: list[Observation] = []
    waiting: list[tuple[Rule, Target]] = []
    for rule, target in pairs:
        source = sources.get(rule.source)
        ready = None
        if hasattr(source, "ready"):
            with suppress(Exception):  # a bug: fetch_safely logs it and answers inconclusive
                ready = cast(Ready, source).ready(rule, target, at)
        if ready is None:
            waiting.append((rule, target))
        else:
            results.append(ready)
    if not waiting:
        return results

    async def one(rule: Rule, target: Target) -> None:
        results.append(await fetch_safely(sources, rule, target, at, timeout))

    async with anyio.create_task_group() as tg:
        for rule, target in waiting:
            tg.start_soon(one, rule, target)
    return results


async def fetch_safely(
    sources: Mapping[str, Source], rule: Rule, target: Target, at: datetime, timeout: float
) -> Observation:
    """The rule's observation, inconclusive (with the reason) when its source is not configured,
    raises (a bug: logged) or takes longer than ``timeout`` (a webhook: its own, and a little
    for the source to report). A tick never goes down with a source."""
    source = sources.get(rule.source)
    if source is None:
        why = f"source {rule.source} is not configured"
        return Observation(rule.name, target.role, None, None, why)
    if rule.source == "webhook":
        timeout = max(timeout, rule.timeout.total_seconds() + 5)
    with anyio.move_on_after(timeout):
        try:
            return await source.fetch(rule, target, at)
        except Exception as exc:
            structlog.get_logger("coalmine").exception(
                "source raised", source=rule.source, rule=rule.name
            )
            why = f"source {rule.source} failed: {type(exc).__name__}"
            return Observation(rule.name, target.role, None, None, why)
    return Observation(rule.name, target.role, None, None, f"timeout after {timeout:g}s")
