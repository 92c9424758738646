"""Policy files through `coalmine check-policy` and `coalmine schema`: exact outputs, exit codes."""

from __future__ import annotations

import json
import re
from datetime import time, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from coalmine.cli import main
from coalmine.durations import DURATION_PATTERN
from coalmine.policyfile import load_policy
from tests.support import ROOT, make_policy

SHIPPED = sorted(
    [ROOT / "policies" / "runbook.yaml", *(ROOT / "policies" / "examples").glob("*.yaml")]
)

TOP = "version: 1\nname: t\nscripts: [api]\n"
"""The first three lines of a policy, before its steps."""
HEAD = TOP + "steps:\n  - {weight: 10, hold: 5m}\n  - {weight: 100}\n"
"""Six lines of valid policy; a test's own lines start at line 7."""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder, so that problems name files as relative paths."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def check(workdir: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    """Write ``p.yaml``, run check-policy on it (or on ``files``): (exit code, stderr lines).

    A failing check must print nothing on stdout; a passing one nothing on stderr.
    """

    def run(text: str, *files: str) -> tuple[int, list[str]]:
        Path("p.yaml").write_text(text, encoding="utf-8")
        code = main(["check-policy", *(files or ("p.yaml",))])
        out, err = capsys.readouterr()
        if code == 0:
            assert err == ""
        else:
            assert out == ""
        return code, err.splitlines()

    return run


# ---- what passes ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_policy_passes(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each of policies/runbook.yaml and policies/examples/*.yaml passes check-policy."""
    policy = load_policy(path)
    assert main(["check-policy", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert (
        out == f"{path}: ok ({policy.name}: {len(policy.rules)} rules, {len(policy.steps)} steps)\n"
    )


def test_the_shipped_policies_load_together(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The runbook and the examples folder govern different scripts, so they load as one set."""
    monkeypatch.chdir(ROOT)
    assert main(["check-policy", "policies/runbook.yaml", "policies/examples"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "policies/runbook.yaml: ok (runbook: 19 rules, 3 steps)",
        "policies/examples/cloudflare-only.yaml: ok (cloudflare-only: 7 rules, 4 steps)",
        "policies/examples/fast.yaml: ok (fast: 6 rules, 3 steps)",
    ]


def test_the_cloudflare_example_needs_only_cloudflare() -> None:
    """policies/examples/cloudflare-only.yaml reads Cloudflare signals only, after promotion too."""
    policy = load_policy(ROOT / "policies" / "examples" / "cloudflare-only.yaml")
    assert {rule.source for rule in policy.rules} == {"cloudflare"}
    assert {"errors_per_minute", "error_ratio", "cpu_time_p99", "wall_time_p99"} <= {
        rule.signal for rule in policy.rules
    }
    assert any("post_promotion" in rule.phases for rule in policy.rules)


def test_the_minimal_policy_takes_every_default() -> None:
    """A policy of version, name, scripts and steps is valid and takes the documented defaults."""
    policy = make_policy(HEAD)
    assert policy.analysis.interval == timedelta(seconds=30)
    assert policy.analysis.warmup == timedelta(minutes=1)
    assert policy.analysis.inconclusive_page_after == timedelta(minutes=10)
    assert policy.post_promotion.watch == timedelta(0)
    assert policy.deployment_windows is None
    assert policy.rules == []
    assert policy.steps[1].hold == timedelta(0)


def test_a_rule_takes_its_defaults() -> None:
    """A rule left to its defaults holds, runs in the canary, over 1m, and trips at once."""
    rule = make_policy(HEAD + "rules:\n  - {name: r, source: prometheus, query: up, above: 1}\n")
    only = rule.rules[0]
    assert (only.on_breach, only.phases, only.window, only.for_) == (
        "hold",
        ["canary"],
        timedelta(minutes=1),
        timedelta(0),
    )
    assert (only.severity, only.min_samples, only.samples, only.description) == (None,) * 4


def test_unquoted_times_are_times_not_sexagesimal(check: Any) -> None:
    """`from: 10:00` unquoted is 10:00 (YAML 1.1 would read 600) and passes check-policy."""
    text = HEAD + (
        "deployment_windows:\n"
        "  timezone: America/Los_Angeles\n"
        "  allow: [{days: [tue], from: 10:00, to: 16:30}]\n"
    )
    window = make_policy(text).deployment_windows
    assert window is not None
    assert (window.allow[0].from_, window.allow[0].to) == (time(10, 0), time(16, 30))
    assert check(text) == (0, [])


def test_to_24_00_is_the_end_of_the_day() -> None:
    """`to: "24:00"` is accepted and means the end of the day."""
    text = (
        HEAD
        + "deployment_windows:\n  timezone: UTC\n"
        + '  allow: [{days: [fri], from: "18:00", to: "24:00"}]\n'
    )
    windows = make_policy(text).deployment_windows
    assert windows is not None
    assert windows.allow[0].to == time.max


def test_a_window_past_midnight_is_accepted() -> None:
    """A window whose `to` is earlier than `from` is valid (it runs past midnight)."""
    text = (
        HEAD
        + "deployment_windows:\n  timezone: UTC\n"
        + '  allow: [{days: [fri], from: "22:00", to: "02:00"}]\n'
    )
    windows = make_policy(text).deployment_windows
    assert windows is not None
    assert (windows.allow[0].from_, windows.allow[0].to) == (time(22, 0), time(2, 0))


def test_anchors_and_aliases_work() -> None:
    """YAML anchors and aliases are read as their values."""
    policy = make_policy(
        HEAD + "rules:\n  - {name: r, source: prometheus, query: &q up, above: 1}\n"
        "  - {name: s, source: prometheus, query: *q, below: 0}\n"
    )
    assert [rule.query for rule in policy.rules] == ["up", "up"]


# ---- what the file looks like ---------------------------------------------------------------


def test_malformed_yaml(check: Any) -> None:
    """Broken YAML is one problem on the line where the parser gave up, with PyYAML's reason."""
    assert check("version: 1\nname: [t\nscripts: [api]\n") == (
        2,
        ["p.yaml:3: invalid YAML: while parsing a flow sequence, expected ',' or ']', but got ':'"],
    )


def test_a_tab_in_indentation(check: Any) -> None:
    """A tab where YAML expects indentation is reported on its line."""
    assert check("version: 1\n\tname: t\n") == (
        2,
        [
            "p.yaml:2: invalid YAML: while scanning for the next token, found character '\\t' "
            "that cannot start any token"
        ],
    )


def test_two_documents(check: Any) -> None:
    """A second YAML document in one file is refused."""
    assert check(HEAD + "---\nversion: 1\n") == (
        2,
        [
            "p.yaml:7: invalid YAML: expected a single document in the stream, "
            "but found another document"
        ],
    )


@pytest.mark.parametrize(
    "text", ["", "\n\n", "# only a comment\n"], ids=["empty", "blank", "comment"]
)
def test_an_empty_file(check: Any, text: str) -> None:
    """A file with no YAML document in it is one problem on line 1."""
    assert check(text) == (2, ["p.yaml:1: the file is empty; expected a policy mapping"])


@pytest.mark.parametrize("text", ["- version: 1\n- name: t\n", "just text\n", "42\n", "null\n"])
def test_a_root_that_is_not_a_mapping(check: Any, text: str) -> None:
    """A list, text, a number or null at the top is refused."""
    assert check(text) == (2, ["p.yaml:1: expected a mapping of policy fields"])


def test_an_unknown_top_level_field(check: Any) -> None:
    """A misspelt top-level field is reported by name and line."""
    assert check(HEAD + "rule:\n  - {name: r}\n") == (2, ["p.yaml:7: rule: unknown field"])


def test_an_unknown_field_in_a_rule(check: Any) -> None:
    """A misspelt field in a rule is reported with the rule's index."""
    text = HEAD + "rules:\n  - name: r\n    source: prometheus\n    query: up\n    treshold: 1\n"
    assert check(text) == (2, ["p.yaml:11: rules[0].treshold: unknown field"])


def test_python_names_are_not_field_names(check: Any) -> None:
    """`for_` and `from_` are unknown fields: the file says `for` and `from`."""
    text = HEAD + (
        "deployment_windows:\n"
        "  timezone: UTC\n"
        '  allow: [{days: [mon], from_: "10:00", to: "12:00"}]\n'
        "rules:\n"
        "  - {name: r, source: prometheus, query: up, above: 1, for_: 5m}\n"
    )
    assert check(text) == (
        2,
        [
            "p.yaml:9: deployment_windows.allow[0].from: Field required",
            "p.yaml:9: deployment_windows.allow[0].from_: unknown field",
            "p.yaml:11: rules[0].for_: unknown field",
        ],
    )


def test_missing_required_fields(check: Any) -> None:
    """Every missing required field is reported, at the line of the mapping that lacks it."""
    assert check("version: 1\n") == (
        2,
        [
            "p.yaml:1: name: Field required",
            "p.yaml:1: scripts: Field required",
            "p.yaml:1: steps: Field required",
        ],
    )


def test_wrong_types(check: Any) -> None:
    """A scalar for a list, text for a number and a mapping for text are each reported."""
    text = (
        "version: 1\n"
        "name: {first: t}\n"
        "scripts: api\n"
        "steps:\n"
        "  - {weight: ten}\n"
        "  - {weight: 100}\n"
        "rules:\n"
        "  - {name: r, source: prometheus, query: up, above: high}\n"
    )
    assert check(text) == (
        2,
        [
            "p.yaml:2: name: Input should be a valid string",
            "p.yaml:3: scripts: Input should be a valid list",
            "p.yaml:5: steps[0].weight: Input should be a valid integer",
            "p.yaml:8: rules[0].above: Input should be a valid number",
        ],
    )


def test_no_lax_coercion(check: Any) -> None:
    """`true` is not the weight 1, "10" not the number 10, 1.0 not the version 1."""
    text = (
        "version: 1.0\n"
        "name: t\n"
        "scripts: [api]\n"
        "steps:\n"
        "  - {weight: true}\n"
        '  - {weight: "100"}\n'
        "rules:\n"
        '  - {name: r, source: prometheus, query: up, above: "0.5", min_samples: false}\n'
    )
    assert check(text) == (
        2,
        [
            "p.yaml:1: version: must be 1, the only policy format version",
            "p.yaml:5: steps[0].weight: Input should be a valid integer",
            "p.yaml:6: steps[1].weight: Input should be a valid integer",
            "p.yaml:8: rules[0].min_samples: Input should be a valid number",
            "p.yaml:8: rules[0].above: Input should be a valid number",
        ],
    )


def test_non_finite_thresholds(check: Any) -> None:
    """A NaN or infinite threshold (which could never breach) is refused."""
    text = HEAD + (
        "rules:\n"
        "  - {name: r, source: prometheus, query: up, above: .nan}\n"
        "  - {name: s, source: prometheus, query: up, below: -.inf}\n"
    )
    assert check(text) == (
        2,
        [
            "p.yaml:8: rules[0].above: Input should be a finite number",
            "p.yaml:9: rules[1].below: Input should be a finite number",
        ],
    )


def test_duplicate_yaml_keys(check: Any) -> None:
    """A key given twice is refused (YAML would silently keep the last), naming both lines."""
    text = (
        HEAD
        + "rules:\n  - name: r\n    source: prometheus\n    query: up\n    above: 1\n    above: 2\n"
    )
    assert check(text) == (2, ["p.yaml:12: rules[0].above: duplicate key (first on line 11)"])


def test_merge_keys_are_refused(check: Any) -> None:
    """`<<: *anchor` is refused with a clear message rather than read half-way."""
    text = HEAD + (
        "rules:\n"
        "  - &base {name: r, source: prometheus, query: up, above: 1}\n"
        "  - <<: *base\n"
        "    name: s\n"
    )
    assert check(text) == (
        2,
        ["p.yaml:9: rules[1]: YAML merge keys (<<) are not supported; write the fields out"],
    )


def test_deep_nesting_is_an_error_not_a_crash(check: Any) -> None:
    """Pathologically nested YAML exits 2 with a message instead of a RecursionError."""
    assert check("a: " + "[" * 5000 + "]" * 5000 + "\n") == (
        2,
        ["p.yaml: invalid YAML: nested too deeply"],
    )


# ---- steps ---------------------------------------------------------------------------------


def test_weights_must_rise(check: Any) -> None:
    """A weight not above the one before it is reported at that step."""
    text = TOP + "steps:\n  - {weight: 50}\n  - {weight: 50}\n  - {weight: 100}\n"
    assert check(text) == (
        2,
        ["p.yaml:6: steps[1].weight: weights must rise strictly: 50 after 50"],
    )


def test_the_last_weight_must_be_100(check: Any) -> None:
    """Steps that stop short of 100 are reported at the last step."""
    text = TOP + "steps:\n  - {weight: 10}\n  - {weight: 50}\n"
    assert check(text) == (2, ["p.yaml:6: steps[1].weight: the last step must be 100 (promotion)"])


def test_the_last_step_carries_no_hold(check: Any) -> None:
    """A hold on the promotion step is refused, pointing at post_promotion.watch."""
    text = TOP + "steps:\n  - {weight: 10}\n  - {weight: 100, hold: 1h}\n"
    assert check(text) == (
        2,
        [
            "p.yaml:6: steps[1].hold: the last step is the promotion and is not held; "
            "use post_promotion.watch"
        ],
    )


def test_at_least_one_canary_step(check: Any) -> None:
    """A policy that goes straight to 100 is refused."""
    text = TOP + "steps: [{weight: 100}]\n"
    assert check(text) == (
        2,
        ["p.yaml:4: steps: needs at least one canary step below 100 before the final 100"],
    )


def test_weights_are_percentages(check: Any) -> None:
    """Weights outside 1..100 are refused."""
    text = TOP + "steps: [{weight: 0}, {weight: 101}]\n"
    assert check(text) == (
        2,
        [
            "p.yaml:4: steps[0].weight: Input should be greater than or equal to 1",
            "p.yaml:4: steps[1].weight: Input should be less than or equal to 100",
        ],
    )


# ---- durations and times -------------------------------------------------------------------

NOT_A_DURATION = (
    "is not a duration: use whole numbers with units d, h, m, s in that order, e.g. 30s, 5m, 1h30m"
)


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("5x", f"'5x' {NOT_A_DURATION}"),
        ("-1m", f"'-1m' {NOT_A_DURATION}"),
        ("''", f"'' {NOT_A_DURATION}"),
        ("1.5h", f"'1.5h' {NOT_A_DURATION}"),
        ("30m1h", f"'30m1h' {NOT_A_DURATION}"),
        ("500ms", f"'500ms' {NOT_A_DURATION}"),
        ("5", "must be a duration with a unit, e.g. 30s, 5m, 1h30m"),
        ("0", "must be a duration with a unit, e.g. 30s, 5m, 1h30m"),
        ("", "must be a duration with a unit, e.g. 30s, 5m, 1h30m"),
        ("99999999999d", "'99999999999d' is too long a duration"),
    ],
)
def test_bad_durations(check: Any, written: str, message: str) -> None:
    """Each malformed duration is reported at its field with the reason."""
    text = TOP + f"steps:\n  - {{weight: 10, hold: {written}}}\n  - {{weight: 100}}\n"
    assert check(text) == (2, [f"p.yaml:5: steps[0].hold: {message}"])


def test_durations_that_must_be_positive(check: Any) -> None:
    """`interval` and `window` of 0s are refused; zero holds, `for` and warm-up are fine."""
    text = (
        "version: 1\nname: t\nscripts: [api]\n"
        "analysis: {interval: 0s, warmup: 0s}\n"
        "steps: [{weight: 10, hold: 0s}, {weight: 100}]\n"
        "rules:\n"
        "  - {name: r, source: prometheus, query: up, above: 1, window: 0s, for: 0s}\n"
    )
    assert check(text) == (
        2,
        [
            "p.yaml:7: rules[0].window: must be longer than 0s",
            "p.yaml:4: analysis.interval: must be longer than 0s",
        ],
    )


def test_an_unknown_timezone(check: Any) -> None:
    """A timezone the IANA database does not know is reported by name."""
    text = (
        HEAD
        + "deployment_windows:\n  timezone: America/Los_Angles\n"
        + "  allow: [{days: [tue], from: '10:00', to: '16:00'}]\n"
    )
    assert check(text) == (
        2,
        ["p.yaml:8: deployment_windows.timezone: unknown timezone 'America/Los_Angles'"],
    )


def test_bad_windows(check: Any) -> None:
    """Bad times, unknown days, an empty window and `from: 24:00` are each reported."""
    text = HEAD + (
        "deployment_windows:\n"
        "  timezone: UTC\n"
        "  allow:\n"
        "    - {days: [tuesday], from: '25:00', to: '16:00'}\n"
        "    - {days: [wed], from: '10:00', to: '10:00'}\n"
        "    - {days: [thu, thu], from: '24:00', to: '02:00'}\n"
    )
    assert check(text) == (
        2,
        [
            "p.yaml:10: deployment_windows.allow[0].days[0]: Input should be 'mon', 'tue', 'wed', "
            "'thu', 'fri', 'sat' or 'sun'",
            "p.yaml:10: deployment_windows.allow[0].from: "
            'must be a time of day "HH:MM" (00:00 to 24:00)',
        ],
    )
    fixed = text.replace("tuesday", "tue").replace("'25:00'", "'09:00'")
    assert check(fixed) == (
        2,
        [
            "p.yaml:11: deployment_windows.allow[1].to: must differ from `from`",
            'p.yaml:12: deployment_windows.allow[2].from: "24:00" is only valid as `to`; '
            'a window opening at midnight starts at "00:00"',
            "p.yaml:12: deployment_windows.allow[2].days: lists a day twice",
        ],
    )


# ---- rules ---------------------------------------------------------------------------------


def test_duplicate_rule_names(check: Any) -> None:
    """A rule name used twice is reported at the second, naming the first."""
    text = HEAD + (
        "rules:\n"
        "  - {name: err, source: prometheus, query: up, above: 1}\n"
        "  - {name: lat, source: prometheus, query: up, above: 1}\n"
        "  - {name: err, source: prometheus, query: up, above: 2}\n"
    )
    assert check(text) == (
        2,
        ["p.yaml:10: rules[2].name: duplicate rule name 'err' (also rules[0])"],
    )


def test_a_rule_needs_exactly_one_threshold(check: Any) -> None:
    """Neither `above` nor `below` is reported at the rule; both at `below`."""
    text = HEAD + (
        "rules:\n"
        "  - name: none\n"
        "    source: prometheus\n"
        "    query: up\n"
        "  - name: both\n"
        "    source: prometheus\n"
        "    query: up\n"
        "    above: 1\n"
        "    below: 0\n"
    )
    assert check(text) == (
        2,
        [
            "p.yaml:8: rules[0]: set exactly one of above or below",
            "p.yaml:15: rules[1].below: set exactly one of above or below, not both",
        ],
    )


@pytest.mark.parametrize("source", ["prometheus", "grafana"])
def test_a_promql_rule_needs_a_query(check: Any, source: str) -> None:
    """A prometheus or grafana rule without a query (or with a blank one) is refused."""
    text = HEAD + (
        "rules:\n"
        f"  - {{name: r, source: {source}, above: 1}}\n"
        f"  - {{name: s, source: {source}, query: '  ', above: 1}}\n"
    )
    assert check(text) == (
        2,
        [
            f"p.yaml:8: rules[0].query: a {source} rule needs a query",
            f"p.yaml:9: rules[1].query: a {source} rule needs a query",
        ],
    )


def test_a_promql_rule_takes_no_signal(check: Any) -> None:
    """A prometheus rule with a Cloudflare signal is refused, not silently ignored."""
    text = HEAD + "rules:\n  - {name: r, source: prometheus, query: up, signal: errors, above: 1}\n"
    assert check(text) == (
        2,
        ["p.yaml:8: rules[0].signal: a prometheus rule takes a query, not a signal"],
    )


def test_a_cloudflare_rule_needs_a_signal(check: Any) -> None:
    """A cloudflare rule without a signal is refused."""
    text = HEAD + "rules:\n  - name: r\n    source: cloudflare\n    above: 1\n"
    assert check(text) == (2, ["p.yaml:8: rules[0].signal: a cloudflare rule needs a signal"])


def test_a_cloudflare_rule_takes_no_promql(check: Any) -> None:
    """A cloudflare rule with a query or samples is refused at each."""
    text = HEAD + (
        "rules:\n"
        "  - name: r\n"
        "    source: cloudflare\n"
        "    signal: errors\n"
        "    query: up\n"
        "    samples: up\n"
        "    above: 1\n"
    )
    assert check(text) == (
        2,
        [
            "p.yaml:11: rules[0].query: a cloudflare rule takes a signal, not PromQL",
            "p.yaml:12: rules[0].samples: a cloudflare rule takes a signal, not PromQL",
        ],
    )


def test_an_unknown_signal(check: Any) -> None:
    """An unknown Cloudflare signal is reported with the list of known ones."""
    text = (
        HEAD
        + "rules:\n  - name: r\n    source: cloudflare\n    signal: errors_per_hour\n    above: 1\n"
    )
    assert check(text) == (
        2,
        [
            "p.yaml:10: rules[0].signal: Input should be 'requests', 'errors', 'error_ratio', "
            "'errors_per_minute', 'cpu_time_p50', 'cpu_time_p99' or 'wall_time_p99'"
        ],
    )


def test_an_unknown_source(check: Any) -> None:
    """An unknown source is reported with the list of known ones."""
    text = HEAD + "rules:\n  - {name: r, source: datadog, query: up, above: 1}\n"
    assert check(text) == (
        2,
        [
            "p.yaml:8: rules[0].source: Input should be 'prometheus', 'grafana', 'cloudflare' or 'webhook'"
        ],
    )


def test_an_unknown_placeholder(check: Any) -> None:
    """`$scrip` and `${scrip}`, in query or samples, are reported with the known placeholders."""
    known = "known: $script, $version, $canary, $stable, $window"
    text = HEAD + (
        "rules:\n"
        "  - name: r\n"
        "    source: prometheus\n"
        '    query: sum(rate(x{script="$scrip"}[$window]))\n'
        '    samples: sum(increase(x{script="${scrip}"}[${window}]))\n'
        "    above: 1\n"
    )
    assert check(text) == (
        2,
        [
            f"p.yaml:10: rules[0].query: unknown placeholder $scrip; {known}",
            f"p.yaml:11: rules[0].samples: unknown placeholder $scrip; {known}",
        ],
    )


def test_a_dollar_that_is_not_a_placeholder() -> None:
    """A `$` not followed by a name (a regex anchor) is left alone."""
    text = (
        HEAD + "rules:\n  - {name: r, source: prometheus, query: 'up{code=~\"5..$\"}', above: 1}\n"
    )
    assert make_policy(text).rules[0].query == 'up{code=~"5..$"}'


def test_min_samples_needs_samples(check: Any) -> None:
    """A PromQL rule with min_samples but no samples query (always inconclusive) is refused."""
    text = (
        HEAD + "rules:\n  - {name: r, source: prometheus, query: up, above: 1, min_samples: 100}\n"
    )
    assert check(text) == (
        2,
        ["p.yaml:8: rules[0].min_samples: needs `samples`, the PromQL that counts the requests"],
    )


@pytest.mark.parametrize("action", ["rollback", "warn"])
def test_severity_is_refused_where_it_has_no_effect(check: Any, action: str) -> None:
    """`severity` on a rollback or warn rule is refused; on hold and page rules it is fine."""
    text = HEAD + (
        "rules:\n"
        "  - {name: r, source: prometheus, query: up, above: 1,"
        f" on_breach: {action}, severity: info}}\n"
        "  - {name: s, source: prometheus, query: up, above: 1, on_breach: page, severity: info}\n"
        "  - {name: t, source: prometheus, query: up, above: 1, on_breach: hold, severity: info}\n"
    )
    assert check(text) == (
        2,
        [
            f"p.yaml:8: rules[0].severity: has no effect on a {action} rule "
            "(rollback pages are critical; warn rules post to Slack)"
        ],
    )


def test_bad_rule_names_and_phases(check: Any) -> None:
    """Rule names are identifiers; phases are known, non-empty, and listed once."""
    text = HEAD + (
        "rules:\n"
        "  - {name: 'error rate', source: prometheus, query: up, above: 1, phases: [later]}\n"
        "  - {name: r, source: prometheus, query: up, above: 1, phases: []}\n"
    )
    assert check(text) == (
        2,
        [
            "p.yaml:8: rules[0].name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]*$'",
            "p.yaml:8: rules[0].phases[0]: Input should be 'canary' or 'post_promotion'",
            "p.yaml:9: rules[1].phases: List should have at least 1 item after validation, not 0",
        ],
    )


# ---- several problems ----------------------------------------------------------------------


def test_every_structural_problem_is_reported_at_once(check: Any) -> None:
    """Unknown fields, bad values and wrong types anywhere in a file come out together, in order."""
    text = (
        "version: 1\n"
        "name: t\n"
        "scripts: [api]\n"
        "analysis: {interval: 30}\n"
        "steps:\n"
        "  - {weight: 10, hold: 5x}\n"
        "  - {weight: 100}\n"
        "rules:\n"
        "  - name: r\n"
        "    source: prometheus\n"
        "    query: up\n"
        "    above: 1\n"
        "    treshold: 2\n"
        "  - name: s\n"
        "    source: cloudflare\n"
        "    signal: nope\n"
        "    above: 1\n"
    )
    assert check(text) == (
        2,
        [
            "p.yaml:4: analysis.interval: must be a duration with a unit, e.g. 30s, 5m, 1h30m",
            f"p.yaml:6: steps[0].hold: '5x' {NOT_A_DURATION}",
            "p.yaml:13: rules[0].treshold: unknown field",
            "p.yaml:16: rules[1].signal: Input should be 'requests', 'errors', 'error_ratio', "
            "'errors_per_minute', 'cpu_time_p50', 'cpu_time_p99' or 'wall_time_p99'",
        ],
    )


def test_every_cross_field_problem_is_reported_at_once(check: Any) -> None:
    """Once the structure is right, every cross-field problem comes out together."""
    text = (
        "version: 1\n"
        "name: t\n"
        "scripts: [api, api]\n"
        "steps:\n"
        "  - {weight: 50}\n"
        "  - {weight: 10}\n"
        "  - {weight: 90}\n"
        "deployment_windows:\n"
        "  timezone: Mars/Olympus\n"
        "  allow: [{days: [mon], from: '10:00', to: '12:00'}]\n"
        "rules:\n"
        "  - {name: r, source: prometheus, above: 1}\n"
        "  - {name: r, source: prometheus, query: 'x{a=\"$scrip\"}'}\n"
    )
    assert check(text) == (
        2,
        [
            "p.yaml:6: steps[1].weight: weights must rise strictly: 10 after 50",
            "p.yaml:7: steps[2].weight: the last step must be 100 (promotion)",
            "p.yaml:12: rules[0].query: a prometheus rule needs a query",
            "p.yaml:13: rules[1].name: duplicate rule name 'r' (also rules[0])",
            "p.yaml:13: rules[1]: set exactly one of above or below",
            "p.yaml:13: rules[1].query: unknown placeholder $scrip; "
            "known: $script, $version, $canary, $stable, $window",
            "p.yaml:9: deployment_windows.timezone: unknown timezone 'Mars/Olympus'",
            "p.yaml:3: scripts[1]: lists script 'api' twice",
        ],
    )


# ---- files and folders ---------------------------------------------------------------------


def test_a_missing_file(check: Any) -> None:
    """A file that does not exist is one problem naming it, with no line."""
    assert check(HEAD, "p.yaml", "nope.yaml") == (
        2,
        ["nope.yaml: cannot read: No such file or directory"],
    )


def test_a_file_that_is_not_text(check: Any) -> None:
    """A file that is not UTF-8 is reported, not a traceback."""
    Path("bin.yaml").write_bytes(b"\xff\xfe\x00")
    assert check(HEAD, "bin.yaml") == (
        2,
        [
            "bin.yaml: cannot read: 'utf-8' codec can't decode byte 0xff in position 0: "
            "invalid start byte"
        ],
    )


def test_a_folder_of_policies(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder means its *.yaml and *.yml files, in name order; other files are ignored."""
    folder = Path("policies")
    folder.mkdir()
    (folder / "b.yml").write_text(HEAD.replace("[api]", "[web]"), encoding="utf-8")
    (folder / "a.yaml").write_text(HEAD, encoding="utf-8")
    (folder / "notes.txt").write_text("not a policy", encoding="utf-8")
    assert main(["check-policy", "policies"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines() == [
        "policies/a.yaml: ok (t: 0 rules, 2 steps)",
        "policies/b.yml: ok (t: 0 rules, 2 steps)",
    ]


def test_a_folder_reports_the_problems_of_every_file(check: Any) -> None:
    """Each bad file in a folder is reported; one bad file does not hide another."""
    folder = Path("policies")
    folder.mkdir()
    (folder / "a.yaml").write_text(HEAD + "bogus: 1\n", encoding="utf-8")
    (folder / "b.yaml").write_text("", encoding="utf-8")
    assert check(HEAD, "policies") == (
        2,
        [
            "policies/a.yaml:7: bogus: unknown field",
            "policies/b.yaml:1: the file is empty; expected a policy mapping",
        ],
    )


def test_an_empty_folder(check: Any) -> None:
    """A folder with no policy files in it is an error, not a silent success."""
    Path("empty").mkdir()
    assert check(HEAD, "empty") == (2, ["empty: no policy files (*.yaml, *.yml) here"])


def test_a_script_governed_by_two_files(check: Any) -> None:
    """Two files naming one script are refused: coalmine would not know which to follow."""
    Path("q.yaml").write_text(HEAD.replace("name: t", "name: other"), encoding="utf-8")
    assert check(HEAD, "p.yaml", "q.yaml") == (
        2,
        ["q.yaml: scripts: script 'api' is already governed by p.yaml"],
    )


def test_a_file_named_twice_is_one_policy(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Naming a file twice (or a file and its folder) is not a conflict with itself."""
    Path("p.yaml").write_text(HEAD, encoding="utf-8")
    assert main(["check-policy", "p.yaml", "./p.yaml", "."]) == 0
    assert capsys.readouterr().out.splitlines() == ["p.yaml: ok (t: 0 rules, 2 steps)"]


# ---- JSON Schema ---------------------------------------------------------------------------


@pytest.fixture
def schema(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """`coalmine schema`'s output, parsed."""
    assert main(["schema"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    parsed: dict[str, Any] = json.loads(out)
    return parsed


def test_the_schema_is_json_schema(schema: dict[str, Any]) -> None:
    """`coalmine schema` prints a draft 2020-12 JSON Schema, fields named as YAML spells them."""
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "coalmine policy"
    assert set(schema["required"]) == {"version", "name", "scripts", "steps"}
    assert schema["additionalProperties"] is False
    assert "for" in schema["$defs"]["Rule"]["properties"]
    assert "for_" not in schema["$defs"]["Rule"]["properties"]
    assert "from" in schema["$defs"]["TimeWindow"]["properties"]


def _duration_properties(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{model}.{name}": prop
        for model, definition in schema["$defs"].items()
        for name, prop in definition["properties"].items()
        if prop.get("pattern") == DURATION_PATTERN
    }


def test_the_schema_gives_durations_their_pattern(schema: dict[str, Any]) -> None:
    """Every duration field carries the duration pattern, and its default matches it."""
    durations = _duration_properties(schema)
    assert set(durations) == {
        "Analysis.interval",
        "Analysis.warmup",
        "Analysis.inconclusive_page_after",
        "Step.hold",
        "PostPromotion.watch",
        "Rule.window",
        "Rule.for",
        "Rule.timeout",
    }
    defaults = {name: prop["default"] for name, prop in durations.items()}
    assert defaults == {
        "Analysis.interval": "30s",
        "Analysis.warmup": "1m",
        "Analysis.inconclusive_page_after": "10m",
        "Step.hold": "0s",
        "PostPromotion.watch": "0s",
        "Rule.window": "1m",
        "Rule.for": "0s",
        "Rule.timeout": "30s",
    }


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("30s", True),
        ("1h30m", True),
        ("2d", True),
        ("0s", True),
        ("5", False),
        ("5x", False),
        ("-1m", False),
        ("", False),
        ("30m1h", False),
    ],
)
def test_the_duration_pattern(text: str, matches: bool) -> None:
    """The schema's duration pattern accepts what the loader accepts and refuses the rest."""
    assert bool(re.fullmatch(DURATION_PATTERN, text)) is matches


def test_runbook_durations_match_the_schema_pattern(schema: dict[str, Any]) -> None:
    """Every duration written in runbook.yaml matches the schema's duration pattern."""
    data = yaml.safe_load((ROOT / "policies" / "runbook.yaml").read_text(encoding="utf-8"))
    keys = {name.split(".")[1] for name in _duration_properties(schema)}
    found = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in keys and not isinstance(item, (dict, list)):
                    found.append(item)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(data)
    assert len(found) > 30  # every rule's window and for, the holds, the watch, the analysis
    assert [d for d in found if not re.fullmatch(DURATION_PATTERN, str(d))] == []
