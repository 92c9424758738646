"""The budget plan (cloudflare/plan.py): the contract's request model, the rollbacks' reserve,
the room for more canaries, and computed changes that make an over-budget plan fit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coalmine.cloudflare.budgets import TokenBucket, write_reserve
from coalmine.cloudflare.plan import Change, Group, Inputs, budgets, plan, token_budgets

# the issue's account: 1,000 scripts, 50 live canaries at 30 s with Cloudflare rules, defaults
ACCOUNT = Inputs(
    groups=(Group("runbook", 30.0, True, live=50, idle=950),),
    discovery=60.0,
    drift=1800.0,
    canary_drift=120.0,
    rest_limit=600,
    graphql_limit=200,
)


def parts(inputs: Inputs) -> dict[str, float]:
    """Every part of both APIs' plans, by name."""
    rest, graphql = budgets(inputs)
    return {f"{b.api} {name}": n for b in (rest, graphql) for name, n in b.parts}


def go_live(inputs: Inputs, counts: list[int]) -> Inputs:
    """``inputs`` with ``counts[i]`` more of group i's idle scripts running a canary."""
    groups = tuple(
        g._replace(live=g.live + n, idle=g.idle - n)
        for g, n in zip(inputs.groups, counts, strict=True)
    )
    return inputs._replace(groups=groups)


def test_the_issues_account_fits_the_defaults_part_by_part() -> None:
    """1,000 scripts with 50 canaries at 30 s: REST 125 + 100 + 158.3 of 600, GraphQL 5 + 10."""
    assert parts(ACCOUNT) == pytest.approx(
        {
            "rest canary reads": 50 * 300 / 120,  # every 2 min: the canary drift interval
            "rest canary writes": 50 * 2,
            "rest idle reads": 950 * 300 / 1800,
            "graphql discovery": 5,
            "graphql analytics": 10,  # one batched query every 30 s for all 50
        }
    )
    result = plan(ACCOUNT)
    assert result.fits and result.fixes == ()
    assert result.problem() is None
    assert result.summary().startswith("REST 384/600 per 5 min (canary reads 125, ")
    assert "GraphQL 15/200 per 5 min (discovery 5, analytics 10)" in result.summary()
    assert result.more_canaries == 48  # each one more costs 2.5 + 2 - 1/6 of the 210.7 left


def test_the_rollback_reserve_is_never_planned() -> None:
    """REST fits only within the limit less the token bucket's reserve for writes."""
    reserve = write_reserve(600)
    assert reserve == TokenBucket(600).reserve > 0
    # 2 canaries read every 2 min (5 requests) + writes (4); each idle script 1 (every 5 min)
    base = ACCOUNT._replace(drift=300.0, groups=(Group("p", 1.0, False, live=2, idle=0),))
    idle_at = int(600 - reserve - 9)  # idle reads that fill the room exactly
    exactly = base._replace(groups=(*base.groups, Group("q", 1.0, False, 0, idle_at)))
    over = base._replace(groups=(*base.groups, Group("q", 1.0, False, 0, idle_at + 1)))
    assert budgets(exactly)[0].fits
    assert not budgets(over)[0].fits
    assert budgets(over)[0].planned < 600  # under the limit, but it would spend the reserve


def test_a_canary_reads_its_deployment_at_its_interval_or_the_canary_drift_interval() -> None:
    """300 / max(analysis.interval, canary drift): every tick when the interval is longer."""
    slow = ACCOUNT._replace(groups=(Group("slow", 300.0, False, live=1, idle=0),))
    fast = ACCOUNT._replace(groups=(Group("fast", 10.0, False, live=1, idle=0),))
    assert parts(slow)["rest canary reads"] == pytest.approx(1.0)
    assert parts(fast)["rest canary reads"] == pytest.approx(2.5)


