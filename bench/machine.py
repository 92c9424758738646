"""What every benchmark prints about where it ran: CPU, code version, load."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def code_version(*paths: str) -> str:
    """The commit measured, marked when ``paths`` (default the package) have local changes."""
    git = ["git", "-C", str(ROOT)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", *(paths or ("daemon/coalmine",))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    where = " and ".join(paths or ("daemon/coalmine",))
    return f"{commit} + uncommitted changes in {where}" if dirty else commit


def load() -> str:
    """The load averages, as text."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())
