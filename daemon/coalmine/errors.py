"""coalmine's exception tree.

Everything coalmine raises on purpose derives from :class:`CoalmineError`::

    CoalmineError
    ├── LocalError                 a mistake on this side: fix the input and run again (exit 2)
    │   ├── PolicyError            a policy file is unreadable or invalid; carries every problem
    │   ├── ReplayFormatError      a replay input line is malformed; names the line
    │   └── ConfigError            an environment variable is missing or malformed
    ├── RemoteError                a dependency failed: retry, report degraded, never crash
    │   └── StoreError             the state database refused a read or a write
    └── IllegalTransition          a bug: the engine tried a lifecycle move its table forbids

Foreign exceptions (yaml, json, pydantic, and later httpx and sqlite3) are translated into
this tree at the boundary where they occur; none reaches the engine or the user unexplained.
"""

from __future__ import annotations

from dataclasses import dataclass


class CoalmineError(Exception):
    """The root of every error coalmine raises on purpose."""


class LocalError(CoalmineError):
    """Bad local input: a policy, a replay file, the environment. The CLI exits 2."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input file, located as precisely as the input allows."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class PolicyError(LocalError):
    """A policy file could not be loaded; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ReplayFormatError(LocalError):
    """A line of a replay input is malformed."""

    def __init__(self, file: str, line: int, message: str) -> None:
        self.file = file
        self.line = line
        super().__init__(f"{file}:{line}: {message}")


class ConfigError(LocalError):
    """An environment variable is missing or malformed; the message names the variable."""


class RemoteError(CoalmineError):
    """A dependency (a metrics source, an API, the state store) failed."""


class StoreError(RemoteError):
    """The state database failed (locked, full, corrupt, from a newer coalmine)."""


class IllegalTransition(CoalmineError):
    """The rollout lifecycle was asked for a move its transition table does not allow."""
