"""The policy format: what to watch, how to judge it, and how to move traffic.

These models are the contract of docs/policy.md (a test keeps the two in step). Loading a file
and locating its problems by line lives in :mod:`coalmine.policyfile`; the checks that span
fields (weights rising to 100, exactly one of ``above``/``below``, known placeholders, ...) are
in :func:`semantic_problems`, so that every problem in a file is reported at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic.json_schema import GenerateJsonSchema

from coalmine.durations import DURATION_PATTERN, format_duration, parse_duration

Source = Literal["prometheus", "grafana", "cloudflare", "webhook"]
OnBreach = Literal["rollback", "hold", "page", "warn"]
Phase = Literal["canary", "post_promotion"]
Severity = Literal["critical", "error", "warning", "info"]
SharedIncident = Literal["rollback", "hold"]
When = Literal["before_advance", "every_tick", "after_promotion", "after_rollback"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
CloudflareSignal = Literal[
    "requests",
    "errors",
    "error_ratio",
    "errors_per_minute",
    "cpu_time_p50",
    "cpu_time_p99",
    "wall_time_p99",
]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
PLACEHOLDERS = ("script", "version", "canary", "stable", "window")
_PLACEHOLDER = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except OverflowError:
            raise ValueError(f"{value!r} is too long a duration") from None
    raise ValueError("must be a duration with a unit, e.g. 30s, 5m, 1h30m")


Duration = Annotated[
    timedelta,
    BeforeValidator(_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "examples": ["30s", "1h30m"]}),
]


def _time_of_day(value: object) -> time:
    if isinstance(value, time):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"(\d{1,2}):(\d{2})", value.strip())
        if match:
            hour, minute = int(match[1]), int(match[2])
            if hour == 24 and minute == 0:
                return time.max  # "24:00": the end of the day
            if hour < 24 and minute < 60:
                return time(hour, minute)
    raise ValueError('must be a time of day "HH:MM" (00:00 to 24:00)')


def _format_time(value: time) -> str:
    return "24:00" if value == time.max else value.strftime("%H:%M")


TimeOfDay = Annotated[
    time,
    BeforeValidator(_time_of_day),
    PlainSerializer(_format_time, return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^\d{1,2}:\d{2}$", "examples": ["10:00"]}),
]


def _format_version(value: object) -> object:
    # Literal[1] alone would take YAML's `true` and `1.0` for 1.
    if type(value) is not int or value != 1:
        raise ValueError("must be 1, the only policy format version")
    return value


FormatVersion = Annotated[Literal[1], BeforeValidator(_format_version)]
ScriptName = Annotated[str, Field(min_length=1)]
# Cloudflare's rule for a Worker's name (workers_schemas-script_name in the API's OpenAPI schema)
SCRIPT_NAME = re.compile(r"[a-z0-9_][a-z0-9_-]*")
SCRIPT_RULE = "lowercase letters, digits, - and _, not starting with -"
# Finite: a NaN or infinite threshold would never breach, an infinite min_samples never pass.
Number = Annotated[float, Field(allow_inf_nan=False)]


class _Model(BaseModel):
    # Strict: YAML's `true` is not the weight 1, nor the string "10" the number 10.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)


class Analysis(_Model):
    """How often coalmine polls and how it treats fresh and missing data."""

    interval: Duration = Field(
        default=timedelta(seconds=30), description="Poll and evaluation period."
    )
    warmup: Duration = Field(
        default=timedelta(minutes=1),
        description="After each traffic change, rules are evaluated and exported but not judged.",
    )
    inconclusive_page_after: Duration = Field(
        default=timedelta(minutes=10),
        description="Page (warning) once a gating rule has been inconclusive this long.",
    )


class Step(_Model):
    """One canary weight and how long it is held before advancing."""

    weight: int = Field(ge=1, le=100, description="Percent of traffic on the canary.")
    hold: Duration = Field(
        default=timedelta(0), description="Minimum time at this weight before advancing."
    )


class PostPromotion(_Model):
    """The watch after promotion, while the old version stays the rollback target."""

    watch: Duration = Field(
        default=timedelta(0),
        description="How long post_promotion rules run after promotion.",
    )


class TimeWindow(_Model):
    """Days and a time range in which advancing is allowed."""

    days: list[Day] = Field(min_length=1, description="Days the window opens on (mon..sun).")
    from_: TimeOfDay = Field(alias="from", description='Opening time, inclusive ("HH:MM").')
    to: TimeOfDay = Field(
        description='Closing time, exclusive ("HH:MM", "24:00" for midnight); '
        "earlier than `from` means the window runs past midnight."
    )


class DeploymentWindows(_Model):
    """When coalmine may advance a canary. Rollbacks are allowed at any hour."""

    timezone: str = Field(description="IANA timezone the windows are written in.")
    allow: list[TimeWindow] = Field(
        min_length=1, description="Windows in which advancing is allowed."
    )

    def zone(self) -> ZoneInfo:
        """The timezone (validated when the policy was loaded)."""
        return ZoneInfo(self.timezone)


class Compare(_Model):
    """Judge the canary against the stable version it runs beside, not against a constant."""

    max_ratio: Number = Field(
        gt=0,
        description="Breaching when the canary's event rate is, with `confidence`, more than "
        "this many times the stable's (1.5: half as many events again).",
    )
    confidence: float = Field(
        default=0.99,
        ge=0.5,
        lt=1,
        allow_inf_nan=False,
        description="How sure the test must be before it calls the canary worse; "
        "1 - confidence bounds the false-alarm rate over the whole canary, however often "
        "it checks.",
    )


class Freeze(_Model):
    """No canary starts or advances while an incident is open on one of these services."""

    pagerduty_services: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1,
        description="PagerDuty service IDs; a triggered or acknowledged incident on any of "
        "them freezes advancing (COALMINE_PAGERDUTY_API_TOKEN reads them).",
    )


def _canary_only() -> list[Phase]:
    return ["canary"]


class Rule(_Model):
    """One signal, its threshold, how long a breach must last, and what a trip does."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=100,
        description="Unique within the policy; used in dedup keys and metric labels.",
    )
    description: str | None = Field(default=None, description="Shown in pages and messages.")
    source: Source = Field(description="Where the value comes from.")
    query: str | None = Field(
        default=None, description="PromQL giving one number (prometheus and grafana sources)."
    )
    samples: str | None = Field(
        default=None, description="PromQL giving the request count behind the value."
    )
    events: str | None = Field(
        default=None,
        description="PromQL counting the events (errors, slow requests) among `samples` "
        "(compare rules with a prometheus or grafana source).",
    )
    compare: Compare | None = Field(
        default=None,
        description="Judge the canary's event rate against the stable's instead of "
        "`above`/`below` (see docs/statistics.md).",
    )
    signal: CloudflareSignal | None = Field(
        default=None, description="Built-in Workers analytics signal (cloudflare source)."
    )
    window: Duration = Field(
        default=timedelta(minutes=1), description="Substituted for $window; the analytics window."
    )
    min_samples: Number | None = Field(
        default=None, ge=0, description="Fewer samples than this is inconclusive."
    )
    above: Number | None = Field(default=None, description="Breaching when value > above.")
    below: Number | None = Field(default=None, description="Breaching when value < below.")
    for_: Duration = Field(
        default=timedelta(0),
        alias="for",
        description="How long a breach must last, continuously, before the rule trips.",
    )
    on_breach: OnBreach = Field(default="hold", description="What a trip does.")
    phases: list[Phase] = Field(
        default_factory=_canary_only, min_length=1, description="When the rule runs."
    )
    severity: Severity | None = Field(
        default=None, description="Page severity for hold and page rules (default error)."
    )
    url: str | None = Field(
        default=None, description="Where a webhook rule POSTs the rollout's context (http/https)."
    )
    timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="A webhook rule's time limit; a call that takes longer is inconclusive.",
    )
    when: When = Field(
        default="before_advance", description="When a webhook rule is called (webhook rules)."
    )
    shared_incident: SharedIncident = Field(
        default="rollback",
        description="A rollback rule whose stable version breaches the same threshold at the "
        "same evaluation: roll back anyway, or hold and page (a shared incident).",
    )

    @property
    def threshold(self) -> float:
        """The ``above`` or ``below`` bound; a compare rule's ``max_ratio``."""
        if self.compare is not None:
            return self.compare.max_ratio
        if self.source == "webhook":
            return 0.0  # the value is 0 on a 2xx answer, the HTTP status otherwise
        return self.above if self.above is not None else self.below  # type: ignore[return-value]

    @property
    def operator(self) -> str:
        """``>`` for ``above`` and compare rules, ``<`` for ``below`` rules."""
        return "<" if self.below is not None and self.compare is None else ">"

    @property
    def gating(self) -> bool:
        """Whether the rule gates advancement (``rollback`` and ``hold`` rules do)."""
        return self.on_breach in ("rollback", "hold")


