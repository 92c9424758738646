"""Replicas share one Cloudflare token: each one's buckets and budget plan are its share.

Pure: the bucket sizes (cloudflare/budgets.py ``size``, ``TokenBucket.share``) on a virtual
clock, and the plan (cloudflare/plan.py) with ``Inputs.replicas`` and ``Inputs.account``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from coalmine.cli.status import budget_line
from coalmine.cloudflare.budgets import TokenBucket, size, write_reserve
from coalmine.cloudflare.plan import Group, Inputs, budgets, plan, token_budgets
from coalmine.cloudflare.planner import BudgetPlanner, Watched
from coalmine.policyfile import parse_policy
from coalmine.replicas import LeaseKeeper
from coalmine.server.health import Health
from coalmine.server.metrics import LeaseMetrics, Metrics
from coalmine.settings import load_settings
from coalmine.store.leases import OUTBOX, ReplicaIdInUse
from coalmine.store.sqlite import SqliteStore
from coalmine.store.threaded import ThreadedSqlite
from tests.unit.test_budget_plan import ACCOUNT, go_live
from tests.unit.test_ratelimit import Clock

pytestmark = pytest.mark.anyio


# ---- Buckets ---------------------------------------------------------------------------------


def test_a_share_refills_at_the_limit_over_the_replicas_and_keeps_its_part_of_the_reserve() -> None:
    """Three replicas of 600 per 5 minutes: 200 each, a burst of 20, a reserve of 2; the three
    reserves add up to the token's; one replica is the whole bucket, as before."""
    whole = size(600)
    share = size(600, replicas=3)
    assert share.rate == pytest.approx(whole.rate / 3) == pytest.approx(200 / 300)
    assert (share.capacity, share.reserve) == pytest.approx((20.0, 2.0))
    assert 3 * share.reserve == pytest.approx(whole.reserve) == pytest.approx(write_reserve(600))
    assert write_reserve(600, replicas=3) == pytest.approx(2.0)
    alone = TokenBucket(600)
    assert (alone.rate, alone.capacity, alone.reserve) == tuple(whole)
    assert size(600, replicas=0) == whole  # never more than the whole


def test_replicas_together_never_spend_more_than_the_token() -> None:
    """Three shared buckets, each sending as fast as it may for 5 minutes: together no more
    than the token's 600 (plus the bursts they started with, a tenth of it in all)."""
    clock = Clock()
    shares = [TokenBucket(600, replicas=3, clock=clock) for _ in range(3)]
    taken = 0
    while clock.now < 300:
        for bucket in shares:
            if bucket.wait_for("write") == 0:
                taken += 1
        clock.now += 0.01
    assert 600 <= taken <= 600 + sum(b.capacity for b in shares) == 660


def test_a_bucket_resized_keeps_what_it_earned_up_to_its_new_burst() -> None:
    """A second replica arrives: the bucket refills at half the rate and holds at most half
    the burst. The other leaves: the whole rate again, but no sudden full burst."""
    clock = Clock()
    bucket = TokenBucket(600, clock=clock)
    assert bucket.tokens == 60
    bucket.share(2)
    assert (bucket.rate, bucket.capacity, bucket.reserve) == pytest.approx((1.0, 30.0, 3.0))
    assert bucket.tokens == 30  # clipped to the share's burst
    while bucket.wait_for("write") == 0:
        pass  # spent
    bucket.share(1)
    assert bucket.capacity == 60 and bucket.tokens < 1
    clock.now += 10
    assert bucket.tokens == pytest.approx(bucket.tokens) and 19 < bucket.tokens < 21  # 2/s
    bucket.share(1)  # the same count: nothing changes
    assert bucket.rate == pytest.approx(2.0)


def test_tokens_earned_before_a_resize_count_at_the_old_rate() -> None:
    """Time passed before the count changed refills at the rate of that time."""
    clock = Clock()
    bucket = TokenBucket(600, clock=clock)
    while bucket.wait_for("write") == 0:
        pass
    clock.now += 5  # 10 tokens at 2 a second
    bucket.share(4)  # now 0.5 a second, at most 15
    assert bucket.tokens == pytest.approx(10, abs=1)


def test_a_shares_reserve_is_its_own_rollbacks() -> None:
    """Reads on one replica stop at its share's reserve, whatever another replica does: its
    rollback then goes at once (the other's reads never take this replica's reserve)."""
    clock = Clock()
    mine, theirs = (TokenBucket(600, replicas=2, clock=clock) for _ in range(2))
    reads = 0
    while mine.wait_for("read") == 0:
        reads += 1
    while theirs.wait_for("write") == 0:
        pass  # the other replica spends all it has
    assert reads == int(mine.capacity - mine.reserve) == 27
    assert mine.wait_for("rollback") == 0


