"""`coalmine run` as a process, guarding its state store and reloading on SIGHUP.

- an unusable state database at start (missing or read-only folder, garbage, a newer schema)
  is exit 2 naming the file and the cause, never "internal error" (exit 70);
- the state folder removed under the running process: /readyz fails, /health is unhealthy,
  one critical page; the folder back: written back, ready, resolved; SIGTERM still exits 0;
- SIGHUP reloads the policies: a valid set adds and removes scripts, an invalid set is refused
  with a warning and the running policies stay.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from coalmine.guard import STORE_PAGE_KEY
from coalmine.store.sqlite import SqliteStore
from tests.e2e.test_process import at_percent, get_json, simulated, start, url, wait_for

pytestmark = pytest.mark.anyio

TWO_SCRIPTS = """
version: 1
name: process
scripts: [api, web]
analysis: {interval: 1s, warmup: 0s, inconclusive_page_after: 1h}
steps: [{weight: 10, hold: 1h}, {weight: 100}]
rules:
  - {name: exceptions, source: cloudflare, signal: errors_per_minute, window: 1m, above: 1000, on_breach: page}
"""


def run_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`coalmine run` in the foreground (it is expected to stop at once)."""
    return subprocess.run(
        [sys.executable, "-m", "coalmine", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start_env(tmp_path: Path, state: Path) -> dict[str, str]:
    """Settings good enough to get to opening the store (nothing is called before it)."""
    (tmp_path / "policy.yaml").write_text(TWO_SCRIPTS)
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("COALMINE_")},
        "COALMINE_POLICIES": str(tmp_path / "policy.yaml"),
        "COALMINE_STATE_URL": f"sqlite:///{state}",
        "COALMINE_CLOUDFLARE_ACCOUNT_ID": "0123456789abcdef0123456789abcdef",
        "COALMINE_CLOUDFLARE_API_TOKEN": "not-used-the-store-fails-first",
        "COALMINE_LISTEN": "127.0.0.1:0",
    }


