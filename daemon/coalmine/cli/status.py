"""``coalmine status [SCRIPT] [--watch] [--json]``: where each rollout stands and what it waits for.

The rendering is a pure function of the API's rollout objects (:func:`render`), so what a person
reads is tested without a daemon. Every line fits 100 columns; colour only on a terminal (and
never with ``NO_COLOR``). ``--watch`` redraws until the rollout ends and exits like
``validate``: 0 promoted, 1 rolled back, 3 no verdict (a dry run, or ``--timeout``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import quote

from coalmine.cli.client import daemon_url, request
from coalmine.errors import CoalmineError, LocalError, RemoteError
from coalmine.settings import Settings

WIDTH = 100
PROMOTED, ROLLED_BACK, NO_VERDICT = 0, 1, 3
_COLOURS = {"red": "31", "green": "32", "yellow": "33", "magenta": "35", "dim": "2", "bold": "1"}
_PHASE_COLOUR = {
    "canary": "yellow",
    "paused": "yellow",
    "promoted": "green",
    "rolled_back": "red",
    "stood_down": "red",
}


def render(rollouts: list[dict[str, Any]], *, colour: bool = False) -> list[str]:
    """Every rollout as a few lines: a headline, then what it waits for and why."""
    paint = _painter(colour)
    lines: list[str] = []
    for r in rollouts:
        lines.extend(_clip(line) for line in _rollout(r, paint))
    return lines or ["no scripts are watched"]


def budget_line(plan: dict[str, Any] | None, *, colour: bool = False) -> str | None:
    """One line on the Cloudflare budget plan (``/health``'s ``budget_plan``), or None."""
    if not plan:
        return None
    rest, graphql = plan["rest"], plan["graphql"]
    numbers = (
        f"REST {math.ceil(rest['planned'])}/{round(rest['limit'], 1):g},"
        f" GraphQL {math.ceil(graphql['planned'])}/{round(graphql['limit'], 1):g} per 5 min"
    )
    if plan.get("replicas", 1) > 1:  # this replica's share of the token's budget
        numbers += f" (share 1/{plan['replicas']})"
    if plan["fits"]:
        return _clip(f"budget: {numbers}; {plan['more_canaries']} more canaries would fit")
    changes = plan.get("changes") or ["see GET /health"]
    over = _painter(colour)("OVER", "red")
    return _clip(f"budget: {over}: {numbers}; fix: {changes[0]}")


def _rollout(r: dict[str, Any], paint: Callable[[str, str], str]) -> list[str]:
    phase = r["phase"]
    dry = " " + paint("DRY RUN", "magenta") if r.get("dry_run") else ""
    head = f"{paint(r['script'], 'bold')}  {paint(phase.upper(), _PHASE_COLOUR.get(phase, 'dim'))}"
    if "lease" in r:  # replicas: which one holds the script
        head += f"  holder {_holder(r)}"
    if not r["canary"]:
        stable = r["stable"] or "no deployment seen yet"
        return [f"{head}{dry}  stable {_short(stable)}"]
    step = f"  step {r['step']}/{len(r['steps'])}" if r["step"] else ""
    lines = [f"{head}{dry}{step}  canary {_short(r['canary'])} over {_short(r['stable'])}"]
    if phase == "rolled_back":
        live = r.get("live")
        now = f" (live: {_describe(live)})" if live and live.get("canary") else ""
        lines.append(f"  rolled back: {_short(r['stable'])} at 100%{now}")
        return lines
    lines.append("  " + _split(r))
    lines += ["  " + text for text in _progress(r)]
    lines += ["  " + text for text in _rules(r, paint)]
    change = r.get("traffic_change")
    if change:
        why = f": {change['error']}" if change.get("error") else ""
        lines.append(
            "  " + paint(f"traffic change {change['state']}: {change['kind']}{why}", "red")
        )
    return lines


def _holder(rollout: dict[str, Any]) -> str:
    """The replica holding a script's lease, with its epoch ("-": none holds it now)."""
    lease = rollout.get("lease") or {}
    return f"{lease['holder']}@{lease['epoch']}" if lease.get("holder") else "-"


def _split(r: dict[str, Any]) -> str:
    """``split 50%, live 50%`` (or, when they differ, which one coalmine would have set)."""
    live = r.get("live")
    live_percent = None
    if live is not None:
        live_percent = live["canary_percent"] if live.get("canary") == r["canary"] else None
    mine = f"{r['canary_percent']}%"
    if live is None:
        return f"split {mine} (live split not read yet)"
    live_text = f"{live_percent}%" if live_percent is not None else _describe(live)
    if r.get("dry_run"):
        return f"live {live_text}; coalmine would have set {mine} (dry run: traffic unchanged)"
    if live_percent == r["canary_percent"]:
        return f"split {mine} (live)"
    return f"live {live_text}; coalmine set {mine}"


def _describe(live: dict[str, Any]) -> str:
    if not live.get("canary"):
        return f"{_short(live['stable'])} at 100%"
    return f"{_short(live['canary'])} at {live['canary_percent']}%"


def _progress(r: dict[str, Any]) -> list[str]:
    phase = r["phase"]
    out: list[str] = []
    if phase in ("canary", "paused") and r.get("next_percent") is not None:
        remaining = r.get("hold_remaining_seconds")
        due = _clock(r.get("next_step_at"))
        if remaining:
            out.append(f"hold {_seconds(remaining)} left; next step {r['next_percent']}% at {due}")
        else:
            waits = r.get("waiting_for") or []
            if waits:
                out.append(f"hold done; next step {r['next_percent']}% waits for:")
                out += [f"  - {why}" for why in waits]
            else:
                out.append(f"hold done; next step {r['next_percent']}% at the next tick")
    elif phase == "promoted" and r.get("watch_ends_at"):
        out.append(f"post-promotion watch until {_clock(r['watch_ends_at'])}")
    elif phase == "stood_down":
        out.append("stood down after a manual change: `coalmine resume` adopts the live split")
    return out


def _rules(r: dict[str, Any], paint: Callable[[str, str], str]) -> list[str]:
    out: list[str] = []
    for name, rule in sorted(r["rules"].items()):
        status = rule["status"]
        if status == "breaching":
            text = f"breaching {name}: {_num(rule['value'])} {_bound(rule)}"
            out.append(paint(text, "red"))
        elif status == "inconclusive":
            detail = rule.get("detail") or "no data"
            out.append(paint(f"inconclusive {name}: {detail}", "yellow"))
    return out


def _bound(rule: dict[str, Any]) -> str:
    if rule.get("threshold") is None:
        return ""
    return f"{rule.get('operator', '>')} {_num(rule['threshold'])}"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "none" if value is None else str(value)


def _short(version: str | None) -> str:
    """A version id as people say it: Cloudflare's UUIDs by their first 8 characters."""
    if version is None:
        return "-"
    return version[:8] if len(version) == 36 and version.count("-") == 4 else version


def _seconds(seconds: float) -> str:
    whole = int(seconds + 0.999)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _clock(when: str | None) -> str:
    """``18:35:00Z`` from an RFC 3339 time (the date is rarely news)."""
    if not when:
        return "-"
    return when[11:19] + "Z" if len(when) >= 19 else when


def _clip(line: str) -> str:
    """At most WIDTH visible columns (colour escapes do not count)."""
    visible, out, i = 0, [], 0
    while i < len(line):
        if line[i] == "\x1b":
            end = line.index("m", i) + 1
            out.append(line[i:end])
            i = end
            continue
        if visible == WIDTH - 1 and len(_strip(line[i:])) > 1:
            out.append("…")
            break
        out.append(line[i])
        visible += 1
        i += 1
    text = "".join(out)
    return text + "\x1b[0m" if "\x1b[" in text and not text.endswith("\x1b[0m") else text


def _strip(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\x1b":
            i = text.index("m", i) + 1
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _painter(colour: bool) -> Callable[[str, str], str]:
    def paint(text: str, name: str) -> str:
        return f"\x1b[{_COLOURS[name]}m{text}\x1b[0m" if colour else text

    return paint


def use_colour(stream: TextIO) -> bool:
    """Colour on a terminal only, and never with ``NO_COLOR`` set."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def _fetch(base: str, script: str | None) -> list[dict[str, Any]]:
    path = "/api/v1/rollouts" + (f"/{quote(script, safe='')}" if script else "")
    response = request("GET", base + path)
    if response.status_code == 404 and script:
        raise LocalError(f"the daemon does not watch a script named {script!r}")
    if response.status_code != 200:
        raise RemoteError(f"daemon answered HTTP {response.status_code}")
    body = response.json()
    return [body] if script else list(body["rollouts"])


def _budget(base: str, colour: bool) -> str | None:
    """The budget plan's line, or None when /health does not say (an older daemon)."""
    try:
        response = request("GET", base + "/health")
        return budget_line(response.json().get("budget_plan"), colour=colour)
    except (CoalmineError, ValueError, AttributeError):
        return None


def status(
    settings: Settings,
    url: str | None,
    script: str | None = None,
    *,
    as_json: bool = False,
    watch: bool = False,
    every: float = 2.0,
    timeout: float | None = None,
    out: TextIO | None = None,
) -> int:
    """Print the rollouts once, or (``watch``) until the script's rollout ends."""
    stream = out or sys.stdout
    base = daemon_url(settings, url)
    if not watch:
        rollouts = _fetch(base, script)
        if as_json:
            print(
                json.dumps(rollouts[0] if script else {"rollouts": rollouts}, indent=2), file=stream
            )
        else:
            lines = render(rollouts, colour=use_colour(stream))
            if script is None and (line := _budget(base, use_colour(stream))) is not None:
                lines.append(line)
            print("\n".join(lines), file=stream)
        return 0
    return _watch(base, script, stream, as_json=as_json, every=every, timeout=timeout)


def _watch(
    base: str,
    script: str | None,
    stream: TextIO,
    *,
    as_json: bool,
    every: float,
    timeout: float | None,
) -> int:
    if script is None:
        scripts = [r["script"] for r in _fetch(base, None)]
        if len(scripts) != 1:
            raise LocalError(f"--watch needs a SCRIPT (one of: {', '.join(scripts)})")
        script = scripts[0]
    terminal = stream.isatty() and not as_json
    deadline = None if timeout is None else time.monotonic() + timeout
    seen_canary, last = False, ""
    while True:
        (rollout,) = _fetch(base, script)
        seen_canary = seen_canary or rollout["canary"] is not None
        if as_json:
            text = json.dumps(rollout)
        else:
            text = "\n".join(render([rollout], colour=use_colour(stream)))
        if text != last:  # redraw in place on a terminal; elsewhere, print each change once
            stream.write(("\x1b[H\x1b[J" if terminal else "") + text + "\n")
            stream.flush()
            last = text
        verdict = _verdict(rollout, seen_canary)
        if verdict is not None:
            return verdict
        if deadline is not None and time.monotonic() >= deadline:
            print(f"{script}: no verdict within {timeout:g}s", file=sys.stderr)
            return NO_VERDICT
        time.sleep(every)


def _verdict(rollout: dict[str, Any], seen_canary: bool) -> int | None:
    """0 promoted, 1 rolled back, 3 a dry run's end; None while the rollout runs."""
    phase = rollout["phase"]
    ended = phase in ("promoted", "rolled_back") or (phase == "idle" and seen_canary)
    if not ended:
        return None
    if rollout.get("dry_run"):
        return NO_VERDICT  # nothing was promoted or rolled back for real
    return ROLLED_BACK if phase == "rolled_back" else PROMOTED
