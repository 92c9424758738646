"""Crash consistency: `coalmine run` SIGKILLed at 30+ points across canaries, restarted each time.

Kills land where the simulator's fault queue pins the daemon (a deployments POST held before
Cloudflare applies it: the intent persisted, the call not made; one Cloudflare applies but does
not answer: the call made, not journaled; a page PagerDuty holds, or accepts without answering)
and at random moments (seeded; the seed is in every assertion message and
``CRASH_TEST_SEED=<seed>`` replays the choices) during holds, during pages, right after a
rollback trip and after a rollout ended. The assertions are invariants, true wherever a kill
lands: the right split at the end, each deployment call made exactly once (none repeated, none
missing), every intent finished with one journal entry, a journal whose hash chain verifies, and
each page decided once and delivered under its dedup key as one PagerDuty alert. Delivery is at
least once: a kill after PagerDuty accepted a page and before the outbox recorded it sends that
page again (PagerDuty deduplicates it by key); any other kill must not.

Each test runs on both state stores (the ``backend`` fixture): a SQLite file, and a database
on a real PostgreSQL.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from coalmine.cli import localprom
from coalmine.simulator import Injection, Service, Simulator
from coalmine.simulator.service import Action
from coalmine.store.journal import verify_entries
from coalmine.store.records import JournalEntry
from tests.integration.prometheus import binaries
from tests.stores import Backend

pytestmark = pytest.mark.anyio
SEED = int(os.environ.get("CRASH_TEST_SEED") or random.SystemRandom().randrange(2**32))
SCRIPT = "api"
DEPLOYMENTS = f"/client/v4/accounts/*/workers/scripts/{SCRIPT}/deployments"
# a random kill comes this many seconds after the daemon's start, or after it got ready
FROM_START = (0.3, 1.6)
FROM_READY = (0.0, 1.2)
RUN_LINES = 300  # a failure shows up to this many lines of the failing run's output
TRAFFIC = ("set_traffic", "promote", "rollback")
HELD = "cloudflare held the deployments POST before applying it"
APPLIED = "cloudflare applied the deployments POST and held its answer"

PROMOTE_POLICY = f"""
version: 1
name: crash-promote
scripts: [{SCRIPT}]
analysis: {{interval: 1s, warmup: 0s, inconclusive_page_after: 1h}}
steps: [{{weight: 10, hold: 6s}}, {{weight: 50, hold: 6s}}, {{weight: 100}}]
post_promotion: {{watch: 6s}}
rules:
  - {{name: exceptions, source: cloudflare, signal: errors_per_minute, window: 1m, above: 1000, on_breach: page}}
"""

ROLLBACK_POLICY = f"""
version: 1
name: crash-rollback
scripts: [{SCRIPT}]
analysis: {{interval: 1s, warmup: 0s, inconclusive_page_after: 1h}}
steps: [{{weight: 10, hold: 1h}}, {{weight: 50, hold: 1h}}, {{weight: 100}}]
rules:
  - name: error_rate
    source: prometheus
    query: >-
      (sum(rate(http_requests_total{{script="$script",version="$version",code=~"5.."}}[$window])) or vector(0))
      / sum(rate(http_requests_total{{script="$script",version="$version"}}[$window]))
    samples: sum(increase(http_requests_total{{script="$script",version="$version"}}[$window]))
    window: 5s
    min_samples: 20
    above: 0.05
    for: 0s
    on_breach: rollback
"""

Split = list[tuple[str, float]]
PageKey = tuple[str, str]  # (dedup_key, event_action)


def split(versions: Any) -> Split:
    """A deployment's versions as sorted (version, percent) pairs, comparable across sources."""
    return sorted((str(v), float(p)) for v, p in versions)


@dataclass(frozen=True)
class Kill:
    """One SIGKILL: what it was aimed at, and where the daemon's traces say it landed."""

    aim: str
    where: str  # "intent→call", "call→journal" or "elsewhere"
    detail: str
    intent: int | None  # the intent left open by the kill, if any