class Policy(_Model):
    """A whole policy file."""

    version: FormatVersion = Field(description="Format version; always 1.")
    name: str = Field(min_length=1, description="Shown in pages, messages and the journal.")
    scripts: list[ScriptName] = Field(
        min_length=1, description="Worker script names this policy governs."
    )
    analysis: Analysis = Field(
        default_factory=Analysis, description="Poll period, warm-up and inconclusive paging."
    )
    steps: list[Step] = Field(min_length=1, description="Canary weights, rising to 100.")
    post_promotion: PostPromotion = Field(
        default_factory=PostPromotion, description="The watch after promotion."
    )
    deployment_windows: DeploymentWindows | None = Field(
        default=None, description="Advancing only inside these windows; omitted means always."
    )
    rules: list[Rule] = Field(default_factory=list, description="What to watch and judge.")
    freeze: Freeze | None = Field(
        default=None, description="Incident freeze: hold while PagerDuty has an open incident."
    )


Path = tuple[str | int, ...]


def semantic_problems(policy: Policy) -> list[tuple[Path, str]]:
    """Every cross-field problem of a structurally valid policy, each with its data path."""
    return [
        *_step_problems(policy),
        *_rule_problems(policy),
        *_window_problems(policy),
        *_misc_problems(policy),
    ]


