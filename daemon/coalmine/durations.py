"""Durations as users write them: ``30s``, ``5m``, ``1h30m``, ``24h``, ``2d``."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
DURATION_PATTERN = r"^(?=\d)(?:\d+d)?(?:\d+h)?(?:\d+m)?(?:\d+s)?$"


def parse_duration(text: str) -> timedelta:
    """Parse ``1h30m``-style text; raise ``ValueError`` with a readable message otherwise."""
    match = _DURATION.match(text.strip()) if text.strip() else None
    if match is None or not any(match.groups()):
        raise ValueError(
            f"{text!r} is not a duration: use whole numbers with units d, h, m, s "
            "in that order, e.g. 30s, 5m, 1h30m"
        )
    seconds = sum(int(n) * unit for n, (_, unit) in zip(match.groups(), _UNITS, strict=True) if n)
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest ``1h30m``-style text for a whole number of seconds (``0s`` for zero)."""
    remaining = int(value.total_seconds())
    if remaining == 0:
        return "0s"
    sign = "-" if remaining < 0 else ""
    remaining = abs(remaining)
    parts = []
    for suffix, unit in _UNITS:
        count, remaining = divmod(remaining, unit)
        if count:
            parts.append(f"{count}{suffix}")
    return sign + "".join(parts)
