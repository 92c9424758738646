"""`coalmine sandbox` as a new user drives it: printed ports and token, `ship` with a fault,
`status --watch` on the verdict, and `pause` twice, all as separate processes."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coalmine.cli.demo import FAST_POLICY
from coalmine.cli.sandbox import TOKEN, _Control, parse_fault, parse_percent
from coalmine.engine import RolloutState
from coalmine.errors import ConfigError
from coalmine.policy import Policy
from coalmine.policyfile import parse_policy
from coalmine.simulator import Simulator
from tests.integration.prometheus import binaries


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A running `coalmine sandbox --port-base 0`; yields its printed addresses."""
    binaries()  # skip without Debian's prometheus
    out = (tmp_path / "out.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "coalmine", "sandbox", "--port-base", "0"],
        stdout=out,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        text = ""
        while "Ctrl-C" not in text:
            assert process.poll() is None, text
            assert time.monotonic() < deadline, f"no banner: {text}"
            time.sleep(0.1)
            text = (tmp_path / "out.log").read_text()
        listen = re.search(r"COALMINE_LISTEN=(\S+)", text)
        control = re.search(r"control +(http://\S+)", text)
        token = re.search(r"COALMINE_ADMIN_TOKEN=(\S+)", text)
        assert listen and control and token, text
        yield {"listen": listen[1], "control": control[1], "token": token[1]}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        out.close()


def coalmine(
    env: dict[str, str], *argv: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a coalmine command against the sandbox."""
    return subprocess.run(
        [sys.executable, "-m", "coalmine", *argv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_ship_a_faulty_canary_and_watch_it_roll_back(sandbox: dict[str, str]) -> None:
    """The printed token and address drive pause (twice) and resume; a fault shipped `--at 50%`
    waits for that step, then rolls the canary back and `status --watch` exits 1.

    The fault waits for 50% so that nothing can end the canary while it is paused: a paused
    canary does not advance, and rollback triggers act while paused (the daemon promises both),
    so a fault injected at once could roll it back between the two pauses under load. The one
    deadline left is the 10% step's 20 s hold, within which the first pause must land (one
    `coalmine` command after the status poll saw the canary; about a second, several on a
    loaded machine)."""
    env = {"COALMINE_ADMIN_TOKEN": sandbox["token"], "COALMINE_LISTEN": sandbox["listen"]}
    assert sandbox["token"] == TOKEN
    shipped = coalmine(
        env, "sandbox", "ship", "demo-worker", "--fault", "error-rate=10%", "--at", "50%",
        "--control", sandbox["control"],
    )  # fmt: skip
    assert shipped.returncode == 0, shipped.stderr
    assert "fault http_5xx_rate=0.1 once it reaches 50%" in shipped.stdout
    deadline = time.monotonic() + 30
    while "CANARY" not in coalmine(env, "status").stdout:  # the daemon adopts the split
        assert time.monotonic() < deadline
        time.sleep(0.2)
    paused = coalmine(env, "pause", "demo-worker", "--reason", "a look")
    assert paused.returncode == 0, paused.stdout + paused.stderr
    assert paused.stdout.startswith("pause: paused by an operator"), paused.stdout
    again = coalmine(env, "pause", "demo-worker")
    assert (again.returncode, again.stdout) == (0, "demo-worker: already paused\n")
    status = coalmine(env, "status", "demo-worker", "--json")
    assert status.returncode == 0, status.stderr
    rollout = json.loads(status.stdout)
    assert (rollout["phase"], rollout["canary_percent"]) == ("paused", 10), rollout
    assert coalmine(env, "resume", "demo-worker").returncode == 0
    watched = coalmine(env, "status", "demo-worker", "--watch", "--every", "0.5")
    assert watched.returncode == 1, watched.stdout + watched.stderr
    assert "ROLLED_BACK" in watched.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [("error-rate=5%", {"http_5xx_rate": 0.05}), ("latency-p99=2s", {"latency_p99": 2.0})],
)
def test_faults_are_named_in_the_units_people_use(text: str, expected: dict[str, float]) -> None:
    """`--fault error-rate=5%` is a 5% 5xx rate; latency is in seconds."""
    assert parse_fault(text) == expected


@pytest.mark.parametrize("text", ["error-rate", "nonsense=1", "error-rate=150%", "error-rate=x"])
def test_a_bad_fault_is_refused_with_the_names_it_takes(text: str) -> None:
    """A malformed --fault is a ConfigError (exit 2) naming what it takes."""
    with pytest.raises(ConfigError, match="--fault"):
        parse_fault(text)


def test_at_takes_a_weight() -> None:
    """`--at 50%` and `--at 50` are the 50% step; 0 or 101 are refused."""
    assert parse_percent("50%") == parse_percent("50") == 50
    with pytest.raises(ConfigError):
        parse_percent("101%")


@dataclass
class _Loop:
    """What the control endpoint reads of a script's loop: its state and policy."""

    state: RolloutState
    policy: Policy


def test_a_fault_waits_for_its_weight() -> None:
    """`ship --fault ... --at 50%`: the fault is injected only once the canary reaches 50%."""
    sim = Simulator(seed=1)
    sim.add_script("demo-worker")
    loop = _Loop(RolloutState("demo-worker"), parse_policy(FAST_POLICY, "fast.yaml"))
    control = _Control(sim, {"demo-worker": loop}, io.StringIO())  # type: ignore[dict-item]
    version = sim.upload_version("demo-worker")
    control.waiting.append(("demo-worker", version, 50, {"http_5xx_rate": 0.1}))
    loop.state = RolloutState("demo-worker", canary=version, canary_percent=10)
    control.check()
    assert control.waiting
    assert sim.world.behaviour("demo-worker", version).http_5xx_rate < 0.1
    loop.state = RolloutState("demo-worker", canary=version, canary_percent=50)
    control.check()
    assert not control.waiting
    assert sim.world.behaviour("demo-worker", version).http_5xx_rate == 0.1