class Crashes:
    """`coalmine run` against one simulator, started, SIGKILLed and restarted, kill by kill."""

    def __init__(
        self,
        sim: Simulator,
        env: dict[str, str],
        tmp_path: Path,
        rng: random.Random,
        backend: Backend,
    ) -> None:
        self.sim = sim
        self.env = env
        self.rng = rng
        self.backend = backend
        self.log = tmp_path / "run.log"
        self.run_starts = 0  # where the current (or last) run's output begins in the log
        self.kills: list[Kill] = []
        self.process: subprocess.Popen[bytes] | None = None
        self.armed: list[tuple[Service, Injection]] = []
        self.hung_posts = 0  # deployment POSTs held by a `hang` and never applied
        self.pending_at_kill: Counter[PageKey] = Counter()  # kills with a page undelivered
        self.accepted_unmarked: Counter[PageKey] = Counter()  # seen after kills: resent pages

    # -- what the daemon left behind -----------------------------------------------------------

    def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """A query over the state database (empty before the daemon created it)."""
        return self.backend.rows(sql, *args)

    def state(self) -> dict[str, Any]:
        """The rollout state the daemon last persisted."""
        found = self.rows("SELECT state FROM rollouts WHERE script = ?", SCRIPT)
        return json.loads(found[0][0]) if found else {}

    def live(self) -> Split:
        """The split Cloudflare serves now."""
        return split(self.sim.cloudflare.current(SCRIPT).versions)

    def open_intents(self) -> list[tuple[int, str, Split]]:
        """Intents persisted and not finished: (id, kind, target split)."""
        return [
            (i, kind, split(json.loads(body)["versions"]))
            for i, kind, body in self.rows(
                "SELECT id, kind, body FROM intents WHERE finished_at IS NULL ORDER BY id"
            )
        ]

    def page_rows(self, *, undelivered: bool = False, delivered: bool = False) -> Counter[PageKey]:
        """PagerDuty alert events in the outbox, by (dedup key, event action)."""
        where = " AND delivered_at IS NULL" if undelivered else ""
        where += " AND delivered_at IS NOT NULL" if delivered else ""
        return Counter(
            (key, json.loads(payload)["event_action"])
            for key, payload in self.rows(
                "SELECT dedup_key, payload FROM outbox WHERE channel = 'pagerduty'" + where
            )
        )

    def pages(self) -> Counter[PageKey]:
        """PagerDuty alert events the simulator accepted, by (dedup key, event action)."""
        return Counter((str(e["dedup_key"]), str(e["event_action"])) for e in self.sim.pages)

    def settled(self) -> bool:
        """No traffic change pending and every notification delivered."""
        return not self.rows(
            "SELECT 1 FROM intents WHERE finished_at IS NULL UNION ALL"
            " SELECT 1 FROM outbox WHERE delivered_at IS NULL"
        )

    def context(self) -> str:
        """What every assertion message carries: the seed, the kills so far, the log's tail."""
        tail = self.log.read_text(errors="replace").splitlines()[-12:] if self.log.exists() else []
        return (
            f"\nseed {SEED} (CRASH_TEST_SEED={SEED} replays the kill choices)\n"
            f"{self.summary()}\nlog tail ({self.log}):\n" + "\n".join(tail)
        )

    def run_output(self) -> str:
        """The whole output of the current (or last) run: a daemon that exited by itself
        printed why there (a traceback: COALMINE_DEBUG is set), often more than a tail holds."""
        with self.log.open("rb") as log:
            log.seek(self.run_starts)
            lines = log.read().decode(errors="replace").splitlines()
        if len(lines) > RUN_LINES:
            lines = [f"... {len(lines) - RUN_LINES} lines left out", *lines[-RUN_LINES:]]
        return "\n".join(lines)

    def summary(self) -> str:
        """Every kill, and how many landed where."""
        counts = Counter(k.where for k in self.kills)
        lines = [
            f"{len(self.kills)} kills: "
            + ", ".join(f"{where} {n}" for where, n in sorted(counts.items()))
        ]
        lines += [
            f"  {n:2}. {k.where:12} aimed at {k.aim}; {k.detail}"
            for n, k in enumerate(self.kills, 1)
        ]
        return "\n".join(lines)

    # -- starting and killing ------------------------------------------------------------------

    def start(self) -> None:
        """Start `coalmine run`, its output appended to the log."""
        with self.log.open("ab") as out:
            self.run_starts = out.tell()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "coalmine", "run"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def arm(self, service: Service, path: str, action: Action) -> Injection:
        """Hold the next POST to ``path`` on ``service`` (see the simulator's fault queue)."""
        injection = service.inject(method="POST", path=path, action=action, times=1)
        self.armed.append((service, injection))
        return injection

    async def crash(
        self,
        aim: str,
        until: Callable[[], bool] | None = None,
        *,
        at_random: bool = False,
        then: float = 0.0,
        random_aim: str = "",
    ) -> bool:
        """Start the daemon and SIGKILL it once ``until`` holds (and up to ``then`` seconds
        more), or, ``at_random``, at a random moment (FROM_START or FROM_READY) if sooner.
        Returns whether ``until`` held."""
        self.start()
        limit = 30.0
        if at_random and self.rng.random() < 0.5:  # from its start: imports, reconciliation
            limit = self.rng.uniform(*FROM_START)
        elif at_random:  # once it serves: ticks, calls, deliveries
            limit = self.rng.uniform(*FROM_READY)
            await self._ready(until)
        held = await self._wait(until or (lambda: False), limit)
        if not held and not at_random:
            pytest.fail(f"not reached within {limit:g}s: {aim}{self.context()}")
        if held and then:
            await self._wait(lambda: False, self.rng.uniform(0.0, then))
        held = held or (until is not None and until())
        await self._kill(aim if held or not random_aim else random_aim)
        return held

    async def random_kills(
        self, count: int, during: str, stop: Callable[[], bool] | None = None, aim: str = ""
    ) -> bool:
        """Up to ``count`` kills at random moments; the first once ``stop`` holds (the kill
        ``aim`` names) ends them early, returning True."""
        for _ in range(count):
            if await self.crash(aim, stop, at_random=True, random_aim=f"random, {during}"):
                return True
        return False

    def _listening(self) -> str | None:
        """Where this run listens, from its "coalmine started" line (None before it)."""
        with self.log.open("rb") as log:
            log.seek(self.run_starts)
            for line in log.read().decode(errors="replace").splitlines():
                if '"coalmine started"' in line:
                    return str(json.loads(line)["listen"])
        return None

    async def _ready(self, until: Callable[[], bool] | None = None) -> None:
        """Wait until the daemon answers /readyz (or ``until`` holds). Each run listens on a
        port of its own (COALMINE_LISTEN port 0, read from its log): a port kept across
        restarts can be taken by another process while the daemon is down."""
        async with httpx.AsyncClient() as client:
            with anyio.move_on_after(30.0) as waiting:
                while not (until and until()):
                    listen = self._listening()
                    if listen is not None and await answers(client, f"http://{listen}/readyz"):
                        break
                    self._check_alive()
                    await anyio.sleep(0.02)
        if waiting.cancelled_caught:
            pytest.fail(f"the daemon never got ready{self.context()}")

    async def _wait(self, predicate: Callable[[], bool], seconds: float) -> bool:
        """Poll ``predicate`` for up to ``seconds`` while the daemon runs; fail if it exits."""
        with anyio.move_on_after(seconds):
            while not predicate():
                self._check_alive()
                await anyio.sleep(0.01)
            return True
        self._check_alive()
        return False

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(
                f"the daemon exited by itself ({self.process.returncode}){self.context()}\n"
                f"its whole output:\n{self.run_output()}"
            )

    async def _kill(self, aim: str) -> None:
        assert self.process is not None
        self._check_alive()
        self.process.kill()
        await anyio.to_thread.run_sync(self.process.wait)
        self.process = None
        self.kills.append(self._landed(aim))
        for service, injection in list(self.armed):
            if injection.times == 0:  # it held a request: release it now that its client died
                if injection.action == "hang" and service is self.sim.cloudflare:
                    self.hung_posts += 1
                service.faults.clear()
                self.armed.remove((service, injection))

    def _landed(self, aim: str) -> Kill:
        """Classify a kill by what the dead daemon left: an open intent either is live already
        (the call was made, not journaled) or not (the call was not made)."""
        phase = self.state().get("phase", "not started")
        detail = f"phase {phase} at {self.state().get('canary_percent', 0)}%"
        pending = self.page_rows(undelivered=True)
        if pending:
            self.pending_at_kill.update(pending.keys())
            detail += ", a page undelivered"
        surplus = self.pages() - self.page_rows(delivered=True)
        if surplus - self.accepted_unmarked:  # best effort: PagerDuty may still be reading it
            detail += ", a page accepted by PagerDuty and not yet marked delivered"
            self.accepted_unmarked = surplus
        for intent, kind, target in self.open_intents():
            where = "call→journal" if target == self.live() else "intent→call"
            return Kill(aim, where, f"{kind} intent {intent} open; {detail}", intent)
        return Kill(aim, "elsewhere", detail, None)

    async def finish(self, done: Callable[[], bool], what: str) -> None:
        """Start the daemon one last time, wait for ``done`` and settling, stop it with SIGTERM."""
        self.start()
        await self._ready()
        if not await self._wait(lambda: done() and self.settled(), 45.0):
            pytest.fail(f"the last run never reached {what}{self.context()}")
        process, self.process = self.process, None
        process.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=30))
        assert code == 0, f"SIGTERM exit code {code}{self.context()}"

    def stop(self) -> None:
        """Kill a daemon left running by a failed test."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    # -- the invariants ------------------------------------------------------------------------

    def check(
        self, deployments: list[Split], decisions: list[tuple[str, int, str]], final: Split
    ) -> list[Any]:
        """What every run must end with, wherever the kills landed; returns the journal."""
        ctx = self.context()
        assert self.live() == final, ctx
        made = [
            split(d.versions) for d in reversed(self.sim.cloudflare.deployments(SCRIPT))
        ]  # oldest first
        by_coalmine = [
            split(d.versions)
            for d in reversed(self.sim.cloudflare.deployments(SCRIPT))
            if d.source == "api"
        ]
        assert by_coalmine == deployments, f"deployments {made}{ctx}"
        posts = len(self.sim.deployment_posts(SCRIPT))
        assert posts == len(deployments) + self.hung_posts, f"{posts} POSTs{ctx}"
        journal = [
            JournalEntry(seq, t, recorded, script, actor, action, json.loads(body), prev, digest)
            for seq, t, recorded, script, actor, action, body, prev, digest in self.rows(
                "SELECT seq, t, recorded_at, script, actor, action, body, prev_hash, hash"
                " FROM journal ORDER BY seq"
            )
        ]
        verification = verify_entries(journal)
        assert verification.ok, f"{verification.problem}{ctx}"
        traffic = [
            (e.action, e.body.get("canary_percent"), e.body.get("canary"))
            for e in journal
            if e.action in TRAFFIC
        ]
        assert traffic == decisions, ctx
        intents = self.rows("SELECT id, finished_at, result FROM intents ORDER BY id")
        assert len(intents) == len(decisions), ctx
        assert all(finished for _, finished, _ in intents), ctx
        applied = Counter(e.body["intent"] for e in journal if e.action == "applied")
        assert applied == Counter(i for i, _, _ in intents), ctx
        outcome = {i: json.loads(result)["outcome"] for i, _, result in intents}
        for n, kill in enumerate(self.kills):
            if kill.intent is None:
                continue
            if kill.where == "call→journal":  # the restart found it live: no second call
                assert outcome[kill.intent] == "already live", f"kill {n + 1}{ctx}"
            later = [k for k in self.kills[n + 1 :] if k.intent == kill.intent]
            if kill.aim.startswith(HELD) and not later:
                # the held POST was dropped unapplied: the restart made the call, once
                assert outcome[kill.intent] == "applied", f"kill {n + 1}{ctx}"
        assert not self.sim.errors, f"{self.sim.errors}{ctx}"
        return journal


async def answers(client: httpx.AsyncClient, url: str) -> bool:
    """Whether ``url`` answers 200 (False while nothing listens)."""
    try:
        return (await client.get(url, timeout=2.0)).status_code == 200
    except httpx.TransportError:
        return False


@asynccontextmanager
async def simulated(
    tmp_path: Path, policy: str, backend: Backend, *, prometheus: bool
) -> AsyncIterator[tuple[Simulator, dict[str, str]]]:
    """A wall-clock simulator (scraped by a real Prometheus if asked) and coalmine's env."""
    if prometheus:
        binaries()  # skip (fail in CI) without Debian's prometheus
    sim = Simulator(seed=SEED % 1000)
    sim.slack.limiter.limit = None
    sim.add_script(SCRIPT, requests_per_minute=6000)
    (tmp_path / "policy.yaml").write_text(policy)
    async with sim.running():
        with ExitStack() as stack:
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("COALMINE_")},
                **sim.environment(),
                "COALMINE_POLICIES": str(tmp_path / "policy.yaml"),
                "COALMINE_STATE_URL": backend.url,
                "COALMINE_LISTEN": "127.0.0.1:0",  # each run's port: see Crashes._ready
                "COALMINE_DISCOVERY_INTERVAL": "1s",
                "COALMINE_DRIFT_INTERVAL": "1s",  # idle scripts read every second
                "COALMINE_CANARY_DRIFT_INTERVAL": "1s",  # and canaries at every tick
                # on PostgreSQL each restart is the same replica: it takes its lease back at once
                "COALMINE_REPLICA_ID": "crash-test",
                # an internal error prints its traceback (and exits 1, not 70): the failure
                # message then shows where it came from
                "COALMINE_DEBUG": "1",
            }
            if prometheus:
                env["COALMINE_PROMETHEUS_URL"] = stack.enter_context(
                    localprom.running_prometheus([sim.prometheus_metrics_url])
                )
            yield sim, env