@pytest.mark.parametrize("replicas", [7, 20, 60])
def test_however_thin_the_share_its_reserve_holds_a_whole_rollback(replicas: int) -> None:
    """600 per 5 minutes over many replicas: a share's tenth of its burst is under one token,
    yet its reads stop a whole token short, and a rollback goes at once (it waited 0.5 s at 7
    replicas and 24 s at 60 with a reserve of a fraction of a token: found in review)."""
    clock = Clock()
    bucket = TokenBucket(600, replicas=replicas, clock=clock)
    assert bucket.reserve >= 1.0 and bucket.capacity >= bucket.reserve + 1.0
    while bucket.wait_for("read") == 0:
        pass
    assert bucket.wait_for("rollback") == 0
    assert write_reserve(600, replicas=replicas) == bucket.reserve  # what the plan keeps


def test_the_graphql_sibling_and_the_per_second_cap_are_shared_too() -> None:
    """GraphQL's bucket follows REST's share; Cloudflare's account-wide 1 query a second
    (account-based GraphQL limits) is split between the replicas as well."""
    clock = Clock()
    rest = TokenBucket(600, replicas=2, clock=clock)
    graphql = rest.sibling(200)
    assert graphql.replicas == 2 and graphql.rate == pytest.approx(100 / 300)
    assert graphql.reserve == 0.0
    graphql.at_most_per_second(1.0)
    assert graphql.rate == pytest.approx(100 / 300)  # already slower than half a second
    graphql.share(1)
    assert graphql.rate == pytest.approx(200 / 300)
    fast = TokenBucket(1200, reserve_fraction=0.0, replicas=2, clock=clock)  # 2 a second each
    fast.at_most_per_second(1.0)
    assert (fast.rate, fast.capacity) == pytest.approx((0.5, 1.0))
    fast.share(1)
    assert (fast.rate, fast.capacity) == pytest.approx((1.0, 1.0))


# ---- The plan --------------------------------------------------------------------------------

RUNBOOK = ACCOUNT.groups[0]  # 50 canaries at 30 s with Cloudflare rules, 950 idle


def replica(held: Group, replicas: int = 2, account: Group = RUNBOOK) -> Inputs:
    """One replica of ``replicas`` holding ``held`` of the issue's account."""
    return ACCOUNT._replace(groups=(held,), replicas=replicas, account=(account,))


def test_two_replicas_each_plan_their_half_against_half_the_limits() -> None:
    """The issue's account over two replicas, half each: each plans 500 scripts against 300
    REST (3 kept) and 100 GraphQL; the token's plan is the whole account with a discovery
    query and an analytics query per replica; the two replicas' plans add up to it."""
    half = RUNBOOK._replace(live=25, idle=475)
    inputs = replica(half)
    rest, graphql = budgets(inputs)
    assert (rest.limit, rest.reserve, graphql.limit) == pytest.approx((300, 3.0, 100))
    assert rest.planned == pytest.approx(25 * 2.5 + 25 * 2 + 475 / 6)
    assert dict(graphql.parts) == pytest.approx({"discovery": 5, "analytics": 10})
    token = token_budgets(inputs)
    assert token is not None
    token_rest, token_graphql = token
    assert (token_rest.limit, token_rest.reserve, token_graphql.limit) == (600, 6.0, 200)
    assert token_rest.planned == pytest.approx(2 * rest.planned)
    assert dict(token_graphql.parts) == pytest.approx({"discovery": 10, "analytics": 20})
    result = plan(inputs)
    assert result.fits and result.token == token
    assert result.summary().startswith("REST 192/300 per 5 min (canary reads 63, ")
    assert "25 live canaries of 500 scripts held" in result.summary()
    assert result.summary().endswith(
        "the token, shared by 2 replicas: REST 384/600, GraphQL 30/200 per 5 min"
    )


def test_one_replica_alone_plans_the_whole_as_a_daemon_alone_does() -> None:
    """A single live replica holding everything: the same numbers as a daemon alone."""
    alone = plan(ACCOUNT)
    sole = plan(replica(RUNBOOK, replicas=1))
    assert (sole.rest, sole.graphql) == (alone.rest, alone.graphql)
    assert sole.token == (alone.rest, alone.graphql)
    assert sole.more_canaries == alone.more_canaries == 48
    assert alone.token is None and token_budgets(ACCOUNT) is None


