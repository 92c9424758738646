"""Budget plan benchmark: what one recomputation of the plan costs (cloudflare/plan.py).

Run from the repository root::

    .venv/bin/python bench/plan.py

This is a benchmark, not a test: it prints numbers and exits 0. The daemon recomputes the plan
at start, on reload and whenever a canary starts or ends, in the event loop: it should stay far
under a millisecond when it fits and near 10 ms when it searches for fixes. Each workload is
built before the clock starts and run once to warm up, then timed ``--repeats`` times; the
table gives the median, fastest and slowest wall-clock run (``time.perf_counter_ns``) and the
median CPU time of the process: a wall-clock median well above it means the core was shared.

a. ``fits``: the issue's account, 1,000 scripts of one policy, 50 of them canaries.
b. ``over``: 5,000 scripts in 20 policies at five intervals, 200 of them canaries, account-wide
   discovery unavailable: over REST, so every lever and pair of levers is searched for fixes.
c. ``replica``: ``over`` on one of three replicas sharing the token, holding a third of each
   policy's scripts: its share's plan and the token's, both searched for fixes.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from coalmine.cloudflare.plan import Group, Inputs, plan


def workloads() -> dict[str, Inputs]:
    """The inputs timed, by name."""
    fits = Inputs((Group("runbook", 30.0, True, 50, 950),), 60.0, 1800.0, 120.0, 600, 200)
    groups = tuple(
        Group(f"policy-{i:02}", (10.0, 15.0, 20.0, 30.0, 60.0)[i % 5], i % 2 == 0, 10, 240)
        for i in range(20)
    )
    over = Inputs(groups, 60.0, 1800.0, 120.0, 600, 200, account_wide=False)
    third = tuple(g._replace(live=g.live // 3, idle=g.idle // 3) for g in groups)
    replica = over._replace(groups=third, replicas=3, account=groups)
    return {"fits": fits, "over": over, "replica": replica}


def main() -> None:
    """Time each workload and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per workload")
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {args.repeats} runs each")
    print("| workload | scripts | fits | fixes | median | min | max | median CPU |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, inputs in workloads().items():
        result = plan(inputs)  # warm-up
        runs, cpu = [], []
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter_ns(), time.process_time_ns()
            plan(inputs)
            runs.append((time.perf_counter_ns() - start) / 1e6)
            cpu.append((time.process_time_ns() - start_cpu) / 1e6)
        scripts = inputs.live + inputs.idle
        print(
            f"| {name} | {scripts} | {result.fits} | {len(result.fixes)} |"
            f" {statistics.median(runs):.3f} ms | {min(runs):.3f} ms | {max(runs):.3f} ms |"
            f" {statistics.median(cpu):.3f} ms |"
        )


if __name__ == "__main__":
    main()
