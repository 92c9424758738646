"""Reading policy files: YAML to :class:`~coalmine.policy.Policy`, every problem with its line.

PyYAML composes the document into nodes that carry their line; we build the Python values from
those nodes ourselves so that each data path (``rules[2].above``) maps to the line it came from,
duplicate keys are refused instead of silently overwritten, and YAML 1.1's surprises are off
(``10:00`` stays a string instead of becoming the sexagesimal 600; ``no`` stays a string).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path as FsPath
from typing import Any

import yaml
from pydantic import ValidationError

from coalmine.errors import PolicyError, Problem
from coalmine.policy import Path, Policy, semantic_problems

_INT = re.compile(r"^[-+]?[0-9]+$")
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_SPECIAL_FLOATS = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}


class _Resolver(yaml.resolver.Resolver):
    """YAML 1.2 core-schema scalars: null, true/false, decimal ints and floats; the rest strings."""


_Resolver.yaml_implicit_resolvers = {}


class _Loader(
    yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer, _Resolver
):
    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Resolver.__init__(self)


class _Builder:
    """Turns composed nodes into plain values and remembers the line of every data path."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[Path, int] = {}
        self.problems: list[Problem] = []

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return _scalar(node)

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            key = _scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.problems.append(
                    Problem(self.file, line, _dotted(path), "keys must be plain names")
                )
                continue
            if key == "<<" and not key_node.style:
                self.problems.append(
                    Problem(
                        self.file,
                        line,
                        _dotted(path),
                        "YAML merge keys (<<) are not supported; write the fields out",
                    )
                )
                continue
            if key in result:
                first = self.lines[(*path, key)]
                self.problems.append(
                    Problem(
                        self.file,
                        line,
                        _dotted((*path, key)),
                        f"duplicate key (first on line {first})",
                    )
                )
                continue
            self.lines[(*path, key)] = line
            result[key] = self.build(value_node, (*path, key))
        return result


def _scalar(node: yaml.Node) -> Any:
    value: str = node.value
    if getattr(node, "style", None):  # quoted or block scalars are always strings
        return value
    lowered = value.lower()
    if lowered in ("", "~", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if _INT.match(value):
        return int(value)
    if _FLOAT.match(value):
        return float(value)
    if lowered in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[lowered]
    return value


def _dotted(path: Path) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        name = part if part.isprintable() and part.strip() == part else repr(part)
        text += f".{name}" if text else name
    return text


def _line_of(lines: dict[Path, int], path: Path) -> int | None:
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _known_prefix(lines: dict[Path, int], loc: tuple[str | int, ...]) -> Path:
    """Pydantic's error location, trimmed of tags (union members, validators) not in the data."""
    path: Path = ()
    for part in loc:
        if (*path, part) in lines or (isinstance(part, str) and part.isidentifier()):
            path = (*path, part)
        else:
            break
    return path


def parse_policy(text: str, file: str = "<policy>") -> Policy:
    """Parse and validate policy text; raise :class:`PolicyError` listing every problem."""
    try:
        node = _Loader(text).get_single_node()
        builder = _Builder(file)
        data = builder.build(node, ()) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise PolicyError([Problem(file, line, "", f"invalid YAML: {_yaml_reason(exc)}")]) from None
    except yaml.YAMLError as exc:
        reason = str(exc).split("\n", 1)[0]  # the reader adds 'in "<unicode string>"' below
        position = getattr(exc, "position", None)
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
        raise PolicyError([Problem(file, line, "", f"invalid YAML: {reason}")]) from None
    except RecursionError:  # PyYAML and the builder recurse once per nesting level
        raise PolicyError([Problem(file, None, "", "invalid YAML: nested too deeply")]) from None
    if node is None:
        raise PolicyError([Problem(file, 1, "", "the file is empty; expected a policy mapping")])
    if builder.problems:
        raise PolicyError(builder.problems)
    if not isinstance(data, dict):
        raise PolicyError(
            [Problem(file, node.start_mark.line + 1, "", "expected a mapping of policy fields")]
        )
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_pydantic_problems(exc.errors(), builder.lines, file)) from None
    problems = [
        Problem(file, _line_of(builder.lines, path), _dotted(path), message)
        for path, message in semantic_problems(policy)
    ]
    if problems:
        raise PolicyError(problems)
    return policy


def _yaml_reason(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's context and problem as one phrase: the context is often the telling half."""
    parts = [part for part in (exc.context, exc.problem) if part]
    return ", ".join(parts) if parts else str(exc)


def _pydantic_problems(errors: Iterable[Any], lines: dict[Path, int], file: str) -> list[Problem]:
    problems = []
    for error in errors:
        path = _known_prefix(lines, tuple(error["loc"]))
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        problems.append(Problem(file, _line_of(lines, path), _dotted(path), message))
    return problems


def load_policy(path: str | FsPath) -> Policy:
    """Read and validate one policy file."""
    file = str(path)
    try:
        text = FsPath(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PolicyError([Problem(file, None, "", f"cannot read: {reason}")]) from None
    return parse_policy(text, file)


def policy_files(path: str | FsPath) -> list[FsPath]:
    """The policy files a path names: the file itself, or a folder's ``*.yaml``/``*.yml``."""
    root = FsPath(path)
    if root.is_dir():
        return sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [root]


def load_policies(paths: Iterable[str | FsPath]) -> dict[str, Policy]:
    """Load several files; raise one :class:`PolicyError` with every problem of every file.

    Also refuses a script governed by two policies: coalmine would not know which to follow.
    """
    loaded: dict[str, Policy] = {}
    problems: list[Problem] = []
    owner: dict[str, str] = {}
    seen: set[FsPath] = set()
    for path in paths:
        files = policy_files(path)
        if not files:
            problems.append(Problem(str(path), None, "", "no policy files (*.yaml, *.yml) here"))
        for file in files:
            if file.resolve() in seen:  # named twice (a file and its folder): one policy
                continue
            seen.add(file.resolve())
            _load_into(file, loaded, owner, problems)
    if problems:
        raise PolicyError(problems)
    return loaded


def _load_into(
    file: FsPath, loaded: dict[str, Policy], owner: dict[str, str], problems: list[Problem]
) -> None:
    try:
        policy = load_policy(file)
    except PolicyError as exc:
        problems.extend(exc.problems)
        return
    loaded[str(file)] = policy
    for script in policy.scripts:
        if script in owner:
            problems.append(
                Problem(
                    str(file),
                    None,
                    "scripts",
                    f"script {script!r} is already governed by {owner[script]}",
                )
            )
        owner.setdefault(script, str(file))
