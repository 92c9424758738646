"""``coalmine start | pause | resume | promote | rollback``: talk to a running daemon."""

from __future__ import annotations

import getpass
import os
import sys
from typing import Any
from urllib.parse import quote

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


def request(
    method: str,
    url: str,
    token: str | None = None,
    body: Any = None,
    extra_headers: dict[str, str] | None = None,
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(extra_headers or {})
    try:
        return httpx.request(method, url, json=body, headers=headers, timeout=40.0)
    except httpx.TransportError as exc:
        raise RemoteError(
            f"cannot reach the daemon at {httpx.URL(url).copy_with(path='/')}"
            f" ({type(exc).__name__}); is `coalmine run` running?"
        ) from None


ALREADY = {
    "pause": "already paused",
    "resume": "not paused: nothing to resume",
    "promote": "already at 100%: nothing to promote",
}


def default_actor() -> str:
    """Who is at the keyboard: the OS user (``--actor`` overrides it)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no user name in a bare container
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


def command(
    settings: Settings,
    url: str | None,
    script: str,
    kind: str,
    version: str | None = None,
    *,
    actor: str | None = None,
    reason: str | None = None,
) -> int:
    """Send an operator command; exit 0 when applied (or already so), 1 when refused.

    The journal records ``actor`` (default: the OS user) and ``reason``.
    """
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    if not token:
        raise ConfigError("COALMINE_ADMIN_TOKEN is not set: the daemon refuses commands without it")
    body: dict[str, str] = {}
    if version:
        body["version"] = version
    if reason:
        body["reason"] = reason
    response = request(
        "POST",
        f"{daemon_url(settings, url)}/api/v1/rollouts/{quote(script, safe='')}/{kind}",
        token,
        body or None,
        {"X-Coalmine-Actor": actor or default_actor()},
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
            print(f"{script}: {ALREADY.get(kind, 'nothing to do')}")
        return 0 if response.status_code == 200 else 1
    print(f"coalmine: {payload.get('error', f'HTTP {response.status_code}')}", file=sys.stderr)
    return 1
