"""What the scorer reads of the feature store: every user (SCAN), many states at once, the
change marks; against a real Redis."""

from __future__ import annotations

import pandas as pd
import pytest
from redis.asyncio import Redis

from feature_store.features import compute_features
from feature_store.redis_store import _HEADER, FeatureStore, online_features
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
    read = await store.read_states(asked)
    assert [asked[i] for i in read.known] == USERS[::-1]  # the unknown one left out
    together = compute_features(read.state, 9100)
    for k, u in enumerate(USERS[::-1]):
        alone = await store.read_state(u)
        assert alone is not None
        pd.testing.assert_frame_equal(together.loc[[u]], online_features(alone.state, 9100))
        assert read.digests[k] == alone.digest
    assert len(set(read.digests)) == len(USERS)


async def test_the_state_digest_changes_with_the_features_not_with_a_redelivery(
    redis: Redis,
) -> None:
    store = await _store(redis)
    before = await store.read_state("plain")
    assert before is not None
    again = _ev("plain-0", "purchase", "plain", "o0", 1000, 9000 * MS_PER_DAY)
    await store.apply([again], group="g", progress={"orders:0": 2}, now_ms=5)  # a duplicate
    same = await store.read_state("plain")
    assert same is not None and same.digest == before.digest
    late = _ev("plain-late", "refund", "plain", "o0", -300, 8990 * MS_PER_DAY)  # reordered
    await store.apply([late], group="g", progress={"orders:0": 3}, now_ms=0)  # the same ms
    after = await store.read_state("plain")
    assert after is not None and after.digest != before.digest


async def test_the_state_digest_covers_the_header_and_each_day_record_not_the_seen_ids(
    redis: Redis,
) -> None:
    # Each field written directly: the digest is of what compute_features reads, all of it.
    store = await _store(redis)
    key = store.user_key("b}c")  # purchases on two days
    raw = await redis.hgetall(key)
    days = sorted(k for k in raw if k[:1] in (b"o", b"v"))
    assert len(days) == 4 and b"h" in raw

    async def digest() -> str:
        stored = await store.read_state("b}c")
        assert stored is not None
        return stored.digest

    first = await digest()
    await redis.hset(key, "#another-event-id", 1)  # seen ids: not features
    assert await digest() == first
    await redis.hdel(key, "#another-event-id")
    changed = set()
    for field in [b"h", *days]:
        if field == b"h":  # the last change's time, a millisecond later
            header = list(_HEADER.unpack(raw[b"h"]))
            header[8] += 1
            await redis.hset(key, field, _HEADER.pack(*header))
        else:
            await redis.hset(key, field, int(raw[field]) + 1)
        changed.add(await digest())
        await redis.hset(key, field, raw[field])
        assert await digest() == first
    assert len(changed) == 5 and first not in changed


async def test_change_marks_are_taken_once_and_erasure_forgets_a_user(redis: Redis) -> None:
    store = await _store(redis)
    await store.mark_changed(["plain", "b}c", "plain"])
    assert await store.take_changed(10) == ["b}c", "plain"]
    assert await store.take_changed(10) == []
    await store.mark_changed(["x*y"])
    assert await store.forget("x*y") is True
    assert await store.read_state("x*y") is None and await store.take_changed(10) == []
    assert await store.forget("x*y") is False
