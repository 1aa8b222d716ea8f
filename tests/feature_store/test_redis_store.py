"""The online state (Lua in a real Redis) against the offline fold of the same events."""

from __future__ import annotations

import random
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from clv.local_stack import LocalProcess, free_port, start_redis
from feature_store.events import ValidEvent
from feature_store.features import RETENTION_DAYS
from feature_store.offline import features_at, too_late_mask
from feature_store.redis_client import connect
from feature_store.redis_store import FeatureStore, decode_hash, user_key

from .streams import (
    MS_PER_DAY,
    _ev,
    as_frame,
    check_a_batch_after_one_not_applied_is_refused,
    messy_events,
    purchase,
)

pytestmark = pytest.mark.integration


async def _online(store: FeatureStore, users: list[str], as_of_day: int) -> pd.DataFrame:
    frames = [await store.features(u, as_of_day) for u in users]
    return pd.concat([f for f in frames if f is not None]).sort_index()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 17, 500])
async def test_online_equals_offline_under_duplicates_reordering_and_late_events(
    redis: Redis, seed: int, batch: int
) -> None:
    store = FeatureStore(redis)
    events = messy_events(seed, redated=0.05)
    late = []
    for i in range(0, len(events), batch):
        res = await store.apply(
            events[i : i + batch], group="g", progress={"orders:0": i}, now_ms=1
        )
        late.extend(events[i + j] for j in res.too_late)
    assert late, "the stream should hold events later than the retention"
    frame = as_frame(events)
    # The rejections are the offline rule's, however the stream is cut into batches
    flagged = frame[too_late_mask(frame, RETENTION_DAYS)]
    assert sorted((e.user_id, e.event_id) for e in late) == sorted(
        zip(flagged.user_id, flagged.event_id, strict=True)
    )
    latest = int(frame["day"].max())
    for as_of in (latest, latest + 3, latest + 40, latest + 400):
        offline = features_at(frame, as_of, late_after_days=RETENTION_DAYS).sort_index()
        online = await _online(store, list(offline.index), as_of)
        pd.testing.assert_frame_equal(online, offline, check_dtype=False)


async def test_a_copy_dated_otherwise_moves_no_latest_day_online_or_offline(
    redis: Redis,
) -> None:
    # A second copy of e1, dated past the retention, is a duplicate online: the user's latest
    # day stays put, and e2, dated ten days after e1, applies. Fails if the offline rule lets
    # the copy's day move the latest day (it then took e2 for late: 1 order against 2).
    store = FeatureStore(redis, prefix="copyday")
    day = 20_000
    events = [purchase(1, day), purchase(1, day + RETENTION_DAYS + 50), purchase(2, day + 10)]
    for e in events:
        await store.apply([e], group="g", progress={}, now_ms=1)
    frame = as_frame(events)
    assert not too_late_mask(frame, RETENTION_DAYS).any()
    for as_of in (day + RETENTION_DAYS + 50, day + RETENTION_DAYS + 60):
        offline = features_at(frame, as_of, late_after_days=RETENTION_DAYS)
        pd.testing.assert_frame_equal(
            await _online(store, ["u"], as_of), offline, check_dtype=False
        )


async def test_redelivered_batch_changes_nothing(redis: Redis) -> None:
    store = FeatureStore(redis)
    events = messy_events(7, users=5)
    first = await store.apply(events, group="g", progress={"orders:0": 10}, now_ms=1)
    before = {k: await redis.hgetall(k) for k in await redis.keys("clv:{*")}
    again = await store.apply(events, group="g", progress={"orders:0": 10}, now_ms=2)
    assert first.applied > 0
    assert first.applied + first.duplicates + len(first.too_late) == len(events)
    assert again.applied == 0
    assert again.duplicates + len(again.too_late) == len(events)
    after = {k: await redis.hgetall(k) for k in await redis.keys("clv:{*")}
    assert after == before


