"""``coalmine sandbox``: the embedded world for trying coalmine by hand.

``coalmine sandbox`` runs, in the foreground until Ctrl-C, the simulator (Cloudflare's API, a
Worker's metrics, PagerDuty, Slack, Grafana), a real Prometheus scraping the simulated Worker,
and the real daemon on ``policies/examples/fast.yaml``, all on fixed loopback ports printed at
start with the admin token, so every operator command and the API can be tried from another
terminal. ``coalmine sandbox ship SCRIPT [--fault error-rate=5% --at 50%]`` uploads a new
version and starts its canary; with ``--fault`` the sandbox injects the fault once the canary
reaches ``--at`` (default at once). ``ship`` talks to the sandbox's small control endpoint.
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import anyio
import httpx

from coalmine.app import open_daemon, prepare
from coalmine.cli import localprom
from coalmine.cli.demo import FAST_POLICY
from coalmine.daemon import ScriptLoop
from coalmine.errors import ConfigError, RemoteError
from coalmine.logs import configure as configure_logging
from coalmine.settings import load_settings
from coalmine.simulator import Behaviour, Simulator
from coalmine.simulator.service import Request, Response, serve

TOKEN = "coalmine-sandbox"  # loopback only: a fixed token the quickstart can show
BASE_PORT = 9300
CONTROL = f"http://127.0.0.1:{BASE_PORT + 91}"
SCRIPT = "demo-worker"
# --fault NAME=VALUE: what each name changes in the simulated version, and the value's unit
FAULTS = {
    "error-rate": ("http_5xx_rate", "%"),
    "exception-rate": ("exception_rate", "%"),
    "latency-p99": ("latency_p99", "s"),
    "latency-p50": ("latency_p50", "s"),
    "cpu-p99": ("cpu_p99_ms", "ms"),
}


@dataclass(frozen=True)
class Ports:
    """Where each part listens: fixed from a base port, or any free ones (base 0)."""

    daemon: int
    prometheus: int
    control: int
    cloudflare: int
    metrics: int
    pagerduty: int
    slack: int
    grafana: int

    @classmethod
    def from_base(cls, base: int) -> Ports:
        """The daemon on ``base`` (9300, coalmine's default), the rest from ``base + 90``;
        base 0: any free ports."""
        if base == 0:
            return cls(*(localprom.free_port() for _ in range(8)))
        return cls(base, *range(base + 90, base + 97))


def parse_fault(text: str) -> dict[str, float]:
    """``error-rate=5%`` -> ``{"http_5xx_rate": 0.05}``; a ConfigError names what is wrong."""
    name, sep, value = text.partition("=")
    if not sep or name not in FAULTS:
        raise ConfigError(f"--fault {text!r}: write NAME=VALUE, NAME one of {', '.join(FAULTS)}")
    field, unit = FAULTS[name]
    number = value.strip().removesuffix(unit)
    try:
        amount = float(number)
    except ValueError:
        raise ConfigError(f"--fault {text!r}: {value!r} is not a number of {unit}") from None
    if unit == "%":
        if not 0 <= amount <= 100:
            raise ConfigError(f"--fault {text!r}: a rate is 0% to 100%")
        amount /= 100
    elif amount <= 0:
        raise ConfigError(f"--fault {text!r}: must be above 0{unit}")
    return {field: amount}


def parse_percent(text: str) -> int:
    """``50%`` or ``50`` -> 50."""
    try:
        value = int(text.strip().removesuffix("%"))
    except ValueError:
        raise ConfigError(f"--at {text!r}: write a canary weight such as 50%") from None
    if not 0 < value <= 100:
        raise ConfigError(f"--at {text!r}: a weight is 1% to 100%")
    return value


def ship(control: str, script: str, faults: list[str], at: str | None) -> int:
    """``coalmine sandbox ship``: ask the running sandbox to start a canary (and a fault)."""
    changes: dict[str, float] = {}
    for fault in faults:
        changes |= parse_fault(fault)
    body = {"script": script, "fault": changes, "at": parse_percent(at) if at else 0}
    try:
        response = httpx.post(control.rstrip("/") + "/ship", json=body, timeout=10.0)
    except httpx.TransportError:
        raise RemoteError(f"no sandbox at {control}; start one with `coalmine sandbox`") from None
    answer = response.json()
    if response.status_code != 200:
        raise ConfigError(answer.get("error", f"HTTP {response.status_code}"))
    print(answer["message"])
    return 0


class _Control:
    """The sandbox's control endpoint: ``POST /ship``."""

    def __init__(self, sim: Simulator, loops: dict[str, ScriptLoop], out: TextIO) -> None:
        self.sim = sim
        self.loops = loops
        self.out = out
        self.waiting: list[tuple[str, str, int, dict[str, float]]] = []

    async def __call__(self, request: Request) -> Response:
        if (request.method, request.path) != ("POST", "/ship"):
            return Response.json(404, {"error": "POST /ship is the only control"})
        try:
            body: Any = request.json()
            script, fault, at = body["script"], dict(body.get("fault") or {}), int(body["at"])
        except (ValueError, KeyError, TypeError):
            return Response.json(400, {"error": 'body: {"script", "fault", "at"}'})
        if script not in self.loops:
            known = ", ".join(self.loops)
            return Response.json(404, {"error": f"the sandbox runs {known}, not {script!r}"})
        try:
            version = self.sim.upload_version(script, Behaviour(), message="sandbox ship")
            first = self.loops[script].policy.steps[0].weight
            self.sim.start_canary(script, version, percent=first)
        except ValueError as exc:
            return Response.json(409, {"error": str(exc)})
        message = f"shipped {version} to {script} at {first}%"
        if fault:
            self.waiting.append((script, version, at, fault))
            what = ", ".join(f"{k}={v:g}" for k, v in fault.items())
            message += f"; fault {what} " + (f"once it reaches {at}%" if at else "now")
            self.check()
        print(message, file=self.out, flush=True)
        return Response.json(200, {"version": version, "message": message})

    def check(self) -> None:
        """Inject every waiting fault whose canary reached its weight."""
        for item in list(self.waiting):
            script, version, at, fault = item
            state = self.loops[script].state
            if (state.canary == version and state.canary_percent >= at) or at == 0:
                self.sim.schedule_fault(script, version, **fault)  # type: ignore[arg-type]
                self.waiting.remove(item)
                print(f"fault injected into {version}: {fault}", file=self.out, flush=True)


def run_sandbox(base_port: int = BASE_PORT, out: TextIO | None = None) -> int:
    """``coalmine sandbox``: serve until interrupted."""
    if localprom.binary() is None:
        raise ConfigError(
            "the sandbox needs Debian's prometheus (apt-get install prometheus); "
            "`coalmine demo --offline` runs without it"
        )
    with suppress(KeyboardInterrupt):
        anyio.run(_sandbox, Ports.from_base(base_port), out or sys.stdout)
    return 0


async def _sandbox(ports: Ports, out: TextIO) -> None:
    configure_logging("console", "info")
    sim = Simulator(seed=7)
    sim.slack.limiter.limit = None
    sim.pagerduty.limiter.limit = None
    for service, port in (
        (sim.cloudflare, ports.cloudflare),
        (sim.metrics, ports.metrics),
        (sim.pagerduty, ports.pagerduty),
        (sim.slack, ports.slack),
        (sim.grafana, ports.grafana),
    ):
        service.port = port  # fixed ports: the printed addresses stay true across restarts
    sim.add_script(SCRIPT, requests_per_minute=30000)
    async with AsyncExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coalmine-sandbox-")))
        await stack.enter_async_context(sim.running())
        prometheus = await anyio.to_thread.run_sync(
            lambda: stack.enter_context(
                localprom.running_prometheus([sim.prometheus_metrics_url], port=ports.prometheus)
            )
        )
        policy_file = folder / "fast.yaml"
        policy_file.write_text(FAST_POLICY)
        env = {
            **sim.environment(),
            "COALMINE_PROMETHEUS_URL": prometheus,
            "COALMINE_POLICIES": str(policy_file),
            "COALMINE_STATE_URL": f"sqlite:///{folder / 'state.db'}",
            "COALMINE_LISTEN": f"127.0.0.1:{ports.daemon}",
            "COALMINE_ADMIN_TOKEN": TOKEN,
            "COALMINE_DISCOVERY_INTERVAL": "2s",
            # one script watched: read its deployment every 2 s (a new split is adopted at
            # once, not when its first minute of analytics is complete)
            "COALMINE_DRIFT_INTERVAL": "2s",
            "COALMINE_CANARY_DRIFT_INTERVAL": "2s",
        }
        settings = load_settings(env)
        daemon = await stack.enter_async_context(open_daemon(settings, prepare(settings)))
        control = _Control(sim, daemon.loops, out)
        async with anyio.create_task_group() as tg:
            port = await tg.start(daemon.serve)
            control_port = await tg.start(
                lambda task_status: serve(
                    control, "127.0.0.1", ports.control, task_status=task_status
                )
            )
            _banner(out, port, prometheus, control_port, sim)
            while True:
                control.check()
                await anyio.sleep(0.5)


def _banner(out: TextIO, port: int, prometheus: str, control: int, sim: Simulator) -> None:
    daemon = f"http://127.0.0.1:{port}"
    lines = [
        f"coalmine sandbox: a simulated Worker {SCRIPT!r} at 500 req/s, policy fast",
        f"  coalmine    {daemon}  (/api/v1/rollouts, /metrics, /health)",
        f"  prometheus  {prometheus}  (scraping the simulated Worker every second)",
        f"  cloudflare  {sim.cloudflare_api_url}  (simulated)",
        f"  control     http://127.0.0.1:{control}  (for `coalmine sandbox ship`)",
        "",
        "In another terminal:",
        f"  export COALMINE_ADMIN_TOKEN={TOKEN} COALMINE_LISTEN=127.0.0.1:{port}",
        f"  coalmine sandbox ship {SCRIPT} --fault error-rate=5% --at 50%"
        + ("" if control == BASE_PORT + 91 else f" --control http://127.0.0.1:{control}"),
        f"  coalmine status {SCRIPT} --watch",
        "",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), file=out, flush=True)