async def test_sigkill_anywhere_in_a_promoted_canary_ends_promoted_with_each_call_once(
    tmp_path: Path, backend: Backend
) -> None:
    """Killed during holds and watch, with each step's call unsent (at a tick, and at the
    restart's reconciliation) and then applied but unanswered, restarted each time: promoted,
    each deployment call made exactly once, no page."""
    async with simulated(tmp_path, PROMOTE_POLICY, backend, prometheus=False) as (sim, env):
        stable = sim.cloudflare.current(SCRIPT).versions[0][0]
        canary = sim.upload_version(SCRIPT)
        sim.start_canary(SCRIPT, canary, percent=10)
        crashes = Crashes(sim, env, tmp_path, random.Random(f"{SEED}/promote"), backend)
        half, promoted = split([(canary, 50), (stable, 50)]), [(canary, 100.0)]

        def taken(injection: Injection, target: Split | None = None) -> Callable[[], bool]:
            return lambda: injection.times == 0 and (target is None or crashes.live() == target)

        try:
            # to 50%: the tick's call held unapplied; the restart's call applied, answer held
            held = crashes.arm(sim.cloudflare, DEPLOYMENTS, "hang")
            aim = f"{HELD} (to 50%, at a tick)"
            if not await crashes.random_kills(3, "the 10% hold", taken(held), aim):
                await crashes.crash(aim, taken(held))
            held = crashes.arm(sim.cloudflare, DEPLOYMENTS, "apply_then_hang")
            await crashes.crash(f"{APPLIED} (to 50%, at reconciliation)", taken(held, half))
            await crashes.crash("the 50% step, settled", crashes.settled)
            # to 100%: held unapplied at a tick and at reconciliation, then applied, answer held
            held = crashes.arm(sim.cloudflare, DEPLOYMENTS, "hang")
            aim = f"{HELD} (the promotion, at a tick)"
            if not await crashes.random_kills(3, "the 50% hold", taken(held), aim):
                await crashes.crash(aim, taken(held))
            held = crashes.arm(sim.cloudflare, DEPLOYMENTS, "hang")
            await crashes.crash(f"{HELD} (the promotion, at reconciliation)", taken(held))
            held = crashes.arm(sim.cloudflare, DEPLOYMENTS, "apply_then_hang")
            await crashes.crash(
                f"{APPLIED} (the promotion, at reconciliation)", taken(held, promoted)
            )
            while len(crashes.kills) < 16:
                await crashes.random_kills(1, "the post-promotion watch and after")

            def completed() -> bool:
                state = crashes.state()
                return state.get("phase") == "idle" and state.get("stable") == canary

            await crashes.finish(completed, "the end of the post-promotion watch")
        finally:
            crashes.stop()
        print(crashes.summary())
        crashes.check(
            deployments=[half, promoted],
            decisions=[("set_traffic", 50, canary), ("promote", 100, canary)],
            final=promoted,
        )
        assert sim.pages == [], crashes.context()
        assert len(crashes.kills) >= 16, crashes.context()


