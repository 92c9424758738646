"""Bad input never crashes the command line: generated policy files and replay lines.

`coalmine check-policy` and `coalmine replay` must answer any file with exit 0 or a clear error
(exit 2) naming the file and, where there is one, the line; never an internal error (exit 70)
and never an exception.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from coalmine.cli import main
from coalmine.policyfile import load_policy
from tests.support import ROOT, T0

BAD_INPUT = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no slow "explain"
)
FAST = ROOT / "policies" / "examples" / "fast.yaml"
SMALL_POLICY = """\
version: 1
name: small
scripts: [svc]
analysis: {interval: 10s, warmup: 10s, inconclusive_page_after: 1m}
steps:
  - {weight: 10, hold: 1m}
  - {weight: 100}
post_promotion: {watch: 1m}
deployment_windows:
  timezone: America/Los_Angeles
  allow: [{days: [tue, wed], from: "10:00", to: "16:00"}]
rules:
  - {name: err, source: prometheus, query: q, samples: n, min_samples: 10, above: 0.01, for: 30s,
     on_breach: rollback}
  - {name: cpu, source: cloudflare, signal: cpu_time_p50, window: 5m, below: 5, on_breach: page,
     severity: warning, phases: [canary, post_promotion]}
"""
# The policies mutated below, smallest first (what a failing example shrinks towards).
POLICIES = (SMALL_POLICY, FAST.read_text(), (ROOT / "policies" / "runbook.yaml").read_text())
_LOADED = [yaml.safe_load(text) for text in POLICIES]


def _small_with(edit: Callable[[Any], object]) -> str:
    """SMALL_POLICY with one edit applied to its data, as YAML (for explicit examples)."""
    doc = copy.deepcopy(_LOADED[0])
    edit(doc)
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


FAST_RULES = tuple(rule.name for rule in load_policy(FAST).rules)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the generated files (module-scoped: one per test module, reused)."""
    return tmp_path_factory.mktemp("bad-input")