def _step_problems(policy: Policy) -> Iterator[tuple[Path, str]]:
    steps = policy.steps
    for i in range(1, len(steps)):
        if steps[i].weight <= steps[i - 1].weight:
            yield (
                ("steps", i, "weight"),
                f"weights must rise strictly: {steps[i].weight} after {steps[i - 1].weight}",
            )
    if steps[-1].weight != 100:
        yield (("steps", len(steps) - 1, "weight"), "the last step must be 100 (promotion)")
    elif steps[-1].hold:
        yield (
            ("steps", len(steps) - 1, "hold"),
            "the last step is the promotion and is not held; use post_promotion.watch",
        )
    if len(steps) < 2:
        yield (("steps",), "needs at least one canary step below 100 before the final 100")


def _rule_problems(policy: Policy) -> Iterator[tuple[Path, str]]:
    first_seen: dict[str, int] = {}
    for i, rule in enumerate(policy.rules):
        at: Path = ("rules", i)
        if rule.name in first_seen:
            yield (
                (*at, "name"),
                f"duplicate rule name {rule.name!r} (also rules[{first_seen[rule.name]}])",
            )
        first_seen.setdefault(rule.name, i)
        if rule.source == "webhook" or rule.url is not None or _webhook_fields(rule):
            yield from _webhook_problems(rule, at)
        elif rule.compare is not None:
            yield from _compare_problems(rule, at)
        elif rule.above is None and rule.below is None:
            yield (at, "set exactly one of above or below")
        elif rule.above is not None and rule.below is not None:
            yield ((*at, "below"), "set exactly one of above or below, not both")
        if rule.source != "webhook":
            yield from _source_problems(rule, at)
        if len(set(rule.phases)) != len(rule.phases):
            yield ((*at, "phases"), "lists a phase twice")
        if rule.window <= timedelta(0):
            yield ((*at, "window"), "must be longer than 0s")
        if rule.shared_incident == "hold":
            yield from _shared_incident_problems(rule, at)
        if rule.severity is not None and rule.on_breach in ("rollback", "warn"):
            yield (
                (*at, "severity"),
                f"has no effect on a {rule.on_breach} rule "
                "(rollback pages are critical; warn rules post to Slack)",
            )


