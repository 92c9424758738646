"""`coalmine replay`: DESIGN.md's replay format, line by line, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from coalmine.cli import main

POLICY = """
version: 1
name: replay
scripts: [demo-worker]
analysis: {interval: 5s, warmup: 10s, inconclusive_page_after: 1m}
steps: [{weight: 10, hold: 1m}, {weight: 50, hold: 1m}, {weight: 100}]
rules:
  - {name: error_rate, source: prometheus, query: q, samples: s, window: 10s, min_samples: 20,
     above: 0.02, for: 20s, on_breach: rollback}
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> str:
    """A one-rule policy file."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return str(path)


DEPLOY = '{"t": "2026-03-03T18:00:00Z", "deployment": {"canary": "v2", "stable": "v1", "canary_percent": 10}}'


def run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *lines: str, flags: tuple[str, ...] = ()
) -> tuple[int, list[dict[str, Any]], str]:
    """Replay the given lines against the fast policy; return exit code, decisions, stderr."""
    path = tmp_path / "input.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (tmp_path / "policy.yaml").write_text(POLICY)
    code = main(["replay", "--policy", str(tmp_path / "policy.yaml"), "--input", str(path), *flags])
    out = capsys.readouterr()
    decisions = [json.loads(line) for line in out.out.splitlines()] if code != 2 else []
    return code, decisions, out.err


def obs(
    t: str, value: object, rule: str = "error_rate", version: str = "canary", **extra: object
) -> str:
    """One observation line."""
    return json.dumps(
        {"t": f"2026-03-03T18:{t}Z", "rule": rule, "version": version, "value": value, **extra}
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "each line must be a JSON object"),
        (
            '{"t": "2026-03-03T18:00:00Z"}',
            'a line needs one of "deployment", "rule", "command" or "freeze"',
        ),
        ('{"t": 5, "command": "pause"}', '"t" must be an RFC 3339 time string'),
        ('{"t": "yesterday", "command": "pause"}', "is not an RFC 3339 time"),
        ('{"t": "2026-03-03T18:00:00", "command": "pause"}', "has no timezone"),
        ('{"t": "2026-03-03T18:00:00Z", "command": "jump"}', '"command" must be one of'),
        ('{"t": "2026-03-03T18:00:00Z", "command": "start"}', 'a "start" command needs "version"'),
        (
            '{"t": "2026-03-03T18:00:00Z", "rule": "nope", "version": "canary", "value": 1}',
            "unknown rule 'nope'",
        ),
        (
            '{"t": "2026-03-03T18:00:00Z", "rule": "error_rate", "version": "v2", "value": 1}',
            '"version" must be "canary" or "stable"',
        ),
        (
            '{"t": "2026-03-03T18:00:00Z", "rule": "error_rate", "version": "canary"}',
            'an observation needs "value"',
        ),
        (
            '{"t": "2026-03-03T18:00:00Z", "rule": "error_rate", "version": "canary", "value": "high"}',
            '"value" must be a number',
        ),
        (
            '{"t": "2026-03-03T18:00:00Z", "rule": "error_rate", "version": "canary", "value": true}',
            '"value" must be a number',
        ),
        (
            '{"t": "2026-03-03T18:00:00Z", "rule": "error_rate", "version": "canary", "value": NaN}',
            "bare NaN is not JSON",
        ),
        (
            '{"t": "2026-03-03T18:00:00Z", "rule": "error_rate", "version": "canary", "value": 1, "x": 1}',
            "unknown field 'x'",
        ),
        (
            '{"t": "2026-03-03T18:00:00Z", "deployment": {"stable": "v1", "canary": "v2", "canary_percent": 150}}',
            "canary_percent",
        ),
        (
            '{"t": "2026-03-03T18:00:00Z", "deployment": {"canary": "v2", "canary_percent": 10}}',
            "deployment.stable",
        ),
    ],
)
def test_malformed_line_exits_2_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    """A malformed line -> exit 2 with `file:LINE: message`, no traceback, nothing on stdout."""
    code, _, err = run(tmp_path, capsys, DEPLOY, line)
    assert code == 2
    assert err.startswith(f"coalmine: {tmp_path / 'input.jsonl'}:2: ")
    assert message in err
    assert "Traceback" not in err


def test_time_going_backwards_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lines must be in time order: an earlier t names its line."""
    code, _, err = run(
        tmp_path, capsys, DEPLOY, obs("00:10", 0.0, samples=100), obs("00:05", 0.0, samples=100)
    )
    assert code == 2
    assert ":3: t goes back in time" in err