def cli(*argv: str) -> tuple[int, str, str]:
    """Run `coalmine` in-process: exit code, stdout, stderr. An exception fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


# ---- policy files ---------------------------------------------------------------------------

YAML_PIECES = st.sampled_from(
    (
        *"abcdefghijklmnopqrstuvwxyz_0123456789 :-{}[],#'\"&*!|>%@`?.\t\n",
        *("\n  ", ": ", "- ", "version: 1\n", "name: x\n", "scripts: [a]\n", "steps:\n"),
        *("rules:\n", "  - {weight: ", "hold: ", "for: ", "24:00", ".nan", "~", "!!python/int"),
        *("&a ", "*a", "<<: ", "\x00", "\ufeff", "\u2028", "\x85", "é", "\U0001f600", "\\"),
    )
)
YAML_TEXT = st.lists(YAML_PIECES, max_size=120).map("".join)

DURATION_FIELDS = {
    "interval",
    "warmup",
    "inconclusive_page_after",
    "hold",
    "watch",
    "for",
    "window",
}
DURATIONS = st.one_of(
    st.from_regex(r"\A\d{1,20}[dhms](\d{1,4}[hms])?\Z"),
    st.sampled_from(
        (
            *("0s", "1h30m", "5 m", "1.5h", "-1m", "m", "30", "1m1h", "", "24h", "P1D"),
            *("99999999999999999999d", "106751991167300d", "9999999999h", "1d1h1m1s"),
        )
    ),
    st.integers(-10, 10**15),
)
TRICKY_TEXT = st.sampled_from(
    (
        *("", " ", "a:b", "a\nb", "tab\there", "é", "24:00", "25:61", "10:00", "-", "1"),
        *("America/Nowhere", "A" * 300, "../../etc/passwd", "UTC\x00", "Etc/GMT+99", "."),
        *("$script", "$nope", "${window}", "prometheus", "cloudflare", "rollback", "canary"),
    )
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from((10**30, -1, 0, 100, 101, 2**63)),
    st.floats(),
    st.text(max_size=20),
    TRICKY_TEXT,
)
KEYS = st.one_of(
    st.sampled_from(
        (
            *("version", "name", "scripts", "analysis", "steps", "post_promotion", "rules"),
            *("deployment_windows", "timezone", "allow", "days", "from", "to", "weight", "hold"),
            *("source", "query", "samples", "signal", "window", "min_samples", "above", "below"),
            *("for", "on_breach", "phases", "severity", "description", "interval", "watch"),
        )
    ),
    TRICKY_TEXT,
    st.text(max_size=12),
)
ODD_KEYS = st.sampled_from(("a\nb", "fo:o", "", " ", "é", "x" * 200, "1", "a\tb", "#c", "\x85"))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=6,
)
Path_ = tuple[str | int, ...]


def _paths(node: Any, at: Path_ = ()) -> list[Path_]:
    """Every path to a value inside a loaded document."""
    found = [at] if at else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*at, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*at, i))
    return found


def _parent(doc: Any, path: Path_) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


DURATION_VALUES = st.one_of(DURATIONS, VALUES)
# Odd values per field: wrong types, out of range, almost right.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    **dict.fromkeys(DURATION_FIELDS, DURATION_VALUES),
    "timezone": st.sampled_from(
        ("A" * 300, "../../etc/passwd", "UTC\x00", "", "Mars/Olympus", "zoneinfo", 5, None)
    ),
    "days": st.sampled_from(([], ["mon", "mon"], ["Mon"], "tue", [1], None, ["funday"])),
    "from": st.sampled_from(("24:00", "25:00", "10:60", "9:5", "1000", 36000, None, "", "23:59")),
    "weight": st.sampled_from((0, 101, -5, 100, 50, 10.5, "10", None, True, 10**30)),
    "source": st.sampled_from(("prometheus", "grafana", "cloudflare", "datadog", "", None)),
    "signal": st.sampled_from(("errors", "cpu_time_p50", "bogus", None, 5)),
    "on_breach": st.sampled_from(("rollback", "hold", "page", "warn", "explode", None)),
    "severity": st.sampled_from(("critical", "error", "warning", "info", "fatal", None)),
    "phases": st.sampled_from(([], ["canary", "canary"], ["post_promotion"], "canary", ["x"])),
    "min_samples": st.sampled_from((-1, 0, 1e308, math.nan, math.inf, "100", None, 10**400)),
    "above": st.sampled_from((math.nan, math.inf, -math.inf, "0.5", None, 10**400, True)),
    "query": st.sampled_from(("", "$nope", "${script}", "$$", "sum(x)", None, 5, "a\nb")),
    "name": st.sampled_from(("", "a b", "x" * 101, "ok", None, 5, "a\nb")),
    "scripts": st.sampled_from(([], ["a", "a"], "a", [None], [""], ["x\ny"])),
    "version": st.sampled_from((2, "1", 0, None, 1.0, True)),
    "steps": st.sampled_from(([], [{"weight": 100}], [{"weight": 50}, {"weight": 10}], "x")),
    "allow": st.sampled_from(([], [{}], [{"days": ["mon"], "from": "10:00", "to": "10:00"}])),
}
FIELD_VALUES |= {
    "to": FIELD_VALUES["from"],
    "below": FIELD_VALUES["above"],
    "samples": FIELD_VALUES["query"],
}


@st.composite
def mutated_policies(draw: st.DrawFn) -> str:
    """A repository policy with fields deleted, given odd values or values of the wrong type,
    and unknown keys added, dumped back to YAML."""
    doc = copy.deepcopy(draw(st.sampled_from(_LOADED)))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(doc)
        if not paths:
            break
        how = draw(st.sampled_from(("field", "field", "delete", "replace", "add")))
        names = sorted({str(p[-1]) for p in paths if p[-1] in FIELD_VALUES})
        if how == "field" and names:  # a field name first, so that rare fields come up too
            name = draw(st.sampled_from(names))
            path = draw(st.sampled_from([p for p in paths if p[-1] == name]))
            _parent(doc, path)[name] = copy.deepcopy(draw(FIELD_VALUES[name]))
            continue
        path = draw(st.sampled_from(paths))
        parent, key = _parent(doc, path), path[-1]
        if how == "delete":
            del parent[key]
        # drawn values are copied: a later mutation must not change what hypothesis generated
        elif how == "replace":
            parent[key] = copy.deepcopy(draw(VALUES))
        elif isinstance(parent, dict):
            parent[draw(st.one_of(ODD_KEYS, KEYS))] = copy.deepcopy(draw(VALUES))
        else:
            parent.append(copy.deepcopy(draw(VALUES)))
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


@st.composite
def edited_policies(draw: st.DrawFn) -> str:
    """A repository policy's text with lines deleted, repeated, swapped or overwritten."""
    lines = draw(st.sampled_from(POLICIES)).split("\n")
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(("delete", "repeat", "swap", "overwrite", "indent")))
        if how == "delete" and len(lines) > 1:
            del lines[i]
        elif how == "repeat":
            lines.insert(i, lines[i])
        elif how == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif how == "overwrite":
            start = draw(st.integers(0, len(lines[i])))
            piece = draw(YAML_TEXT)
            lines[i] = lines[i][:start] + piece + lines[i][start + len(piece) :]
        else:
            lines[i] = draw(st.sampled_from((" ", "  ", "\t", "- "))) + lines[i]
    return "\n".join(lines)


