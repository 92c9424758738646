"""A real Prometheus on a free loopback port, for ``coalmine demo`` and the tests.

Debian's ``prometheus`` package provides the binary. The server scrapes the given targets
(every second by default) into a temporary folder and is stopped when the block ends.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx


def binary() -> str | None:
    """The prometheus binary, if installed."""
    return shutil.which("prometheus")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_ready(url: str, process: subprocess.Popen[bytes], deadline: float = 30.0) -> None:
    """Poll ``/-/ready`` until 200; raise if the process exits or the deadline passes."""
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/-/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"prometheus at {url} not ready after {deadline:g}s")


def _config(targets: Sequence[str], scrape_interval: str) -> str:
    lines = [
        f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}",
        "scrape_configs:",
    ]
    for i, target in enumerate(targets):
        parts = urlsplit(target)
        lines.append(
            f"  - job_name: target{i}\n"
            f"    metrics_path: {parts.path or '/metrics'}\n"
            f"    static_configs: [{{targets: ['{parts.netloc}']}}]"
        )
    return "\n".join(lines) + "\n"


@contextmanager
def running_prometheus(
    targets: Sequence[str],
    *,
    scrape_interval: str = "1s",
    data: Path | None = None,
    port: int | None = None,
) -> Iterator[str]:
    """Start Prometheus scraping ``targets`` (metrics URLs) on ``port`` (default: a free one);
    yield its base URL."""
    prometheus = binary()
    if prometheus is None:
        raise FileNotFoundError("prometheus is not installed (Debian: apt-get install prometheus)")
    with tempfile.TemporaryDirectory(prefix="coalmine-prometheus-") as tmp:
        folder = Path(tmp)
        config = folder / "prometheus.yml"
        config.write_text(_config(targets, scrape_interval))
        port = port or free_port()
        with (folder / "prometheus.log").open("wb") as log:
            process = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={data or folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                wait_until_ready(url, process)
                yield url
            finally:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