def test_one_analytics_query_per_distinct_interval_of_live_cloudflare_canaries() -> None:
    """Canaries sharing an interval share one query; idle scripts and other sources add none."""
    inputs = ACCOUNT._replace(
        groups=(
            Group("a", 30.0, True, live=20, idle=100),
            Group("b", 30.0, True, live=5, idle=0),
            Group("c", 60.0, True, live=1, idle=0),
            Group("d", 10.0, False, live=9, idle=0),  # prometheus rules: no GraphQL
            Group("e", 15.0, True, live=0, idle=50),  # no live canary: no query yet
        ),
    )
    assert parts(inputs)["graphql analytics"] == pytest.approx(300 / 30 + 300 / 60)


def test_in_the_fallback_idle_scripts_cost_a_read_per_discovery_interval() -> None:
    """Without account-wide discovery the issue's account needs 4,975 REST requests: named fixes."""
    fallback = ACCOUNT._replace(account_wide=False)
    result = plan(fallback)
    assert parts(fallback)["rest idle discovery reads"] == pytest.approx(950 * 5)
    assert not result.fits and result.more_canaries == 0
    texts = result.changes
    assert texts[0].startswith("restore account-wide discovery")
    assert "raise COALMINE_DISCOVERY_INTERVAL to 15m (now 1m)" in texts
    assert "watch 877 fewer idle scripts (now 950)" in texts
    problem = result.problem()
    assert problem is not None and "REST 4975/600 per 5 min" in problem


def test_the_drift_interval_named_is_the_shortest_that_fits() -> None:
    """Idle reads just over the room ask for the next step of drift interval, not any bigger."""
    # 2,000 idle scripts at 30 m = 333 reads, + 50 canaries' 225: fits 594; 3,000 do not
    inputs = ACCOUNT._replace(groups=(Group("runbook", 30.0, True, live=50, idle=3000),))
    result = plan(inputs)
    assert not result.fits
    assert result.changes[0] == "raise COALMINE_DRIFT_INTERVAL to 45m (now 30m)"
    assert plan(result.fixes[0][0].apply(inputs)).fits


def test_graphql_over_budget_names_the_policy_interval_and_the_limit() -> None:
    """A 1 s Cloudflare-rule policy over GraphQL's 200: its analysis.interval or the limit;
    not discovery, which alone cannot make room."""
    inputs = ACCOUNT._replace(
        discovery=10.0,  # 30 queries
        groups=(Group("fast", 1.0, True, live=1, idle=0), Group("slow", 30.0, True, 1, 0)),
    )
    result = plan(inputs)  # 30 + 300 + 10
    assert (result.rest.fits, result.graphql.fits) == (True, False)
    assert "analysis.interval 5s in policy fast (now 1s)" in result.changes
    assert "raise COALMINE_CLOUDFLARE_GRAPHQL_RATE_LIMIT to 300 (now 200, at most 300)" not in (
        result.changes  # 340 > 300: the limit alone cannot
    )
    assert not any(t.startswith("raise COALMINE_DISCOVERY_INTERVAL") for t in result.changes)


def test_a_policy_interval_that_joins_another_saves_its_query() -> None:
    """Moving a policy onto another's interval merges two analytics queries into one."""
    inputs = ACCOUNT._replace(
        graphql_limit=15,
        groups=(Group("a", 30.0, True, live=1, idle=0), Group("b", 20.0, True, live=1, idle=0)),
    )
    result = plan(inputs)  # 5 + 10 + 15 = 30 over 15
    assert "analysis.interval 30s in policy b (now 20s)" in result.changes


def test_no_change_found_says_so() -> None:
    """Canaries that alone overflow every lever: the problem says no change was found."""
    inputs = ACCOUNT._replace(groups=(Group("runbook", 30.0, False, live=700, idle=0),))
    result = plan(inputs)  # 700 writes alone exceed even 1,200
    assert result.fixes == ()
    problem = result.problem()
    assert problem is not None and "no change of one or two settings makes it fit" in problem


# ---- Properties ------------------------------------------------------------------------------

durations = st.sampled_from([1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 1800.0, 3600.0])


