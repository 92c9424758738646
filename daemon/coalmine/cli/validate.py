"""``coalmine validate``: one canary, judged once, as a deploy gate in CI.

It runs the daemon's loop for one script in the foreground: it adopts the canary the pipeline
just split (or waits for it), moves it through the policy's steps, prints every decision as it
is made and a status line every minute, and exits when the verdict is in:

- 0: promoted (the canary reached 100%);
- 1: rolled back;
- 3: no verdict in time (still holding: inconclusive data, a closed window, a breaching gate),
  or the verdict's traffic change could not be applied.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import TextIO

import anyio

from coalmine.app import open_daemon
from coalmine.cli.replay import format_table
from coalmine.engine import Decision
from coalmine.errors import ConfigError
from coalmine.policy import Policy
from coalmine.settings import Settings
from coalmine.store.base import StateStore

PROMOTED, ROLLED_BACK, NO_VERDICT = 0, 1, 3
STATUS_EVERY = 60.0
APPLY_WAIT = 120.0  # seconds to wait for the verdict's traffic change to be live


def default_duration(policy: Policy) -> timedelta:
    """Every hold, plus room for warm-ups and a few polls."""
    holds = sum((step.hold for step in policy.steps), timedelta(0))
    return holds + len(policy.steps) * policy.analysis.warmup + timedelta(minutes=5)


async def validate(
    settings: Settings,
    policies: list[Policy],
    script: str,
    duration: timedelta | None,
    out: TextIO | None = None,
) -> int:
    """Drive one script's canary to a verdict; return the exit code."""
    out = out or sys.stdout
    policy = next((p for p in policies if script in p.scripts), None)
    if policy is None:
        raise ConfigError(f"no policy in {settings.policies} governs script {script!r}")
    limit = duration or default_duration(policy)
    verdict = NO_VERDICT
    async with open_daemon(settings, policies) as daemon:
        loop = daemon.loops[script]
        print(
            f"coalmine validate {script}: policy {policy.name}, verdict within {limit}",
            file=out,
            flush=True,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.outbox.run)
            await daemon.shared.actuator.reconcile(script)
            tg.start_soon(loop.run)
            seen, last_status = len(loop.recent), anyio.current_time()
            print(next(format_table([])), file=out, flush=True)
            with anyio.move_on_after(limit.total_seconds()):
                while verdict == NO_VERDICT:
                    fresh, seen = loop.recent[seen:], len(loop.recent)
                    for line in list(format_table(fresh))[1:]:
                        print(line, file=out, flush=True)
                    verdict = _verdict(fresh)
                    if anyio.current_time() - last_status >= STATUS_EVERY:
                        last_status = anyio.current_time()
                        print(_status(loop.describe()), file=out, flush=True)
                    await anyio.sleep(0.2)
            if verdict != NO_VERDICT and not await _landed(daemon.store, script, APPLY_WAIT):
                print("the verdict's traffic change could not be applied", file=out, flush=True)
                verdict = NO_VERDICT
            with anyio.move_on_after(10):  # last notifications out before leaving
                await daemon.outbox.deliver_due()
            tg.cancel_scope.cancel()
    word = {
        PROMOTED: "promoted",
        ROLLED_BACK: "rolled back",
        NO_VERDICT: f"no verdict within {limit}",
    }
    print(f"verdict: {word[verdict]}", file=out, flush=True)
    return verdict


async def _landed(store: StateStore, script: str, seconds: float) -> bool:
    """Wait until no traffic change of the script is pending (the verdict is live)."""
    with anyio.move_on_after(seconds):
        while any(i.script == script for i in await store.open_intents()):
            await anyio.sleep(0.2)
        return True
    return False


def _verdict(decisions: list[Decision]) -> int:
    for decision in decisions:
        if decision.dry_run:
            continue
        if decision.action == "promote":
            return PROMOTED
        if decision.action == "rollback":
            return ROLLED_BACK
    return NO_VERDICT


def _status(rollout: dict[str, object]) -> str:
    rules = rollout["rules"]
    assert isinstance(rules, dict)
    waiting = sorted(name for name, r in rules.items() if r["status"] != "ok")
    return (
        f"... {rollout['phase']} at {rollout['canary_percent']}% (step {rollout['step']}); "
        f"not passing: {', '.join(waiting) or 'none'}"
    )
