"""Cloudflare saying no for good: a version that does not exist, a change it will never accept."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from coalmine.cli import main
from coalmine.cloudflare.actuator import cannot_succeed
from coalmine.cloudflare.client import CloudflareError
from coalmine.engine import RolloutPhase
from tests.e2e.harness import ADMIN_TOKEN, Harness, harness, served

pytestmark = pytest.mark.anyio
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MISSING = "00000000-0000-4000-8000-00000000dead"

# Advances on the hold alone: the 10% step's hold ends at the third tick.
POLICY = """
version: 1
name: refusals
scripts: [api]
analysis: {interval: 30s, warmup: 0s}
steps: [{weight: 10, hold: 1m}, {weight: 50, hold: 1m}, {weight: 100}]
rules: []
"""


def posts(h: Harness) -> list[tuple[Any, int | None]]:
    """Every deployment POST Cloudflare received: its body and status."""
    return [
        (r.body, r.status)
        for r in h.sim.cloudflare.requests
        if r.method == "POST" and r.path.endswith("/deployments")
    ]


def refusal_pages(h: Harness) -> list[str]:
    """The event actions of the refusal page PagerDuty received, in order."""
    return [p["event_action"] for p in h.sim.pages if p["dedup_key"] == "coalmine/api/refused"]


async def test_start_of_a_version_that_does_not_exist_is_404(tmp_path: Path) -> None:
    """POST start naming an unknown version: 404 with Cloudflare's message, nothing queued,
    nothing sent to the deployments API."""
    async with harness(tmp_path, start_canary=False) as h, served(h) as client:
        await h.tick()
        response = await client.post(
            "/api/v1/rollouts/api/start", json={"version": MISSING}, headers=AUTH
        )
        assert response.status_code == 404
        error = response.json()["error"]
        assert error.startswith(f"no version {MISSING!r} of 'api': ")
        assert f"version {MISSING} not found" in error  # the simulator's (Cloudflare's) words
        assert h.loop._pending == []
        await h.tick()
        assert posts(h) == []
        assert h.phase is RolloutPhase.IDLE


async def test_coalmine_start_of_a_missing_version_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coalmine start api UNKNOWN` prints Cloudflare's message and exits 1."""
    async with harness(tmp_path, start_canary=False) as h, served(h) as client:
        monkeypatch.setenv("COALMINE_ADMIN_TOKEN", ADMIN_TOKEN)
        url = str(client.base_url).rstrip("/")
        code = await anyio.to_thread.run_sync(main, ["start", "api", MISSING, "--url", url])
    assert code == 1
    assert f"version {MISSING} not found" in capsys.readouterr().err


async def test_a_change_cloudflare_refuses_for_good_is_withdrawn_once(tmp_path: Path) -> None:
    """The 50% step answered 400 (100405, Durable Object exports differ): the POST is sent
    once, not retried; the rollout is back at 10% as before; one page says why; nothing more
    is sent until an operator resumes; then the page resolves and the step goes out."""
    async with harness(tmp_path, policy=POLICY) as h, served(h) as client:
        refusal = {
            "success": False,
            "errors": [{"code": 100405, "message": "versions declare different DO exports"}],
            "messages": [],
            "result": None,
        }
        h.sim.cloudflare.inject(method="POST", path="*/deployments", status=400, body=refusal)
        await h.run_until(lambda h: "set_traffic" in h.actions(), timedelta(minutes=3))
        assert [status for _, status in posts(h)] == [400]
        assert (h.phase, h.loop.state.canary_percent) == (RolloutPhase.CANARY, 10)
        withdrawn = [e for e in h.db.journal() if e.action == "withdrawn"]
        assert [e.body["reason"] for e in withdrawn] == [
            "100405: versions declare different DO exports"
        ]
        assert h.db.open_intents() == []

        for _ in range(10):  # five minutes: held, not re-sent, paged once
            await h.tick()
        assert [status for _, status in posts(h)] == [400]
        assert h.loop.state.canary_percent == 10
        assert refusal_pages(h) == ["trigger"]
        (page,) = [p for p in h.sim.pages if p["dedup_key"] == "coalmine/api/refused"]
        assert "Cloudflare refused set_traffic" in page["payload"]["summary"]
        assert "100405" in page["payload"]["summary"]

        async def resume() -> None:
            await client.post("/api/v1/rollouts/api/resume", headers=AUTH)

        async with anyio.create_task_group() as tg:
            tg.start_soon(resume)
            with anyio.fail_after(10):
                while not h.loop._pending:
                    await anyio.sleep(0.01)
            await h.tick()
        await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=2))
        assert [status for _, status in posts(h)] == [400, 200]
        assert refusal_pages(h) == ["trigger", "resolve"]


