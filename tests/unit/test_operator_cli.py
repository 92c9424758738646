"""The small things an operator tripped over: pipes, state URLs, start-up errors, the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from coalmine.cli import main
from coalmine.store.records import NewEntry
from coalmine.store.sqlite import SqliteStore as Store


def journal_db(path: Path, entries: int) -> Path:
    """A state database with ``entries`` journal entries."""
    now = datetime(2026, 3, 3, 18, 0, tzinfo=UTC)
    with Store(path) as store:
        batch = [NewEntry(now, "api", "coalmine", "hold", {"reason": "x" * 200})] * entries
        store.commit("api", {}, batch, [], now)
    return path


def clean_env() -> dict[str, str]:
    """The environment without any COALMINE_ variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith("COALMINE_")}


def test_journal_export_into_head_stops_quietly(tmp_path: Path) -> None:
    """`journal export | head -1` exits 0 with nothing on stderr (no sqlite3 traceback)."""
    db = journal_db(tmp_path / "state.db", 3000)  # ~700 KB: more than a pipe holds
    export = subprocess.Popen(
        [sys.executable, "-m", "coalmine", "journal", "export", "--state", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert export.stdout is not None and export.stderr is not None
    assert export.stdout.readline().startswith(b'{"seq": 1')
    export.stdout.close()  # what `head -1` does
    assert export.wait(timeout=60) == 0
    with export.stderr:
        assert export.stderr.read() == b""


def test_state_takes_the_sqlite_url_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--state sqlite:///PATH`, the form COALMINE_STATE_URL uses, opens PATH."""
    db = journal_db(tmp_path / "state.db", 2)
    assert main(["journal", "verify", "--state", f"sqlite:///{db}"]) == 0
    assert "journal ok: 2 entries" in capsys.readouterr().out


def test_run_in_an_empty_folder_names_every_missing_piece(tmp_path: Path) -> None:
    """`coalmine run` with nothing set names the policy file and the account and token at once."""
    run = subprocess.run(
        [sys.executable, "-m", "coalmine", "run"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert "policies/runbook.yaml" in run.stderr
    assert "COALMINE_CLOUDFLARE_ACCOUNT_ID" in run.stderr
    assert "COALMINE_CLOUDFLARE_API_TOKEN" in run.stderr


def test_demo_jsonl_says_it_runs_offline(capsys: pytest.CaptureFixture[str]) -> None:
    """`demo --format jsonl` runs the offline demo and says so on stderr."""
    assert main(["demo", "--format", "jsonl"]) == 0
    assert "offline" in capsys.readouterr().err