def _webhook_fields(rule: Rule) -> set[str]:
    return {"timeout", "when"} & rule.model_fields_set


def _webhook_problems(rule: Rule, at: Path) -> Iterator[tuple[Path, str]]:
    if rule.source != "webhook":
        for field in sorted({"url"} & rule.model_fields_set | _webhook_fields(rule)):
            yield ((*at, field), f"only a webhook rule takes `{field}`")
        return
    url = rule.url or ""
    if not re.fullmatch(r"https?://[^\s/]+\S*", url):
        yield ((*at, "url"), "a webhook rule needs a url, http:// or https://")
    for field in ("query", "samples", "events", "signal", "compare", "above", "below"):
        if getattr(rule, field) is not None:
            yield (
                (*at, field),
                f"a webhook rule takes no `{field}`: "
                "a 2xx answer passes, any other status breaches",
            )
    if rule.min_samples is not None:
        yield ((*at, "min_samples"), "a webhook rule has no samples")
    if rule.timeout <= timedelta(0):
        yield ((*at, "timeout"), "must be longer than 0s")
    yield from _when_problems(rule, at)


def _when_problems(rule: Rule, at: Path) -> Iterator[tuple[Path, str]]:
    if rule.when == "before_advance":
        if not rule.gating:
            yield (
                (*at, "on_breach"),
                "a before_advance webhook gates advancing: on_breach rollback or hold",
            )
        if "post_promotion" in rule.phases:
            yield (
                (*at, "phases"),
                "a before_advance webhook runs in the canary phase only (nothing advances after "
                "promotion); use when: after_promotion or every_tick",
            )
    elif rule.when in ("after_promotion", "after_rollback") and "phases" in rule.model_fields_set:
        yield ((*at, "phases"), f"when: {rule.when} sets the phase; leave `phases` out")
    if rule.when == "after_rollback":
        for field in ("on_breach", "severity"):
            if field in rule.model_fields_set:
                yield (
                    (*at, field),
                    f"an after_rollback webhook pages critical when it fails; leave `{field}` out",
                )


def _shared_incident_problems(rule: Rule, at: Path) -> Iterator[tuple[Path, str]]:
    if rule.source == "webhook":
        yield (
            (*at, "shared_incident"),
            "a webhook rule has no stable evaluation; shared_incident is for above/below rules",
        )
    elif rule.compare is not None:
        yield (
            (*at, "shared_incident"),
            "a compare rule already judges the canary against the stable version; "
            "shared_incident is for above/below rules",
        )
    elif rule.on_breach != "rollback":
        yield (
            (*at, "shared_incident"),
            f"only a rollback rule can hold for a shared incident, not a {rule.on_breach} rule",
        )


