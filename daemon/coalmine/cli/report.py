"""The backtest's HTML report: one self-contained file, inline SVG, no script, no external asset.

Each canary rule gets a chart of its canary (solid) and stable (dashed) values over the range,
its threshold as a red line, and every traffic decision marked as a vertical line; then the
decision timeline with reasons. Everything shown is escaped.
"""

from __future__ import annotations

import math
from datetime import datetime
from html import escape

from coalmine.cli.backtest import Backtest
from coalmine.engine import Decision
from coalmine.engine.model import Role, format_time

W, H, PAD = 720, 180, 36
_MARK = {"set_traffic": "#1f6feb", "promote": "#1a7f37", "rollback": "#cf222e", "start": "#8250df"}
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#1f2328;max-width:760px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:2em}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;text-align:left;
vertical-align:top;border-bottom:1px solid #d0d7de}.verdict{font-weight:bold}
svg{background:#f6f8fa;border:1px solid #d0d7de}.legend{color:#57606a;font-size:12px}
"""


def render_html(result: Backtest, verdict: str) -> str:
    """The whole report."""
    p = result.policy
    split = result.split
    head = (
        f"<h1>coalmine backtest: {escape(result.script)}</h1>"
        f"<p>Policy <b>{escape(p.name)}</b>, canary <code>{escape(split.canary or '-')}</code> "
        f"over stable <code>{escape(split.stable)}</code>, from {_t(result.start)} to "
        f"{_t(result.end)}, every {p.analysis.interval.total_seconds():g}s.</p>"
        f'<p class="verdict">Verdict: {escape(verdict)}</p>'
    )
    charts = []
    for rule in p.rules:
        series = result.series.get(rule.name)
        if series is None:
            continue
        op = ">" if rule.above is not None or rule.compare is not None else "<"
        limit = f"breaches when value {op} {rule.threshold:g}"
        charts.append(
            f"<h2>{escape(rule.name)}</h2>"
            f'<p class="legend">{escape(rule.source)}, {escape(rule.on_breach)}; {limit}. '
            "Solid: canary; dashed: stable; red: threshold; vertical: decisions.</p>"
            + _chart(result, rule.name, rule.threshold)
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>coalmine backtest {escape(result.script)}</title>"
        f"<style>{_CSS}</style></head><body>{head}{''.join(charts)}"
        f"<h2>Decisions</h2>{_table(result)}</body></html>\n"
    )


def _chart(result: Backtest, rule: str, threshold: float) -> str:
    series = result.series[rule]
    points = [v for line in series.values() for _, v in line if v is not None and math.isfinite(v)]
    top = max([threshold, *points]) if points else threshold
    bottom = min([0.0, threshold, *points]) if points else 0.0
    top = top + (top - bottom) * 0.1 or 1.0
    span = (result.end - result.start).total_seconds() or 1.0

    def x(t: datetime) -> float:
        return PAD + (W - 2 * PAD) * (t - result.start).total_seconds() / span

    def y(v: float) -> float:
        return H - PAD / 2 - (H - PAD) * (v - bottom) / ((top - bottom) or 1.0)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img">']
    for d in result.decisions:
        colour = _MARK.get(d.action)
        if colour is not None:
            parts.append(
                f'<line x1="{x(d.t):.1f}" x2="{x(d.t):.1f}" y1="4" y2="{H - 4}" '
                f'stroke="{colour}" stroke-width="1"><title>{escape(_label(d))}</title></line>'
            )
    parts.append(
        f'<line x1="{PAD}" x2="{W - PAD}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
        f'stroke="#cf222e" stroke-dasharray="2 2"/>'
    )
    roles: tuple[tuple[Role, str], ...] = (("stable", ' stroke-dasharray="6 3"'), ("canary", ""))
    for role, dash in roles:
        for run in _runs(series.get(role) or []):
            coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in run)
            parts.append(
                f'<polyline fill="none" stroke="#24292f" stroke-width="1.5"{dash} '
                f'points="{coords}"><title>{role}</title></polyline>'
            )
    parts.append(
        f'<text x="2" y="12" font-size="10">{top:.4g}</text>'
        f'<text x="2" y="{H - 4}" font-size="10">{bottom:.4g}</text></svg>'
    )
    return "".join(parts)


def _runs(line: list[tuple[datetime, float | None]]) -> list[list[tuple[datetime, float]]]:
    """The line split at gaps (no data is drawn as no line, not as zero)."""
    runs: list[list[tuple[datetime, float]]] = [[]]
    for t, v in line:
        if v is not None and math.isfinite(v):
            runs[-1].append((t, v))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def _table(result: Backtest) -> str:
    rows = "".join(
        f"<tr><td>{_t(d.t)}</td><td>{escape(d.action)}</td>"
        f"<td>{'' if d.canary_percent is None else f'{d.canary_percent}%'}</td>"
        f"<td>{escape(d.reason)}</td></tr>"
        for d in result.decisions
    )
    header = "<tr><th>time (UTC)</th><th>action</th><th>canary</th><th>reason</th></tr>"
    return f"<table>{header}{rows}</table>"


def _label(d: Decision) -> str:
    percent = f" {d.canary_percent}%" if d.canary_percent is not None else ""
    return f"{_t(d.t)} {d.action}{percent}"


def _t(t: datetime) -> str:
    return escape(format_time(t))
