"""A reload's new rules are served as a restart would serve them (SIGHUP).

Before, the sources were built for the policies at start only: a reloaded Cloudflare rule with
a longer window was judged over the rows of the old, shorter span (an error rate diluted by
the minutes never asked for: a false pass), a new signal's quantile was never asked for, and a
first webhook rule had no source at all (inconclusive until a restart).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from coalmine.engine.model import format_time
from coalmine.sources.cloudflare import CloudflareAnalytics
from coalmine.sources.webhook import WebhookSource
from tests.e2e.harness import POLICY, harness

pytestmark = pytest.mark.anyio

LONGER = POLICY.replace(
    "    signal: error_ratio\n    window: 2m", "    signal: error_ratio\n    window: 10m"
) + (
    "  - {name: wall, source: cloudflare, signal: wall_time_p99, window: 2m, above: 900,"
    " on_breach: hold}\n"
    "  - {name: gate, source: webhook, url: 'http://127.0.0.1:9/check', on_breach: hold}\n"
)


def analytics_asked(h: Any, since: int) -> list[dict[str, Any]]:
    """The analytics queries (not discovery's, not the schema check) sent after ``since``."""
    return [
        r.body
        for r in h.sim.cloudflare.requests[since:]
        if r.path.endswith("/graphql") and "scriptVersion_in" in str(r.body)
    ]


async def test_a_reload_widens_the_analytics_query_and_adds_the_webhook_source(
    tmp_path: Path,
) -> None:
    """The exceptions rule's window reloaded from 2m to 10m, a wall-time rule and a webhook
    rule added: the next analytics query spans 10 minutes and asks for wallTimeP99 (its
    schema checked again), and the webhook rule has its source."""
    async with harness(tmp_path) as h:
        await h.tick()
        await h.tick()
        before = analytics_asked(h, 0)
        assert before and "wallTimeP99" not in before[-1]["query"]
        assert "webhook" not in h.daemon.shared.sources
        (tmp_path / "policy.yaml").write_text(LONGER)
        started: list[object] = []
        assert await h.daemon.reload(started.append)
        assert started[0] == h.daemon.check_analytics_schema  # the new fields, checked
        assert isinstance(h.daemon.shared.sources["webhook"], WebhookSource)
        source = h.daemon.shared.sources["cloudflare"]
        assert isinstance(source, CloudflareAnalytics)
        assert await source.check_schema() is None  # the simulator's schema has them all
        since = len(h.sim.cloudflare.requests)
        await h.tick()
        after = analytics_asked(h, since)
    assert after, "no analytics query after the reload"
    where = after[-1]["variables"]["filter"]
    span = datetime.fromisoformat(where["datetime_lt"]) - datetime.fromisoformat(
        where["datetime_geq"]
    )
    assert span == timedelta(minutes=10), (format_time(h.clock()), where)
    assert "wallTimeP99" in after[-1]["query"]
