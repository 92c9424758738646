"""Declared means used: every runtime dependency in pyproject.toml is imported by the package."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "daemon" / "coalmine"
# needed at run time without an import of their own (docs/reliability.md says why)
NOT_IMPORTED = {
    "sniffio": "httpcore imports it at every lock; without it each import searches sys.path",
    "tzdata": "the IANA database zoneinfo reads where the host has none",
}
IMPORT_NAMES = {
    "pyyaml": "yaml",
    "prometheus-client": "prometheus_client",
    "graphql-core": "graphql",
}


def _declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = []
    for spec in project["dependencies"]:
        match = re.match(r"[A-Za-z0-9_.-]+", spec)
        assert match is not None, spec
        names.append(match.group(0).lower())
    return names


def _imported() -> set[str]:
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_every_declared_dependency_is_imported() -> None:
    """A dependency the package never imports (apscheduler was one) fails unless listed here."""
    imported = _imported()
    unused = [
        name
        for name in _declared()
        if name not in NOT_IMPORTED
        and IMPORT_NAMES.get(name, name.replace("-", "_")) not in imported
    ]
    assert unused == [], f"declared but never imported: {unused}"


def test_apscheduler_is_not_a_dependency() -> None:
    """Loops are scheduled by the daemon's task group, not by apscheduler (docs/reliability.md)."""
    assert "apscheduler" not in _declared()
