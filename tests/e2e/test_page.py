"""The status page at `GET /`: rendered by a real headless Chromium, a canary that advances and
one that rolls back, no console errors, and a screenshot for the docs."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from coalmine.server.page import render
from coalmine.simulator import Behaviour
from tests.e2e.harness import Harness, harness, served
from tests.support import ROOT

pytestmark = pytest.mark.anyio
SCREENSHOT = ROOT / "docs" / "status-page.png"


def chromium() -> str:
    """Debian's chromium, or skip (fail when COALMINE_REQUIRE_CHROMIUM=1)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "Debian's chromium is not installed (make test installs it when it can)"
    if os.environ.get("COALMINE_REQUIRE_CHROMIUM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def browse(url: str, tmp_path: Path, screenshot: Path | None = None) -> tuple[str, str]:
    """Load ``url`` in headless Chromium: the DOM it rendered and its console log."""
    browser = chromium()
    base = [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1000,640",
    ]
    dom = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    if screenshot is not None:
        shot = subprocess.run(
            [*base, f"--screenshot={screenshot}", url],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    return dom.stdout, dom.stderr


def console_errors(log: str) -> list[str]:
    """The page's console messages and load errors in Chromium's log."""
    return [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]


async def run_to(h: Harness, action: str) -> None:
    """Tick until the rollout has made ``action``."""
    await h.run_until(lambda h: action in h.actions(), limit=timedelta(minutes=15))


async def test_the_page_shows_a_canary_that_advances(tmp_path: Path) -> None:
    """An advancing canary: its phase, split and rule charts render with no console error."""
    async with harness(tmp_path) as h, served(h) as client:
        await run_to(h, "set_traffic")
        for _ in range(4):
            await h.tick()
        url = str(client.base_url) + "/"
        dom, log = await anyio.to_thread.run_sync(lambda: browse(url, tmp_path, SCREENSHOT))
    assert "CANARY" in dom and "step 2/3" in dom and "50%" in dom
    assert dom.count("<svg") >= 2  # a chart per rule
    assert "set_traffic" in dom
    assert console_errors(log) == []


async def test_the_page_shows_a_canary_that_rolled_back(tmp_path: Path) -> None:
    """A faulty canary: ROLLED_BACK and the rollback's reason, with no console error."""
    async with harness(tmp_path, canary=Behaviour(exception_rate=0.2)) as h, served(h) as client:
        await run_to(h, "rollback")
        url = str(client.base_url) + "/"
        dom, log = await anyio.to_thread.run_sync(lambda: browse(url, tmp_path))
    assert "ROLLED_BACK" in dom and "tripped" in dom
    assert console_errors(log) == []


def test_the_page_escapes_everything_and_loads_nothing() -> None:
    """Reasons are escaped; there is no script and no external asset; it refreshes itself."""
    rollout = {
        "script": "api",
        "phase": "canary",
        "canary": "v2",
        "stable": "v1",
        "canary_percent": 10,
        "step": 1,
        "steps": [10, 50, 100],
        "rules": {"err": {"status": "ok", "value": 0.1, "threshold": 0.5, "operator": ">"}},
        "recent_decisions": [{"t": "t", "action": "warn", "reason": "<script>alert(1)</script>"}],
    }
    now = datetime(2026, 3, 3, 18, 0, tzinfo=UTC)
    page = render([rollout], {"api": {"err": [(now, 0.1), (now, None), (now, 0.2)]}}, now)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'http-equiv="refresh"' in page
    assert "src=" not in page and "<link" not in page