async def test_missing_names_the_users_without_state_repeated_or_not(redis: Redis) -> None:
    store = FeatureStore(redis)
    await store.apply(
        [purchase(1, 9000, "a"), purchase(2, 9000, "b")], group="g", progress={}, now_ms=1
    )
    assert await store.missing([]) == []
    assert await store.missing(["a", "b", "a"]) == []
    # a repeated known user does not make up for an unknown one in the count
    assert await store.missing(["a", "a", "x"]) == ["x"]
    assert await store.missing(["x", "b", "y", "x"]) == ["x", "y", "x"]
    await store.forget("a")
    assert await store.missing(["a", "b"]) == ["a"]


async def test_progress_only_moves_forward(redis: Redis) -> None:
    store = FeatureStore(redis)
    await store.apply([], group="g", progress={"orders:0": 10, "orders:1": 3}, now_ms=1)
    await store.apply([], group="g", progress={"orders:0": 4}, now_ms=1)
    assert await store.progress("g") == {"orders:0": 10, "orders:1": 3}


async def test_state_older_than_the_longest_window_is_dropped(redis: Redis) -> None:
    store = FeatureStore(redis)
    events = messy_events(11, users=1, per_user=200, span_days=1500)
    await store.apply(events, group="g", progress={}, now_ms=1)
    key = store.user_key(events[0].user_id)
    state = decode_hash(await redis.hgetall(key))
    latest = state["latest_day"]
    assert latest == max(e.day for e in events)
    assert state["days"] and min(state["days"]) > latest - RETENTION_DAYS
    dedup = state["dedup"]
    assert dedup and min(dedup.values()) > latest - RETENTION_DAYS
    assert len(dedup) < len({e.event_id for e in events})


async def test_memory_per_user_stays_bounded_by_the_window(redis: Redis) -> None:
    """Four years of daily orders cost no more than the last year of them."""
    store = FeatureStore(redis)
    one_year = messy_events(3, users=1, per_user=365, span_days=365)
    four_years = messy_events(3, users=1, per_user=4 * 365, span_days=4 * 365)
    await store.apply(one_year, group="g", progress={}, now_ms=1)
    small = await redis.memory_usage(store.user_key(one_year[0].user_id))
    await redis.flushdb()
    await store.apply(four_years, group="g", progress={}, now_ms=1)
    big = await redis.memory_usage(store.user_key(four_years[0].user_id))
    assert big < 1.5 * small


async def test_a_redelivered_event_is_a_duplicate_not_too_late(redis: Redis) -> None:
    """After a crash before the commit the batch comes again: nothing is dead-lettered."""
    store = FeatureStore(redis)
    old = _ev("x1", "purchase", "u", "o1", 1000, 1000 * MS_PER_DAY)
    first = await store.apply([old], group="g", progress={}, now_ms=1)
    newer = _ev("x2", "purchase", "u", "o2", 500, 1300 * MS_PER_DAY)
    batch = [old, newer]
    once = await store.apply(batch, group="g", progress={}, now_ms=2)
    again = await store.apply(batch, group="g", progress={}, now_ms=3)
    assert (first.applied, once.applied, once.duplicates) == (1, 1, 1)
    assert (again.applied, again.duplicates, again.too_late) == (0, 2, [])


async def test_the_same_event_id_under_two_users_is_two_events(redis: Redis) -> None:
    store = FeatureStore(redis)
    events = [
        _ev("e1", "purchase", "a", "o1", 1000, 20000 * MS_PER_DAY),
        _ev("e1", "purchase", "b", "o1", 1000, 20000 * MS_PER_DAY),
    ]
    await store.apply(events, group="g", progress={}, now_ms=1)
    offline = features_at(as_frame(events), 20000, late_after_days=RETENTION_DAYS)
    for user in ("a", "b"):
        online = await store.features(user, 20000)
        assert online is not None
        pd.testing.assert_frame_equal(online, offline.loc[[user]], check_dtype=False)