CALL_HELD = f"{HELD} (the rollback)"
ANSWER_HELD = f"{APPLIED} (the rollback)"
PAGE_HELD = "pagerduty held the rollback's page"
JUST_AFTER = "right after the rollback trip was committed"
PAGE_ACCEPTED = "pagerduty accepted the rollback's page and held its answer"
TRIPS = (CALL_HELD, ANSWER_HELD, PAGE_HELD, JUST_AFTER, PAGE_ACCEPTED)


async def test_sigkill_around_rollback_trips_rolls_back_once_and_pages_once_per_key(
    tmp_path: Path, backend: Backend
) -> None:
    """Five faulty canaries, each killed during its hold, at its trip (the call unsent, sent but
    unjournaled, the page held, the page accepted but unanswered, or at random just after) and
    after it: each rolled back by one call, one page per canary's dedup key."""
    async with simulated(tmp_path, ROLLBACK_POLICY, backend, prometheus=True) as (sim, env):
        stable = sim.cloudflare.current(SCRIPT).versions[0][0]
        crashes = Crashes(sim, env, tmp_path, random.Random(f"{SEED}/rollback"), backend)
        canaries: list[str] = []
        rolled_back = [(stable, 100.0)]
        try:
            for trip in TRIPS:
                canary = sim.upload_version(SCRIPT)
                canaries.append(canary)
                key = f"coalmine/{SCRIPT}/{canary}/error_rate"
                sim.start_canary(SCRIPT, canary, percent=10)
                await crashes.random_kills(2, "the 10% hold of a healthy canary")
                sim.schedule_fault(SCRIPT, canary, http_5xx_rate=0.5)
                await trip_and_kill(crashes, trip, key, rolled_back)
                await crashes.random_kills(1, "after the rollback trip")

                def settled(canary: str = canary) -> bool:
                    state = crashes.state()
                    done = state.get("phase") == "rolled_back" and state.get("canary") == canary
                    return done and crashes.live() == rolled_back and crashes.settled()

                await crashes.crash("a rolled-back rollout, settled", settled)

            def last_rolled_back() -> bool:
                return crashes.state().get("canary") == canaries[-1]

            await crashes.finish(last_rolled_back, "the last rollback")
        finally:
            crashes.stop()
        print(crashes.summary())
        print("pagerduty events:", dict(crashes.pages()), "alerts:", len(sim.pagerduty.alerts))
        crashes.check(
            deployments=[rolled_back] * len(TRIPS),
            decisions=[("rollback", 0, c) for c in canaries],
            final=rolled_back,
        )
        check_pages(crashes, canaries)
        assert len(crashes.kills) >= 20, crashes.context()


