"""The daemon's own checks of its SQLite file never cost it a decision.

The guard checks the database file every 5 s (its identity, its header). Had it read the file
through a descriptor it then closes, the process would drop every POSIX lock it holds on the
file, SQLite's included: the next connection of another process to close (an operator's
``sqlite3``, a backup) takes itself for the last, checkpoints and deletes the WAL under the
daemon, and what the daemon commits afterwards is gone at its next crash
(https://sqlite.org/howtocorrupt.html, 2.2).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from coalmine.store.sqlite import SqliteStore

# A daemon's store, as the daemon drives it: a tick committed, the guard's check of the file,
# then (once the operator's connection has come and gone) another tick committed.
DAEMON = """
import sys
from coalmine.store.sqlite import SqliteStore

store = SqliteStore(sys.argv[1])
store.commit("api", {"tick": 1})
store.identity()
print("checked", flush=True)
sys.stdin.readline()
store.commit("api", {"tick": 2})
print("committed", flush=True)
sys.stdin.readline()
"""


def sqlite3_shell(path: Path) -> None:
    """An operator's `sqlite3 state.db 'select ...'`."""
    operator = sqlite3.connect(path)
    assert operator.execute("SELECT count(*) FROM rollouts").fetchone() == (1,)
    operator.close()


def journal_verify(path: Path) -> None:
    """An operator's `coalmine journal verify` (the runbook's)."""
    verified = subprocess.run(
        [sys.executable, "-m", "coalmine", "journal", "verify", "--state", f"sqlite:///{path}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "")},
        check=False,
    )
    assert verified.returncode == 0 and verified.stdout.startswith("journal ok"), verified


@pytest.mark.parametrize("operator", [sqlite3_shell, journal_verify])
def test_a_decision_committed_after_the_guards_check_survives_a_kill(
    tmp_path: Path, operator: Callable[[Path], None]
) -> None:
    """Tick 1, the guard's identity check, an operator's sqlite3 or `coalmine journal verify`
    come and gone, tick 2, kill -9: the restarted store has tick 2 (it did not on a header read
    through open())."""
    path = tmp_path / "state.db"
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert daemon.stdin is not None and daemon.stdout is not None
    try:
        assert daemon.stdout.readline() == "checked\n"
        operator(path)
        assert Path(f"{path}-wal").exists(), "the WAL was deleted under the running daemon"
        daemon.stdin.write("\n")
        daemon.stdin.flush()
        assert daemon.stdout.readline() == "committed\n"
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=30)
        daemon.stdin.close()
        daemon.stdout.close()
    with SqliteStore(path) as store:
        assert store.states()["api"] == {"tick": 2}
