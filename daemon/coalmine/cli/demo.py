"""``coalmine demo``: the embedded default, a simulated Worker with a healthy and a faulty canary.

Live (the default when Debian's ``prometheus`` is installed): the simulator's loopback
Cloudflare, metrics and receivers; a real Prometheus scraping the simulated Worker every
second; and the real daemon on ``policies/examples/fast.yaml`` with its endpoints up. A healthy
canary is promoted through every step, then a faulty one is rolled back, then a shared incident
(both versions failing) is held through and the canary promoted, each decision printed as it is
made. ``--offline`` (or no Prometheus) plays the same two canaries through the engine
on a virtual clock instead, in a second.

The policy is embedded so the demo runs from an installed wheel; a test keeps it identical to
the file.
"""

from __future__ import annotations

import json
import secrets
import sys
import tempfile
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import TextIO

import anyio

from coalmine.app import open_daemon, prepare
from coalmine.cli import localprom
from coalmine.cli.replay import format_table
from coalmine.cli.simulate import Behaviour as ReplayBehaviour
from coalmine.cli.simulate import Simulation, run, steady
from coalmine.daemon import ScriptLoop
from coalmine.engine import RolloutPhase, RolloutState
from coalmine.logs import configure as configure_logging
from coalmine.policyfile import parse_policy
from coalmine.settings import load_settings
from coalmine.simulator import Behaviour, Fault, Simulator

FAST_POLICY = """\
# A fast policy: the runbook's shape with second-scale durations. `coalmine demo` and the
# tests use it so that a whole rollout (three steps and a watch) plays out in about a minute.
# Not for production: windows this short are noisy on real traffic.
version: 1
name: fast
scripts: [demo-worker]
analysis:
  interval: 5s
  warmup: 10s
  inconclusive_page_after: 1m
steps:
  - {weight: 10, hold: 20s}
  - {weight: 50, hold: 20s}
  - {weight: 100}
post_promotion: {watch: 20s}
rules:
  - name: error_rate
    description: 5xx share of the canary's requests
    source: prometheus
    query: >-
      (sum(rate(http_requests_total{script="$script",version="$version",code=~"5.."}[$window])) or vector(0))
      / sum(rate(http_requests_total{script="$script",version="$version"}[$window]))
    samples: sum(increase(http_requests_total{script="$script",version="$version"}[$window]))
    window: 10s
    min_samples: 20
    above: 0.02
    for: 20s
    on_breach: rollback
    shared_incident: hold        # both versions over 2%: hold and page, do not roll back
  - name: errors_vs_stable
    description: the canary's 5xx rate against the stable version's, side by side (a shared
      incident hitting both versions does not trip it); see docs/statistics.md
    source: prometheus
    events: >-
      sum(increase(http_requests_total{script="$script",version="$version",code=~"5.."}[$window])) or vector(0)
    samples: sum(increase(http_requests_total{script="$script",version="$version"}[$window]))
    window: 5s
    min_samples: 50
    compare: {max_ratio: 1.5, confidence: 0.99}
    on_breach: rollback
  - name: latency_p99
    description: P99 request latency, seconds
    source: prometheus
    query: >-
      histogram_quantile(0.99, sum by (le)
      (rate(http_request_duration_seconds_bucket{script="$script",version="$version"}[$window])))
    samples: sum(increase(http_requests_total{script="$script",version="$version"}[$window]))
    window: 10s
    min_samples: 20
    above: 1.0
    for: 20s
    on_breach: rollback
  - name: latency_p50_gate
    description: P50 request latency must stay under 200 ms to advance
    source: prometheus
    query: >-
      histogram_quantile(0.5, sum by (le)
      (rate(http_request_duration_seconds_bucket{script="$script",version="$version"}[$window])))
    samples: sum(increase(http_requests_total{script="$script",version="$version"}[$window]))
    window: 10s
    min_samples: 20
    above: 0.2
    on_breach: hold
  - name: worker_exceptions
    description: unhandled exceptions per minute, from Workers analytics (which lag a few
      minutes, longer than this policy's steps, so this rule pages rather than gates)
    source: cloudflare
    signal: errors_per_minute
    window: 1m
    above: 30
    for: 10s
    on_breach: page
  - name: error_rate_after_promotion
    description: 5xx share after promotion
    source: prometheus
    query: >-
      (sum(rate(http_requests_total{script="$script",version="$version",code=~"5.."}[$window])) or vector(0))
      / sum(rate(http_requests_total{script="$script",version="$version"}[$window]))
    samples: sum(increase(http_requests_total{script="$script",version="$version"}[$window]))
    window: 10s
    min_samples: 20
    above: 0.01
    for: 30s
    on_breach: page
    phases: [post_promotion]
"""
SCRIPT = "demo-worker"
LIVE_LIMIT = 360.0  # seconds: give up if the live demo has not finished by then


