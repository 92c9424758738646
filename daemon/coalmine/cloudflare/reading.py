"""How to read the budget plan: docs/configuration.md's section, generated with the rest of that
file (:func:`coalmine.settings.reference`) so that it names what :mod:`coalmine.cloudflare.plan`
computes."""

READING = """\
## Reading the budget plan

coalmine works out how many Cloudflare requests per 5 minutes it will need for the scripts
it watches and the canaries live now, and checks them against its limits: at start, after a
reload (SIGHUP), and whenever a canary starts or ends. Each time it logs one line, event
`budget plan`, with the fields `plan`, `rest`, `rest_limit`, `graphql`, `graphql_limit`,
`more_canaries` and `why`. For 1,000 scripts, 50 of them canaries of the runbook, `plan` reads:

```
REST 384/600 per 5 min (canary reads 125, canary writes 100, idle reads 159, 6 kept for
rollbacks); GraphQL 15/200 per 5 min (discovery 5, analytics 10); 50 live canaries of 1000
scripts, 48 more would fit
```

REST, against `COALMINE_CLOUDFLARE_RATE_LIMIT`:

- *canary reads*: a script with a live canary (running, paused, or in its post-promotion
  watch) reads its deployment every `analysis.interval` or every
  `COALMINE_CANARY_DRIFT_INTERVAL`, whichever is longer;
- *canary writes*: 2 per live canary, a traffic change (step, promotion, rollback) and its
  read-back;
- *idle reads*: every other script once per `COALMINE_DRIFT_INTERVAL`. While account-wide
  discovery is unavailable, *idle discovery reads*: once per `COALMINE_DISCOVERY_INTERVAL`;
- *kept for rollbacks*: the reserve of the REST token bucket that only writes may take. The
  plan never counts on it: REST fits when its total is at most the limit less the reserve.

GraphQL, against `COALMINE_CLOUDFLARE_GRAPHQL_RATE_LIMIT`:

- *discovery*: one account-wide query per `COALMINE_DISCOVERY_INTERVAL`;
- *analytics*: one query for all live canaries with `source: cloudflare` rules per
  `analysis.interval`, one for each distinct interval among them (two policies at 30s share
  one, a third at 1m adds another). The schema check at start is one query, not counted.

*N more would fit*: how many idle scripts could start a canary at once with the plan still
fitting, counting the costliest first.

When the plan does not fit, the line is a warning, `budget plan does NOT fit`, and its
`change` lists changes that would each make it fit (two joined by "and" go together),
computed for that moment's scripts and canaries: `raise COALMINE_DRIFT_INTERVAL to 45m (now
30m)`, `analysis.interval 1m in policy runbook (now 30s)`, `watch 120 fewer idle scripts (now
950)`, a higher limit when the token has room. Nothing is refused meanwhile; calls wait on the
token buckets, so deployments are read, canaries judged and new splits adopted late. Until a
plan fits, `GET /health` is `degraded` with the `cloudflare_budget` check failing and the
same reason, and its `budget_plan` has the numbers. On `/metrics`:
`coalmine_cloudflare_budget_planned{api}`, `coalmine_cloudflare_budget_limit{api}`,
`coalmine_cloudflare_budget_reserve{api}` and `coalmine_cloudflare_budget_more_canaries`; the
alert `CoalmineBudgetPlanOverLimit` watches them. `coalmine status` ends with one line, e.g.
`budget: REST 384/600, GraphQL 15/200 per 5 min; 48 more canaries would fit`, or `budget:
OVER: ...; fix: ...` with the first change. Sizing an account:
[deploy.md](deploy.md#sizing-an-account).

Replicas sharing one Cloudflare token (a PostgreSQL store) share its limits: each replica
plans the scripts it holds against its share, the limit over the live replicas (its token
buckets allow no more), and every watched script against the token's whole limits, counting
a discovery query per replica. The line then reads `... 17 live canaries of 334 scripts
held, 15 more would fit; the token, shared by 3 replicas: REST 384/600, GraphQL 45/200 per 5
min` and has a `replicas` field; `rest_limit` and `graphql_limit` are the replica's share.
`/health`'s `budget_plan` adds `replicas` and `token`; on `/metrics`,
`coalmine_cloudflare_budget_token_planned{api}` and `coalmine_cloudflare_budget_token_limit{api}`
are the token's whole (alone: the same as the daemon's own). A plan fits only when both do: the
problem names which, *this replica's share* or *the token's whole*.
"""