def test_a_replica_holding_nothing_plans_nothing_not_even_discovery() -> None:
    """No scripts held (just started, or every lease elsewhere): no query of its own."""
    nothing = replica(RUNBOOK._replace(live=0, idle=0), replicas=3)
    rest, graphql = budgets(nothing)
    assert (rest.planned, graphql.planned) == (0, 0)
    assert graphql.limit == pytest.approx(200 / 3)
    assert plan(nothing).summary().startswith("REST 0/200 per 5 min")
    assert "GraphQL 0/66.7 per 5 min" in plan(nothing).summary()


def test_canaries_crowded_on_one_replica_overflow_its_share_not_the_token() -> None:
    """Leases balance scripts, not their cost: one replica of three holding all 50 canaries
    needs more than its 200 while the token's whole fits; it says so, with fixes that fit."""
    crowded = replica(RUNBOOK._replace(live=50, idle=284), replicas=3)
    result = plan(crowded)
    assert result.token is not None and all(b.fits for b in result.token)
    assert not result.rest.fits and not result.fits
    problem = result.problem()
    assert problem is not None
    assert "this replica's share (1/3 of the token): REST 273/200 per 5 min" in problem
    assert "the token's whole fits: this replica holds more than its share" in problem
    assert result.fixes
    for fix in result.fixes:
        after = crowded
        for change in fix:
            after = change.apply(after)
        assert plan(after).fits, [c.text(crowded) for c in fix]


def test_an_account_over_the_token_shows_on_every_replica() -> None:
    """An account over the token's whole limit: a replica within its share still does not
    fit, naming the token's plan; fewer idle scripts counts the account's."""
    big = RUNBOOK._replace(live=50, idle=4000)
    light = replica(RUNBOOK._replace(live=0, idle=100), replicas=3, account=big)
    result = plan(light)
    assert result.rest.fits and not result.fits
    problem = result.problem()
    assert problem is not None and "the token's whole: REST " in problem
    assert any(t.endswith("fewer idle scripts (now 4000)") for t in result.changes)


# ---- Properties ------------------------------------------------------------------------------

durations = st.sampled_from([5.0, 30.0, 60.0, 120.0, 1800.0])


@st.composite
def replicated(draw: st.DrawFn) -> Inputs:
    """Any account of one or two policies over 1-4 replicas, this one holding part of it."""
    replicas = draw(st.integers(1, 4))
    account, held = [], []
    for i in range(draw(st.integers(1, 2))):
        group = Group(
            f"p{i}",
            draw(durations),
            draw(st.booleans()),
            live=draw(st.integers(0, 120)),
            idle=draw(st.integers(0, 3000)),
        )
        account.append(group)
        held.append(
            group._replace(
                live=draw(st.integers(0, group.live)), idle=draw(st.integers(0, group.idle))
            )
        )
    return Inputs(
        tuple(held),
        discovery=draw(durations),
        drift=draw(durations),
        canary_drift=draw(durations),
        rest_limit=draw(st.integers(1, 1200)),
        graphql_limit=draw(st.integers(1, 300)),
        account_wide=draw(st.booleans()),
        replicas=replicas,
        account=tuple(account),
    )


@settings(max_examples=200, deadline=None)
@given(replicated())
def test_every_fix_makes_both_the_share_and_the_token_fit(inputs: Inputs) -> None:
    """Any fix suggested to a replica makes its share's plan and the token's plan fit."""
    result = plan(inputs)
    if result.fits:
        assert result.fixes == ()
        return
    for fix in result.fixes:
        after = inputs
        for change in fix:
            after = change.apply(after)
        assert plan(after).fits, [c.text(inputs) for c in fix]


@settings(max_examples=200, deadline=None)
@given(replicated(), st.data())
def test_that_many_more_canaries_on_this_replica_still_fit(
    inputs: Inputs, data: st.DataObject
) -> None:
    """Whichever of this replica's idle scripts start the counted number of canaries, its
    share's plan and the token's still fit."""
    result = plan(inputs)
    if not result.fits:
        return
    left, counts = result.more_canaries, []
    for g in inputs.groups:
        n = data.draw(st.integers(0, min(g.idle, left)))
        counts.append(n)
        left -= n
    after = go_live(inputs, counts)
    account = go_live(after._replace(groups=after.account or ()), counts).groups
    assert plan(after._replace(account=account)).fits


