"""docs/policy.md stays true to the policy models: every field, its default, every value."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, get_args

import pytest
from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

from coalmine.durations import DURATION_PATTERN, format_duration
from coalmine.policy import (
    PLACEHOLDERS,
    Analysis,
    CloudflareSignal,
    Compare,
    DeploymentWindows,
    Duration,
    Freeze,
    OnBreach,
    Policy,
    PostPromotion,
    Rule,
    Source,
    Step,
    TimeWindow,
)
from coalmine.policyfile import load_policy
from tests.support import ROOT, make_policy

DOC = ROOT / "docs" / "policy.md"
MODELS: tuple[type[BaseModel], ...] = (
    Policy,
    Analysis,
    Compare,
    Step,
    PostPromotion,
    DeploymentWindows,
    TimeWindow,
    Rule,
    Compare,
    Freeze,
)
_HEADING = re.compile(r"^(#+) (.*)$")
_METRIC = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{")


def sections(text: str) -> dict[str, list[str]]:
    """Each heading's text (without the #s) mapped to its lines, up to the next heading."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading:
            current = found.setdefault(heading[2].strip(), [])
        elif current is not None:
            current.append(line)
    return found


def table(lines: list[str]) -> list[dict[str, str]]:
    """The rows of the first Markdown table in ``lines``, keyed by the header's cells."""
    rows: list[str] = []
    for line in lines:
        if line.strip().startswith("|"):
            rows.append(line.strip())
        elif rows:
            break
    if len(rows) < 2:
        return []

    def cells(row: str) -> list[str]:
        return [cell.strip() for cell in row.strip("|").split("|")]

    header = cells(rows[0])
    return [dict(zip(header, cells(row), strict=True)) for row in rows[2:]]


def documented_fields(lines: list[str]) -> dict[str, str]:
    """A model section's field table: field name (unquoted) to its default cell."""
    return {row["field"].strip("`"): row["default"] for row in table(lines)}


