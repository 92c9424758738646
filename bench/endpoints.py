"""What coalmine's HTTP endpoints cost the daemon: CPU per request, and requests a second.

Run from the repository root (any coalmine's venv: it measures the coalmine that python imports)::

    .venv/bin/python bench/endpoints.py                   # 2,000 requests per endpoint
    .venv/bin/python bench/endpoints.py --requests 5000

``python -m coalmine run`` runs as its own process against the simulator, watching one script
(analysis every 60 s, so its loop is nearly idle). The benchmark sends ``--requests`` GETs to
each endpoint one after another on one keep-alive connection, and reads the daemon's CPU time
(user + system, /proc/<pid>/stat) before and after each batch. It prints CPU per request and
the requests a second one client gets. Loopback, no TLS. Not a test: it exits 0 whatever the
numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx

import coalmine
from coalmine.cli import localprom
from coalmine.simulator import Simulator

ENDPOINTS = ("/healthz", "/health", "/metrics", "/api/v1/rollouts/bench")
POLICY = """
version: 1
name: http-bench
scripts: [bench]
analysis: {interval: 60s, warmup: 0s, inconclusive_page_after: 1h}
steps: [{weight: 10, hold: 1h}, {weight: 100}]
rules:
  - name: errors
    source: cloudflare
    signal: errors_per_minute
    window: 1m
    above: 1000
    on_breach: page
"""


def cpu_seconds(pid: int) -> float:
    """The process's CPU time, user + system."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """The process's peak RSS (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def code() -> str:
    """The commit of the coalmine measured."""
    folder = Path(coalmine.__file__).resolve().parent
    done = subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


async def run(requests: int) -> None:
    """Start the daemon, measure each endpoint, stop it."""
    sim = Simulator(seed=1)
    sim.add_script("bench", requests_per_minute=600)
    canary = sim.upload_version("bench")
    with tempfile.TemporaryDirectory(prefix="coalmine-http-bench-") as tmp:
        folder = Path(tmp)
        (folder / "policy.yaml").write_text(POLICY)
        async with sim.running():
            sim.start_canary("bench", canary, percent=10)
            listen = f"127.0.0.1:{localprom.free_port()}"
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("COALMINE_")},
                **sim.environment(),
                "COALMINE_POLICIES": str(folder / "policy.yaml"),
                "COALMINE_STATE_URL": f"sqlite:///{folder / 'state.db'}",
                "COALMINE_LISTEN": listen,
            }
            with (folder / "run.log").open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "coalmine", "run"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                async with httpx.AsyncClient(base_url=f"http://{listen}", timeout=10) as client:
                    with anyio.fail_after(60):
                        while True:
                            try:
                                if (await client.get("/readyz")).status_code == 200:
                                    break
                            except httpx.TransportError:
                                pass
                            await anyio.sleep(0.2)
                    await anyio.sleep(2)  # past start-up's first ticks
                    for path in ENDPOINTS:
                        for _ in range(50):  # warm up
                            await client.get(path)
                        before, started = cpu_seconds(process.pid), time.perf_counter()
                        for _ in range(requests):
                            await client.get(path)
                        elapsed = time.perf_counter() - started
                        used = cpu_seconds(process.pid) - before
                        print(
                            f"  {path:<24} {used / requests * 1e6:8.0f} µs CPU per request"
                            f"   {requests / elapsed:7.0f} requests/s"
                        )
                print(f"  peak RSS (VmHWM) {rss_mb(process.pid):.1f} MB")
            finally:
                process.send_signal(signal.SIGTERM)
                await anyio.to_thread.run_sync(lambda: process.wait(timeout=30))


def main() -> int:
    """Parse arguments, print the machine, run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per endpoint (2,000)")
    args = parser.parse_args()
    print("== endpoints: coalmine's endpoints, one keep-alive client, sequential GETs")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"python:  {platform.python_implementation()} {platform.python_version()}")
    print(f"code:    {code()} ({Path(coalmine.__file__).resolve().parent})")
    anyio.run(run, args.requests)
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