async def test_the_too_late_edge_is_the_retention_to_the_day(redis: Redis) -> None:
    store = FeatureStore(redis)
    newest = _ev("n", "purchase", "u", "o1", 100, 1365 * MS_PER_DAY)
    await store.apply([newest], group="g", progress={}, now_ms=1)
    at_edge = _ev("e", "purchase", "u", "o2", 100, (1365 - RETENTION_DAYS) * MS_PER_DAY)
    inside = _ev("i", "purchase", "u", "o3", 100, (1366 - RETENTION_DAYS) * MS_PER_DAY)
    result = await store.apply([at_edge, inside], group="g", progress={}, now_ms=2)
    assert (result.applied, result.too_late) == (1, [0])


async def test_a_day_that_slides_out_of_the_window_is_dropped_on_that_day(redis: Redis) -> None:
    """Nothing is kept past the retention: a kept bucket would also make every later batch of
    the user rescan the whole hash (its oldest day stays at or before the cutoff)."""
    store = FeatureStore(redis)
    first = _ev("a", "purchase", "u", "o1", 100, 1000 * MS_PER_DAY)
    await store.apply([first], group="g", progress={}, now_ms=1)
    later = _ev("b", "purchase", "u", "o2", 100, (1000 + RETENTION_DAYS) * MS_PER_DAY)
    await store.apply([later], group="g", progress={}, now_ms=2)
    state = decode_hash(await redis.hgetall(store.user_key("u")))
    assert list(state["days"]) == [1000 + RETENTION_DAYS]
    assert list(state["dedup"]) == ["b"]
    assert state["oldest_day"] == 1000 + RETENTION_DAYS


async def test_the_event_clock_never_goes_back(redis: Redis) -> None:
    store = FeatureStore(redis)
    await store.apply(
        [_ev("a", "purchase", "u", "o1", 1, 2000 * MS_PER_DAY)], group="g", progress={}, now_ms=1
    )
    await store.apply(
        [_ev("b", "purchase", "v", "o2", 1, 1000 * MS_PER_DAY)], group="g", progress={}, now_ms=2
    )
    assert await store.event_clock_ms("g") == 2000 * MS_PER_DAY


async def test_features_before_the_latest_event_are_refused_online(redis: Redis) -> None:
    """The online state no longer knows the past: earlier dates are the event log's job."""
    from clv.errors import StoreError
    from feature_store.redis_store import online_features

    store = FeatureStore(redis)
    await store.apply(
        [_ev("a", "purchase", "u", "o1", 100, 1000 * MS_PER_DAY)], group="g", progress={}, now_ms=1
    )
    stored = await store.read_state("u")
    assert stored is not None
    assert online_features(stored.state, 1000).loc["u", "orders_total"] == 1
    with pytest.raises(StoreError, match="is before the user's latest event day 1000"):
        online_features(stored.state, 999)


async def _online_equals_offline(
    store: FeatureStore, events: list, user: str, as_of: int
) -> pd.Series:
    online = await store.features(user, as_of)
    assert online is not None
    offline = features_at(as_frame(events), as_of, late_after_days=RETENTION_DAYS)
    pd.testing.assert_frame_equal(online, offline.loc[[user]], check_dtype=False)
    return online.loc[user]


# Fails if RETENTION_DAYS = max(WINDOWS) - 1: the retention must cover the longest
# window; the online/offline comparisons use the same constant, so they cannot see it.
async def test_an_order_364_days_before_the_as_of_day_counts_in_the_365_day_window_online(
    redis: Redis,
) -> None:
    store = FeatureStore(redis)
    old = _ev("a", "purchase", "u", "o1", 1000, 1000 * MS_PER_DAY)
    new = _ev("b", "purchase", "u", "o2", 500, 1364 * MS_PER_DAY)
    for ev in (old, new):
        await store.apply([ev], group="g", progress={}, now_ms=1)
    f = await store.features("u", 1364)
    assert f is not None
    assert f.loc["u", "orders_365d"] == 2 and f.loc["u", "revenue_365d"] == 15.0
    assert f.loc["u", "orders_90d"] == 1
    f = await store.features("u", 1365)  # a day later the old order has left the window
    assert f is not None and f.loc["u", "orders_365d"] == 1