def yaml_text(value: Any) -> str:
    """A default as a policy author would write it."""
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, BaseModel):
        assert value == type(value)(), "a nested default other than all-defaults needs a new form"
        return "{}"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_text(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def expected_default(field: FieldInfo) -> str:
    """The default cell the doc must show for a field."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "`unset`" if value is None else f"`{yaml_text(value)}`"


def drift(title: str, model: type[BaseModel], documented: dict[str, str]) -> list[str]:
    """Every difference between a model's fields and its section's table."""
    problems = []
    names = set()
    for name, field in model.model_fields.items():
        key = field.alias or name
        names.add(key)
        expected = expected_default(field)
        if key not in documented:
            problems.append(f"{title}: field `{key}` (default {expected}) is not documented")
        elif documented[key] != expected:
            problems.append(f"{title}.{key}: the doc says {documented[key]}, the model {expected}")
    problems += [
        f"{title}: documents `{key}`, which is not a field"
        for key in documented
        if key not in names
    ]
    return problems


def model_section(doc: dict[str, list[str]], model: type[BaseModel]) -> list[str]:
    """The doc's section titled with the model's name (``### Rule``)."""
    assert model.__name__ in doc, f"docs/policy.md has no section titled {model.__name__}"
    return doc[model.__name__]


@pytest.fixture(scope="module")
def doc() -> dict[str, list[str]]:
    """docs/policy.md, by section."""
    return sections(DOC.read_text(encoding="utf-8"))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_is_documented_with_its_default(
    doc: dict[str, list[str]], model: type[BaseModel]
) -> None:
    """Each model's section lists exactly the model's fields, each with the model's default."""
    assert drift(model.__name__, model, documented_fields(model_section(doc, model))) == []


def faithful(model: type[BaseModel]) -> dict[str, str]:
    """A field table that matches ``model`` exactly, whatever the doc says today."""
    return {
        field.alias or name: expected_default(field) for name, field in model.model_fields.items()
    }


def test_drift_reports_an_undocumented_field() -> None:
    """A field added to Rule but not to its table is reported, with its default."""

    class RuleWithRetries(Rule):
        retries: int = 3

    assert drift("Rule", RuleWithRetries, faithful(Rule)) == [
        "Rule: field `retries` (default `3`) is not documented"
    ]


def test_drift_reports_a_changed_default() -> None:
    """A default changed in the model but not in its table is reported."""

    class SlowerRule(Rule):
        window: Duration = Field(default=timedelta(minutes=2))

    assert drift("Rule", SlowerRule, faithful(Rule)) == [
        "Rule.window: the doc says `1m`, the model `2m`"
    ]


def test_drift_reports_a_stale_row() -> None:
    """A documented field that the model no longer has is reported."""
    documented = {**faithful(Step), "pause": "`0s`"}
    assert drift("Step", Step, documented) == ["Step: documents `pause`, which is not a field"]


def test_drift_accepts_a_faithful_table() -> None:
    """A table with every field and its default shows no drift: the checks above are specific."""
    assert all(drift(m.__name__, m, faithful(m)) == [] for m in MODELS)


def test_the_section_parser_reads_the_rule_table(doc: dict[str, list[str]]) -> None:
    """The Rule section's table is found and parsed: names as YAML spells them, defaults quoted."""
    documented = documented_fields(model_section(doc, Rule))
    assert documented["for"] == "`0s`"
    assert documented["on_breach"] == "`hold`"
    assert documented["source"] == "required"


def test_required_and_unset_fields_read_as_such() -> None:
    """Required fields show `required`, None defaults `unset`, factories their value."""
    fields = Rule.model_fields
    assert expected_default(fields["name"]) == "required"
    assert expected_default(fields["above"]) == "`unset`"
    assert expected_default(fields["phases"]) == "`[canary]`"
    assert expected_default(fields["for_"]) == "`0s`"
    assert expected_default(Policy.model_fields["analysis"]) == "`{}`"


def test_every_source_signal_and_action_is_documented(doc: dict[str, list[str]]) -> None:
    """Every source, every Cloudflare signal and every on_breach value has its own row."""
    signals = {row["signal"].strip("`") for row in table(doc["Cloudflare signals"])}
    assert signals == set(get_args(CloudflareSignal))
    rule = doc["Rule"]
    actions = {row["value"].strip("`") for row in table(rule[rule.index("`on_breach`:") :])}
    assert actions == set(get_args(OnBreach))
    text = DOC.read_text(encoding="utf-8")
    assert [s for s in get_args(Source) if f"`source: {s}`" not in text] == []


def test_every_placeholder_is_documented(doc: dict[str, list[str]]) -> None:
    """The placeholder table lists exactly the placeholders the loader accepts."""
    rows = {row["placeholder"].strip("`") for row in table(doc["Placeholders"])}
    assert rows == {"$" + name for name in PLACEHOLDERS}


def test_the_duration_pattern_is_the_one_in_the_doc() -> None:
    """The documented duration pattern is the schema's."""
    assert f"`{DURATION_PATTERN}`" in DOC.read_text(encoding="utf-8")


def test_every_metric_of_the_runbook_is_documented(doc: dict[str, list[str]]) -> None:
    """The metrics table lists exactly the metric names that runbook.yaml's PromQL reads."""
    runbook = load_policy(ROOT / "policies" / "runbook.yaml")
    used = {
        name
        for rule in runbook.rules
        for text in (rule.query, rule.samples, rule.events)
        for name in _METRIC.findall(text or "")
    }
    documented = {row["metric"].strip("`") for row in table(doc["Metrics the runbook reads"])}
    assert used == documented
    assert "http_request_duration_seconds_bucket" in used  # the pattern does find names


def test_every_runbook_rule_is_in_the_map(doc: dict[str, list[str]]) -> None:
    """Each rule of runbook.yaml appears in the runbook-to-rules table, and no other rule does."""
    runbook = load_policy(ROOT / "policies" / "runbook.yaml")
    mapped = {
        row["rule (`policies/runbook.yaml`)"].strip("`")
        for row in table(doc["How the runbook maps to rules"])
    }
    rules = {rule.name for rule in runbook.rules}
    assert rules <= mapped
    assert mapped - rules == {"steps", "post_promotion", "deployment_windows", "—"}


def test_the_policies_in_the_doc_are_valid() -> None:
    """Every whole policy shown in the doc (a YAML block starting with `version:`) loads."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    policies = [block for block in blocks if block.startswith("version:")]
    assert [make_policy(block).name for block in policies] == ["runbook", "minimal"]