def check_policy(path: Path, text: str) -> None:
    """check-policy exits 0 or 2; each error line names the file and, optionally, a line of it
    (counting every line break PyYAML knows: U+2028 and NEL too)."""
    line_count = len(text.splitlines()) + 1
    code, _, err = cli("check-policy", str(path))
    assert code in (0, 2), err
    if code == 0:
        assert err == ""
        return
    assert err.endswith("\n"), err
    for line in err[:-1].split("\n"):
        match = re.match(rf"^{re.escape(str(path))}:(\d+:)? ", line)
        assert match, f"{line!r} does not name the file (stderr: {err!r})"
        if match[1]:
            assert 1 <= int(match[1][:-1]) <= line_count, err


def _check_text(workdir: Path, text: str) -> None:
    path = workdir / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    check_policy(path, text)


@BAD_INPUT
@given(st.one_of(YAML_TEXT, st.text(max_size=200)))
@example(text="version: 1\x00")  # PyYAML's reader error spans two lines
def test_check_policy_answers_yaml_like_text(workdir: Path, text: str) -> None:
    """check-policy on random YAML-ish text exits 0 or 2, each error line naming `file:line:`."""
    _check_text(workdir, text)


@BAD_INPUT
@given(mutated_policies())
@example(text=_small_with(lambda d: d["deployment_windows"].update(timezone="A" * 300)))
@example(text=_small_with(lambda d: d["rules"][0].update({"fo\no": 1})))
@example(text=_small_with(lambda d: d["steps"][0].update(hold="99999999999d")))
@example(text=_small_with(lambda d: d["rules"][0].update(above=10**400)))
def test_check_policy_answers_mutated_policies(workdir: Path, text: str) -> None:
    """check-policy on a real policy with fields deleted, types swapped, random durations or
    keys exits 0 or 2, each error line naming `file:line:`."""
    _check_text(workdir, text)


@BAD_INPUT
@given(edited_policies())
def test_check_policy_answers_edited_policies(workdir: Path, text: str) -> None:
    """check-policy on a real policy with lines deleted, repeated, swapped or overwritten exits
    0 or 2, each error line naming `file:line:`."""
    _check_text(workdir, text)


@BAD_INPUT
@given(st.binary(max_size=200))
@example(data=b"\xff\xfeversion: 1")
def test_check_policy_answers_any_bytes(workdir: Path, data: bytes) -> None:
    """check-policy on arbitrary bytes (not UTF-8, NULs) exits 0 or 2 naming the file."""
    path = workdir / "policy.yaml"
    path.write_bytes(data)
    check_policy(path, data.decode("utf-8", errors="replace"))