@st.composite
def inputs(draw: st.DrawFn) -> Inputs:
    """Any account: a few policies, up to a few thousand scripts, any settings."""
    count = draw(st.integers(1, 4))
    groups = tuple(
        Group(
            f"p{i}",
            draw(durations),
            draw(st.booleans()),
            live=draw(st.integers(0, 120)),
            idle=draw(st.integers(0, 3000)),
        )
        for i in range(count)
    )
    return Inputs(
        groups,
        discovery=draw(durations),
        drift=draw(durations),
        canary_drift=draw(durations),
        rest_limit=draw(st.integers(1, 1200)),
        graphql_limit=draw(st.integers(1, 300)),
        account_wide=draw(st.booleans()),
    )


@settings(max_examples=300, deadline=None)
@given(inputs())
def test_every_suggested_change_makes_the_plan_fit(account: Inputs) -> None:
    """Applying any fix the plan suggests yields a plan that fits; a fitting plan suggests none."""
    result = plan(account)
    if result.fits:
        assert result.fixes == ()
        return
    assert result.more_canaries == 0
    for fix in result.fixes:
        after = account
        for change in fix:
            after = change.apply(after)
        assert plan(after).fits, [c.text(account) for c in fix]


@settings(max_examples=300, deadline=None)
@given(inputs(), st.data())
def test_any_that_many_more_canaries_fit(account: Inputs, data: st.DataObject) -> None:
    """Whichever idle scripts start the counted number of canaries, the plan still fits."""
    result = plan(account)
    if not result.fits:
        return
    left = result.more_canaries
    counts = []
    for g in account.groups:
        n = data.draw(st.integers(0, min(g.idle, left)))
        counts.append(n)
        left -= n
    assert plan(go_live(account, counts)).fits


def test_one_more_than_counted_may_not_fit() -> None:
    """The count is tight: the costliest idle script beyond it does not fit."""
    result = plan(ACCOUNT)
    assert not plan(go_live(ACCOUNT, [result.more_canaries + 1])).fits


def test_changes_say_what_to_set() -> None:
    """Each kind of change reads as the setting, policy field or count to change."""
    texts = {
        Change("drift", 2700).text(ACCOUNT),
        Change("canary_drift", 300).text(ACCOUNT),
        Change("interval", 60, policy="runbook").text(ACCOUNT),
        Change("rest_limit", 900).text(ACCOUNT),
        Change("fewer_idle", 100).text(ACCOUNT),
    }
    assert texts == {
        "raise COALMINE_DRIFT_INTERVAL to 45m (now 30m)",
        "raise COALMINE_CANARY_DRIFT_INTERVAL to 5m (now 2m)",
        "analysis.interval 1m in policy runbook (now 30s)",
        "raise COALMINE_CLOUDFLARE_RATE_LIMIT to 900 (now 600, at most 1200)",
        "watch 100 fewer idle scripts (now 950)",
    }


def test_pages_are_sized_by_every_policys_window_as_the_source_sizes_them() -> None:
    """An idle policy's hour-long Cloudflare window sizes the analytics source's pages (its
    query spans every rule's window): 800 live canaries at 60 s with 5-minute windows then
    need 10 queries a minute (80 a page), not one (832 a page)."""
    live = Group("short", 60.0, True, live=800, idle=0, window=300.0)
    idle = Group("long", 60.0, True, live=0, idle=10, window=3600.0)
    alone = parts(ACCOUNT._replace(groups=(live,)))["graphql analytics"]
    both = parts(ACCOUNT._replace(groups=(live, idle)))["graphql analytics"]
    assert (alone, both) == (5.0, 50.0)


def test_the_token_counts_each_replicas_discovery_chunks() -> None:
    """5,000 scripts on two replicas: each asks about its 2,500 in two queries, so the token
    plans four a minute (20 per 5 minutes), not three."""
    every = (Group("p", 30.0, False, live=0, idle=5000),)
    mine = (Group("p", 30.0, False, live=0, idle=2500),)
    inputs = ACCOUNT._replace(groups=mine, account=every, replicas=2)
    token = token_budgets(inputs)
    assert token is not None
    assert dict(token[1].parts)["discovery"] == 20
    assert dict(budgets(inputs)[1].parts)["discovery"] == 10
