"""``coalmine demo``: the embedded default. A simulated Worker, a healthy and a faulty canary.

The policy is ``policies/examples/fast.yaml``, embedded so the demo runs from an installed
wheel; a test keeps the two identical.
"""

from __future__ import annotations

import json
from datetime import timedelta

from coalmine.policyfile import parse_policy
from coalmine.replay import format_table
from coalmine.simulate import Behaviour, Simulation, run, steady

FAST_POLICY = """\
# A fast policy: the runbook's shape with second-scale durations. `coalmine demo` and the
# tests use it so that a whole rollout (three steps and a watch) plays out in minutes of
# simulated time. Not for production: windows this short are noisy on real traffic.
version: 1
name: fast
scripts: [demo-worker]
analysis:
  interval: 5s
  warmup: 10s
  inconclusive_page_after: 1m
steps:
  - {weight: 10, hold: 1m}
  - {weight: 50, hold: 1m}
  - {weight: 100}
post_promotion: {watch: 2m}
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
    description: unhandled exceptions per minute, from Workers analytics
    source: cloudflare
    signal: errors_per_minute
    window: 1m
    above: 30
    for: 10s
    on_breach: rollback
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


def _faulty(elapsed: timedelta, percent: int) -> Behaviour:
    """Healthy at 10%; at 50% a bad dependency path starts failing 8% of requests."""
    return Behaviour(error_rate=0.08, p99=0.9) if percent >= 50 else Behaviour()


def run_demo(output: str = "table") -> int:
    """Print the two canaries' timelines."""
    policy = parse_policy(FAST_POLICY, "policies/examples/fast.yaml")
    scenarios = (
        ("A healthy canary: promoted through every step, then watched", steady(Behaviour())),
        ("A faulty canary: errors appear at the 50% step and it is rolled back", _faulty),
    )
    for title, canary in scenarios:
        _, decisions = run(Simulation(policy, canary))
        if output == "jsonl":
            for decision in decisions:
                print(json.dumps(decision.to_dict()))
            continue
        print(f"== {title}")
        print(f"   policy {policy.name}: steps 10% (hold 1m) -> 50% (hold 1m) -> 100%, watch 2m;")
        print("   simulated 50 req/s, evaluated every 5s on a virtual clock")
        for line in format_table(decisions):
            print("   " + line)
        print()
    return 0
