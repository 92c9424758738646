"""The read-only status page at ``GET /``: server-rendered HTML, a small inline SVG per rule.

:func:`render` is pure: the rollouts as the API describes them, each rule's recent values, and
the time, in; one self-contained HTML document out (no script, no external asset, everything
escaped). The page reloads itself every ``REFRESH`` seconds. Nothing secret is on it: the same
fields the open ``GET /api/v1/rollouts`` shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import quote

REFRESH = 5
POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
"""The page's Content-Security-Policy: it loads nothing and runs nothing."""
W, H = 240, 48
History = Mapping[str, Sequence[tuple[datetime, float | None]]]
"""Per rule, its recent canary values, oldest first (None: inconclusive)."""

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em;color:#1f2328;background:#fff}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.15em;margin:0}
section{border:1px solid #d0d7de;border-radius:6px;padding:1em;margin:1em 0;max-width:980px}
.phase{font-weight:600;padding:1px 6px;border-radius:4px;background:#eaeef2}
.canary,.paused{background:#fff8c5}.promoted{background:#dafbe1}
.rolled_back,.stood_down{background:#ffebe9}.dry{background:#fbefff;color:#8250df}
.bar{height:8px;background:#eaeef2;border-radius:4px;max-width:480px;margin:.4em 0}
.bar>span{display:block;height:8px;background:#1f6feb;border-radius:4px}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;text-align:left;
vertical-align:middle;border-bottom:1px solid #eaeef2}.breaching{color:#cf222e;font-weight:600}
.inconclusive,.warmup{color:#9a6700}.muted{color:#57606a}svg{display:block}
"""


def render(
    rollouts: Sequence[Mapping[str, Any]], history: Mapping[str, History], now: datetime
) -> str:
    """The whole page."""
    body = "".join(_rollout(r, history.get(r["script"], {})) for r in rollouts)
    if not rollouts:
        body = "<p>No scripts are watched.</p>"
    stamp = escape(now.strftime("%Y-%m-%d %H:%M:%S UTC"))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>coalmine</title><style>{_CSS}</style></head><body>"
        f'<h1>coalmine</h1><p class="muted">Read-only; refreshes every {REFRESH} s. '
        f"As of {stamp}.</p>{body}</body></html>\n"
    )


def _rollout(r: Mapping[str, Any], history: History) -> str:
    script, phase = str(r["script"]), str(r["phase"])
    dry = ' <span class="phase dry">DRY RUN</span>' if r.get("dry_run") else ""
    head = (
        f'<h2 id="{escape(script)}">{escape(script)} '
        f'<span class="phase {escape(phase)}">{escape(phase.upper())}</span>{dry}</h2>'
    )
    if not r.get("canary"):
        stable = r.get("stable") or "no deployment seen yet"
        return f"<section>{head}<p>stable {escape(str(stable))}</p>{_timeline(r)}</section>"
    percent = int(r.get("canary_percent") or 0)
    live = r.get("live") or {}
    live_text = ""
    if live.get("canary") == r["canary"] and live.get("canary_percent") != percent:
        live_text = f", live {int(live['canary_percent'])}%"
    step = f"step {r['step']}/{len(r['steps'])}, " if r.get("step") else ""
    facts = (
        f"<p>canary <code>{escape(str(r['canary']))}</code> over "
        f"<code>{escape(str(r['stable']))}</code>: {step}{percent}%{escape(live_text)}"
        f"{_next(r)}</p>"
        f'<div class="bar" title="{percent}%"><span style="width:{percent}%"></span></div>'
    )
    return f"<section>{head}{facts}{_rules(r, history)}{_timeline(r)}</section>"


def _next(r: Mapping[str, Any]) -> str:
    if r.get("next_percent") is None:
        return ""
    remaining = r.get("hold_remaining_seconds")
    if remaining:
        return f"; next step {int(r['next_percent'])}% in {math.ceil(float(remaining))} s"
    waits = r.get("waiting_for") or []
    if waits:
        return f"; next step waits for: {escape('; '.join(str(w) for w in waits))}"
    return ""


def _rules(r: Mapping[str, Any], history: History) -> str:
    rows = []
    for name, rule in sorted(r.get("rules", {}).items()):
        status = str(rule.get("status", "none"))
        threshold = rule.get("threshold")
        bound = f"{rule.get('operator', '>')} {_num(threshold)}" if threshold is not None else ""
        detail = f" ({escape(str(rule['detail']))})" if rule.get("detail") else ""
        rows.append(
            f'<tr><td>{escape(name)}</td><td class="{escape(status)}">{escape(status)}{detail}'
            f"</td><td>{escape(_num(rule.get('value')))}</td><td>{escape(bound)}</td>"
            f"<td>{_chart(history.get(name, ()), threshold)}</td></tr>"
        )
    if not rows:
        return ""
    head = (
        "<tr><th>rule</th><th>status</th><th>value</th><th>breaches when</th><th>recent</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _chart(points: Sequence[tuple[datetime, float | None]], threshold: Any) -> str:
    """Recent values as a line, the threshold dashed red; gaps where a value was missing."""
    values = [v for _, v in points if v is not None and math.isfinite(v)]
    limit = float(threshold) if isinstance(threshold, int | float) else None
    if not values:
        return '<span class="muted">no values yet</span>'
    top = max([*values, *([limit] if limit is not None else [])])
    bottom = min([*values, 0.0, *([limit] if limit is not None else [])])
    span = (top - bottom) or 1.0
    n = max(1, len(points) - 1)

    def y(v: float) -> float:
        return H - 3 - (H - 6) * (v - bottom) / span

    runs: list[list[str]] = [[]]
    for i, (_, v) in enumerate(points):
        if v is None or not math.isfinite(v):
            runs.append([])
            continue
        runs[-1].append(f"{W * i / n:.1f},{y(v):.1f}")
    lines = "".join(
        f'<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{" ".join(run)}"/>'
        for run in runs
        if run
    )
    if limit is not None:
        lines += (
            f'<line x1="0" x2="{W}" y1="{y(limit):.1f}" y2="{y(limit):.1f}" '
            'stroke="#cf222e" stroke-dasharray="3 2"/>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img">{lines}</svg>'
    )


def _timeline(r: Mapping[str, Any]) -> str:
    decisions = list(r.get("recent_decisions") or [])[-10:]
    if not decisions:
        return ""
    rows = "".join(
        f"<tr><td>{escape(str(d.get('t', '')))}</td><td>{escape(str(d.get('action', '')))}</td>"
        f"<td>{escape(str(d.get('reason', '')))}</td></tr>"
        for d in reversed(decisions)
    )
    return f"<details open><summary>decisions</summary><table>{rows}</table></details>"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def anchor(script: str) -> str:
    """The page's link to one script's section."""
    return "/#" + quote(script, safe="")