def _faulty(_elapsed: timedelta, percent: int) -> ReplayBehaviour:
    """Healthy at 10%; at 50% a bad dependency path starts failing 8% of requests."""
    return ReplayBehaviour(error_rate=0.08, p99=0.9) if percent >= 50 else ReplayBehaviour()


def _dependency_outage(elapsed: timedelta, _percent: int) -> ReplayBehaviour:
    """A shared dependency fails 8% of both versions' requests from 5 s to 45 s."""
    failing = timedelta(seconds=5) <= elapsed < timedelta(seconds=45)
    return ReplayBehaviour(error_rate=0.08) if failing else ReplayBehaviour()


def _without_shared_hold(policy_text: str) -> str:
    return policy_text.replace("    shared_incident: hold", "    shared_incident: rollback", 1)


def run_offline(output: str = "table", out: TextIO | None = None) -> int:
    """The three canaries through the pure engine on a virtual clock."""
    out = out or sys.stdout
    policy = parse_policy(FAST_POLICY, "policies/examples/fast.yaml")
    scenarios = (
        ("A healthy canary: promoted through every step, then watched", steady(ReplayBehaviour())),
        ("A faulty canary: errors appear at the 50% step and it is rolled back", _faulty),
        (
            "A shared incident: a dependency fails both versions for 40 s; held, then promoted",
            _dependency_outage,
        ),
    )
    for title, canary in scenarios:
        stable = canary if canary is _dependency_outage else steady(ReplayBehaviour())
        _, decisions = run(Simulation(policy, canary, stable))
        if output == "jsonl":
            for decision in decisions:
                print(json.dumps(decision.to_dict()), file=out)
            continue
        print(f"== {title}", file=out)
        print("   policy fast: 10% (hold 20s) -> 50% (hold 20s) -> 100%, watch 20s;", file=out)
        print("   simulated 50 req/s, evaluated every 5s on a virtual clock", file=out)
        for line in format_table(decisions):
            print("   " + line, file=out)
        if canary is _dependency_outage:
            alone = parse_policy(_without_shared_hold(FAST_POLICY), "fast.yaml")
            _, other = run(Simulation(alone, canary, stable))
            rollback = next((d for d in other if d.action == "rollback"), None)
            if rollback is not None:
                offset = rollback.t - other[0].t
                print(
                    f"   (with the absolute rule alone, shared_incident: rollback, the canary "
                    f"would have been rolled back {offset.total_seconds():g}s in, for an outage "
                    "that rolling back cannot fix)",
                    file=out,
                )
        print(file=out)
    return 0


def run_demo(output: str = "table", offline: bool = False, out: TextIO | None = None) -> int:
    """``coalmine demo``: live when Prometheus is installed, else offline."""
    out = out or sys.stdout
    if offline or output == "jsonl":
        if not offline:  # say so: the decisions below are not the live demo's
            print("coalmine demo: --format jsonl runs the offline demo", file=sys.stderr)
        return run_offline(output, out)
    if localprom.binary() is None:
        print(
            "Debian's prometheus is not installed, so this is the offline demo: the engine on a\n"
            "virtual clock. `apt-get install prometheus` (or `make demo` as root) for the live one.\n",
            file=out,
        )
        return run_offline(output, out)
    return anyio.run(_live, out)


