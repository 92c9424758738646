"""``coalmine status | start | pause | resume | promote | rollback``: talk to a running daemon."""

from __future__ import annotations

import sys
from typing import Any

import httpx

from coalmine.errors import ConfigError, RemoteError
from coalmine.settings import Settings


def daemon_url(settings: Settings, url: str | None) -> str:
    """The daemon's base URL: ``--url``, else ``COALMINE_LISTEN`` (0.0.0.0 reached on loopback)."""
    if url:
        return url.rstrip("/")
    host, port = settings.listen_address
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _request(method: str, url: str, token: str | None = None, body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return httpx.request(method, url, json=body, headers=headers, timeout=40.0)
    except httpx.TransportError as exc:
        raise RemoteError(
            f"cannot reach the daemon at {httpx.URL(url).copy_with(path='/')}"
            f" ({type(exc).__name__}); is `coalmine run` running?"
        ) from None


def status(settings: Settings, url: str | None) -> int:
    """Print every rollout as a table."""
    response = _request("GET", daemon_url(settings, url) + "/api/v1/rollouts")
    if response.status_code != 200:
        raise RemoteError(f"daemon answered HTTP {response.status_code}")
    rollouts = response.json()["rollouts"]
    leased = any("lease" in r for r in rollouts)  # replicas: which one holds each script
    rows: list[tuple[str, ...]] = [
        ("SCRIPT", "PHASE", "CANARY", "STABLE", "WEIGHT", "STEP", "BREACHING", "INCONCLUSIVE")
        + (("HOLDER",) if leased else ())
    ]
    for r in rollouts:
        breaching = sorted(n for n, v in r["rules"].items() if v["status"] == "breaching")
        inconclusive = sorted(n for n, v in r["rules"].items() if v["status"] == "inconclusive")
        steps = f"{r['step']}/{len(r['steps'])}" if r["step"] else "-"
        rows.append(
            (
                r["script"],
                r["phase"],
                r["canary"] or "-",
                r["stable"] or "-",
                f"{r['canary_percent']}%" if r["canary"] else "-",
                steps,
                ",".join(breaching) or "-",
                ",".join(inconclusive) or "-",
            )
            + ((f"{_holder(r)}",) if leased else ())
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def command(
    settings: Settings, url: str | None, script: str, kind: str, version: str | None = None
) -> int:
    """Send an operator command; exit 0 when applied, 1 when refused."""
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    if not token:
        raise ConfigError("COALMINE_ADMIN_TOKEN is not set: the daemon refuses commands without it")
    body = {"version": version} if version else None
    response = _request(
        "POST", f"{daemon_url(settings, url)}/api/v1/rollouts/{script}/{kind}", token, body
    )
    try:
        payload = response.json()
    except ValueError:
        payload = {}
    if response.status_code == 202:
        print(f"{kind}: accepted, still being applied ({payload.get('queued', '')})")
        return 0
    if response.status_code in (200, 409):
        for d in payload.get("decisions", []):
            print(f"{d['action']}: {d['reason']}")
        if response.status_code == 200 and not payload.get("decisions"):
            print(f"{kind}: nothing to do")
        return 0 if response.status_code == 200 else 1
    print(f"coalmine: {payload.get('error', f'HTTP {response.status_code}')}", file=sys.stderr)
    return 1


def _holder(rollout: dict[str, Any]) -> str:
    """The replica holding a script's lease, with its epoch ("-": none holds it now)."""
    lease = rollout.get("lease") or {}
    return f"{lease['holder']}@{lease['epoch']}" if lease.get("holder") else "-"