# Fails if a copy's fate depends on where the batches end: a copy of an event, in the same
# batch that moved the event's own day out of the window, was a duplicate there, but too late
# in a batch of its own (and a copy re-dated inside the window applied only in its own).
@pytest.mark.parametrize("copy_day", [1000, 1000 + RETENTION_DAYS - 10])
async def test_a_copy_after_its_entry_left_the_window_is_judged_alike_in_any_batch(
    redis: Redis, copy_day: int
) -> None:
    x = _ev("x", "purchase", "u", "o1", 1000, 1000 * MS_PER_DAY)
    y = _ev("y", "purchase", "u", "o2", 500, (1000 + RETENTION_DAYS) * MS_PER_DAY)
    copy = _ev("x", "purchase", "u", "o1", 1000, copy_day * MS_PER_DAY)
    late = copy_day == 1000
    for i, batches in enumerate(([[x, y, copy]], [[x], [y], [copy]], [[x], [y, copy]])):
        store = FeatureStore(redis, prefix=f"alike{copy_day}:{i}")
        results = [await store.apply(b, group="g", progress={}, now_ms=1) for b in batches]
        assert sum(r.applied for r in results) == (2 if late else 3)
        assert sum(r.duplicates for r in results) == 0
        assert sum(len(r.too_late) for r in results) == late
        f = await store.features("u")
        assert f is not None and f.loc["u", "orders_total"] == (2 if late else 3)
    frame = as_frame([x, y, copy])
    assert list(too_late_mask(frame, RETENTION_DAYS)) == [False, False, late]
    as_of = 1000 + RETENTION_DAYS
    pd.testing.assert_frame_equal(
        await _online(store, ["u"], as_of),
        features_at(frame, as_of, late_after_days=RETENTION_DAYS),
        check_dtype=False,
    )


# Fails if the oldest kept day is not lowered by an older day arriving out of order:
# that day's bucket and dedup id would then outlive the window.
async def test_an_older_day_arriving_out_of_order_is_dropped_when_it_leaves_the_window(
    redis: Redis,
) -> None:
    store = FeatureStore(redis)
    for eid, day in (("a", 1100), ("b", 1000), ("c", 1000 + RETENTION_DAYS)):
        ev = _ev(eid, "purchase", "u", f"o-{eid}", 100, day * MS_PER_DAY)
        await store.apply([ev], group="g", progress={}, now_ms=1)
    state = decode_hash(await redis.hgetall(store.user_key("u")))
    assert sorted(state["days"]) == [1100, 1000 + RETENTION_DAYS]
    assert sorted(state["dedup"]) == ["a", "c"]
    assert state["oldest_day"] == 1100
    assert state["orders"] == 3 and state["purchase_days"] == 3


# Fails if the purchase flag sent to Lua comes from the sign of cents: a refund of 0.00 is no
# order and no purchase day.
async def test_a_refund_of_nothing_is_not_an_order_online_as_offline(redis: Redis) -> None:
    store = FeatureStore(redis)
    events = [
        _ev("p", "purchase", "u", "o1", 1000, 1000 * MS_PER_DAY),
        _ev("r", "refund", "u", "o1", 0, 1001 * MS_PER_DAY + 5),
    ]
    await store.apply(events, group="g", progress={}, now_ms=1)
    f = await _online_equals_offline(store, events, "u", 1001)
    assert f["orders_total"] == 1 and f["purchase_days"] == 1
    assert f["last_order_at"] == "1972-09-27T00:00:00Z"


