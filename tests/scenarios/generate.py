"""Write the replay scenarios of tests/scenarios/ from the simulator.

Run from the repository root: ``.venv/bin/python -m tests.scenarios.generate``. The files are
committed so that the scenarios are plain data anyone can replay; this script shows where they
came from and re-creates them after a deliberate change to the simulator.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from coalmine.cli.simulate import Behaviour, Script, Simulation, run, steady
from coalmine.engine import Command
from coalmine.policyfile import load_policy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
HEALTHY = Behaviour()


def _fault_at_50(_elapsed: timedelta, percent: int) -> Behaviour:
    return Behaviour(error_rate=0.08) if percent >= 50 else HEALTHY


def _flapping(elapsed: timedelta, _percent: int) -> Behaviour:
    # P99 latency breaching on every other 5 s tick: never 20 s in a row
    return Behaviour(p99=2.0) if int(elapsed.total_seconds() // 5) % 2 else HEALTHY


def _nan_storm(elapsed: timedelta, _percent: int) -> Behaviour:
    return Behaviour(no_data=True) if elapsed >= timedelta(seconds=10) else HEALTHY


def scenarios() -> dict[str, Simulation]:
    """Every scenario by file name."""
    fast = load_policy(ROOT / "policies" / "examples" / "fast.yaml")
    windowed = load_policy(HERE / "windowed.yaml")
    minutes = timedelta(minutes=1)
    sims: dict[str, tuple[Script, dict[str, object]]] = {
        "healthy-promotion": (steady(HEALTHY), {}),
        "fault-at-50": (_fault_at_50, {}),
        "flapping": (_flapping, {}),
        "nan-storm": (_nan_storm, {"duration": 5 * minutes}),
        "low-traffic": (steady(HEALTHY), {"requests_per_second": 2.0, "duration": 5 * minutes}),
        "pause-resume": (
            steady(HEALTHY),
            {
                "commands": {
                    timedelta(seconds=10): Command("pause"),
                    timedelta(seconds=60): Command("resume"),
                },
                "seed": 2,
            },
        ),
    }
    out = {name: Simulation(fast, canary, **extra) for name, (canary, extra) in sims.items()}  # type: ignore[arg-type]
    out["outside-window"] = Simulation(
        windowed,
        steady(HEALTHY),
        start=datetime.fromisoformat("2026-03-03T23:58:30+00:00"),  # Tue 15:58:30 in Los Angeles
        duration=timedelta(hours=19),
    )
    return out


def main() -> None:
    """Write every scenario's replay file."""
    for name, sim in scenarios().items():
        records, _ = run(sim)
        path = HERE / f"{name}.jsonl"
        path.write_text("".join(r.to_json() + "\n" for r in records))
        print(f"{path.relative_to(ROOT)}: {len(records)} lines")


if __name__ == "__main__":
    main()