def test_value_strings_and_errors_are_inconclusive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`value` may be null, "NaN", "+Inf", "-Inf"; an `error` line is a failed query: all hold."""
    lines = [DEPLOY]
    values: list[object] = [None, "NaN", "+Inf", "-Inf"]
    for i in range(12):
        t = f"{(i + 1) * 5 // 60:02d}:{(i + 1) * 5 % 60:02d}"
        if i % 5 == 4:
            lines.append(
                json.dumps(
                    {
                        "t": f"2026-03-03T18:{t}Z",
                        "rule": "error_rate",
                        "version": "canary",
                        "error": "timeout",
                    }
                )
            )
        else:
            lines.append(obs(t, values[i % 5 % 4], samples=1000))
    code, decisions, err = run(tmp_path, capsys, *lines)
    assert code == 3, err  # held: no verdict
    assert [d["action"] for d in decisions] == ["start", "hold"]
    assert "error_rate inconclusive" in decisions[1]["reason"]


def test_engine_runs_once_per_t_with_observations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ "The engine runs once per distinct `t` that carries observations, with the observations
    of that `t`": two lines at one t are one tick (a rollback rule with for 20s needs 3 ticks)."""
    lines = [DEPLOY]
    for t in ("00:10", "00:20", "00:30"):
        lines += [obs(t, 0.5, samples=100), obs(t, 0.001, version="stable", samples=900)]
    code, decisions, _ = run(tmp_path, capsys, *lines)
    assert code == 1  # rolled back
    rollback = next(d for d in decisions if d["action"] == "rollback")
    assert rollback["t"] == "2026-03-03T18:00:30Z"
    assert rollback["breached_since"] == "2026-03-03T18:00:10Z"
    assert rollback["stable_value"] == 0.001


def test_commands_apply_at_their_t_without_observations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ "Commands are applied at their `t` even when no observation shares it." """
    code, decisions, _ = run(
        tmp_path, capsys, DEPLOY, '{"t": "2026-03-03T18:00:07Z", "command": "rollback"}'
    )
    assert code == 1  # rolled back
    assert [(d["action"], d["t"], d["actor"]) for d in decisions[1:]] == [
        ("rollback", "2026-03-03T18:00:07Z", "operator")
    ]


def test_command_applies_before_that_ticks_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ "A `command` line ... applies at its `t`, before that tick's evaluation": a pause written
    after the tick's observations still stops that tick's advance."""
    lines = [DEPLOY]
    for s in range(5, 60, 5):
        lines.append(obs(f"00:{s:02d}", 0.0, samples=100))
    lines += [obs("01:00", 0.0, samples=100), '{"t": "2026-03-03T18:01:00Z", "command": "pause"}']
    code, decisions, _ = run(tmp_path, capsys, *lines)
    assert code == 3  # paused: no verdict
    assert [d["action"] for d in decisions] == ["start", "pause", "hold"]


def test_own_traffic_decision_echoed_is_not_drift(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ "a later `deployment` line that matches them is not drift; one that differs is." """
    healthy = [f"00:{s:02d}" for s in range(5, 60, 5)] + ["01:00"]
    lines = [DEPLOY] + [obs(t, 0.0, samples=100) for t in healthy]
    same = '{"t": "2026-03-03T18:01:05Z", "deployment": {"canary": "v2", "stable": "v1", "canary_percent": 50}}'
    other = '{"t": "2026-03-03T18:01:10Z", "deployment": {"canary": "v2", "stable": "v1", "canary_percent": 20}}'
    code, decisions, _ = run(tmp_path, capsys, *lines, same)
    assert [d["action"] for d in decisions] == ["start", "set_traffic"]
    code, decisions, _ = run(tmp_path, capsys, *lines, same, other)
    assert code == 3  # stood down: no verdict
    assert [d["action"] for d in decisions] == ["start", "set_traffic", "warn"]
    assert decisions[-1]["reason"].startswith("drift: live deployment is v2 at 20% over v1")


def test_decision_fields_are_the_documented_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Output objects carry t, action, reason and the optional fields DESIGN.md lists, non-finite
    numbers as strings."""
    lines = [DEPLOY] + [obs(f"00:{s:02d}", 0.9, samples=100) for s in (10, 20, 30)]
    _, decisions, _ = run(tmp_path, capsys, *lines)
    rollback = next(d for d in decisions if d["action"] == "rollback")
    assert set(rollback) >= {
        "t",
        "action",
        "canary_percent",
        "rule",
        "value",
        "threshold",
        "breached_since",
        "reason",
    }
    assert rollback["window"] == "10s" and rollback["samples"] == 100


def test_table_format_is_a_readable_timeline(
    policy_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--format table prints one line per decision under a header."""
    lines = [DEPLOY] + [obs(f"00:{s:02d}", 0.9, samples=100) for s in (10, 20, 30)]
    path = tmp_path / "input.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["replay", "--policy", policy_file, "--input", str(path), "--format", "table"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["time", "(UTC)", "action", "canary", "reason"]
    assert out[1].split()[:4] == ["2026-03-03", "18:00:00", "start", "10%"]
    assert out[2].split()[:4] == ["2026-03-03", "18:00:30", "rollback", "0%"]
    assert "[critical]" in out[3]


def test_missing_input_file_exits_2(
    policy_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing input file is a clear error, exit 2."""
    assert main(["replay", "--policy", policy_file, "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("values", "code"),
    [((0.0,) * 24, 0), ((0.9,) * 8, 1), ((None,) * 3, 3)],
    ids=["promoted", "rolled back", "no verdict"],
)
def test_replay_exits_like_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], values: tuple[float | None, ...], code: int
) -> None:
    """Exit 0 when the replay promotes, 1 when it rolls back, 3 with no verdict."""
    lines = [DEPLOY] + [
        obs(f"{s // 60:02d}:{s % 60:02d}", v, samples=100)
        for s, v in zip(range(10, 1000, 5), values, strict=False)
    ]
    got, _, err = run(tmp_path, capsys, *lines)
    assert got == code, err