# Fails if the batch's event clock is taken from its last event, not its largest time.
async def test_the_event_clock_is_the_largest_time_in_a_batch_whatever_its_order(
    redis: Redis,
) -> None:
    store = FeatureStore(redis)
    later = _ev("a", "purchase", "u", "o1", 1, 2000 * MS_PER_DAY)
    earlier = _ev("b", "purchase", "v", "o2", 1, 1000 * MS_PER_DAY)
    await store.apply([later, earlier], group="g", progress={"orders:0": 1}, now_ms=1)
    assert await store.event_clock_ms("g") == 2000 * MS_PER_DAY


# Fails if updated_ms is read from another header field: "features updated at" is the
# wall clock of the last change, and a batch that changes nothing leaves it.
async def test_the_state_records_when_it_last_changed(redis: Redis) -> None:
    store = FeatureStore(redis)
    ev = _ev("a", "purchase", "u", "o1", 100, 1000 * MS_PER_DAY)
    await store.apply([ev], group="g", progress={}, now_ms=1_700_000_000_123)
    await store.apply([ev], group="g", progress={}, now_ms=1_700_000_999_000)  # a duplicate
    stored = await store.read_state("u")
    assert stored is not None and stored.updated_ms == 1_700_000_000_123


# Fails if progress() returns the event_clock field as if it were a partition.
async def test_progress_lists_partitions_only_not_the_event_clock(redis: Redis) -> None:
    store = FeatureStore(redis)
    ev = _ev("a", "purchase", "u", "o1", 100, 1000 * MS_PER_DAY)
    await store.apply([ev], group="g", progress={"orders:0": 5}, now_ms=1)
    assert await store.progress("g") == {"orders:0": 5}
    assert await store.event_clock_ms("g") == 1000 * MS_PER_DAY


# Fails if every id is used as its own hash tag: an id with "}" would give an empty or cut
# tag, and then the user's keys under different prefixes (state, scores, alerts) would land in
# different Redis Cluster slots.
@pytest.mark.parametrize("uid", ["}", "}0{x}", "a}b", "{x}"])
def test_a_user_id_with_a_closing_brace_keeps_all_its_keys_in_one_slot(uid: str) -> None:
    slots = {key_slot(user_key(prefix, uid).encode()) for prefix in ("clv", "score", "alert:x")}
    assert len(slots) == 1
    assert user_key("clv", uid) != user_key("clv", uid + "}")


# Was a defect (avg_repeat_value), online: refunds dated before the first purchase day, a first
# purchase day that moves earlier when an older purchase arrives late, and a refund on the
# first day, in every batching: online equals offline, and the hand-checked value.
@pytest.mark.parametrize("batch", [1, 2, 6])
async def test_refunds_dated_before_the_first_purchase_are_no_repeat_revenue_online_as_offline(
    redis: Redis, batch: int
) -> None:
    store = FeatureStore(redis)
    events = [
        _ev("r0", "refund", "u", "o0", -700, 95 * MS_PER_DAY),  # before any purchase
        _ev("p2", "purchase", "u", "o2", 2000, 110 * MS_PER_DAY),
        _ev("p3", "purchase", "u", "o3", 3000, 120 * MS_PER_DAY),
        _ev("r1", "refund", "u", "o9", -1000, 100 * MS_PER_DAY),  # before the first purchase
        _ev("p1", "purchase", "u", "o1", 4000, 105 * MS_PER_DAY),  # now the first purchase
        _ev("r2", "refund", "u", "o1", -500, 105 * MS_PER_DAY + 1),  # on the first day
    ]
    for i in range(0, len(events), batch):
        await store.apply(events[i : i + batch], group="g", progress={}, now_ms=1)
    f = await _online_equals_offline(store, events, "u", 120)
    assert f["frequency"] == 2 and f["revenue_total"] == 68.0
    assert f["avg_repeat_value"] == 25.0  # (20 + 30) / 2: no refund is on a repeat day


