"""The same online state on a real 3-node Redis Cluster: every user's keys share one slot."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pandas as pd
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from clv.errors import StoreUnavailable
from clv.local_stack import LocalProcess, free_port, port_open, start_redis
from feature_store.features import RETENTION_DAYS
from feature_store.offline import features_at
from feature_store.redis_client import connect
from feature_store.redis_store import FeatureStore

from .streams import (
    MS_PER_DAY,
    _ev,
    as_frame,
    check_a_batch_after_one_not_applied_is_refused,
    messy_events,
    purchase,
)

pytestmark = pytest.mark.integration


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535 and not port_open("127.0.0.1", port + 10000):
            return port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    nodes: list[LocalProcess] = []
    ports = [cluster_port() for _ in range(3)]
    try:
        for port in ports:
            work = tmp_path_factory.mktemp(f"cluster-{port}")
            nodes.append(
                start_redis(
                    port,
                    work,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(work / "nodes.conf"),
                )
            )
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in ports],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for _ in range(100):
            out = subprocess.run(
                ["redis-cli", "-p", str(ports[0]), "cluster", "info"],
                capture_output=True,
                text=True,
            ).stdout
            if "cluster_state:ok" in out:
                break
            time.sleep(0.1)
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for n in nodes:
            n.stop()


@pytest.fixture
async def cluster_client(cluster: str) -> AsyncIterator[RedisCluster]:
    client = connect(cluster)
    assert isinstance(client, RedisCluster)
    yield client
    await client.aclose()


async def test_online_equals_offline_on_redis_cluster(cluster_client: RedisCluster) -> None:
    store = FeatureStore(cluster_client, prefix="cl")
    events = messy_events(17, users=50, per_user=20)
    slots = {cluster_client.keyslot(store.user_key(e.user_id)) for e in events}
    assert len(slots) > 10, "users should spread over many slots (and nodes)"
    for i in range(0, len(events), 300):
        await store.apply(events[i : i + 300], group="g", progress={"orders:0": i}, now_ms=1)
    frame = as_frame(events)
    as_of = int(frame["day"].max())
    offline = features_at(frame, as_of, late_after_days=RETENTION_DAYS).sort_index()
    online = pd.concat([await store.features(u, as_of) for u in offline.index]).sort_index()
    pd.testing.assert_frame_equal(online, offline, check_dtype=False)
    assert (await store.progress("g"))["orders:0"] == (len(events) - 1) // 300 * 300
    again = await store.apply(events, group="g", progress={}, now_ms=2)
    assert again.applied == 0


async def test_scores_and_answers_are_written_in_the_users_slot_only_while_it_is_known(
    cluster_client: RedisCluster,
) -> None:
    from service.scores import ANSWER_FEATURES, ScoreStore, StoredAnswer
    from service.scoring import SEGMENTS

    store = FeatureStore(cluster_client, prefix="sc")
    scores = ScoreStore(cluster_client, prefix="sc")
    users = [f"u{i}" for i in range(20)] + ["a}b", "{x}"]
    known = users[:-1]  # "{x}": no features, so nothing is written for it
    events = [purchase(i, 9000, u) for i, u in enumerate(known)]
    await store.apply(events, group="g", progress={"orders:0": 1}, now_ms=1)
    fields = {
        "clv": "1.00", "expected_orders": "0.1", "p_alive": "0.5", "churn_risk": "0.9",
        "segment": "lost", "model_version": "v", "as_of": "1994-08-23", "scored_at": "t",
    }  # fmt: skip
    answer = StoredAnswer.of(
        fields,
        horizon_days=365,
        state="s",
        features=dict.fromkeys(ANSWER_FEATURES, 0),
        explanation=[],
    )
    await scores.write([(u, fields) for u in users], dict.fromkeys(users, answer))
    assert len({cluster_client.keyslot(scores.answer_key(u)) for u in users}) > 5
    stored = await scores.read(users)
    answers = [
        await scores.answer(u, model_version="v", horizon_days=365, as_of="1994-08-23", state="s")
        for u in users
    ]
    assert [u for u, x in zip(users, stored, strict=True) if x is not None] == known
    assert [u for u, x in zip(users, answers, strict=True) if x is not None] == known
    assert await cluster_client.zcard(scores.top_key()) == len(known)  # "{x}" is not ranked
    # half of them move to another segment: the rankings share one slot, so a batch's
    # ranking is one script for each chunk there too
    tops = [scores.top_key(seg) for seg in (None, *SEGMENTS)]
    assert len({cluster_client.keyslot(k) for k in tops}) == 1
    moved = {**fields, "clv": "2.00", "segment": "at_risk"}
    await scores.write([(u, moved) for u in known[::2]], dict.fromkeys(known[::2], answer))
    assert await cluster_client.zcard(scores.top_key("at_risk")) == len(known[::2])
    assert await cluster_client.zcard(scores.top_key("lost")) == len(known[1::2])
    assert await cluster_client.zscore(scores.top_key(), known[0]) == 2.0
    # rankings under their names up to 1f1e89c, each in a slot of its own: adopted, deleted
    legacy = [scores.legacy_top_key(seg) for seg in (None, "lost", "new")]
    assert len({cluster_client.keyslot(k) for k in legacy}) == 3
    for key in legacy[:2]:
        await cluster_client.zadd(key, {known[0]: 9.0, "old": 3.0})
    await cluster_client.zadd(legacy[2], {"older": 4.0})
    assert await scores.adopt_legacy_rankings() == 2  # known[0] keeps its current ranking
    assert await cluster_client.zscore(scores.top_key("lost"), "old") == 3.0
    assert await cluster_client.zscore(scores.top_key("new"), "older") == 4.0
    assert await cluster_client.zscore(scores.top_key(), known[0]) == 2.0
    assert not any([await cluster_client.exists(k) for k in legacy])


async def test_the_rankings_check_takes_users_without_features_off_every_ranking(
    cluster_client: RedisCluster,
) -> None:
    # What a sweep's check leaves on a cluster: ZSCAN over pages (over 128 members, so not
    # one reply), removals as it goes, a ranking of everyone and one of a segment that
    # disagree (their writes interleaved with an erasure's removals on two nodes).
    from service.scorer import prune_rankings
    from service.scores import ScoreStore

    store = FeatureStore(cluster_client, prefix="pr")
    scores = ScoreStore(cluster_client, prefix="pr")
    known = [f"k{i}" for i in range(150)]
    await store.apply(
        [purchase(i, 9000, u) for i, u in enumerate(known)], group="g", progress={}, now_ms=1
    )
    ghosts = [f"x{i}" for i in range(12)]
    await cluster_client.zadd(scores.top_key(), dict.fromkeys(known + ghosts[:8], 1.0))
    await cluster_client.zadd(scores.top_key("lost"), dict.fromkeys(known[:100] + ghosts[4:], 1.0))
    assert await prune_rankings(store, scores, 7, asyncio.Event()) == len(ghosts)
    assert {m.decode() for m in await cluster_client.zrange(scores.top_key(), 0, -1)} == set(known)
    assert {m.decode() for m in await cluster_client.zrange(scores.top_key("lost"), 0, -1)} == set(
        known[:100]
    )
    stop = asyncio.Event()
    stop.set()
    assert await prune_rankings(store, scores, 7, stop) is None  # cut short: said so


async def test_too_late_positions_are_those_of_a_single_redis(
    cluster_client: RedisCluster, redis: Redis
) -> None:
    """The positions index the batch as given, also when one event object appears twice."""
    day0 = 20_000 * MS_PER_DAY
    recent = _ev("recent", "purchase", "late-user", "o1", 1_000, day0 + 400 * MS_PER_DAY)
    old = _ev("old", "purchase", "late-user", "o2", 2_000, day0)  # before the retention
    others = [_ev(f"e{i}", "purchase", f"user-{i}", f"o{i}", 500, day0) for i in range(6)]
    batch = [recent, others[0], old, others[1], others[2], old, *others[3:]]
    single = await FeatureStore(redis, prefix="tl").apply(batch, group="g", progress={}, now_ms=1)
    clustered = await FeatureStore(cluster_client, prefix="tl").apply(
        batch, group="g", progress={}, now_ms=1
    )
    assert single.too_late == clustered.too_late == [2, 5]
    assert (single.applied, single.duplicates) == (clustered.applied, clustered.duplicates)


async def test_a_batch_is_refused_on_a_cluster_when_the_one_before_it_was_not_applied(
    cluster_client: RedisCluster,
) -> None:
    # Fails if the cluster path applies a batch after one that never reached Redis.
    store = FeatureStore(cluster_client, prefix="clorder")
    await check_a_batch_after_one_not_applied_is_refused(store)


async def test_a_cluster_slot_without_a_master_is_redis_away_not_a_refusal(
    tmp_path: Path,
) -> None:
    # Fails if the cluster client's errors for a slot nobody serves (redis-py retries and
    # then raises its own cluster errors) stop the consumer instead of being waited out.
    port = cluster_port()
    node = start_redis(
        port,
        tmp_path,
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(tmp_path / "nodes.conf"),
    )
    admin = Redis(port=port)  # the node itself, not as a cluster client
    try:
        await admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        for _ in range(100):
            if (await admin.execute_command("CLUSTER", "INFO")).startswith(b"cluster_state:ok"):
                break
            await asyncio.sleep(0.1)
        client = connect(f"redis+cluster://127.0.0.1:{port}")
        assert isinstance(client, RedisCluster)
        store = FeatureStore(client, prefix="away")
        await store.apply([purchase(0, 19_000, "other")], group="g", progress={}, now_ms=0)
        slot = client.keyslot(store.user_key("u"))
        await admin.execute_command("CLUSTER", "DELSLOTS", slot)
        with pytest.raises(StoreUnavailable):
            await store.apply([purchase(1, 20_000)], group="g", progress={}, now_ms=0)
        await client.aclose()
        await admin.aclose()
    finally:
        node.stop()
