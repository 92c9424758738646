"""Change-detector variants: how the compare rule's detector would do with other designs.

Run from the repository root::

    .venv/bin/python bench/detector_variants.py                 # 1,000 canaries, max_ratio 1.5
    .venv/bin/python bench/detector_variants.py --canaries 300 --max-ratio 1.2

A benchmark, not a test: it prints a table and exits 0. docs/statistics.md ("How these were
chosen") quotes it. It re-implements the detector of daemon/coalmine/engine/compare.py (the
Shiryaev-Roberts mixture over the 16 grid ratios in ``(max_ratio, 16 x max_ratio]``, one
window a tick, judged from the second tick, tripping at 100) with its design choices as
parameters, and runs it on bench/judge.py's canaries (same generator, same seeds), so that
``before`` and ``tuned`` reproduce the ``compare`` columns of docs/benchmarks.md. The variants:
the split of the budget between the start and the planned canary (traffic changes play no part:
these scenarios have none), candidate starts only every ``g`` windows, the prior over the
ratios, and a CUSUM-style maximum over the starts instead of their sum (never larger, so valid
at the same bar). Two scenarios are added: the late ones started at minute 42.5 (off a 5-minute
grid) and a late 10x regression.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from judge import INTERVAL, SCENARIOS, Counts, Scenario, simulate
from machine import code_version, cpu_model, load

BAR = math.log(100.0)
HORIZON = 180  # the runbook's 90 planned minutes in 30 s windows


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    start: float = 0.5  # budget on the first window
    planned: float = 0.35  # spread over candidate starts within the horizon
    later: float = 0.05
    every: int = 1  # a candidate start every ``every`` windows
    prior: Callable[[float], float] = lambda x: 1 / x  # weight of ratio ``x`` x max_ratio
    cusum: bool = False  # the best start instead of the sum over starts

    def weight(self, j: int) -> float:
        w = self.start if j == 1 else 0.0
        if j <= HORIZON:
            return w + (self.planned * self.every / HORIZON if (j - 1) % self.every == 0 else 0)
        m = j - HORIZON
        return w + self.later / (m * (m + 1))


VARIANTS = (
    Variant("before: 0.4/0.3/0.1, even prior", 0.4, 0.3, 0.1, prior=lambda x: 1.0),
    Variant("tuned: 0.5/0.35/0.05, prior 1/ratio"),
    Variant("tuned, a start every 5 min", every=10),
    Variant("tuned, a start every 2 min", every=4),
    Variant("tuned, CUSUM max over starts", cusum=True),
    Variant("0.8 on the start, 0.15 planned", 0.8, 0.15),
)


def trip(variant: Variant, max_ratio: float, canary: Counts, stable: Counts, n: int) -> int | None:
    """The window (0-based) at which the variant trips, or None."""
    ratios = [2 ** (k / 4) for k in range(-40, 41)]
    ratios = [r for r in ratios if max_ratio < r <= 16 * max_ratio]
    raw = [variant.prior(r / max_ratio) for r in ratios]
    log_prior = [math.log(w / sum(raw)) for w in raw]
    state = [-math.inf] * len(ratios)
    for k in range(n):
        xc, nc, xs, ns = canary.errors[k], canary.requests[k], stable.errors[k], stable.requests[k]
        w = variant.weight(k + 1)
        log_w = math.log(w) if w > 0 else -math.inf
        if xc + xs > 0 and nc > 0 and ns > 0:
            a = nc / ns
            null = xc * math.log(max_ratio * a) - (xc + xs) * math.log1p(max_ratio * a)
            llr = [xc * math.log(r * a) - (xc + xs) * math.log1p(r * a) - null for r in ratios]
        else:
            llr = [0.0] * len(ratios)
        step = max if variant.cusum else _logaddexp
        state = [step(s, log_w) + x for s, x in zip(state, llr, strict=True)]
        if k >= 1 and _log_sum_exp([s + p for s, p in zip(state, log_prior, strict=True)]) >= BAR:
            return k
    return None


def scenarios() -> list[Scenario]:
    by_key = {s.key: s for s in SCENARIOS}
    late = by_key["late3x"]
    return [
        late,
        replace(late, key="late3x_42", label="3x from minute 42.5", onset=42.5),
        replace(late, key="late10x", label="10x from minute 40", factor=10.0),
        replace(late, key="late10x_42", label="10x from minute 42.5", factor=10.0, onset=42.5),
        by_key["burn"],
        by_key["x10_1000"],
        by_key["x4_600"],
        by_key["x4_60"],
    ]


def summary(times: Sequence[int | None], scenario: Scenario) -> str:
    onset = scenario.onset * 60
    after = [
        INTERVAL * (k + 1) - onset if k is not None and INTERVAL * (k + 1) >= onset else math.inf
        for k in times
    ]
    median = statistics.median_high(after)
    shown = "never" if math.isinf(median) else f"{median / 60:.1f} min"
    caught = sum(1 for t in after if t < math.inf) / len(after)
    return f"{shown} ({100 * caught:.0f}%)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-ratio", type=float, default=1.5)
    args = parser.parse_args(argv)
    print("coalmine change-detector variants")
    print(f"machine: {cpu_model()}, load average {load()}; code: {code_version('bench')}")
    print(
        f"canaries: {args.canaries:,} per scenario, seed {args.seed}, max_ratio {args.max_ratio:g}"
    )
    print("cells: median detection after the onset (share caught before the scenario ends)")
    print()
    started = time.perf_counter()
    runs = scenarios()
    traffic = {
        s.key: [
            simulate(s, random.Random(f"judge/{args.seed}/{s.key}/{i}"))
            for i in range(args.canaries)
        ]
        for s in runs
    }
    print("| variant | " + " | ".join(s.label for s in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for variant in VARIANTS:
        cells = []
        for s in runs:
            times = [
                trip(variant, args.max_ratio, t.canary, t.stable, s.intervals)
                for t in traffic[s.key]
            ]
            cells.append(summary(times, s))
        print(f"| {variant.name} | " + " | ".join(cells) + " |", flush=True)
    print()
    print(f"run time: {time.perf_counter() - started:.0f} s wall; load average after: {load()}")
    return 0


def _logaddexp(x: float, y: float) -> float:
    top = max(x, y)
    if top == -math.inf:
        return top
    return top + math.log(math.exp(x - top) + math.exp(y - top))


def _log_sum_exp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


if __name__ == "__main__":
    sys.exit(main())
