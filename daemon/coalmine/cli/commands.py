"""The ``coalmine`` command line. Every local mistake exits 2 with a message, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio

from coalmine import __version__
from coalmine.app import check_live_settings, prepare, run_until_signalled
from coalmine.cli import client, sandbox
from coalmine.cli.backtest import parse_time
from coalmine.cli.backtest_command import backtest_command
from coalmine.cli.demo import run_demo
from coalmine.cli.replay import format_table, parse_records, replay, verdict
from coalmine.cli.status import status as show_status
from coalmine.cli.validate import validate
from coalmine.durations import parse_duration
from coalmine.engine import Engine, Options
from coalmine.errors import (
    CoalmineError,
    ConfigError,
    LocalError,
    PolicyError,
    ReplayFormatError,
    StoreError,
)
from coalmine.logs import configure as configure_logging
from coalmine.policy import json_schema
from coalmine.policyfile import load_policies, load_policy
from coalmine.settings import Settings, env_name, load_settings
from coalmine.store.base import StateStore
from coalmine.store.records import StoreIdentity, Verification
from coalmine.store.sqlite import SqliteStore
from coalmine.store.threaded import ThreadedSqlite
from coalmine.store.urls import is_postgres_url

EXIT_LOCAL_ERROR = 2
T = TypeVar("T")
EXIT_INTERNAL = 70


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coalmine",
        description="Automated canary analysis for Cloudflare Workers gradual deployments.",
    )
    parser.add_argument("--version", action="version", version=f"coalmine {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check-policy", help="validate policy files")
    check.add_argument("files", nargs="+", metavar="FILE", help="policy files or folders")
    check.set_defaults(handler=_check_policy)

    schema = commands.add_parser("schema", help="print the policy JSON Schema")
    schema.set_defaults(handler=_schema)

    rep = commands.add_parser(
        "replay",
        help="run the engine over recorded observations",
        description="Exit 0 promoted, 1 rolled back, 3 no verdict, 2 bad input.",
    )
    rep.add_argument("--policy", required=True, metavar="P", help="policy file")
    rep.add_argument(
        "--input", required=True, metavar="FILE", help="JSON Lines observations, - for stdin"
    )
    rep.add_argument("--script", help="script name (default: the policy's first script)")
    rep.add_argument("--format", choices=("jsonl", "table"), default="jsonl")
    rep.add_argument(
        "--no-auto-rollback", action="store_true", help="page and hold instead of rolling back"
    )
    rep.add_argument("--no-auto-promote", action="store_true", help="stop before each advance")
    rep.add_argument("--dry-run", action="store_true", help="mark traffic decisions as dry run")
    rep.set_defaults(handler=_replay)

    run = commands.add_parser(
        "run",
        help="the daemon",
        description="Watch every script the policies govern; configured by COALMINE_* variables.",
        epilog="variables: " + ", ".join(env_name(n) for n in Settings.model_fields),
    )
    run.set_defaults(handler=_run)

    _operator_commands(commands)

    back = commands.add_parser(
        "backtest",
        help="the policy replayed on real Prometheus/Cloudflare history",
        description="Fetch each rule's history and run the engine over it. "
        "Exit 0 promoted, 1 rolled back, 3 no verdict, 2 bad input.",
    )
    back.add_argument("--policy", required=True, metavar="P", help="policy file")
    back.add_argument("--script", help="script name (default: the policy's first script)")
    back.add_argument("--from", dest="start", required=True, metavar="T1", help="RFC 3339 time")
    back.add_argument("--to", dest="end", required=True, metavar="T2", help="RFC 3339 time")
    back.add_argument("--canary", metavar="V", help="the canary version (with --stable)")
    back.add_argument("--stable", metavar="V", help="the stable version (with --canary)")
    back.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    back.add_argument("--format", choices=("table", "jsonl"), default="table")
    back.add_argument("--dry", action="store_true", help="print the queries it would run")
    back.set_defaults(handler=_backtest)

    gate = commands.add_parser(
        "validate",
        help="one-shot CI gate: exit 0 promoted, 1 rolled back, 3 no verdict",
        description="Drive one script's canary to a verdict in the foreground.",
    )
    gate.add_argument("--script", required=True, help="the Worker script")
    gate.add_argument("--duration", type=_duration, help="give up after (default: the holds + 5m)")
    gate.set_defaults(handler=_validate)

    journal = commands.add_parser("journal", help="check or export the decision journal")
    journal_commands = journal.add_subparsers(
        dest="journal_command", required=True, metavar="ACTION"
    )
    verify = journal_commands.add_parser("verify", help="check the journal's hash chain")
    export = journal_commands.add_parser("export", help="write the journal as JSON Lines")
    export.add_argument("--since", type=int, default=0, metavar="SEQ", help="entries after SEQ")
    export.add_argument(
        "--output", default="-", metavar="FILE", help="file to write (default stdout)"
    )
    for sub in (verify, export):
        sub.add_argument(
            "--state",
            metavar="PATH|URL",
            help="database file or postgresql:// URL (default: COALMINE_STATE_URL)",
        )
    verify.set_defaults(handler=_journal_verify)
    export.set_defaults(handler=_journal_export)

    _add_migrate_state(commands)
    _sandbox_commands(commands)

    demo = commands.add_parser("demo", help="a simulated Worker: a healthy and a faulty canary")
    demo.add_argument("--format", choices=("table", "jsonl"), default="table")
    demo.add_argument("--offline", action="store_true", help="the engine on a virtual clock only")
    demo.set_defaults(handler=_demo)
    return parser


def _operator_commands(commands: Any) -> None:
    """``status``, ``start``, ``pause``, ``resume``, ``promote``, ``rollback``: a running daemon."""
    status = commands.add_parser(
        "status",
        help="where each rollout stands and what it waits for",
        description="Phase, live split, step, hold remaining, what blocks the next step, "
        "breaching and inconclusive rules. --watch exits 0 promoted, 1 rolled back, 3 no verdict.",
    )
    status.add_argument("script", nargs="?", help="one script (default: every one)")
    status.add_argument("--url", help="the daemon (default: from COALMINE_LISTEN)")
    status.add_argument("--json", action="store_true", help="the API's rollout objects as JSON")
    status.add_argument(
        "--watch", action="store_true", help="redraw until the rollout ends; exit on its verdict"
    )
    status.add_argument(
        "--timeout", type=_duration, metavar="DURATION", help="with --watch: give up (exit 3)"
    )
    status.add_argument("--every", type=float, default=2.0, help=argparse.SUPPRESS)
    status.set_defaults(handler=_status)
    start = commands.add_parser("start", help="start a canary of VERSION")
    start.add_argument("script")
    start.add_argument("version")
    start.add_argument("--url", help="the daemon (default: from COALMINE_LISTEN)")
    _who_and_why(start)
    start.set_defaults(handler=_command, kind="start")
    for kind, text in (
        ("pause", "stop advancing (rollback triggers still act)"),
        ("resume", "resume a paused rollout, or adopt the live split after drift"),
        ("promote", "advance one step now"),
        ("rollback", "roll the canary back now"),
    ):
        sub = commands.add_parser(kind, help=text)
        sub.add_argument("script")
        sub.add_argument("--url", help="the daemon (default: from COALMINE_LISTEN)")
        _who_and_why(sub)
        sub.set_defaults(handler=_command, kind=kind, version=None)


def _sandbox_commands(commands: Any) -> None:
    """``sandbox`` and ``sandbox ship``."""
    box = commands.add_parser(
        "sandbox",
        help="simulator + Prometheus + daemon on printed ports and token, to drive by hand",
        description="Run the sandbox until Ctrl-C; `coalmine sandbox ship SCRIPT` starts a canary.",
    )
    box.add_argument(
        "--port-base",
        type=int,
        default=sandbox.BASE_PORT,
        metavar="N",
        help="the daemon on N (default 9300), the rest on N+90..N+96; 0: any free ports",
    )
    box.set_defaults(handler=_sandbox)
    box_commands = box.add_subparsers(dest="sandbox_command", metavar="ACTION")
    shipping = box_commands.add_parser("ship", help="upload a new version and start its canary")
    shipping.add_argument("script")
    shipping.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"inject a fault: {', '.join(sandbox.FAULTS)} (e.g. error-rate=5%%)",
    )
    shipping.add_argument("--at", metavar="WEIGHT", help="once the canary reaches it, e.g. 50%%")
    shipping.add_argument("--control", default=sandbox.CONTROL, help="the sandbox's control URL")
    shipping.set_defaults(handler=_ship)


def _who_and_why(parser: argparse.ArgumentParser) -> None:
    """``--reason`` and ``--actor``: the journal records who asked and why."""
    parser.add_argument("--reason", help="why, recorded in the journal and shown in Slack")
    parser.add_argument("--actor", help="who, for the journal (default: your OS user name)")


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_policy(args: argparse.Namespace) -> int:
    loaded = load_policies(args.files)
    for file, policy in loaded.items():
        print(f"{file}: ok ({policy.name}: {len(policy.rules)} rules, {len(policy.steps)} steps)")
    return 0


def _schema(_: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _replay(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    script = args.script or policy.scripts[0]
    options = Options(
        auto_rollback=not args.no_auto_rollback,
        auto_promote=not args.no_auto_promote,
        dry_run=args.dry_run,
    )
    engine = Engine(policy, options)
    name = "<stdin>" if args.input == "-" else args.input
    try:
        stream = sys.stdin.buffer if args.input == "-" else Path(args.input).open("rb")  # noqa: SIM115
    except OSError as exc:
        raise ReplayFormatError(name, 0, f"cannot read: {exc.strerror}") from None
    with stream:
        records = parse_records(stream, name, (rule.name for rule in policy.rules))
        decisions = list(replay(engine, records, script))
        if args.format == "table":
            for line in format_table(decisions):
                print(line)
        else:
            for decision in decisions:
                print(json.dumps(decision.to_dict()))
    return verdict(decisions)


def _backtest(args: argparse.Namespace) -> int:
    settings = load_settings()
    policy = load_policy(args.policy)
    script = args.script or policy.scripts[0]
    start, end = parse_time(args.start), parse_time(args.end)
    if end <= start:
        raise ConfigError("--to must be after --from")
    if (args.canary is None) != (args.stable is None):
        raise ConfigError("--canary and --stable go together")
    return anyio.run(backtest_command, settings, policy, script, start, end, args)


def _run(_: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    try:
        policies = prepare(settings)
    except PolicyError:
        try:  # name every missing piece at once, not the policy first and the token next time
            check_live_settings(settings, [])
        except ConfigError as exc:
            print(f"coalmine: {exc}", file=sys.stderr)
        raise
    anyio.run(run_until_signalled, settings, policies)
    return 0


def _validate(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_format, "warning")
    policies = prepare(settings)
    return anyio.run(validate, settings, policies, args.script, args.duration)


def _status(args: argparse.Namespace) -> int:
    return show_status(
        load_settings(),
        args.url,
        args.script,
        as_json=args.json,
        watch=args.watch,
        every=args.every,
        timeout=args.timeout.total_seconds() if args.timeout else None,
    )


def _command(args: argparse.Namespace) -> int:
    return client.command(
        load_settings(),
        args.url,
        args.script,
        args.kind,
        args.version,
        actor=args.actor,
        reason=args.reason,
    )


def _open_store(args: argparse.Namespace) -> StateStore:
    """The journal's store: ``--state`` (a file, ``sqlite:///PATH`` or a PostgreSQL URL) or
    COALMINE_STATE_URL; a PostgreSQL database without coalmine's tables is refused, never
    initialised."""
    url = args.state or load_settings().state_url
    if is_postgres_url(url):
        # imported here: only a PostgreSQL URL pays for the driver's import
        from coalmine.store.postgres import PostgresStore  # noqa: PLC0415

        return PostgresStore(url, create=False)
    # the form COALMINE_STATE_URL takes (sqlite:///PATH) works as well as a bare path
    path = Path(url.removeprefix("sqlite:///"))
    if not path.is_file():
        raise ConfigError(f"no state database at {path} (set COALMINE_STATE_URL or --state)")
    try:
        return ThreadedSqlite(SqliteStore(path))
    except StoreError as exc:  # garbage, corrupt, newer schema: name the file and the cause
        raise ConfigError(str(exc)) from None


async def _closing(store: StateStore, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    finally:
        await store.aclose()


def _journal_verify(args: argparse.Namespace) -> int:
    store = _open_store(args)

    async def verify() -> tuple[Verification, StoreIdentity]:
        return await store.verify_journal(), await store.identity()

    result, genesis = anyio.run(_closing, store, verify)
    # the genesis tells a journal that restarted from zero (a new store) from the one it replaced
    since = f"genesis: store {genesis.id} created {genesis.created_at.isoformat()}"
    if result.ok:
        print(f"journal ok: {result.entries} entries, head {result.head}, {since}")
        return 0
    print(
        f"journal BROKEN after {result.entries} good entries: {result.problem} ({since})",
        file=sys.stderr,
    )
    return 1


def _journal_export(args: argparse.Namespace) -> int:
    store = _open_store(args)
    entries = anyio.run(_closing, store, lambda: store.journal(since=args.since))
    _write_journal(args.output, (json.dumps(entry.to_dict()) + "\n" for entry in entries))
    return 0


def _add_migrate_state(commands: Any) -> None:
    move = commands.add_parser(
        "migrate-state", help="copy a SQLite state file into an empty PostgreSQL database"
    )
    move.add_argument("--from", dest="source", required=True, metavar="sqlite:///PATH")
    move.add_argument("--to", dest="target", required=True, metavar="postgresql://...")
    move.set_defaults(handler=_migrate_state)


def _migrate_state(args: argparse.Namespace) -> int:
    # imported here: only this command pays for the PostgreSQL driver's import
    from coalmine.store.migrate import migrate_state  # noqa: PLC0415

    copied = migrate_state(args.source, args.target)
    print(
        f"copied {copied.states} rollouts, {copied.intents} open intents,"
        f" {copied.notifications} undelivered notifications and {copied.entries} journal"
        f" entries (head {copied.head})"
    )
    return 0


def _write_journal(output: str, lines: Iterator[str]) -> None:
    if output != "-":
        with Path(output).open("w", encoding="utf-8") as out:
            out.writelines(lines)
        return
    try:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (`| head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _sandbox(args: argparse.Namespace) -> int:
    return sandbox.run_sandbox(args.port_base)


def _ship(args: argparse.Namespace) -> int:
    return sandbox.ship(args.control, args.script, args.fault, args.at)


def _demo(args: argparse.Namespace) -> int:
    return run_demo(args.format, offline=args.offline)


def _sole(error: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups of one, else ``error`` itself."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coalmine`` console script."""
    args = _parser().parse_args(argv)
    try:
        try:
            return int(args.handler(args))
        except BaseExceptionGroup as group:  # what a task raised, wrapped by its task group
            raise _sole(group) from None
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_LOCAL_ERROR
    except LocalError as exc:
        print(f"coalmine: {exc}", file=sys.stderr)
        return EXIT_LOCAL_ERROR
    except CoalmineError as exc:
        print(f"coalmine: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("COALMINE_DEBUG"):
            raise
        print(
            f"coalmine: internal error: {type(exc).__name__}: {exc} "
            "(this is a bug; COALMINE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
