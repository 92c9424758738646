"""The daemon's own checks of its SQLite file never cost it a decision.

The guard checks the database file every 5 s (its identity, its header). Had it read the file
through a descriptor it then closes, the process would drop every POSIX lock it holds on the
file, SQLite's included: the next connection of another process to close (an operator's
``sqlite3``, a backup) takes itself for the last, checkpoints and deletes the WAL under the
daemon, and what the daemon commits afterwards is gone at its next crash
(https://sqlite.org/howtocorrupt.html, 2.2).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

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


def test_a_decision_committed_after_the_guards_check_survives_a_kill(tmp_path: Path) -> None:
    """Tick 1, the guard's identity check, an operator's sqlite3 opened and closed, tick 2,
    kill -9: the restarted store has tick 2 (it did not on a header read through open())."""
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
        operator = sqlite3.connect(path)  # `sqlite3 state.db 'select ...'`
        assert operator.execute("SELECT count(*) FROM rollouts").fetchone() == (1,)
        operator.close()
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
