"""deploy/systemd/coalmine.service: systemd accepts it, it is sandboxed, and its settings hold."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from coalmine.settings import Settings, env_name, load_settings

from ..support import ROOT

UNIT = ROOT / "deploy" / "systemd" / "coalmine.service"
SYSTEM_UNITS = ("/usr/lib/systemd/system", "/lib/systemd/system")
REQUIRED = {
    "DynamicUser": "yes",
    "StateDirectory": "coalmine",
    "ConfigurationDirectory": "coalmine",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "SystemCallFilter": "@system-service",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "Type": "exec",
}
MAX_EXPOSURE = 15  # `systemd-analyze security` exposure x 10: 1.5 of 10 ("OK" is below 2)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in order (keys repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{line!r} outside a section"
        assert not line.endswith("\\"), "no continuation lines: keep each setting on one line"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    """Every value a key is given in a section, in order."""
    return [v for k, v in section if k == key]


@pytest.fixture
def service() -> list[tuple[str, str]]:
    """The unit's [Service] section."""
    return parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]


def analyze() -> str:
    """systemd-analyze, or a skip: it comes with systemd (Debian's `systemd` package)."""
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (it comes with Debian's systemd package)")
    return found


def verify(analyzer: str, unit: Path, root: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of a unit installed under ``root`` beside the system's units."""
    installed = root / "etc" / "systemd" / "system" / unit.name
    installed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(unit, installed)
    return subprocess.run(
        [analyzer, "verify", f"--root={root}", str(installed)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.fixture
def root(tmp_path: Path, service: list[tuple[str, str]]) -> Path:
    """A root folder with the system's units and an executable where ExecStart and ExecReload
    point."""
    system = next((Path(p) for p in SYSTEM_UNITS if Path(p).is_dir()), None)
    if system is None:
        pytest.skip("no system unit folder to verify against")
    root = tmp_path / "root"
    shutil.copytree(system, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    for key in ("ExecStart", "ExecReload"):
        [command] = values(service, key)
        program = root / command.split()[0].lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
    return root


def test_systemd_analyze_verify_finds_nothing(root: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` prints nothing and exits 0; a broken copy is flagged (it looks)."""
    analyzer = analyze()
    broken = tmp_path / "coalmine.service"
    broken.write_text(
        UNIT.read_text(encoding="utf-8").replace("ProtectHome=yes", "ProtectHome=yess\nFooBar=1")
    )
    flagged = verify(analyzer, broken, root)
    assert "FooBar" in flagged.stderr and "yess" in flagged.stderr, flagged.stderr
    done = verify(analyzer, UNIT, root)
    # Unknown keys and bad values are only warnings for systemd (exit 0): any output fails.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stderr


def test_systemd_analyze_security_rates_the_sandbox_ok() -> None:
    """The offline `systemd-analyze security` exposure is at most 1.5 of 10."""
    analyzer = analyze()
    done = subprocess.run(
        [analyzer, "security", "--offline=yes", f"--threshold={MAX_EXPOSURE}", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr


def test_unit_has_the_required_hardening(service: list[tuple[str, str]]) -> None:
    """DynamicUser, state and configuration directories, sandbox and restart keys, set once."""
    for key, wanted in REQUIRED.items():
        assert values(service, key)[:1] == [wanted], f"{key}= should be {wanted!r}"
    assert values(service, "SystemCallFilter")[1:] == ["~@privileged @resources"]
    families = set(" ".join(values(service, "RestrictAddressFamilies")).split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert int(values(service, "TimeoutStopSec")[0].removesuffix("s")) >= 10
    assert values(service, "RestartPreventExitStatus") == ["2"], "exit 2: configuration mistake"
    for key in REQUIRED.keys() - {"SystemCallFilter"}:
        assert len(values(service, key)) == 1, f"{key}= set more than once"


def test_unit_raises_the_fd_limit(service: list[tuple[str, str]]) -> None:
    """LimitNOFILE= is set once and well above systemd's 1,024 default (connection cap room)."""
    (limit,) = values(service, "LimitNOFILE")
    assert int(limit.split(":")[0]) >= 4096


def test_unit_reloads_the_policies_with_sighup(service: list[tuple[str, str]]) -> None:
    """`systemctl reload` sends SIGHUP to the main process, which re-reads the policies."""
    (reload,) = values(service, "ExecReload")
    assert reload.split()[-2:] == ["-HUP", "$MAINPID"]


def test_unit_environment_is_valid_and_matches_its_directories(
    service: list[tuple[str, str]],
) -> None:
    """Environment= parses as coalmine settings; state, policies and secrets sit where the
    unit's directories are; the command is `coalmine run`."""
    env = dict(v.split("=", 1) for v in values(service, "Environment"))
    known = {env_name(name) for name in Settings.model_fields}
    assert {k for k in env if k.startswith("COALMINE_")} <= known
    assert not any(word in k for k in env for word in ("TOKEN", "KEY", "WEBHOOK")), (
        "secrets belong in the EnvironmentFile, not the unit"
    )
    settings = load_settings(env)
    state = PurePosixPath("/var/lib") / values(service, "StateDirectory")[0]
    config = PurePosixPath("/etc") / values(service, "ConfigurationDirectory")[0]
    assert PurePosixPath(settings.state_path).parent == state
    assert values(service, "WorkingDirectory") == [str(state)]
    assert PurePosixPath(settings.policies).is_relative_to(config)
    assert [PurePosixPath(f.lstrip("-")) for f in values(service, "EnvironmentFile")] == [
        config / "coalmine.env"
    ]
    [start] = values(service, "ExecStart")
    program, *args = start.split()
    assert PurePosixPath(program).is_absolute() and PurePosixPath(program).name == "coalmine"
    assert args == ["run"]
    assert settings.listen_address[0] == "127.0.0.1", "loopback unless the operator opens it"
