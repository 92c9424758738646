"""The daemon's HTTP endpoints: /metrics, /health, /healthz, /readyz and the admin API."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest

from tests.e2e.harness import ADMIN_TOKEN, harness, served

pytestmark = pytest.mark.anyio


async def test_metrics_carry_values_and_pass_promtool(tmp_path: Path) -> None:
    """/metrics has phase, weight and per-rule values, and `promtool check metrics` accepts it."""
    async with harness(tmp_path) as h, served(h) as client:
        for _ in range(6):
            await h.tick()
        response = await client.get("/metrics")
    text = response.text
    assert response.status_code == 200
    assert 'coalmine_rollout_phase{phase="canary",script="api"} 1.0' in text
    assert 'coalmine_canary_weight_percent{script="api"} 10.0' in text
    assert 'coalmine_rule_threshold{rule="exceptions",script="api"} 0.02' in text
    assert 'coalmine_rule_value{rule="exceptions",script="api",version="canary"}' in text
    assert "coalmine_build_info{" in text
    assert 'coalmine_decisions_total{action="start",script="api"} 1.0' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


async def test_health_reports_dependencies_and_degrades(tmp_path: Path) -> None:
    """/health lists each dependency with its latency; a failing one makes it degraded (200)."""
    async with harness(tmp_path) as h, served(h) as client:
        await h.tick()
        healthy = (await client.get("/health")).json()
        h.sim.cloudflare.inject(method="POST", path="*/graphql", status=503, times=None)
        await h.tick()
        degraded = await client.get("/health")
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503  # serve() was not started here
    assert healthy["status"] == "healthy"
    assert healthy["checks"]["cloudflare"]["status"] == "healthy"
    assert isinstance(healthy["checks"]["cloudflare"]["latency_ms"], float)
    assert healthy["rollouts"] == [
        {"script": "api", "phase": "canary", "canary": h.canary, "canary_percent": 10}
    ]
    assert degraded.status_code == 200
    assert degraded.json()["status"] == "degraded"
    assert degraded.json()["checks"]["cloudflare_analytics"]["status"] == "failing"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 403),
        ({"Authorization": f"Basic {ADMIN_TOKEN}"}, 401),
        ({"X-Admin-Token": ADMIN_TOKEN}, 401),
    ],
)
async def test_writes_need_the_bearer_token(
    tmp_path: Path, headers: dict[str, str], status: int
) -> None:
    """No token, a wrong token or a token in the wrong header: refused, nothing applied."""
    async with harness(tmp_path) as h, served(h) as client:
        await h.tick()
        response = await client.post("/api/v1/rollouts/api/rollback", headers=headers)
        assert response.status_code == status
        assert h.phase.value == "canary"


async def test_writes_refused_without_a_configured_token(tmp_path: Path) -> None:
    """With COALMINE_ADMIN_TOKEN unset, every write is 403 even with a bearer header."""
    async with harness(tmp_path, env={"COALMINE_ADMIN_TOKEN": ""}) as h, served(h) as client:
        response = await client.post(
            "/api/v1/rollouts/api/pause", headers={"Authorization": "Bearer anything"}
        )
    assert response.status_code == 403
    assert "COALMINE_ADMIN_TOKEN" in response.json()["error"]


async def test_operator_rollback_through_the_api(tmp_path: Path) -> None:
    """POST rollback with the token: applied at the next tick, answered with the decisions."""
    async with harness(tmp_path) as h, served(h) as client:
        await h.tick()
        answers: list[httpx.Response] = []

        async def post() -> None:
            answers.append(
                await client.post(
                    "/api/v1/rollouts/api/rollback",
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                )
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(post)
            with anyio.fail_after(10):
                while not h.loop._pending:  # wait until the command is queued
                    await anyio.sleep(0.01)
            await h.tick()
        (response,) = answers
        assert response.status_code == 200
        assert [d["action"] for d in response.json()["decisions"]] == ["rollback"]
        assert response.json()["decisions"][0]["actor"] == "operator"
        assert h.sim.deployment_posts("api")[-1]["versions"] == [
            {"version_id": h.stable, "percentage": 100}
        ]  # type: ignore[index]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/v1/rollouts/nope/pause", None, 404),
        ("/api/v1/rollouts/api/explode", None, 404),
        ("/api/v1/rollouts/api/start", b"{not json", 400),
        ("/api/v1/rollouts/api/start", b'{"version": 5}', 400),
    ],
)
async def test_bad_admin_requests_are_4xx(
    tmp_path: Path, path: str, body: bytes | None, status: int
) -> None:
    """Unknown scripts or commands and malformed bodies are 4xx, never 5xx."""
    async with harness(tmp_path) as h, served(h) as client:
        response = await client.post(
            path, content=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
    assert response.status_code == status


async def test_rollouts_read_api(tmp_path: Path) -> None:
    """GET /api/v1/rollouts/{script} shows phase, weights, rule values and recent decisions."""
    async with harness(tmp_path) as h, served(h) as client:
        for _ in range(8):
            await h.tick()
        body = (await client.get("/api/v1/rollouts/api")).json()
        missing = await client.get("/api/v1/rollouts/nope")
    assert (body["phase"], body["canary_percent"], body["steps"]) == ("canary", 10, [10, 50, 100])
    assert body["rules"]["exceptions"]["status"] in ("ok", "warmup")
    assert body["recent_decisions"][0]["action"] == "start"
    assert missing.status_code == 404


async def test_journal_verification_is_exported(tmp_path: Path) -> None:
    """coalmine_journal_verified is 1 for an intact chain and 0 once an entry is edited."""
    import sqlite3

    async with harness(tmp_path) as h, served(h) as client:
        for _ in range(3):
            await h.tick()
        assert await h.daemon.verify_journal()
        intact = (await client.get("/metrics")).text
        db = sqlite3.connect(h.db.path)
        db.executescript(
            "DROP TRIGGER journal_no_update; UPDATE journal SET actor = 'mallory' WHERE seq = 1;"
        )
        db.close()
        assert not await h.daemon.verify_journal()
        broken = (await client.get("/metrics")).text
    assert "coalmine_journal_verified 1.0" in intact
    assert "coalmine_journal_verified 0.0" in broken


async def test_no_secret_reaches_metrics_health_journal_outbox_or_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through failures and a rollback, no token, key or webhook appears anywhere coalmine writes."""
    import sqlite3

    from coalmine.simulator import Behaviour

    async with harness(tmp_path, canary=Behaviour(exception_rate=0.3)) as h, served(h) as client:
        secrets = [
            h.sim.api_token,
            h.sim.pagerduty_routing_key,
            h.sim.grafana_token,
            ADMIN_TOKEN,
            h.sim.slack_webhook_url.rsplit("/", 1)[-1],
        ]
        h.sim.pagerduty.inject(status=500, times=3)
        h.sim.cloudflare.inject(
            method="GET",
            path="*/deployments",
            status=403,
            body={
                "success": False,
                "errors": [{"code": 10000, "message": "Authentication error"}],
                "messages": [],
                "result": None,
            },
            times=2,
        )
        for _ in range(40):
            await h.tick()
        await client.post(
            "/api/v1/rollouts/api/pause", headers={"Authorization": "Bearer wrong-token"}
        )
        texts = [(await client.get(p)).text for p in ("/metrics", "/health", "/api/v1/rollouts")]
        texts += [json.dumps(e.to_dict()) for e in h.db.journal()]
        db = sqlite3.connect(h.db.path)
        texts += [
            row[0] + str(row[1]) for row in db.execute("SELECT payload, last_error FROM outbox")
        ]
        texts += [row[0] for row in db.execute("SELECT state FROM rollouts")]
        db.close()
    captured = capsys.readouterr()
    texts += [captured.out, captured.err]
    assert "rollback" in h.actions()  # the run went through failures and a rollback
    for secret in secrets:
        assert len(secret) >= 16
        assert not [t for t in texts if secret in t], f"a secret leaked: {secret[:4]}..."


async def test_a_command_no_tick_took_is_withdrawn_not_applied_later(tmp_path: Path) -> None:
    """A command that times out before any tick takes it is withdrawn: retrying cannot double it."""
    from coalmine.daemon import CommandFailed
    from coalmine.engine import Command

    async with harness(tmp_path) as h:
        await h.tick()
        with pytest.raises(CommandFailed, match="withdrawn"):
            await h.loop.submit(Command("promote"), timeout=0.05)
        assert h.loop._pending == []
        await h.tick()
        assert h.loop.state.canary_percent == 10  # the withdrawn promote never happened


async def test_accept_errors_show_in_health(tmp_path: Path) -> None:
    """An accept error (EMFILE) makes /health degraded with a failing `http` check, until accepting works again."""
    async with harness(tmp_path) as h, served(h) as client:
        h.daemon.accepting("accepting connections failed: [Errno 24] Too many open files")
        failing = (await client.get("/health")).json()
        h.daemon.accepting(None)
        recovered = (await client.get("/health")).json()
    assert failing["status"] == "degraded"
    assert failing["checks"]["http"]["status"] == "failing"
    assert "Too many open files" in failing["checks"]["http"]["error"]
    assert recovered["checks"]["http"]["status"] == "healthy"