def _early_refunds_and_late_purchases(seed: int, users: int = 25) -> list[ValidEvent]:
    """Random users' events with refunds dated anywhere (also before any purchase), older
    purchases arriving late (the first purchase day moving earlier), copies, in any order."""
    rng = random.Random(seed)
    base = 20_000 * MS_PER_DAY
    out = []
    for u in range(users):
        uid = f"u{u}"
        span = rng.choice([30, 200, 500, 900])
        evs = []
        for k in range(rng.randint(1, 25)):
            ts = base + rng.randint(0, span * MS_PER_DAY)
            r = rng.random()
            if r < 0.35:  # a refund, anywhere (also before any purchase)
                evs.append(_ev(f"r{k}", "refund", uid, f"x{k}", -rng.randint(0, 9000), ts))
            else:
                evs.append(_ev(f"p{k}", "purchase", uid, f"o{k}", rng.randint(0, 9000), ts))
        mode = rng.random()
        if mode < 0.3:
            rng.shuffle(evs)  # fully out of order
        elif mode < 0.6:
            evs.sort(key=lambda e: -e.ts_ms)  # newest first: the first day keeps moving earlier
        else:
            evs.sort(key=lambda e: e.ts_ms)
            for i in range(len(evs) - 1):
                if rng.random() < 0.3:
                    evs[i], evs[i + 1] = evs[i + 1], evs[i]
        evs += [e for e in evs if rng.random() < 0.15]  # redelivered copies
        out.append(evs)
    # interleave users, keeping each user's order
    merged = []
    while any(out):
        lst = rng.choice([o for o in out if o])
        merged.append(lst.pop(0))
    return merged


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("batch", [1, 11, 1000])
async def test_random_online_equals_offline_with_early_refunds_and_late_purchases(
    redis: Redis, seed: int, batch: int
) -> None:
    store = FeatureStore(redis)
    events = _early_refunds_and_late_purchases(seed)
    for i in range(0, len(events), batch):
        await store.apply(events[i : i + batch], group="g", progress={}, now_ms=1)
    frame = as_frame(events)
    latest = int(frame["day"].max())
    for as_of in (latest, latest + 200):
        offline = features_at(frame, as_of, late_after_days=RETENTION_DAYS).sort_index()
        online = await _online(store, list(offline.index), as_of)
        # (a refund-only user has no order time: None online, a missing string offline)
        pd.testing.assert_frame_equal(_nulls_as_none(online), _nulls_as_none(offline))


