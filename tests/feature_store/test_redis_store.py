"""The online state (Lua in a real Redis) against the offline fold of the same events."""

from __future__ import annotations

import pandas as pd
import pytest
from redis.asyncio import Redis

from feature_store.features import RETENTION_DAYS
from feature_store.offline import features_at, too_late_mask
from feature_store.redis_store import FeatureStore, decode_hash

from .streams import MS_PER_DAY, _ev, as_frame, messy_events

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
    events = messy_events(seed)
    late = []
    for i in range(0, len(events), batch):
        res = await store.apply(
            events[i : i + batch], group="g", progress={"orders:0": i}, now_ms=1
        )
        late.extend(events[i + j] for j in res.too_late)
    assert late, "the stream should hold events later than the retention"
    frame = as_frame(events)
    # Every rejection is one the offline rule makes too; the rule may flag more: copies of
    # events still in the dedup set count online as duplicates (neither counts them).
    flagged = frame[too_late_mask(frame, RETENTION_DAYS)]
    assert {(e.user_id, e.event_id) for e in late} <= set(
        zip(flagged.user_id, flagged.event_id, strict=True)
    )
    latest = int(frame["day"].max())
    for as_of in (latest, latest + 3, latest + 40, latest + 400):
        offline = features_at(frame, as_of, late_after_days=RETENTION_DAYS).sort_index()
        online = await _online(store, list(offline.index), as_of)
        pd.testing.assert_frame_equal(online, offline, check_dtype=False)


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
