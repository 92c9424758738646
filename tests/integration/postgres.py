"""A real PostgreSQL for the tests: Debian's package, one server per test session.

The server runs in a temporary folder on a free loopback port (never the host's own cluster).
PostgreSQL refuses to run as root: when the tests run as root (as CI does), the folder belongs
to the ``postgres`` user and every server command runs through ``runuser -u postgres``.
Loopback connections need a password (SCRAM), as a production server would; each test gets a
database of its own from :meth:`RunningPostgres.new_database`.

Without Debian's package the tests that need it skip, or fail when
``COALMINE_REQUIRE_POSTGRES=1`` (CI sets it). :func:`running_postgres` itself does not need
pytest: the benchmarks (bench/store.py) start their server with it too.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from coalmine.cli.localprom import free_port

USER = "coalmine"
PASSWORD = "pg-test-password-7f3a"  # a test-only secret: tests check it never leaks


MISSING = "Debian's postgresql package is not installed (make test installs it when it can)"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here."""


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin with initdb, if any."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


@dataclass
class RunningPostgres:
    """A started server: its port, and the superuser's URL (with its password)."""

    port: int
    data: Path
    runner: list[str]
    bin: Path
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        """A URL to ``database`` on this server."""
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def new_database(self, prefix: str = "test") -> str:
        """Create an empty database and return its URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown)."""
        subprocess.run(
            [*self.runner, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"],
            check=False,
            capture_output=True,
        )


def _runner() -> tuple[list[str], int | None, int | None]:
    """How to run server commands: directly, or as ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(
            "running as root and there is no postgres user to run PostgreSQL as"
        ) from None
    return ["runuser", "-u", "postgres", "--"], user.pw_uid, user.pw_gid


@contextmanager
def running_postgres(*, durable: bool = False) -> Iterator[RunningPostgres]:
    """Start a fresh server; stop it and remove its folder after.

    ``durable=False`` (the tests) turns off fsync: the tests kill coalmine, not PostgreSQL.
    The benchmarks ask for ``durable=True``, PostgreSQL's defaults.
    """
    binaries = find_bin_dir()
    if binaries is None:
        raise PostgresUnavailable(MISSING)
    runner, uid, gid = _runner()
    root = Path(tempfile.mkdtemp(prefix="coalmine-pg-"))
    data = root / "data"
    try:
        if uid is not None and gid is not None:
            os.chown(root, uid, gid)
        password_file = root / "password"
        password_file.write_text(PASSWORD + "\n")
        if uid is not None and gid is not None:
            os.chown(password_file, uid, gid)
        subprocess.run(
            [
                *runner,
                str(binaries / "initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                f"--pwfile={password_file}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        port = free_port()
        options = [
            f"-p {port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={root}",
            "-c max_connections=200",
        ]
        if not durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        started = subprocess.run(
            [
                *runner,
                str(binaries / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "server.log"),
                "-o",
                " ".join(options),
                "-w",
                "-t",
                "60",
                "start",
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        if started.returncode != 0:
            log = (root / "server.log").read_text(errors="replace")[-2000:]
            raise PostgresUnavailable(
                f"PostgreSQL did not start: {started.stdout}{started.stderr}\n{log}"
            )
        server = RunningPostgres(port, data, runner, binaries)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_for_tests() -> Iterator[RunningPostgres]:
    """:func:`running_postgres` for a test session: skipped without the package, or failed
    when ``COALMINE_REQUIRE_POSTGRES=1``."""
    with ExitStack() as stack:
        try:
            server = stack.enter_context(running_postgres())
        except PostgresUnavailable as exc:
            if os.environ.get("COALMINE_REQUIRE_POSTGRES") == "1":
                pytest.fail(str(exc))
            pytest.skip(str(exc))
        yield server
