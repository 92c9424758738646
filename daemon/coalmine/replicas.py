"""Replicas: one :class:`LeaseKeeper` per ``coalmine run`` on a shared PostgreSQL.

The keeper is the only part of a replica that takes, renews and gives up leases (see
:mod:`coalmine.store.leases` for the rules the database keeps). Every ``TTL / 3`` it:

1. announces the replica alive (a heartbeat lasting one TTL) and counts the live replicas;
2. renews every lease it holds; a lease that could not be renewed is lost at once;
3. takes its fair share, ``ceil(scripts / live replicas)``: gives back leases above it (to a
   replica that has fewer), takes free or expired ones below it; and takes the outbox's
   lease when nobody holds it;
4. notes the scripts with operator commands forwarded by other replicas;
5. tells the daemon what changed (:attr:`on_round`): loops of newly held scripts (and of
   scripts with forwarded commands) wake; new holders reload the state and reconcile open
   intents before judging; and tells the budget planner (:attr:`on_share`) how many replicas
   share the Cloudflare token and which scripts this one holds: its token buckets are sized
   for its share.

A replica does not trust a lease longer than it can be sure of it by its *own* monotonic
clock: a renewal that began at ``t`` makes the lease good locally until ``t + TTL`` less a
margin, which ends before the database's expiry (that was set after ``t``). A process paused
(SIGSTOP, a long GC, a frozen VM) past that instant finds its leases gone when it resumes,
before any write; the store and the actuator check the epoch in the database as well.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import anyio
import httpx
import structlog

from coalmine.engine import Command, Decision
from coalmine.errors import CoalmineError, StoreError
from coalmine.server.metrics import LeaseMetrics
from coalmine.store.leases import (
    ACTING_FOR,
    OUTBOX,
    Fence,
    LeaseLost,
    LeaseOps,
    LeaseRow,
    ReplicaIdInUse,
)

log = structlog.get_logger("coalmine")
COMMAND_POLL = 0.1  # seconds between looks for a forwarded command's answer


class Holdings(Mapping[str, Fence]):
    """The leases this replica may act under now: held, and not past their local deadline."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._held: dict[str, Fence] = {}
        self._until: dict[str, float] = {}

    def set(self, name: str, fence: Fence, until: float) -> None:
        """Hold ``name`` under ``fence`` until the monotonic time ``until``."""
        self._held[name] = fence
        self._until[name] = until

    def drop(self, name: str) -> None:
        """No longer hold ``name``."""
        self._held.pop(name, None)
        self._until.pop(name, None)

    def epochs(self) -> dict[str, int]:
        """Every lease held (even past its local deadline), name → epoch."""
        return {name: fence.epoch for name, fence in self._held.items()}

    def __getitem__(self, name: str) -> Fence:
        if self._clock() >= self._until.get(name, -math.inf):
            raise KeyError(name)
        return self._held[name]

    def __iter__(self) -> Iterator[str]:
        now = self._clock()
        return iter([n for n in self._held if now < self._until[n]])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class LeaseKeeper:
    """Takes, renews and gives back one replica's leases; see the module docstring."""

    def __init__(
        self,
        store: LeaseOps,
        replica: str,
        ttl: float,
        scripts: Sequence[str],
        metrics: LeaseMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.replica = replica
        self.ttl = ttl
        self.scripts = sorted(scripts)
        self.holdings = Holdings(clock)
        self.live: list[str] = [replica]
        self.table: dict[str, LeaseRow] = {}
        self.queued: set[str] = set()  # scripts with forwarded commands waiting, as of a round
        self.metrics = metrics
        self.on_round: Callable[[set[str], set[str]], Awaitable[None]] | None = None
        self.on_store: Callable[[bool], None] = lambda ok: None  # whether a round could write
        # why this replica acts on nothing (its id is in use by another live process), or None
        self.on_conflict: Callable[[str | None], None] = lambda problem: None
        # how many replicas are live, and the leases this one holds (after each round)
        self.on_share: Callable[[int, set[str]], None] = lambda replicas, held: None
        self.instance = secrets.token_hex(8)  # this process's own token behind the shared id
        self._clock = clock
        self._outbox_changed = anyio.Event()

    @property
    def period(self) -> float:
        """Seconds between rounds: three renewals fit in one TTL."""
        return self.ttl / 3

    @property
    def margin(self) -> float:
        """How much sooner than the database a replica gives up its own leases."""
        return min(1.0, self.ttl / 10)

    def fence(self, name: str) -> Fence | None:
        """The lease ``name`` if this replica may act under it now."""
        return self.holdings.get(name)

    async def request_hook(self, request: httpx.Request) -> None:
        """An HTTP client hook, run as each request goes out (after any rate-limit wait): a
        call made for a script (:data:`ACTING_FOR`) whose lease this replica no longer holds
        by its own clock is not sent. A process paused while it waited is caught here."""
        script = ACTING_FOR.get()
        if script is not None and self.fence(script) is None:
            raise LeaseLost(f"lease on {script} lost; {request.method} not sent")

    async def check(self, name: str, *, rollback: bool = False) -> None:
        """Raise :class:`LeaseLost` unless the database says the lease is still ours, now.

        A rollback never waits for the store: when the database cannot answer, a lease that is
        still good by this replica's own renewal (renewed less than TTL less a margin ago, so no
        other replica can hold it yet) lets the rollback go out; anything else waits."""
        fence = self.fence(name)
        if fence is None:
            raise LeaseLost(f"lease on {name} lost; write refused before it was sent")
        try:
            held = await self.store.holds(name, fence)
        except StoreError:
            if rollback and self.fence(name) is not None:
                return
            raise
        if not held:
            raise LeaseLost(f"lease on {name} lost; write refused before it was sent")

    def share(self) -> int:
        """How many scripts this replica takes: ``ceil(scripts / live replicas)``."""
        return math.ceil(len(self.scripts) / max(1, len(self.live)))

    async def round(self) -> tuple[set[str], set[str]]:
        """One heartbeat, renewal and rebalancing; returns (acquired, lost) lease names."""
        started = self._clock()
        until = started + self.ttl - self.margin
        before = self.holdings.epochs()
        try:
            self.live = await self.store.heartbeat(self.replica, self.ttl, self.instance)
        except ReplicaIdInUse:
            self._stand_aside()
            raise
        self.metrics.id_conflict.set(0)
        kept = await self.store.renew(self.replica, before, self.ttl)
        lost = set(before) - set(kept)
        mine = sorted(n for n in kept if n != OUTBOX)
        excess = mine[self.share() :]
        if excess:  # another replica has fewer than its share: hand these over
            await self.store.release(self.replica, {n: kept.pop(n) for n in excess})
        wanted = self.share() - (len(mine) - len(excess))
        free = self._candidates(set(kept))
        got = await self.store.acquire(self.replica, free, self.ttl, wanted) if wanted > 0 else {}
        if OUTBOX not in kept:
            got |= await self.store.acquire(self.replica, [OUTBOX], self.ttl, 1)
        for name in lost | set(excess):
            self.holdings.drop(name)
        for name, epoch in (kept | got).items():
            self.holdings.set(name, Fence(self.replica, epoch), until)
        self.table = {row.name: row for row in await self.store.leases()}
        self.queued = await self.store.queued()
        self._export(set(got), lost)
        self.on_share(len(self.live), set(self.holdings))
        if OUTBOX in lost | set(got):
            self._outbox_changed.set()
        for name in lost:
            log.warning("lease lost; not acting on it", lease=name, replica=self.replica)
        for name in got:
            log.info("lease acquired", lease=name, replica=self.replica, epoch=got[name])
        return set(got), lost | set(excess)

    async def announce(self) -> None:
        """The first heartbeat, at start-up, before this process acts on anything: it claims
        the id (the newest process wins, as a restarted container does). A process still
        alive under the same id finds out at its next heartbeat and acts on nothing."""
        self.live = await self.store.heartbeat(self.replica, self.ttl, self.instance, claim=True)

    def _stand_aside(self) -> None:
        """Another live process announces this id: act on nothing. The leases are not given
        back (they are held under the same id, so the other process may be acting on them)."""
        for name in self.holdings.epochs():
            self.holdings.drop(name)
        self.metrics.id_conflict.set(1)
        self._export(set(), set())
        self.on_share(len(self.live), set())

    def _candidates(self, held: set[str]) -> list[str]:
        """Scripts this replica might take, those whose lease expired longest ago first."""
        expires = {name: row.expires_in for name, row in self.table.items()}
        return sorted(
            (s for s in self.scripts if s not in held),
            key=lambda s: (expires.get(s, -math.inf), s),
        )

    def _export(self, got: set[str], lost: set[str]) -> None:
        m = self.metrics
        m.replicas.set(len(self.live))
        for name in [*self.scripts, OUTBOX]:
            m.held.labels(name).set(1 if self.fence(name) else 0)
            row = self.table.get(name)
            if row is not None:
                m.epoch.labels(name).set(row.epoch)
        for name in got:
            m.acquired.labels(name).inc()
        for name in lost:
            m.lost.labels(name).inc()

    async def run(self) -> None:
        """Keep the leases forever; a failed round is logged, the leases lapse locally."""
        while True:
            try:
                acquired, lost = await self.round()
                self.on_store(True)
                self.on_conflict(None)
                if self.on_round is not None:
                    await self.on_round(acquired, lost)
            except ReplicaIdInUse as exc:
                self.on_conflict(str(exc))
                log.error("acting on nothing", replica=self.replica, error=str(exc))
            except CoalmineError as exc:
                self.on_store(False)
                log.error("lease round failed", replica=self.replica, error=str(exc))
            await anyio.sleep(self.period)

    async def while_held(self, name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work`` only while this replica holds lease ``name``; cancel it when lost."""
        while True:
            if self.fence(name) is None:
                with anyio.move_on_after(self.period):
                    await self._outbox_changed.wait()
                self._outbox_changed = anyio.Event()
                continue
            async with anyio.create_task_group() as tg:
                tg.start_soon(work)
                while self.fence(name) is not None:
                    with anyio.move_on_after(self.period):
                        await self._outbox_changed.wait()
                    self._outbox_changed = anyio.Event()
                tg.cancel_scope.cancel()

    async def forward(
        self, script: str, command: Command, timeout: float
    ) -> tuple[bool, dict[str, Any] | None]:
        """Post an operator command for the holder of ``script`` and poll for its answer.

        Returns whether a holder took it, and its answer (None: none came within ``timeout``;
        a command nobody took is withdrawn then, so a retry cannot apply it twice).
        """
        body = {
            "kind": command.kind,
            "version": command.version,
            "requested_by": command.requested_by,  # the holder's journal names who and why
            "reason": command.reason,
        }
        command_id = await self.store.post_command(script, body, self.replica)
        taken, answer = False, None
        with anyio.move_on_after(timeout):
            while answer is None:
                await anyio.sleep(COMMAND_POLL)
                taken, answer = await self.store.command_answer(command_id)
        if answer is None and not taken:
            taken = not await self.store.withdraw_command(command_id)
        return taken, answer

    async def take_commands(self, script: str) -> list[tuple[int, Command]]:
        """Commands forwarded to this replica, the holder of ``script`` (looked for only when
        a round saw some waiting: a tick costs no query otherwise)."""
        if script not in self.queued:
            return []
        self.queued.discard(script)
        taken = await self.store.take_commands(script, self.replica)
        return [
            (
                i,
                Command(
                    body["kind"],
                    body.get("version"),
                    requested_by=body.get("requested_by"),
                    reason=body.get("reason"),
                ),
            )
            for i, body in taken
        ]

    async def answer(self, command_id: int, decisions: list[Decision] | None, error: str) -> None:
        """Answer a forwarded command: its decisions, or (None) the error; never raises."""
        answer = (
            {"error": error}
            if decisions is None
            else {"decisions": [d.to_dict() for d in decisions]}
        )
        try:
            with anyio.CancelScope(shield=True):
                await self.store.answer_command(command_id, answer)
        except CoalmineError as exc:
            log.error("forwarded command not answered", command=command_id, error=str(exc))

    async def step_down(self) -> None:
        """Give every lease back (a clean stop): another replica takes over at once."""
        held = self.holdings.epochs()
        for name in held:
            self.holdings.drop(name)
        if held:
            await self.store.release(self.replica, held)
            log.info("leases released", replica=self.replica, leases=sorted(held))


def decision_from(d: dict[str, Any], script: str) -> Decision:
    """A forwarded command's decision, back from its JSON (the fields the admin API shows)."""
    return Decision(
        t=datetime.fromisoformat(str(d["t"]).replace("Z", "+00:00")),
        action=d["action"],
        reason=str(d.get("reason", "")),
        script=str(d.get("script", script)),
        canary=d.get("canary"),
        stable=d.get("stable"),
        actor=d.get("actor", "operator"),
        canary_percent=d.get("canary_percent"),
        rule=d.get("rule"),
        severity=d.get("severity"),
        dedup_key=d.get("dedup_key"),
        dry_run=bool(d.get("dry_run", False)),
        requested_by=d.get("requested_by"),
        request_reason=d.get("request_reason"),
    )
