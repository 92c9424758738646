"""The operator docs stay true: the `coalmine` commands they show exist and parse, the variables
they name are configuration.md's, the policies they show are valid, and their links resolve."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coalmine.cli.commands import _parser
from coalmine.policyfile import parse_policy
from tests.support import ROOT

DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
CONFIGURATION = ROOT / "docs" / "configuration.md"

# Variables coalmine reads outside its settings model, so configuration.md (generated from the
# model) does not list them. Each must really be read by the package; listing it in
# configuration.md is proposed to the package's owners.
NOT_SETTINGS = {"COALMINE_DEBUG": "the CLI shows the traceback of an internal error"}

# Inline code that starts like a command but quotes a log event.
LOG_EVENTS = frozenset({"coalmine started"})

# Fenced blocks whose lines are shell commands (a console block: only its `$ ` lines).
SHELL_BLOCKS = frozenset({"", "sh", "bash", "shell", "console", "yaml", "yml"})

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`([^`\n]+)`")
_INVOCATION = re.compile(r"(?:^|(?<=[\s;&|(]))(?:[\w./-]*/)?coalmine(?=[ \t]+(?:[a-z]|--[a-z]))")
_COMMAND_END = re.compile(r"\s(?:\||;|&&|\|\||>|<|#)|\)|`")
_COMMENT = re.compile(r"(?:^|(?<=\s))#.*$")
_VARIABLE = re.compile(r"\bCOALMINE_[A-Z0-9_]*[A-Z0-9]\b")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Shown:
    """A `coalmine` invocation shown in a doc: where, its arguments, and whether it is a whole
    command to run (a code block) or a mention in the text (inline code)."""

    where: str
    argv: tuple[str, ...]
    whole: bool


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _arguments(text: str) -> tuple[str, ...]:
    """The arguments after `coalmine` up to the end of the shell command."""
    end = _COMMAND_END.search(text)
    words = shlex.split(text[: end.start() if end else None])[1:]
    return tuple(w.strip("[]") for w in words if w.strip("[]"))


def _commands(lines: list[str], first: int) -> Iterator[tuple[int, str]]:
    """Lines with their continuation lines (a trailing backslash) joined, each with its number."""
    at = 0
    while at < len(lines):
        number, line = first + at, lines[at]
        while line.endswith("\\") and at + 1 < len(lines):
            at += 1
            line = line[:-1] + " " + lines[at]
        at += 1
        yield number, line


def shown_invocations(path: Path) -> Iterator[Shown]:
    """Every `coalmine ...` in a doc's shell code blocks and inline code."""
    text = path.read_text(encoding="utf-8")
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    blocks = []
    for fence in _FENCE.finditer(text):
        blocks.append((fence.start(), fence.end()))
        language, body = fence.group(1), fence.group(2)
        if language not in SHELL_BLOCKS:
            continue
        for number, line in _commands(body.split("\n"), _line(text, fence.start(2))):
            if language == "console" and not line.startswith("$ "):
                continue  # output, not a command
            command = _COMMENT.sub("", line.removeprefix("$ "))
            for match in _INVOCATION.finditer(command):
                yield Shown(f"{name}:{number}", _arguments(command[match.start() :]), whole=True)
    for span in _INLINE.finditer(text):
        if any(a <= span.start() < b for a, b in blocks):
            continue
        code = span.group(1)
        match = _INVOCATION.match(code)
        if match and code not in LOG_EVENTS and not code.split()[1].endswith(":"):
            yield Shown(f"{name}:{_line(text, span.start())}", _arguments(code), whole=False)