async def test_a_change_refused_for_good_after_a_transient_failure_is_withdrawn(
    tmp_path: Path,
) -> None:
    """The 50% step first meets a 503 (kept, retried next tick), then a 400 10021: withdrawn
    at that tick, back at 10%, the refusal paged once, no more POSTs."""
    async with harness(tmp_path, policy=POLICY) as h:
        refusal = {
            "success": False,
            "errors": [{"code": 10021, "message": "versions[0].percentage is invalid"}],
            "messages": [],
            "result": None,
        }
        h.sim.cloudflare.inject(method="POST", path="*/deployments", status=503, times=1)
        await h.run_until(lambda h: "set_traffic" in h.actions(), timedelta(minutes=3))
        assert [status for _, status in posts(h)] == [503]  # kept, to be retried
        h.sim.cloudflare.inject(method="POST", path="*/deployments", status=400, body=refusal)
        for _ in range(4):
            await h.tick()
        assert [status for _, status in posts(h)] == [503, 400]  # then not retried
        assert (h.phase, h.loop.state.canary_percent) == (RolloutPhase.CANARY, 10)
        assert refusal_pages(h) == ["trigger"]


@pytest.mark.parametrize(
    ("status", "codes", "kind", "for_good"),
    [
        (400, (10021,), "set_traffic", True),
        (400, (100405,), "promote", True),
        (404, (10007,), "set_traffic", True),
        (400, (10220,), "set_traffic", True),
        (400, (10220,), "rollback", False),  # forced with ?force=true instead
        (429, (971,), "set_traffic", False),
        (409, (), "promote", False),
        (403, (10000,), "set_traffic", False),
        (503, (10013,), "set_traffic", False),
        (None, (), "set_traffic", False),  # no answer at all
    ],
)
def test_which_refusals_cannot_succeed(
    status: int | None, codes: tuple[int, ...], kind: str, for_good: bool
) -> None:
    """A 4xx about the request itself is for good; auth, conflicts, budget, 5xx are not."""
    assert cannot_succeed(CloudflareError("x", status=status, codes=codes), kind) is for_good


async def test_api_start_checks_the_version_through_cloudflare(tmp_path: Path) -> None:
    """A start naming an existing version reads it once from the versions API, then starts."""
    async with harness(tmp_path, start_canary=False) as h, served(h) as client:
        await h.tick()
        answers: list[httpx.Response] = []

        async def start() -> None:
            answers.append(
                await client.post(
                    "/api/v1/rollouts/api/start", json={"version": h.canary}, headers=AUTH
                )
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            with anyio.fail_after(10):
                while not h.loop._pending:
                    await anyio.sleep(0.01)
            await h.tick()
        assert answers[0].status_code == 200
        reads = [r.path for r in h.sim.cloudflare.requests if r.path.endswith(h.canary)]
        assert reads == [
            f"/client/v4/accounts/{h.sim.cloudflare.account_id}/workers/scripts/api/versions/{h.canary}"
        ]
        assert h.phase is RolloutPhase.CANARY