@contextmanager
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs (root only; chmod does not stop root: skip, saying why, otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("a read-only file system needs root to mount; CI runs the tests as root")
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def garbage(path: Path) -> None:
    """A file that is not a SQLite database."""
    path.write_bytes(os.urandom(4096))


def newer_schema(path: Path) -> None:
    """A SQLite database from a newer coalmine."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")


def nothing(path: Path) -> None:
    """The folder does not exist; nothing to make."""


@pytest.mark.parametrize(
    ("name", "make", "cause"),
    [
        ("missing/state.db", nothing, "does not exist"),
        ("state.db", garbage, "not a SQLite database"),
        ("state.db", newer_schema, "newer than this coalmine"),
    ],
)
def test_an_unusable_state_database_at_start_is_exit_2_naming_file_and_cause(
    tmp_path: Path, name: str, make: Callable[[Path], None], cause: str
) -> None:
    """A missing folder, a garbage file or a newer schema stops `coalmine run` with exit 2,
    the file and the cause on stderr, and no "internal error"."""
    state = tmp_path / name
    make(state)
    result = run_once(start_env(tmp_path, state))
    assert result.returncode == 2, result.stderr
    assert str(state) in result.stderr
    assert cause in result.stderr
    assert "internal error" not in result.stderr


def test_a_read_only_state_folder_at_start_is_exit_2_naming_file_and_cause(
    tmp_path: Path,
) -> None:
    """A state folder on a read-only file system: exit 2 naming the file, not exit 70."""
    with read_only_folder(tmp_path) as folder:
        state = folder / "state.db"
        result = run_once(start_env(tmp_path, state))
    assert result.returncode == 2, result.stderr
    assert str(state) in result.stderr
    assert "read-only" in result.stderr
    assert "internal error" not in result.stderr


async def test_a_state_folder_removed_under_the_process_fails_readiness_and_pages_once(
    tmp_path: Path,
) -> None:
    """The state folder removed while `coalmine run` runs: /readyz 503, /health unhealthy, one
    critical page under coalmine/state-store; the folder back: the database is written back
    from the open file, ready again, the page resolved; SIGTERM still stops it with exit 0."""
    async with simulated(tmp_path) as (sim, env):
        folder = tmp_path / "state"
        folder.mkdir()
        env["COALMINE_STATE_URL"] = f"sqlite:///{folder / 'state.db'}"
        process = start(env, tmp_path / "run.log")
        try:
            await wait_for(lambda: readiness(env, 200))
            shutil.rmtree(folder)

            async def lost() -> bool:
                health = await get_any(env, "/health")
                store_pages = [p for p in sim.pages if p["dedup_key"] == STORE_PAGE_KEY]
                return (
                    health["status"] == "unhealthy"
                    and await readiness(env, 503, "deleted")
                    and len(store_pages) == 1
                )

            await wait_for(lost)
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(url(env) + "/metrics")).text
            assert "coalmine_store_lost 1.0" in metrics
            folder.mkdir()
            await wait_for(lambda: readiness(env, 200))
            assert (folder / "state.db").is_file()
        finally:
            process.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=30))
        assert code == 0, (tmp_path / "run.log").read_text()
        store_pages = [p for p in sim.pages if p["dedup_key"] == STORE_PAGE_KEY]
        assert [p["event_action"] for p in store_pages] == ["trigger", "resolve"]
        assert store_pages[0]["payload"]["severity"] == "critical"
        with SqliteStore(folder / "state.db") as store:
            assert store.verify_journal().ok
            assert store.verify_journal().entries >= 1  # the journal from before, written back


async def readiness(env: dict[str, str], status: int, text: str = "") -> bool:
    """Whether /readyz answers ``status`` (with ``text`` in its body)."""
    try:
        async with httpx.AsyncClient() as client:
            response = await client.get(url(env) + "/readyz")
    except httpx.TransportError:
        return False
    return response.status_code == status and text in response.text


async def get_any(env: dict[str, str], path: str) -> dict[str, Any]:
    """GET a JSON endpoint whatever its status."""
    async with httpx.AsyncClient() as client:
        body: dict[str, Any] = (await client.get(url(env) + path)).json()
    return body


def replace_policy(path: Path, text: str) -> None:
    """Write the policy file whole (a reload must never read half of it)."""
    part = path.with_suffix(".part")
    part.write_text(text)
    part.replace(path)


async def scripts(env: dict[str, str]) -> set[str] | None:
    """The scripts the daemon watches (None while it is not up)."""
    body = await get_json(env, "/api/v1/rollouts")
    if body is None:
        return None
    return {str(r["script"]) for r in body["rollouts"]}  # type: ignore[attr-defined]


async def test_sighup_reloads_valid_policies_and_refuses_an_invalid_set(tmp_path: Path) -> None:
    """SIGHUP with a policy adding `web`: watched, and `api`'s running rollout keeps its state
    and steps; with an invalid file: refused with a warning, both still watched, the process
    alive; with `api` removed: only `web` is left; SIGTERM still stops it with exit 0."""
    async with simulated(tmp_path) as (sim, env):
        sim.add_script("web", requests_per_minute=60)
        policy = Path(env["COALMINE_POLICIES"])
        log = tmp_path / "run.log"
        process = start(env, log)
        try:

            async def watching(expected: set[str]) -> bool:
                return await scripts(env) == expected

            await wait_for(lambda: watching({"api"}))
            await wait_for(lambda: at_percent(env, 50))
            replace_policy(policy, TWO_SCRIPTS)  # other steps: [10, 100]
            process.send_signal(signal.SIGHUP)
            await wait_for(lambda: watching({"api", "web"}))

            replace_policy(policy, TWO_SCRIPTS.replace("above: 1000", "above: many"))
            process.send_signal(signal.SIGHUP)

            async def refused() -> bool:
                return "policies NOT reloaded" in log.read_text()

            await wait_for(refused)
            assert process.poll() is None
            assert await scripts(env) == {"api", "web"}
            # the running rollout kept its state and its steps: not promoted from 50%
            assert await at_percent(env, 50)
            assert [
                [v["percentage"] for v in p["versions"]] for p in sim.deployment_posts("api")
            ] == [[50, 50]]

            replace_policy(policy, TWO_SCRIPTS.replace("[api, web]", "[web]"))
            process.send_signal(signal.SIGHUP)
            await wait_for(lambda: watching({"web"}))
        finally:
            process.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=30))
        assert code == 0, log.read_text()