# ---- replay lines ---------------------------------------------------------------------------


def _time(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=5,
)
BAD_TIMES = st.sampled_from(
    (
        *("2026-03-03T18:00:00", "2026-03-03 18:00", "2026-13-01T00:00:00Z", "yesterday", ""),
        *("2026-03-03T18:00:00+25:00", "2026-02-30T00:00:00Z", "T18:00:00Z", "18:00"),
    )
)
EXTREME_TIMES = st.sampled_from(
    (
        *("9999-12-31T23:59:59Z", "9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00Z"),
        *("0001-01-01T00:30:00+01:00", "2026-03-03T18:00Z", "2026-03-03T10:00:00.5-08:00"),
    )
)
ANY_TIMES = st.one_of(
    st.builds(lambda s: _time(T0 + timedelta(seconds=s)), st.integers(-3600, 3600)),
    BAD_TIMES,
    EXTREME_TIMES,
    st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat()),
    JSON,
)
NUMBERS = st.one_of(
    st.floats(),  # json.dumps writes NaN and ±Inf as bare NaN / Infinity: not JSON
    st.integers(),
    st.sampled_from((10**400, -(10**400), 1e308, "NaN", "+Inf", "-Inf", "nan", "Infinity", "1.5")),
    st.none(),
    JSON,
)
RECORD_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "rule": st.one_of(st.sampled_from((*FAST_RULES, "nope", "")), JSON),
    "version": st.one_of(st.sampled_from(("canary", "stable", "green", "v2", "")), JSON),
    "value": NUMBERS,
    "samples": NUMBERS,
    "error": st.one_of(st.text(max_size=10), JSON),
    "command": st.one_of(
        st.sampled_from(("pause", "resume", "promote", "rollback", "start", "stop")), JSON
    ),
    "deployment": st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "canary": st.one_of(st.sampled_from(("v1", "v2", "v3", "")), JSON),
                "stable": st.one_of(st.sampled_from(("v1", "v2", "")), JSON),
                "canary_percent": st.one_of(
                    st.sampled_from((0, 10, 50, 100, 150, -1, 10.5, "10", True)), NUMBERS
                ),
                "weight": JSON,
            },
        ),
        JSON,
    ),
}
RECORDS = st.fixed_dictionaries(
    {"t": ANY_TIMES},
    optional={**RECORD_FIELDS, "surprise": JSON, "T": JSON},
)
RAW_LINES = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=40)
LINES = st.one_of(
    RECORDS.map(json.dumps),
    JSON.map(json.dumps),
    RAW_LINES,
    st.sampled_from(("", "   ", "{", "}", "[]", "null", '{"t": NaN}', "{'t': 1}")),
)


def check_replay(path: Path, lines: list[str]) -> None:
    """replay exits 0, 1 or 3 (its verdict) or 2; with 2 its error names `file:LINE:` of a line
    that has text."""
    code, out, err = cli("replay", "--policy", str(FAST), "--input", str(path))
    assert code in (0, 1, 2, 3), err
    if code != 2:
        assert err == ""
        for line in out.splitlines():
            assert isinstance(json.loads(line), dict)
        return
    match = re.match(rf"^coalmine: {re.escape(str(path))}:(\d+): ", err)
    assert match, f"stderr does not name file:LINE: {err!r}"
    number = int(match[1])
    assert 1 <= number <= len(lines), err
    assert lines[number - 1].strip(), f"line {number} is blank: {err!r}"


@BAD_INPUT
@given(st.lists(LINES, min_size=1, max_size=12))
def test_replay_answers_random_lines(workdir: Path, lines: list[str]) -> None:
    """replay on random lines (any JSON, objects with random fields, NaN literals, text) exits
    0 or 2 naming `file:LINE:`."""
    path = workdir / "input.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    check_replay(path, lines)