def _nulls_as_none(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype(object).where(frame.notna(), None)


@pytest.mark.parametrize(
    ("url", "timeouts"),
    [
        ("redis://127.0.0.1:1/0", (10.0, 5.0)),
        ("unix:///tmp/no.sock", (10.0, 5.0)),
        ("redis://127.0.0.1:1/0?socket_timeout=30", (30.0, 5.0)),
        ("redis://127.0.0.1:1/0?socket_connect_timeout=2", (10.0, 2.0)),
    ],
)
def test_every_redis_client_waits_a_bounded_time_unless_the_url_says_otherwise(
    url: str, timeouts: tuple[float, float]
) -> None:
    # Fails if a connection may wait forever (redis-py before 8.0 did by default: a Redis that
    # hangs without closing would hold a consumer silently, and no retry would start), or only
    # redis-py 8's 5 s for an answer, which a snapshot's fork can outlast.
    conn = connect(url).connection_pool.make_connection()  # type: ignore[union-attr]
    assert (conn.socket_timeout, conn.socket_connect_timeout) == timeouts


def test_a_redis_cluster_client_waits_a_bounded_time_too() -> None:
    client = connect("redis+cluster://127.0.0.1:1?socket_connect_timeout=2")
    kwargs = client.nodes_manager.connection_kwargs  # type: ignore[union-attr]
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (10.0, 2.0)


def test_a_redis_that_is_away_is_told_apart_from_one_that_refuses_the_batch() -> None:
    from redis.exceptions import (
        AuthenticationError,
        BusyLoadingError,
        ClusterCrossSlotError,
        ClusterDownError,
        ClusterError,
        MasterDownError,
        ReadOnlyError,
        RedisClusterException,
        ResponseError,
        TryAgainError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from clv.errors import StoreError, StoreUnavailable
    from feature_store.redis_store import _apply_failed

    away = [
        RedisConnectionError("refused"),
        RedisTimeoutError("no answer"),
        BusyLoadingError("loading"),
        ReadOnlyError("replica"),
        ConnectionError("a call was cancelled"),
        ResponseError("BUSY Redis is busy running a script"),
        ResponseError("NOREPLICAS Not enough good replicas to write."),
        ResponseError("CLVORDER the batch before this one on t:0 (to offset 9) was not applied"),
        ClusterDownError("The cluster is down"),
        MasterDownError("no master"),
        TryAgainError("migrating"),
        ClusterError("TTL exhausted."),
        RedisClusterException("Redis Cluster cannot be connected. Please provide at least one"),
        RedisClusterException("All slots are not covered after query all startup_nodes."),
    ]
    # Fails if an outage stops the consumer (not retried), or if a refusal that no wait mends
    # (the script's own error, out of memory, wrong credentials) is retried for minutes.
    refused = [
        ResponseError("ERR user_script:1: bad"),
        ResponseError("OOM command not allowed"),
        AuthenticationError("invalid username-password pair"),
        ClusterCrossSlotError("Keys in request don't hash to the same slot"),
        RedisClusterException("No way to dispatch this command to Redis Cluster."),
    ]
    assert [type(_apply_failed(e)) for e in away] == [StoreUnavailable] * len(away)
    assert [type(_apply_failed(e)) for e in refused] == [StoreError] * len(refused)


async def test_a_batch_is_refused_unapplied_when_the_one_before_it_was_not_applied(
    redis: Redis,
) -> None:
    # Fails if a batch whose predecessor never reached Redis is applied anyway.
    await check_a_batch_after_one_not_applied_is_refused(FeatureStore(redis, prefix="order"))


async def test_a_replica_promoted_between_two_pipelined_batches_applies_neither_ahead(
    own_redis: tuple[LocalProcess, Redis], tmp_path: Path
) -> None:
    # The failover case: batch N reaches a replica (READONLY), the replica is promoted before
    # N+1 arrives. Fails if N+1 is applied: retried, N's event would then be too late against
    # N+1's (a year and more later), dead-lettered, and online would differ from offline.
    from clv.errors import StoreUnavailable

    _, client = own_redis
    primary = start_redis(free_port(), tmp_path / "primary")
    try:
        where = urlparse(primary.address)
        await client.execute_command("REPLICAOF", where.hostname, where.port)
        store = FeatureStore(client, prefix="promo")
        n, n1 = [purchase(1, 20_000)], [purchase(2, 20_000 + RETENTION_DAYS + 5)]
        first = await store.submit(n, group="g", progress={"t:0": 0}, now_ms=0)
        with pytest.raises(StoreUnavailable):
            await first
        await client.execute_command("REPLICAOF", "NO", "ONE")
        second = await store.submit(n1, group="g", progress={"t:0": 1}, now_ms=0, after={"t:0": 0})
        with pytest.raises(StoreUnavailable, match="CLVORDER"):
            await second
        # The retry, as the consumer makes it: from the commit, in order.
        await store.apply(n, group="g", progress={"t:0": 0}, now_ms=0)
        assert (await store.apply(n1, group="g", progress={"t:0": 1}, now_ms=0)).too_late == []
        state = await store.read_state("u")
        assert state is not None and int(state.state.orders_total[0]) == 2
    finally:
        primary.stop()
