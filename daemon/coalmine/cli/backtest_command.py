"""The shell of ``coalmine backtest``: settings in, clients built, decisions and a report out."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

from coalmine.cli.backtest import PROMQL_SOURCES, find_split, queries, run_backtest
from coalmine.cli.replay import PROMOTED, ROLLED_BACK, format_table, verdict
from coalmine.cli.report import render_html
from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient
from coalmine.engine import Deployment, Options
from coalmine.errors import ConfigError
from coalmine.policy import Policy
from coalmine.settings import Settings
from coalmine.sources import Source
from coalmine.sources.cloudflare_history import CloudflareHistory

_VERDICTS = {PROMOTED: "promoted", ROLLED_BACK: "rolled back"}


async def backtest_command(
    settings: Settings,
    policy: Policy,
    script: str,
    start: datetime,
    end: datetime,
    args: argparse.Namespace,
) -> int:
    """Run the backtest ``args`` ask for; the exit code is the verdict."""
    given = Deployment(args.stable, args.canary, policy.steps[0].weight) if args.canary else None
    if args.dry:
        split = given or Deployment("$stable", "$canary", policy.steps[0].weight)
        step = policy.analysis.interval
        for query in queries(policy, script, split):
            print(query.describe(start, end, step))
        if given is None:
            print("versions: the first split deployment of the range, from Cloudflare")
        return 0
    async with httpx.AsyncClient(timeout=60.0, verify=True) as http:
        cloudflare = _cloudflare(settings, http, policy, needed=given is None)
        began = start
        if given is None:
            assert cloudflare is not None
            given, began = await find_split(cloudflare, script, start, end)
        sources: dict[str, Source] = {}
        account = settings.cloudflare_account_id
        cloudflare_rules = any(r.source == "cloudflare" for r in policy.rules)
        if cloudflare is not None and account and cloudflare_rules:
            sources["cloudflare"] = CloudflareHistory(cloudflare, account, report=_progress)
        url = settings.prometheus_url
        if url is None and settings.grafana_url and settings.grafana_datasource_uid:
            uid = settings.grafana_datasource_uid
            url = f"{settings.grafana_url}/api/datasources/proxy/uid/{uid}"
        result = await run_backtest(
            policy,
            script,
            began,
            end,
            given,
            http=http,
            prometheus_url=url,
            sources=sources,
            options=Options(settings.auto_rollback, settings.auto_promote, False),
        )
    code = verdict(result.decisions)
    if args.format == "table":
        for line in format_table(result.decisions):
            print(line)
    else:
        for decision in result.decisions:
            print(json.dumps(decision.to_dict()))
    if args.html:
        text = render_html(result, _VERDICTS.get(code, "no verdict"))
        Path(args.html).write_text(text, encoding="utf-8")
        print(f"report written to {args.html}", file=sys.stderr)
    return code


def _cloudflare(
    settings: Settings, http: httpx.AsyncClient, policy: Policy, *, needed: bool
) -> CloudflareClient | None:
    uses = needed or any(r.source not in PROMQL_SOURCES for r in policy.rules)
    if not uses:
        return None
    if not (settings.cloudflare_account_id and settings.cloudflare_api_token):
        why = "to find the versions (or give --canary and --stable)" if needed else "for its rules"
        raise ConfigError(
            "set COALMINE_CLOUDFLARE_ACCOUNT_ID and COALMINE_CLOUDFLARE_API_TOKEN " + why
        )
    return CloudflareClient(
        http,
        base_url=settings.cloudflare_api_url,
        account_id=settings.cloudflare_account_id,
        token=settings.cloudflare_api_token.get_secret_value(),
        limiter=TokenBucket(settings.cloudflare_rate_limit, clock=time.monotonic),
        graphql_limiter=TokenBucket(settings.cloudflare_graphql_rate_limit, clock=time.monotonic),
        timeout=60.0,  # a day of rows is a larger answer than a tick's window
    )


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