# A valid replay line at time t (the records below are all well-formed).
VALID = st.one_of(
    st.builds(
        lambda rule, role, value, samples: {
            "rule": rule,
            "version": role,
            "value": value,
            **({"samples": samples} if samples is not None else {}),
        },
        st.sampled_from(FAST_RULES),
        st.sampled_from(("canary", "stable")),
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False),
            st.sampled_from((None, "NaN", "+Inf", "-Inf", 0, 1)),
        ),
        st.one_of(st.none(), st.integers(0, 10**6), st.sampled_from(("NaN", 12.5))),
    ),
    st.builds(
        lambda rule, role, error: {"rule": rule, "version": role, "error": error},
        st.sampled_from(FAST_RULES),
        st.sampled_from(("canary", "stable")),
        st.text(max_size=10),
    ),
    st.builds(
        lambda stable, canary, percent: {
            "deployment": {"stable": stable, "canary": canary, "canary_percent": percent}
        },
        st.sampled_from(("v1", "v2")),
        st.sampled_from(("v2", "v3", None)),
        st.integers(0, 100),
    ),
    st.sampled_from(
        (
            *({"command": kind} for kind in ("pause", "resume", "promote", "rollback")),
            {"command": "start", "version": "v3"},
        )
    ),
)
WRONG_TYPES: dict[str, tuple[object, ...]] = {
    "t": (123, None, [], {}, True),
    "rule": (5, None, [], {"name": "error_rate"}),
    "version": ("green", 1, None, ["canary"]),
    "value": ("abc", True, [1], {}, "nan", "Infinity", "1.5"),
    "samples": ("x", False, [], {}),
    "error": (5, [], {}, True),
    "command": ("explode", 1, None, ["pause"]),
}
WRONG_DEPLOYMENT: dict[str, tuple[object, ...]] = {
    "canary_percent": (150, -1, 10.5, "10", True, None, [10]),
    "stable": (5, [], {}, "", None),
    "canary": (5, [], {}, 7),
}


def _bad_line(draw: st.DrawFn, previous_t: datetime | None, t: datetime) -> str:
    """One line that the replay format refuses, of a drawn kind."""
    record = {"t": _time(t), **draw(VALID)}
    kinds = ["wrong_type", "unknown_field", "bad_time", "nan_literal", "not_object", "not_json"]
    if previous_t is not None:
        kinds.append("out_of_order")
    kind = draw(st.sampled_from(kinds))
    if kind == "wrong_type" and "deployment" in record:
        field = draw(st.sampled_from(sorted(WRONG_DEPLOYMENT)))
        record["deployment"][field] = draw(st.sampled_from(WRONG_DEPLOYMENT[field]))
    elif kind == "wrong_type":
        start_version = "command" in record  # a start's "version" is any version id
        fields = [f for f in record if f in WRONG_TYPES and not (start_version and f == "version")]
        field = draw(st.sampled_from(fields))
        record[field] = draw(st.sampled_from(WRONG_TYPES[field]))
    elif kind == "unknown_field":
        allowed = {"t", "rule", "version", "value", "samples", "error", "command", "deployment"}
        record[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in allowed))] = 1
    elif kind == "bad_time":
        record["t"] = draw(BAD_TIMES)
    elif kind == "nan_literal":
        record = {"t": _time(t), "rule": "error_rate", "version": "canary"}
        record[draw(st.sampled_from(("value", "samples")))] = draw(
            st.sampled_from((math.nan, math.inf, -math.inf))
        )
        record.setdefault("value", 0.5)
    elif kind == "out_of_order":
        assert previous_t is not None
        record["t"] = _time(previous_t - timedelta(seconds=draw(st.integers(1, 86400))))
    elif kind == "not_object":
        return json.dumps(draw(st.one_of(st.lists(JSON, max_size=3), st.text(), st.integers())))
    else:
        return json.dumps(record)[: draw(st.integers(1, 20))]
    return json.dumps(record)