def subcommands() -> dict[str, set[str]]:
    """The CLI's commands, each with its own subcommands (``journal``: verify, export)."""

    def choices(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    return {name: set(choices(sub)) for name, sub in choices(_parser()).items()}


def test_the_reader_finds_commands_in_blocks_and_text(tmp_path: Path) -> None:
    """Commands come from shell blocks and inline code, never from JSON, output or comments."""
    doc = tmp_path / "reader.md"
    doc.write_text(
        "Run `coalmine status | start A B` or `.venv/bin/coalmine journal verify`.\n"
        "```sh\n"
        "COALMINE_DRY_RUN=true .venv/bin/coalmine run  # the daemon\n"
        "coalmine validate --script api \\\n"
        "  --duration 2h | tee out.txt\n"
        "kubectl exec deploy/coalmine -- coalmine status\n"
        "```\n"
        "```console\n$ coalmine check-policy p.yaml\ncoalmine validate api: policy p\n```\n"
        '```json\n{"event": "coalmine started"}\n```\n'
    )
    got = [(s.argv, s.whole) for s in shown_invocations(doc)]
    assert got == [
        (("run",), True),
        (("validate", "--script", "api", "--duration", "2h"), True),
        (("status",), True),
        (("check-policy", "p.yaml"), True),
        (("status",), False),
        (("journal", "verify"), False),
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_coalmine_command_shown_exists_and_parses(doc: Path) -> None:
    """Each `coalmine X` shown is a real command; in a code block it parses exactly as written."""
    commands = subcommands()
    problems = []
    for shown in shown_invocations(doc):
        command, *rest = shown.argv
        if command.startswith("--"):
            continue  # `coalmine --version`: parsed below when whole
        if command not in commands:
            problems.append(f"{shown.where}: no such command: coalmine {command}")
            continue
        nested = commands[command]
        if nested and rest and not rest[0].startswith("-") and rest[0] not in nested:
            problems.append(f"{shown.where}: no such command: coalmine {command} {rest[0]}")
    for shown in shown_invocations(doc):
        if not shown.whole:
            continue
        try:
            _parser().parse_args(list(shown.argv))
        except SystemExit as exc:
            if exc.code != 0:
                problems.append(f"{shown.where}: does not parse: coalmine {shlex.join(shown.argv)}")
    assert not problems, "\n".join(problems)


def test_the_docs_show_commands() -> None:
    """The docs show the commands they are about, so the check above has work to do."""
    shown = {s.argv[0] for doc in DOCS for s in shown_invocations(doc)}
    assert {"run", "check-policy", "validate", "status", "pause", "resume", "journal"} <= shown


def configured_variables() -> set[str]:
    """The variables in configuration.md's table."""
    text = CONFIGURATION.read_text(encoding="utf-8")
    return set(re.findall(r"^\| `(COALMINE_[A-Z0-9_]+)` \|", text, re.MULTILINE))


def test_every_variable_in_the_docs_is_in_the_configuration_reference() -> None:
    """Every COALMINE_ variable the docs name is in configuration.md (or a listed exception)."""
    configured = configured_variables()
    assert len(configured) >= 20
    problems = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in _VARIABLE.finditer(text):
            name = match.group()
            if name not in configured and name not in NOT_SETTINGS:
                where = f"{doc.relative_to(ROOT)}:{_line(text, match.start())}"
                problems.append(f"{where}: {name} is not in docs/configuration.md")
    assert not problems, "\n".join(problems)
    package = "".join(p.read_text() for p in (ROOT / "daemon" / "coalmine").rglob("*.py"))
    for name in NOT_SETTINGS:
        assert name not in configured, f"{name} is in configuration.md now: drop the exception"
        assert f'"{name}"' in package, f"{name} is not read by the package"


def yaml_blocks(path: Path) -> Iterator[tuple[int, str]]:
    """The YAML code blocks of a doc, with the line each starts on."""
    text = path.read_text(encoding="utf-8")
    for fence in _FENCE.finditer(text):
        if fence.group(1) in ("yaml", "yml"):
            yield _line(text, fence.start(2)), fence.group(2)


def test_every_policy_shown_in_the_docs_is_valid() -> None:
    """A YAML block that is a whole policy (version, scripts, steps) passes check-policy."""
    checked = 0
    for doc in DOCS:
        for line, block in yaml_blocks(doc):
            if not re.search(r"^version: 1$", block, re.MULTILINE) or "\nsteps:" not in block:
                continue
            parse_policy(block, f"{doc.relative_to(ROOT)}:{line}")
            checked += 1
    assert checked >= 3


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_relative_link_resolves() -> None:
    """Relative links in the docs point at files, and headings, that exist."""
    problems = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in _LINK.finditer(text):
            target = match.group(1)
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            where = f"{doc.relative_to(ROOT)}:{_line(text, match.start())}"
            if not path.exists():
                problems.append(f"{where}: {target}: no such file")
            elif anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    problems.append(f"{where}: {target}: no such heading")
    assert not problems, "\n".join(problems)