async def _live(out: TextIO) -> int:
    configure_logging("console", "error")
    sim = Simulator(seed=7)
    sim.slack.limiter.limit = None
    sim.pagerduty.limiter.limit = None
    sim.add_script(SCRIPT, requests_per_minute=30000)
    async with AsyncExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coalmine-demo-")))
        await stack.enter_async_context(sim.running())
        prometheus = await anyio.to_thread.run_sync(
            stack.enter_context, localprom.running_prometheus([sim.prometheus_metrics_url])
        )
        policy_file = folder / "fast.yaml"
        policy_file.write_text(FAST_POLICY)
        settings = load_settings(
            {
                **sim.environment(),
                "COALMINE_PROMETHEUS_URL": prometheus,
                "COALMINE_POLICIES": str(policy_file),
                "COALMINE_STATE_URL": f"sqlite:///{folder / 'state.db'}",
                "COALMINE_LISTEN": "127.0.0.1:0",
                "COALMINE_ADMIN_TOKEN": secrets.token_urlsafe(16),
                "COALMINE_DISCOVERY_INTERVAL": "2s",
                # one script watched: read its deployment every 2 s (a new split is adopted at
                # once, not when its first minute of analytics is complete)
                "COALMINE_DRIFT_INTERVAL": "2s",
                "COALMINE_CANARY_DRIFT_INTERVAL": "2s",
            }
        )
        daemon = await stack.enter_async_context(open_daemon(settings, prepare(settings)))
        async with anyio.create_task_group() as tg:
            port = await tg.start(daemon.serve)
            print(
                f"coalmine demo: a simulated Worker {SCRIPT!r} at 500 req/s, policy fast", file=out
            )
            print(
                f"  coalmine  http://127.0.0.1:{port}/metrics  http://127.0.0.1:{port}/health",
                file=out,
            )
            print(
                f"  prometheus {prometheus} (scraping the simulated Worker every second)", file=out
            )
            print(file=out)
            loop = daemon.loops[SCRIPT]
            with anyio.fail_after(LIVE_LIMIT):
                healthy = sim.upload_version(SCRIPT, Behaviour())
                print("== A healthy canary: promoted through every step, then watched", file=out)
                sim.start_canary(SCRIPT, healthy, percent=10)
                await _follow(
                    loop, out, lambda s: s.phase is RolloutPhase.IDLE and s.stable == healthy
                )
                print(file=out)
                print(
                    "== A faulty canary: 5xx errors start at the 50% step; it is rolled back",
                    file=out,
                )
                faulty = sim.upload_version(SCRIPT, Behaviour())
                sim.start_canary(SCRIPT, faulty, percent=10)
                faults: list[Fault] = []

                def rolled_back(state: RolloutState) -> bool:
                    if state.canary == faulty and state.canary_percent == 50 and not faults:
                        faults.append(sim.schedule_fault(SCRIPT, faulty, http_5xx_rate=0.08))
                    return state.phase is RolloutPhase.ROLLED_BACK

                await _follow(loop, out, rolled_back)
                print(file=out)
                print(
                    "== A shared incident: a dependency fails both versions for 40 s; held "
                    "through, then promoted",
                    file=out,
                )
                shared = sim.upload_version(SCRIPT, Behaviour())
                sim.start_canary(SCRIPT, shared, percent=10)
                for version in (healthy, shared):
                    sim.schedule_fault(
                        SCRIPT, version, http_5xx_rate=0.08, duration=timedelta(seconds=40)
                    )
                await _follow(
                    loop, out, lambda s: s.phase is RolloutPhase.IDLE and s.stable == shared
                )
            print(file=out)
            with anyio.move_on_after(10):  # let the last notifications reach the receivers
                while await daemon.store.backlog():
                    await daemon.outbox.deliver_due()
                    await anyio.sleep(0.1)
            pages = [p for p in sim.pages if p.get("event_action") == "trigger"]
            print(
                f"PagerDuty received {len(pages)} page(s); Slack {len(sim.slack_messages)} message(s); "
                f"Grafana {len(sim.annotations)} annotation(s). Journal: {(await daemon.store.verify_journal()).entries} "
                f"entries, chain verified.",
                file=out,
            )
            tg.cancel_scope.cancel()
    return 0


async def _follow(loop: ScriptLoop, out: TextIO, done: Callable[[RolloutState], bool]) -> None:
    """Print the loop's decisions as they are made, until ``done(state)``."""
    seen, header = len(loop.recent), True
    while True:
        fresh = loop.recent[seen:]
        if fresh or header:
            lines = list(format_table(fresh))
            for line in lines[0 if header else 1 :]:
                print("   " + line, file=out, flush=True)
            header, seen = False, len(loop.recent)
        if done(loop.state):
            return
        await anyio.sleep(0.2)