@st.composite
def odd_lines(draw: st.DrawFn) -> str:
    """A valid line, or one with a single field given an odd value (a wrong type, an extreme
    number or time) or an unknown field added."""
    record = {"t": _time(T0 + timedelta(seconds=draw(st.integers(-60, 600)))), **draw(VALID)}
    how = draw(st.sampled_from(("as is", "field", "field", "unknown", "time")))
    if how == "field":
        field = draw(st.sampled_from(sorted(set(record) - {"t"})))
        if field == "deployment":
            part = draw(st.sampled_from(("stable", "canary", "canary_percent")))
            odd = RECORD_FIELDS["value"] if part == "canary_percent" else RECORD_FIELDS["version"]
            record["deployment"][part] = draw(odd)
        else:
            record[field] = draw(RECORD_FIELDS[field])
    elif how == "unknown":
        record[draw(st.text(max_size=8))] = draw(JSON)
    elif how == "time":
        record["t"] = draw(st.one_of(EXTREME_TIMES, BAD_TIMES, JSON))
    return json.dumps(record)


_ADOPT = '"deployment": {"stable": "v1", "canary": "v2", "canary_percent": 10}}'


@BAD_INPUT
@given(st.lists(odd_lines(), min_size=1, max_size=8))
@example(lines=['{"t": "9999-12-31T23:59:59Z", ' + _ADOPT])
@example(lines=['{"t": "0001-01-01T00:30:00+01:00", ' + _ADOPT])
@example(
    lines=[
        f'{{"t": "{_time(T0)}", "rule": "error_rate", "version": "canary", "value": 1{"0" * 400}}}'
    ]
)
def test_replay_answers_odd_fields(workdir: Path, lines: list[str]) -> None:
    """replay on valid lines with odd fields (wrong types, extreme numbers and times, unknown
    fields, times out of order) exits 0 or 2 naming `file:LINE:`."""
    path = workdir / "input.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    check_replay(path, lines)


@st.composite
def replay_with_one_bad_line(draw: st.DrawFn) -> tuple[list[str], int]:
    """Valid lines in time order around one bad line; the bad line's number (1-based)."""
    before, after = draw(st.integers(0, 8)), draw(st.integers(0, 3))
    t = T0.astimezone(UTC)
    lines, previous = [], None
    for _ in range(before):
        t += timedelta(seconds=draw(st.sampled_from((0, 5, 10, 30))))
        lines.append(json.dumps({"t": _time(t), **draw(VALID)}))
        previous = t
    lines.append(_bad_line(draw, previous, t))
    bad = len(lines)
    for _ in range(after):
        t += timedelta(seconds=5)
        lines.append(json.dumps({"t": _time(t), **draw(VALID)}))
    return lines, bad


@BAD_INPUT
@given(replay_with_one_bad_line())
def test_replay_names_the_bad_line(workdir: Path, case: tuple[list[str], int]) -> None:
    """A replay file with one malformed line among valid ones exits 2 naming exactly that line."""
    lines, bad = case
    path = workdir / "input.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = cli("replay", "--policy", str(FAST), "--input", str(path))
    assert code == 2, err
    assert err.startswith(f"coalmine: {path}:{bad}: "), err


@BAD_INPUT
@given(st.lists(st.one_of(LINES.map(str.encode), st.binary(max_size=30)), max_size=6))
@example(lines=[b'{"t": "2026-03-03T18:00:00Z", "command": "pause"}', b"\xff"])
def test_replay_answers_any_bytes(workdir: Path, lines: list[bytes]) -> None:
    """replay on lines that are not valid UTF-8 exits with a verdict or 2 naming the file."""
    path = workdir / "input.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    code, _, err = cli("replay", "--policy", str(FAST), "--input", str(path))
    assert code in (0, 1, 2, 3), err
    if code == 2:
        assert re.match(rf"^coalmine: {re.escape(str(path))}(:\d+)?: ", err), err
