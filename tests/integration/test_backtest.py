"""`coalmine backtest` against a real Prometheus with backfilled history: a bad release rolls
back, a good one promotes, and the HTML report stands on its own."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from coalmine.cli import main
from tests.integration.prometheus import RunningPrometheus, Series, prometheus_with_history

SCRIPT = "slidecraft-api"
NOW = int(datetime.now(UTC).timestamp()) // 60 * 60
START, END = NOW - 3 * 3600, NOW - 3600
POLICY = f"""
version: 1
name: backtested
scripts: [{SCRIPT}]
analysis: {{interval: 30s, warmup: 30s, inconclusive_page_after: 10m}}
steps:
  - {{weight: 10, hold: 2m}}
  - {{weight: 50, hold: 2m}}
  - {{weight: 100}}
post_promotion: {{watch: 5m}}
rules:
  - name: error_rate
    source: prometheus
    query: >-
      (sum(rate(http_requests_total{{script="$script",version="$version",code=~"5.."}}[$window]))
      or vector(0)) / sum(rate(http_requests_total{{script="$script",version="$version"}}[$window]))
    samples: sum(increase(http_requests_total{{script="$script",version="$version"}}[$window]))
    window: 1m
    min_samples: 50
    above: 0.01
    for: 1m
    on_breach: rollback
"""


def history() -> list[Series]:
    """v1 stable (0.1% 5xx), v2 a bad release (5% 5xx), v3 a good one (0.1% 5xx)."""

    def version(name: str, ok: float, bad: float) -> list[Series]:
        return [
            ("http_requests_total", {"script": SCRIPT, "version": name, "code": "200"}, ok),
            ("http_requests_total", {"script": SCRIPT, "version": name, "code": "503"}, bad),
        ]

    return version("v1", 99.9, 0.1) + version("v2", 9.5, 0.5) + version("v3", 9.99, 0.01)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPrometheus]:
    """One Prometheus with the history above, for the whole module."""
    with prometheus_with_history(
        tmp_path_factory.mktemp("prometheus"), history(), START, END
    ) as running:
        yield running


def backtest(
    server: RunningPrometheus,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    canary: str,
    *flags: str,
) -> tuple[int, list[dict[str, object]]]:
    """`coalmine backtest` over 20 minutes of the history, as JSON Lines."""
    monkeypatch.setenv("COALMINE_PROMETHEUS_URL", server.url)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    begin = datetime.fromtimestamp(START + 1800, UTC).isoformat()
    end = datetime.fromtimestamp(START + 3000, UTC).isoformat()
    argv = ["backtest", "--policy", str(policy), "--from", begin, "--to", end]
    code = main([*argv, "--canary", canary, "--stable", "v1", "--format", "jsonl", *flags])
    out = capsys.readouterr()
    assert code != 2, out.err
    return code, [json.loads(line) for line in out.out.splitlines()]


def test_a_bad_release_is_rolled_back(
    server: RunningPrometheus,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """v2's 5% errors trip error_rate after its `for`: rollback, exit 1, and an HTML report."""
    report = tmp_path / "report.html"
    code, decisions = backtest(server, tmp_path, monkeypatch, capsys, "v2", "--html", str(report))
    assert code == 1
    rollback = next(d for d in decisions if d["action"] == "rollback")
    assert rollback["rule"] == "error_rate"
    assert rollback["value"] == pytest.approx(0.05, rel=1e-3)
    html = report.read_text()
    assert "<svg" in html and "Verdict: rolled back" in html and "error_rate" in html
    external = re.findall(r'(?:src|href)="[^"#]', html)
    assert external == [], "the report must not load anything"


def test_a_good_release_is_promoted(
    server: RunningPrometheus,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """v3's 0.1% errors pass: 10% -> 50% -> promoted, exit 0."""
    code, decisions = backtest(server, tmp_path, monkeypatch, capsys, "v3")
    assert code == 0
    assert [d["action"] for d in decisions][:3] == ["start", "set_traffic", "promote"]
