"""Operator commands on their way to a script's loop: queued for its next tick, or forwarded
to the replica that holds the script's lease and answered through the database."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from coalmine.engine import Command, Decision
from coalmine.errors import CoalmineError
from coalmine.replicas import LeaseKeeper, decision_from


class CommandFailed(CoalmineError):
    """An operator command was not applied (the tick that carried it failed, or none came)."""


class CommandQueued(CoalmineError):
    """An operator command is being applied by a tick that has not finished yet."""


@dataclass
class Pending:
    """A command waiting for a tick, and what became of it."""

    command: Command
    done: anyio.Event = field(default_factory=anyio.Event)
    decisions: list[Decision] = field(default_factory=list)
    error: str | None = None
    taken: bool = False  # a tick has it: it will be applied (or fail) there
    remote: int | None = None  # forwarded by another replica: the command's id


async def forward(
    leases: LeaseKeeper, script: str, command: Command, timeout: float
) -> list[Decision]:
    """Hand an operator command to the replica holding ``script``; wait for its answer."""
    taken, answer = await leases.forward(script, command, timeout)
    if answer is None:
        if taken:
            raise CommandQueued("the holding replica is applying it; see `coalmine status`")
        raise CommandFailed(f"not applied within {timeout:g}s and withdrawn; nothing changed")
    if "error" in answer:
        raise CommandFailed(str(answer["error"]))
    return [decision_from(d, script) for d in answer.get("decisions", [])]


async def take_forwarded(leases: LeaseKeeper, script: str) -> list[Pending]:
    """Commands other replicas forwarded for ``script``, as this loop's own."""
    return [Pending(cmd, remote=i) for i, cmd in await leases.take_commands(script)]


async def answer_forwarded(leases: LeaseKeeper, pending: Sequence[Pending]) -> None:
    """Answer the forwarded commands a tick carried."""
    for item in pending:
        if item.remote is not None:
            failed = item.error is not None or not item.done.is_set()
            why = item.error or "the tick that carried it failed"
            await leases.answer(item.remote, None if failed else item.decisions, why)
