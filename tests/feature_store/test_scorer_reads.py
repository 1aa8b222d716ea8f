"""What the scorer reads of the feature store: every user (SCAN), many states at once, the
change marks; against a real Redis."""

from __future__ import annotations

import pandas as pd
import pytest
from redis.asyncio import Redis

from feature_store.features import compute_features
from feature_store.redis_store import FeatureStore, online_features
from tests.feature_store.streams import MS_PER_DAY, _ev

pytestmark = pytest.mark.integration

# ids a glob or the hash tag could trip over
USERS = ["plain", "b}c", "x*y", "[q]", "a?b", "back\\slash", "{brace", "ünï"]


async def _store(redis: Redis) -> FeatureStore:
    store = FeatureStore(redis, prefix="scan")
    events = [
        _ev(f"{u}-{i}", "purchase", u, f"o{i}", 1000 + 100 * i + j, (9000 + 3 * i + j) * MS_PER_DAY)
        for j, u in enumerate(USERS)
        for i in range(j + 1)
    ]
    await store.apply(events, group="g", progress={"orders:0": 1}, now_ms=0)
    await redis.set("scan:progressish", "not a user")  # another key of the prefix
    return store


async def test_scan_finds_every_user_whatever_their_id(redis: Redis) -> None:
    store = await _store(redis)
    found = [u async for chunk in store.scan_users(count=3) for u in chunk]
    assert sorted(found) == sorted(USERS)


async def test_many_states_read_at_once_give_each_users_own_features(redis: Redis) -> None:
    store = await _store(redis)
    asked = [*USERS[::-1], "nobody"]
    state, positions = await store.read_states(asked)
    assert [asked[i] for i in positions] == USERS[::-1]  # the unknown one left out
    together = compute_features(state, 9100)
    for u in USERS:
        alone = await store.read_state(u)
        assert alone is not None
        pd.testing.assert_frame_equal(together.loc[[u]], online_features(alone.state, 9100))


async def test_change_marks_are_taken_once_and_erasure_forgets_a_user(redis: Redis) -> None:
    store = await _store(redis)
    await store.mark_changed(["plain", "b}c", "plain"])
    assert await store.take_changed(10) == ["b}c", "plain"]
    assert await store.take_changed(10) == []
    await store.mark_changed(["x*y"])
    assert await store.forget("x*y") is True
    assert await store.read_state("x*y") is None and await store.take_changed(10) == []
    assert await store.forget("x*y") is False
