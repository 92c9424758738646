"""The operator's view: commands from the command line, who and why in the journal, dry runs."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import anyio
import httpx
import pytest
import structlog.testing

from coalmine.cli import main
from coalmine.simulator import Behaviour
from coalmine.store.sqlite import SqliteStore as Store
from tests.e2e.harness import ADMIN_TOKEN, Harness, harness, served

pytestmark = pytest.mark.anyio
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")  # the daemon's own log, on stdout


async def cli(
    h: Harness, client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str]:
    """Run ``coalmine ARGV --url DAEMON`` in a thread, ticking the daemon while it waits."""
    codes: list[int] = []
    capsys.readouterr()

    def run() -> None:
        codes.append(main([*argv, "--url", str(client.base_url)]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, run)
        with anyio.fail_after(20):
            while not codes:
                if h.loop._pending:
                    await h.tick(1)
                await anyio.sleep(0.01)
    printed = capsys.readouterr().out.splitlines(keepends=True)
    return codes[0], "".join(line for line in printed if not LOG_LINE.match(line))


async def test_pause_twice_exits_0_and_the_journal_records_who_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pause` is idempotent ("already paused", exit 0); the journal names the actor and reason."""
    monkeypatch.setenv("COALMINE_ADMIN_TOKEN", ADMIN_TOKEN)
    async with harness(tmp_path) as h, served(h) as client:
        await h.tick()
        first = await cli(h, client, capsys, "pause", "api", "--reason", "INC-42", "--actor", "ana")
        second = await cli(h, client, capsys, "pause", "api")
        resumed = await cli(h, client, capsys, "resume", "api", "--reason", "fixed")
        again = await cli(h, client, capsys, "resume", "api")
    assert first[0] == 0 and first[1].startswith("pause: paused by an operator")
    assert second == (0, "api: already paused\n")
    assert resumed[0] == 0 and again == (0, "api: not paused: nothing to resume\n")
    with Store(tmp_path / "state.db") as store:
        entries = [e.to_dict() for e in store.journal(since=0)]
    pause = next(e for e in entries if e["action"] == "pause")
    assert pause["actor"] == "ana"
    assert (pause["body"]["requested_by"], pause["body"]["request_reason"]) == ("ana", "INC-42")
    assert any("(ana — INC-42)" in str(m["text"]) for m in h.sim.slack_messages)
    resume = next(e for e in entries if e["action"] == "resume")
    assert resume["body"]["request_reason"] == "fixed"
    assert resume["actor"] not in ("operator", "", None)  # the OS user by default


async def test_a_dry_run_says_so_everywhere(tmp_path: Path) -> None:
    """Dry run: API shows live vs would-be split; decisions, Slack, annotation say DRY RUN."""
    async with harness(tmp_path, env={"COALMINE_DRY_RUN": "true"}) as h, served(h) as client:
        await h.run_until(lambda h: "set_traffic" in h.actions(), limit=timedelta(minutes=10))
        rollout = (await client.get("/api/v1/rollouts/api")).json()
        await h.run_until(lambda h: "complete" in h.actions(), limit=timedelta(minutes=30))
        after = (await client.get("/api/v1/rollouts/api")).json()
    assert rollout["dry_run"] is True
    assert (rollout["canary_percent"], rollout["live"]["canary_percent"]) == (50, 10)
    assert all(d.dry_run and d.reason.startswith("DRY RUN") for d in h.decisions)
    assert all("DRY RUN" in str(m["text"]) for m in h.sim.slack_messages)
    assert [m for m in h.sim.slack_messages if "set_traffic" in str(m["text"])]
    (annotation,) = h.sim.annotations
    assert "dry_run" in annotation["tags"] and "DRY RUN" in str(annotation["text"])
    # a dry run never calls the canary stable: Cloudflare still serves the old version
    assert (after["phase"], after["stable"]) == ("idle", h.stable)
    assert not h.sim.deployment_posts("api")


async def test_a_rollback_logs_a_warning_and_its_page_links_to_the_rollout(tmp_path: Path) -> None:
    """A rollback and its page log at warning; the page links to the rollout's API and page."""
    env = {"COALMINE_PUBLIC_URL": "https://coalmine.example.com"}
    async with harness(tmp_path, env=env, canary=Behaviour(exception_rate=0.2)) as h:
        with structlog.testing.capture_logs() as logs:
            await h.run_until(lambda h: "rollback" in h.actions(), limit=timedelta(minutes=10))
    levels = {e["action"]: e["log_level"] for e in logs if e.get("action")}
    assert (levels["rollback"], levels["page"]) == ("warning", "warning")
    (page,) = [p for p in h.sim.pages if p.get("event_action") == "trigger"]
    assert [link["href"] for link in page["links"]] == [  # type: ignore[attr-defined]
        "https://coalmine.example.com/api/v1/rollouts/api",
        "https://coalmine.example.com/#api",
    ]


async def watch(
    h: Harness, client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str]:
    """Run ``coalmine status --watch`` in a thread while the daemon ticks on, until it exits."""
    codes: list[int] = []
    capsys.readouterr()

    def run() -> None:
        codes.append(
            main(["status", *argv, "--watch", "--every", "0.01", "--url", str(client.base_url)])
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, run)
        with anyio.fail_after(60):
            while not codes:
                await h.tick(30)
                await anyio.sleep(0.02)  # let the watcher poll between ticks
    printed = capsys.readouterr().out.splitlines(keepends=True)
    return codes[0], "".join(line for line in printed if not LOG_LINE.match(line))


async def test_status_watch_exits_1_when_the_canary_is_rolled_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status --watch` follows a faulty canary and exits 1 on its rollback."""
    async with harness(tmp_path, canary=Behaviour(exception_rate=0.2)) as h, served(h) as client:
        code, out = await watch(h, client, capsys, "api")
    assert code == 1
    assert "api  CANARY" in out and "api  ROLLED_BACK" in out
    assert all(len(line) <= 100 for line in out.splitlines())


async def test_status_watch_exits_0_when_the_canary_is_promoted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status --watch` follows a healthy canary and exits 0 once it is promoted."""
    async with harness(tmp_path) as h, served(h) as client:
        code, out = await watch(h, client, capsys)
    assert code == 0
    assert "hold" in out and "api  PROMOTED" in out


async def test_status_json_is_the_api_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status SCRIPT --json` prints the rollout object, with hold and live split."""
    async with harness(tmp_path) as h, served(h) as client:
        await h.tick()
        code, out = await cli(h, client, capsys, "status", "api", "--json")
    body = json.loads(out)
    assert code == 0
    assert (body["phase"], body["live"]["canary_percent"], body["next_percent"]) == (
        "canary",
        10,
        50,
    )
    assert 0 < body["hold_remaining_seconds"] <= 300