def _compare_problems(rule: Rule, at: Path) -> Iterator[tuple[Path, str]]:
    if "post_promotion" in rule.phases:
        yield (
            (*at, "phases"),
            "a compare rule needs both versions serving: it runs in the canary phase only "
            "(after promotion the stable version serves nothing)",
        )
    for field in ("above", "below"):
        if getattr(rule, field) is not None:
            yield (
                (*at, field),
                "a compare rule is judged against the stable version: "
                "set compare.max_ratio, not above/below",
            )
    if rule.source == "cloudflare":
        if rule.signal is not None and rule.signal != "errors":
            yield (
                (*at, "signal"),
                f"a compare rule needs a count of events among requests: "
                f"signal errors, not {rule.signal}",
            )
        return
    if rule.query is not None:
        yield (
            (*at, "query"),
            "a compare rule counts `events` among `samples`; it takes no `query`",
        )
    for field, what in (("events", "the events (errors, slow requests)"), ("samples", "requests")):
        text = getattr(rule, field)
        if not text or not text.strip():
            yield (
                (*at, field),
                f"a {rule.source} compare rule needs `{field}`, PromQL counting {what}",
            )


def _source_problems(rule: Rule, at: Path) -> Iterator[tuple[Path, str]]:
    if rule.events is not None and rule.compare is None:
        yield ((*at, "events"), "only a compare rule counts `events`; add a `compare` block")
    if rule.source == "cloudflare":
        if rule.signal is None:
            yield ((*at, "signal"), "a cloudflare rule needs a signal")
        for field in ("query", "samples", "events"):
            if getattr(rule, field) is not None:
                yield ((*at, field), "a cloudflare rule takes a signal, not PromQL")
        return
    if rule.signal is not None:
        yield ((*at, "signal"), f"a {rule.source} rule takes a query, not a signal")
    if rule.compare is None and (not rule.query or not rule.query.strip()):
        yield ((*at, "query"), f"a {rule.source} rule needs a query")
    if rule.min_samples is not None and rule.samples is None and rule.compare is None:
        # Without a sample count every evaluation would be inconclusive: the canary never advances.
        yield ((*at, "min_samples"), "needs `samples`, the PromQL that counts the requests")
    for field in ("query", "samples", "events"):
        text = getattr(rule, field)
        for match in _PLACEHOLDER.finditer(text or ""):
            name = match[1] or match[2]
            if name not in PLACEHOLDERS:
                known = ", ".join("$" + p for p in PLACEHOLDERS)
                yield ((*at, field), f"unknown placeholder ${name}; known: {known}")


def _window_problems(policy: Policy) -> Iterator[tuple[Path, str]]:
    windows = policy.deployment_windows
    if windows is None:
        return
    try:
        ZoneInfo(windows.timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a path
        yield (("deployment_windows", "timezone"), f"unknown timezone {windows.timezone!r}")
    for i, window in enumerate(windows.allow):
        if window.from_ == time.max:
            yield (
                ("deployment_windows", "allow", i, "from"),
                '"24:00" is only valid as `to`; a window opening at midnight starts at "00:00"',
            )
        elif window.from_ == window.to:
            yield (("deployment_windows", "allow", i, "to"), "must differ from `from`")
        if len(set(window.days)) != len(window.days):
            yield (("deployment_windows", "allow", i, "days"), "lists a day twice")


def _misc_problems(policy: Policy) -> Iterator[tuple[Path, str]]:
    if policy.analysis.interval <= timedelta(0):
        yield (("analysis", "interval"), "must be longer than 0s")
    seen: set[str] = set()
    for i, script in enumerate(policy.scripts):
        if not SCRIPT_NAME.fullmatch(script):
            yield (("scripts", i), f"{script!r} is not a Cloudflare Worker name: {SCRIPT_RULE}")
        if script in seen:
            yield (("scripts", i), f"lists script {script!r} twice")
        seen.add(script)


class _SchemaGenerator(GenerateJsonSchema):
    """Writes duration defaults as a policy would (``30s``), not as ISO 8601 (``PT30S``)."""

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, timedelta):
            return format_duration(dft)
        return super().encode_default(dft)


def json_schema() -> dict[str, Any]:
    """The policy's JSON Schema, for editors and CI linting."""
    schema = Policy.model_json_schema(by_alias=True, schema_generator=_SchemaGenerator)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "coalmine policy"
    return schema