async def trip_and_kill(crashes: Crashes, trip: str, key: str, rolled_back: Split) -> None:
    """Run the daemon until the faulty canary trips, and kill it at the point ``trip`` names."""
    sim = crashes.sim
    if trip == CALL_HELD:
        held = crashes.arm(sim.cloudflare, DEPLOYMENTS, "hang")
        await crashes.crash(trip, lambda: held.times == 0)
    elif trip == ANSWER_HELD:
        held = crashes.arm(sim.cloudflare, DEPLOYMENTS, "apply_then_hang")
        await crashes.crash(trip, lambda: held.times == 0 and crashes.live() == rolled_back)
    elif trip == PAGE_HELD:
        held = crashes.arm(sim.pagerduty, "/v2/enqueue", "hang")
        await crashes.crash(trip, lambda: held.times == 0)
    elif trip == JUST_AFTER:
        tripped = len(crashes.rows("SELECT 1 FROM journal WHERE action = 'rollback'")) + 1

        def committed() -> bool:
            found = crashes.rows("SELECT 1 FROM journal WHERE action = 'rollback'")
            return len(found) == tripped

        await crashes.crash(trip, committed, then=0.05)
    else:
        held = crashes.arm(sim.pagerduty, "/v2/enqueue", "apply_then_hang")
        await crashes.crash(trip, lambda: held.times == 0 and crashes.pages()[(key, "trigger")] > 0)


def check_pages(crashes: Crashes, canaries: list[str]) -> None:
    """One page decided per canary, one PagerDuty alert per dedup key, still open; each event
    sent once, or again only after a kill that found it undelivered."""
    ctx = crashes.context()
    keys = [f"coalmine/{SCRIPT}/{c}/error_rate" for c in canaries]
    decided = crashes.page_rows()
    assert decided == Counter({(k, "trigger"): 1 for k in keys}), ctx
    assert crashes.page_rows(undelivered=True) == Counter(), ctx
    received = crashes.pages()
    assert set(received) == set(decided), ctx
    resent_by_design = keys[TRIPS.index(PAGE_ACCEPTED)]
    for key, action in received:
        least = 2 if key == resent_by_design else 1
        most = 1 + crashes.pending_at_kill[(key, action)]
        assert least <= received[(key, action)] <= most, f"{key} {action}{ctx}"
    alerts = Counter(a.dedup_key for a in crashes.sim.pagerduty.alerts)
    assert alerts == Counter(keys), ctx
    for key in keys:
        alert = crashes.sim.pagerduty.alert(key)
        assert alert is not None, ctx
        assert (alert.status, alert.severity) == ("triggered", "critical"), ctx
