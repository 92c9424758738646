"""A real Prometheus for the tests: Debian's package, on a free loopback port, with history.

History is backfilled with ``promtool tsdb create-blocks-from openmetrics`` before the server
starts, so queries at a past evaluation time see exactly the series the test wrote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from coalmine.cli.localprom import free_port, wait_until_ready

Series = tuple[str, dict[str, str], float]
"""A metric name, its labels, and how much it increases per second (a linear counter)."""


def binaries() -> tuple[str, str]:
    """The prometheus and promtool binaries, or skip (fail when REQUIRE_PROMETHEUS=1)."""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus and promtool:
        return prometheus, promtool
    message = "Debian's prometheus package is not installed (make test installs it when it can)"
    if os.environ.get("REQUIRE_PROMETHEUS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def openmetrics(series: Iterable[Series], start: int, end: int, step: int = 15) -> str:
    """Linear counters from ``start`` to ``end`` (unix seconds) as OpenMetrics text."""
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    for name, labels, per_second in series:
        by_name.setdefault(name, []).append((labels, per_second))
    lines = []
    for name, members in by_name.items():
        for labels, per_second in members:
            text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            for t in range(start, end + 1, step):
                lines.append(f"{name}{{{text}}} {per_second * (t - start):.6f} {t}")
    return "\n".join(lines) + "\n# EOF\n"


@dataclass(frozen=True)
class RunningPrometheus:
    """A started server."""

    url: str
    process: subprocess.Popen[bytes]


@contextmanager
def prometheus_with_history(
    workdir: Path, series: Iterable[Series], start: int, end: int
) -> Iterator[RunningPrometheus]:
    """Backfill ``series`` between ``start`` and ``end``, start Prometheus on it, stop it after."""
    prometheus, promtool = binaries()
    data = workdir / "data"
    data.mkdir()
    source = workdir / "history.om"
    source.write_text(openmetrics(series, start, end))
    subprocess.run(
        [promtool, "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)],
        check=True,
        capture_output=True,
    )
    config = workdir / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=30d",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        yield RunningPrometheus(url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