def test_status_says_the_numbers_are_this_replicas_share() -> None:
    """`coalmine status` on a replica: its numbers, marked as its share of the token."""
    half = plan(replica(RUNBOOK._replace(live=25, idle=475)))
    assert half.fits
    shown = {
        "fits": True,
        **{b.api: {"planned": b.planned, "limit": b.limit} for b in (half.rest, half.graphql)},
        "replicas": 2,
        "more_canaries": half.more_canaries,
    }
    assert budget_line(shown) == (
        f"budget: REST 192/300, GraphQL 15/100 per 5 min (share 1/2);"
        f" {half.more_canaries} more canaries would fit"
    )


# ---- The lease layer tells the planner ------------------------------------------------------


async def test_each_lease_round_says_how_many_share_the_token_and_what_is_held(
    tmp_path: Path,
) -> None:
    """A lease round reports the live replicas and the leases held (the share the buckets and
    the plan follow); a replica standing aside for a newer process under its id holds none."""
    stores = [ThreadedSqlite(SqliteStore(tmp_path / "state.db")) for _ in range(3)]
    metrics = [LeaseMetrics(CollectorRegistry()) for _ in range(3)]
    a = LeaseKeeper(stores[0], "A", 60, ["x", "y"], metrics[0])
    b = LeaseKeeper(stores[1], "B", 60, ["x", "y"], metrics[1])
    told: list[tuple[int, set[str]]] = []
    a.on_share = lambda replicas, held: told.append((replicas, held))
    try:
        await a.round()
        assert told[-1] == (1, {OUTBOX, "x", "y"})
        await b.round()
        await a.round()  # B is seen: A gives one script back
        replicas, held = told[-1]
        assert replicas == 2 and len(held - {OUTBOX}) == 1
        newer = LeaseKeeper(stores[2], "A", 60, ["x", "y"], metrics[2])
        await newer.announce()
        with pytest.raises(ReplicaIdInUse):
            await a.round()
        assert told[-1][1] == set()
    finally:
        for store in stores:
            await store.aclose()


class Keeper:
    """The lease keeper as the planner sees it: the live replicas, and the hook it calls."""

    def __init__(self, live: int) -> None:
        self.live = [f"r{i}" for i in range(live)]
        self.on_share = lambda replicas, held: None


POLICY = """
version: 1
name: runbook
scripts: [a, b, c, d]
analysis: {interval: 30s}
steps: [{weight: 10, hold: 5m}, {weight: 100}]
rules:
  - {name: errors, source: cloudflare, signal: errors_per_minute, window: 5m, above: 10, on_breach: rollback}
"""


def test_the_planner_sizes_the_buckets_and_plans_the_held_scripts_at_each_round() -> None:
    """Two live replicas: the buckets refill at half and the plan is the held scripts against
    half; a third replica joins: a third; one alone again: the whole, every script held."""
    clock = Clock()
    rest = TokenBucket(600, clock=clock)
    graphql = rest.sibling(200)
    metrics = Metrics(CollectorRegistry())
    planner = BudgetPlanner(load_settings({}), metrics, Health(clock))
    keeper = Keeper(live=2)
    planner.share_with(keeper, [rest, graphql])
    policy = parse_policy(POLICY)
    planner.watch([Watched(s, policy, live=s == "a") for s in policy.scripts])
    assert (rest.rate, graphql.rate) == pytest.approx((1.0, 100 / 300))
    keeper.on_share(2, {"a", "b", OUTBOX})
    current = planner.plan
    assert current is not None and current.token is not None
    assert (current.rest.limit, current.inputs.live, current.inputs.idle) == (300, 1, 1)
    assert current.token[0].limit == 600 and current.inputs.replicas == 2
    described = planner.describe()
    assert described is not None and described["replicas"] == 2
    assert described["rest"]["limit"] == 300 and described["token"]["rest"]["limit"] == 600
    assert described["graphql"]["limit"] == 100
    assert (
        metrics.registry.get_sample_value("coalmine_cloudflare_budget_limit", {"api": "rest"})
        == 300
    )
    assert (
        metrics.registry.get_sample_value("coalmine_cloudflare_budget_token_limit", {"api": "rest"})
        == 600
    )
    keeper.on_share(3, {"c"})
    assert rest.rate == pytest.approx(200 / 300)
    described = planner.describe()
    assert described is not None and described["graphql"]["limit"] == 66.7
    keeper.on_share(1, {"a", "b", "c", "d"})
    assert (rest.rate, rest.capacity, graphql.rate) == pytest.approx((2.0, 60.0, 200 / 300))
    current = planner.plan
    assert current is not None and current.rest.limit == 600
    assert current.inputs.live + current.inputs.idle == 4
    assert current.inputs.groups[0].window == 300.0  # its rows per query: the plan's pages
