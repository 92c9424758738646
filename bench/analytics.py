"""The simulator's GraphQL analytics: what checking each query against the schema costs.

Run from the repository root::

    .venv/bin/python bench/analytics.py                 # 2,000 queries, 5 minutes x 2 versions
    .venv/bin/python bench/analytics.py --queries 500 --minutes 30

The simulator parses, validates (once per distinct query text) and executes every GraphQL
request with graphql-core. This times ``simulator.graphql.answer`` on coalmine's own query in
process, without HTTP, so that load tests (bench/load.py, whose simulator runs in the
benchmark's process) can budget for it. A benchmark, not a test: it prints and exits 0.
docs/benchmarks.md ("Simulator GraphQL") has the results.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta

from coalmine.simulator import Behaviour, Simulator, VirtualClock
from coalmine.simulator.graphql import AnalyticsLimits, answer
from coalmine.simulator.traffic import DEFAULT_START
from coalmine.sources.cloudflare import QUERY
from machine import code_version, cpu_model, load

ACCOUNT = "bench"


def main() -> None:
    """Time the answers and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--minutes", type=int, default=5, help="the window each query asks for")
    args = parser.parse_args()
    clock = VirtualClock(DEFAULT_START)
    sim = Simulator(clock=clock, seed=1)
    stable = sim.add_script("api")
    canary = sim.upload_version("api", Behaviour())
    sim.start_canary("api", canary, percent=10)
    clock.advance(timedelta(minutes=args.minutes + 1))
    end = DEFAULT_START + timedelta(minutes=args.minutes)
    body = {
        "query": QUERY,
        "variables": {
            "accountTag": ACCOUNT,
            "filter": {
                "scriptName": "api",
                "datetime_geq": DEFAULT_START.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "datetime_lt": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "scriptVersion_in": [stable, canary],
            },
        },
    }
    limits = AnalyticsLimits()
    rows = sim.world.rows("api", DEFAULT_START, end)
    for _ in range(50):  # warm the caches (the parsed and validated query)
        answer(sim.world, body, account_id=ACCOUNT, limits=limits)
    world_ms, answer_ms = [], []
    for _ in range(args.queries):
        started = time.perf_counter()
        sim.world.rows("api", DEFAULT_START, end, versions=[stable, canary])
        world_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        answer(sim.world, body, account_id=ACCOUNT, limits=limits)
        answer_ms.append((time.perf_counter() - started) * 1000)
    print(f"machine: {cpu_model()}; code {code_version()}; load {load()}")
    print(f"{args.queries} queries of {len(rows)} rows ({args.minutes} min x 2 versions)")
    for name, values in (("answer (whole)", answer_ms), ("world rows alone", world_ms)):
        ordered = sorted(values)
        p90 = ordered[int(len(ordered) * 0.9)]
        print(f"  {name:17} median {statistics.median(values):.2f} ms, p90 {p90:.2f} ms")


if __name__ == "__main__":
    main()
