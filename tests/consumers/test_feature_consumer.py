"""The feature consumer against the real broker and Redis: exactness under duplicates,
reordering, refunds, bad input, rebalances and crashes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError

import consumers.feature_consumer
from clv.errors import StoreUnavailable
from clv.local_stack import LocalProcess, free_port, start_redis
from clv.replay import publish
from clv.settings import Settings
from consumers.dead_letters import DeadLetters, describe
from consumers.feature_consumer import FeatureConsumer, run_feature_consumer
from consumers.kafka import (
    committed,
    end_offsets,
    make_consumer,
    make_producer,
    read_topic,
    wait_committed,
)
from feature_store.events import ValidEvent
from feature_store.features import RETENTION_DAYS, ms_to_iso
from feature_store.offline import features_at
from feature_store.redis_client import connect
from feature_store.redis_store import FeatureStore
from tests.feature_store.streams import BAD, as_frame, messy_events

from .kafka_helpers import event_message, unique_settings

pytestmark = pytest.mark.integration


class Group:
    """Members of the feature consumer group, in this process, against the real broker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.workers: list[FeatureConsumer] = []
        self.kafkas: list[AIOKafkaConsumer] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Group:
        self.redis = connect(self.settings.redis_url)
        self.producer = make_producer(self.settings)
        await self.producer.start()
        return self

    async def join(self) -> FeatureConsumer:
        s = self.settings
        kc = make_consumer(s, s.consumer_group, s.orders_topic, max_poll_records=100)
        await kc.start()
        w = FeatureConsumer(
            s,
            kc,
            FeatureStore(self.redis, prefix=s.key_prefix),
            DeadLetters(self.producer, s.dlq_topic),
        )
        self.kafkas.append(kc)
        self.workers.append(w)
        self.tasks.append(asyncio.create_task(w.run(self.stop)))
        return w

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        for kc in self.kafkas:
            await kc.stop()
        await self.producer.stop()
        await self.redis.aclose()


async def _run_group(settings: Settings, members: int) -> list[FeatureConsumer]:
    """Run ``members`` consumers of the group until everything is committed."""
    async with Group(settings) as group:
        for _ in range(members):
            await group.join()
        await wait_committed(settings, settings.consumer_group)
    return group.workers


async def _assert_online_equals_offline(settings: Settings, events: list[ValidEvent]) -> None:
    redis = connect(settings.redis_url)
    try:
        store = FeatureStore(redis, prefix=settings.key_prefix)
        frame = as_frame(events)
        latest = int(frame["day"].max())
        for as_of in (latest, latest + 30):
            offline = features_at(frame, as_of, late_after_days=RETENTION_DAYS).sort_index()
            online = pd.concat([await store.features(u, as_of) for u in offline.index]).sort_index()
            pd.testing.assert_frame_equal(online, offline, check_dtype=False)
        # Nobody else got state: bad messages changed nothing.
        keys = {k.decode() async for k in redis.scan_iter(f"{settings.key_prefix}:{{*")}
        assert keys == {store.user_key(u) for u in frame["user_id"].unique()}
    finally:
        await redis.aclose()


def _interleave(
    events: list[ValidEvent], bad: list[bytes | None], seed: int
) -> list[tuple[bytes | None, bytes | None]]:
    rng = random.Random(seed)
    msgs: list[tuple[bytes | None, bytes | None]] = [event_message(e) for e in events]
    for value in bad:
        msgs.insert(rng.randrange(len(msgs) + 1), (b"u-bad", value))
    return msgs


async def test_online_features_equal_offline_on_a_messy_stream(settings: Settings) -> None:
    events = messy_events(21, users=60, per_user=25)
    await publish(settings, _interleave(events, [m for m, _ in BAD], 1))
    [worker] = await _run_group(settings, 1)
    assert worker.stats.rejected == len(BAD)
    assert worker.stats.duplicates > 0 and worker.stats.too_late > 0
    await _assert_online_equals_offline(settings, events)
    # What the state refused as too late is not lost: it is on the dead-letter topic, and each
    # one is dated at or before its user's latest earlier event day minus the retention.
    letters = [describe(r) for r in await read_topic(settings, settings.dlq_topic)]
    late = {(d["partition"], d["offset"]) for d in letters if d["reason"] == "too_late"}
    assert len(late) == worker.stats.too_late
    by_id = {e.event_id: e for e in events}
    latest: dict[str, int] = {}
    may_be_late = set()
    records = await read_topic(settings, settings.orders_topic)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):  # a user's arrival order
        try:
            ev = by_id[json.loads(r.value or b"")["event_id"]]
        except (ValueError, KeyError, TypeError):
            continue  # one of the bad messages
        if ev.day <= latest.get(ev.user_id, ev.day) - RETENTION_DAYS:
            may_be_late.add((r.partition, r.offset))
        latest[ev.user_id] = max(latest.get(ev.user_id, ev.day), ev.day)
    assert late <= may_be_late


async def test_every_bad_message_lands_in_the_dlq_with_its_reason(settings: Settings) -> None:
    events = messy_events(5, users=5, per_user=5)
    await publish(settings, _interleave(events, [m for m, _ in BAD], 2))
    await _run_group(settings, 1)
    letters = [describe(r) for r in await read_topic(settings, settings.dlq_topic)]
    by_value: dict[bytes | None, list[str]] = {}
    for d in letters:
        assert d["topic"] == settings.orders_topic
        assert isinstance(d["partition"], int) and isinstance(d["offset"], int)
        by_value.setdefault(d["value"] or b"", []).append(str(d["reason"]))
    bad_letters = [d for d in letters if d["reason"] != "too_late"]
    assert len(bad_letters) == len(BAD)
    for value, reason in BAD:
        assert reason in by_value[value or b""], (
            value[:60] if value else value,
            by_value.get(value or b""),
        )
    # The source coordinates point at the original message.
    originals = {
        (r.partition, r.offset): (r.value, r.key)
        for r in await read_topic(settings, settings.orders_topic)
    }
    for d in letters:  # its bytes and its key (the user's partition) as they came
        assert originals[(d["partition"], d["offset"])] == (d["value"], d["key"])
    await _assert_online_equals_offline(settings, events)


async def test_two_consumers_with_a_rebalance_mid_stream(settings: Settings) -> None:
    events = messy_events(33, users=200, per_user=40)
    messages = _interleave(events, [m for m, _ in BAD[:5]], 3)
    half = len(messages) // 2
    async with Group(settings) as group:
        first = await group.join()
        await publish(settings, messages[:half])
        while first.stats.batches == 0:
            await asyncio.sleep(0.05)
        second = await group.join()  # the group rebalances while the stream flows
        await publish(settings, messages[half:])
        await wait_committed(settings, settings.consumer_group)
        assignments = [kc.assignment() for kc in group.kafkas]
    assert all(assignments) and not (assignments[0] & assignments[1]), assignments
    assert second.stats.batches > 0, "the member that joined mid-stream should have worked"
    await _assert_online_equals_offline(settings, events)


@pytest.mark.parametrize("allowance", [0, 2])
async def test_redis_gone_for_good_stops_the_consumer_and_commits_nothing(
    settings: Settings, allowance: float
) -> None:
    # One batch and then a quiet topic: the failed write must end the consumer itself, not
    # wait for a next batch that never comes (it used to stall, silent, until stopped): at
    # once with no allowance, after retrying with one.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"  # nothing listens once closed
    gone = settings.model_copy(update={"redis_url": closed, "redis_outage_seconds": allowance})
    await publish(settings, [event_message(e) for e in messy_events(6, users=5, per_user=4)])
    async with Group(gone) as group:
        worker = await group.join()
        with pytest.raises(StoreUnavailable, match=r"applying a batch failed: .*connect") as err:
            await asyncio.wait_for(asyncio.shield(group.tasks[0]), timeout=120)
        group.tasks.clear()  # its failure is the point, not a teardown error
    # Fails if an allowance is not used to retry, or if none is not at once; the error says
    # the allowance ran out, not only the last failure.
    assert (worker.stats.redis_retries > 0) == (allowance > 0)
    assert ("CLV_REDIS_OUTAGE_SECONDS allowed (2)" in str(err.value)) == (allowance > 0)
    commits = await committed(settings, settings.consumer_group, settings.orders_topic)
    assert commits and all(c is None for c in commits.values()), commits


async def _role_is(address: str, role: str) -> None:
    """Wait until the Redis at ``address`` has ``role`` ("master" or "slave", connected)."""
    client = connect(address)
    try:
        for _ in range(600):
            info = await client.info("replication")
            if info["role"] == role and info.get("master_link_status", "up") == "up":
                if role == "slave" or info.get("connected_slaves", 0) > 0:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{address} did not become {role}: {info}")
    finally:
        await client.aclose()


@pytest.mark.parametrize("outage", ["frozen", "restarted", "failover"])
async def test_the_consumer_rides_out_a_redis_outage_mid_stream(
    broker: LocalProcess, tmp_path: Path, outage: str
) -> None:
    # A Redis of its own, persisted as docker-compose runs it, so a restart keeps the state.
    port = free_port()
    redis = start_redis(port, tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    servers = [redis]
    if outage == "failover":  # and a replica to hand the writes to, and back
        servers.append(
            start_redis(free_port(), tmp_path / "replica", "--replicaof", "127.0.0.1", str(port))
        )
        await _role_is(servers[1].address, "slave")
        await _role_is(redis.address, "master")
    url = f"{redis.address}?socket_timeout=1"  # a frozen Redis is noticed in a second
    settings = unique_settings(broker.address, url, redis_outage_seconds=120)
    events = messy_events(12, users=300, per_user=30)
    half = len(events) // 2  # the bad messages come first in the second half, sent while
    # Redis is away: in the first batch to fail
    messages = [event_message(e) for e in events[:half]]
    messages += [(b"u-bad", m) for m, _ in BAD[:3]] + [event_message(e) for e in events[half:]]
    admin = connect(redis.address)
    try:
        async with Group(settings) as group:
            worker = await group.join()
            await publish(settings, messages[:half])
            while worker.stats.batches == 0:
                await asyncio.sleep(0.05)
            if outage == "frozen":
                os.kill(redis.proc.pid, signal.SIGSTOP)
            elif outage == "restarted":
                redis.stop()
            else:  # the replica takes over (after catching up): this one answers READONLY
                replica_port = servers[1].address.rsplit(":", 1)[1].split("/")[0]
                await admin.execute_command("FAILOVER", "TO", "127.0.0.1", replica_port)
                await _role_is(redis.address, "slave")
            await publish(settings, messages[half:])  # arrives while Redis is away
            for _ in range(1200):
                if worker.stats.redis_retries > 0 or group.tasks[0].done():
                    break
                await asyncio.sleep(0.05)
            if outage == "frozen":
                os.kill(redis.proc.pid, signal.SIGCONT)
            elif outage == "restarted":
                redis = servers[0] = start_redis(port, tmp_path / "redis", "--appendonly", "yes")
            else:  # and hands them back
                other = connect(servers[1].address)
                await other.execute_command("FAILOVER", "TO", "127.0.0.1", str(port))
                await other.aclose()
                await _role_is(redis.address, "master")
            # Fails if the consumer stops when Redis goes away instead of waiting for it.
            assert worker.stats.redis_retries > 0 and not group.tasks[0].done()
            await wait_committed(settings, settings.consumer_group)
        # Nothing lost and nothing counted twice: the batches that failed were applied again,
        # and the bad messages among them were dead-lettered once, not once per retry.
        letters = [describe(r) for r in await read_topic(settings, settings.dlq_topic)]
        assert sum(1 for d in letters if d["reason"] != "too_late") == 3
        await _assert_online_equals_offline(settings, events)
    finally:
        await admin.aclose()
        for server in servers:
            if server.proc.poll() is None:
                os.kill(server.proc.pid, signal.SIGCONT)
            server.stop()


def _consume_process(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.as_env()}
    return subprocess.Popen(
        [sys.executable, "-m", "clv", "consume"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_clv_consume_without_a_redis_says_so_at_once(settings: Settings) -> None:
    # Fails if `clv consume` starts without checking Redis: on a quiet topic it would run on
    # and say nothing, and with events it would wait CLV_REDIS_OUTAGE_SECONDS for a Redis
    # that was never there.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    proc = _consume_process(settings.model_copy(update={"redis_url": closed}))
    try:
        _, err = await asyncio.to_thread(proc.communicate, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1, err
    assert len(lines) == 1 and "Redis at CLV_REDIS_URL" in lines[0], lines


async def test_clv_consume_checks_redis_before_it_touches_kafka(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import consumers.feature_consumer as fc

    touched: list[str] = []

    async def ensure_topics(*args: object) -> None:
        touched.append("ensure_topics")

    def make_consumer(*args: object, **kwargs: object) -> object:
        touched.append("make_consumer")
        raise AssertionError("a consumer joined the group")

    monkeypatch.setattr(fc, "ensure_topics", ensure_topics)
    monkeypatch.setattr(fc, "make_consumer", make_consumer)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    with pytest.raises(RedisConnectionError):
        await fc._run_feature_consumer(
            settings.model_copy(update={"redis_url": closed}), asyncio.Event()
        )
    # Fails if the group is joined first (it was): a member that joins only to leave again
    # rebalances the running consumers twice, and the failure came 10 s late.
    assert touched == []


@pytest.mark.slow
async def test_sigkill_mid_stream_then_restart_changes_no_feature(settings: Settings) -> None:
    # Big enough that three restarts (each a process start and a group join) cannot finish it.
    events = messy_events(44, users=1200, per_user=60)
    await publish(settings, _interleave(events, [m for m, _ in BAD[:5]], 4))
    redis = connect(settings.redis_url)
    store = FeatureStore(redis, prefix=settings.key_prefix)
    try:
        kills = 0
        last_seen = -1
        while kills < 3:
            proc = _consume_process(settings)
            # Kill once progress has moved (mid-stream), at a random moment of a batch.
            for _ in range(3000):
                await asyncio.sleep(0.01)
                done = sum((await store.progress(settings.consumer_group)).values())
                if done > last_seen + 100:
                    break
            await asyncio.sleep(random.random() * 0.1)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            last_seen = sum((await store.progress(settings.consumer_group)).values())
        assert last_seen < len(events), "the kills should land mid-stream"
        proc = _consume_process(settings)
        await wait_committed(settings, settings.consumer_group, timeout=180)
        proc.send_signal(signal.SIGTERM)  # a clean stop: exits 0
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        await redis.aclose()
    await _assert_online_equals_offline(settings, events)


MS_PER_DAY = 86_400_000


async def test_the_consumer_records_its_progress_event_clock_and_update_time(
    settings: Settings,
) -> None:
    # Fails if (feature_consumer.py) the progress is a batch's first offset, not its last;
    # the apply records under another group than the consumer's (CLV_CLOCK=event then reads
    # no clock); the users' "updated at" is not the wall-clock time of the apply (0, or in
    # microseconds).
    events = messy_events(12, users=20, per_user=10)
    await publish(settings, [event_message(e) for e in events])
    before = time.time_ns() // 1_000_000
    await _run_group(settings, 1)
    after = time.time_ns() // 1_000_000
    ends = await end_offsets(settings, settings.orders_topic)
    redis = connect(settings.redis_url)
    try:
        store = FeatureStore(redis, prefix=settings.key_prefix)
        group = settings.consumer_group
        # The last applied offset of every partition with records: one short of its end.
        assert await store.progress(group) == {
            f"{tp.topic}:{tp.partition}": end - 1 for tp, end in ends.items() if end
        }
        assert await store.event_clock_ms(group) == max(e.ts_ms for e in events)
        for user in {e.user_id for e in events}:
            stored = await store.read_state(user)
            assert stored is not None and before <= stored.updated_ms <= after, user
    finally:
        await redis.aclose()


def _order(event_id: str, ts_ms: int, **changes: object) -> bytes:
    body = {
        "event_id": event_id,
        "type": "purchase",
        "user_id": event_id,  # a user of its own
        "order_id": event_id,
        "amount": 5.0,
        "ts": ms_to_iso(ts_ms),
        "currency": "EUR",
        **changes,
    }
    return json.dumps(body).encode()


async def test_the_consumer_validates_by_its_settings_and_by_when_a_message_was_produced(
    settings: Settings,
) -> None:
    # Fails if (kafka.py, validate_record) the size cap, the future tolerance or the
    # currency of the settings are not passed on (the defaults judge instead), or if the
    # future-time clock is the wall clock instead of the record's own timestamp (a replay of
    # old messages would then accept what the archiver, reading them when produced, refused).
    s = settings.model_copy(
        update={"max_event_bytes": 1024, "future_tolerance_seconds": 3600, "currency": "EUR"}
    )
    now = time.time_ns() // 1_000_000
    messages = [
        ("ok", _order("ok", now - MS_PER_DAY), None),
        ("big", _order("big", now - MS_PER_DAY, note="x" * 2000), None),  # under the default cap
        ("ahead", _order("ahead", now + 2 * 3_600_000), None),  # under the default tolerance
        ("usd", _order("usd", now - MS_PER_DAY, currency="USD"), None),  # the default currency
        # Produced 30 days ago, dated 10 days after that: ahead of its own clock, though
        # behind the wall clock now.
        ("replayed", _order("replayed", now - 20 * MS_PER_DAY), now - 30 * MS_PER_DAY),
    ]
    producer = make_producer(s)
    await producer.start()
    try:
        for key, value, produced_at in messages:
            await (
                await producer.send(
                    s.orders_topic, key=key.encode(), value=value, timestamp_ms=produced_at
                )
            )
    finally:
        await producer.stop()
    await _run_group(s, 1)
    letters = [describe(r) for r in await read_topic(s, s.dlq_topic)]
    reasons = {json.loads(d["value"])["event_id"]: d["reason"] for d in letters}  # type: ignore[arg-type]
    assert reasons == {
        "big": "too_large",
        "ahead": "future_timestamp",
        "usd": "unsupported_currency",
        "replayed": "future_timestamp",
    }
    redis = connect(s.redis_url)
    try:
        store = FeatureStore(redis, prefix=s.key_prefix)
        assert [u for u, *_ in messages if await store.read_state(u)] == ["ok"]
    finally:
        await redis.aclose()


async def test_a_message_larger_than_a_default_producer_request_is_dead_lettered(
    settings: Settings,
) -> None:
    # Was a defect (kafka.py, make_producer): the dead-letter producer kept aiokafka's 1 MiB request
    # limit, so a 2 MiB orders message (another team's producer allows it, the broker took it)
    # could not be dead-lettered: MessageSizeTooLargeError stopped the consumer, uncommitted,
    # and every restart stopped on the same message.
    big = b'{"pad":"' + b"x" * (2 * 1024 * 1024) + b'"}'
    good = messy_events(5, users=1, per_user=1)[0]
    producer = make_producer(settings, max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        await (await producer.send(settings.orders_topic, key=good.user_id.encode(), value=big))
        key, value = event_message(good)
        await (await producer.send(settings.orders_topic, key=key, value=value))
    finally:
        await producer.stop()
    async with Group(settings) as group:
        await group.join()
        worker = group.tasks[0]
        waiter = asyncio.create_task(wait_committed(settings, settings.consumer_group))
        try:
            await asyncio.wait([waiter, worker], return_when=asyncio.FIRST_COMPLETED)
            if worker.done():
                group.tasks.clear()  # its failure is the finding, not a teardown error
                pytest.fail(f"the consumer stopped: {worker.exception()!r}")
            await waiter
        finally:
            waiter.cancel()
    letters = [describe(r) for r in await read_topic(settings, settings.dlq_topic)]
    assert [(d["reason"], d["value"]) for d in letters] == [("too_large", big)]
    redis = connect(settings.redis_url)
    try:
        store = FeatureStore(redis, prefix=settings.key_prefix)
        assert await store.read_state(good.user_id) is not None  # the message after it counted
    finally:
        await redis.aclose()


async def test_clv_consume_on_a_fresh_broker_creates_the_topics_it_needs(
    broker: LocalProcess, redis_server: LocalProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if run_feature_consumer no longer calls ensure_topics: the orders topic is then
    # whatever the broker auto-creates (if anything) and the dead-letter topic does not exist
    # (and the stop below never comes: the wait runs out).
    s = unique_settings(broker.address, redis_server.address)  # no topics made
    stop = asyncio.Event()
    made = consumers.feature_consumer.ensure_topics

    async def then_stop(settings: Settings) -> None:
        await made(settings)
        stop.set()  # a stop as soon as the topics are there, before consuming

    monkeypatch.setattr(consumers.feature_consumer, "ensure_topics", then_stop)
    stats = await asyncio.wait_for(run_feature_consumer(s, stop), 60)
    assert stats.batches == 0
    orders = await end_offsets(s, s.orders_topic)
    assert sorted(tp.partition for tp in orders) == list(range(s.orders_partitions))
    assert [tp.partition for tp in await end_offsets(s, s.dlq_topic)] == [0]


async def test_a_dead_letter_too_large_for_the_topic_is_sent_without_its_value(
    settings: Settings,
) -> None:
    # A broker whose limit for the dead-letter topic is below the orders topic's refuses a
    # large letter; here the producer's own request limit refuses it. It is sent again
    # without its value, marked with its size, instead of stopping the consumer at every
    # restart; the letters that fit keep their bytes.
    from aiokafka.structs import ConsumerRecord

    from consumers.dead_letters import DeadLetters, Rejected

    def rejected(offset: int, value: bytes, key: bytes | None = b"u1") -> Rejected:
        rec = ConsumerRecord(
            settings.orders_topic, 0, offset, 0, 0, key, value, None, 2, len(value), ()
        )
        return Rejected(rec, "too_large", f"{len(value)} bytes > limit")

    small, big = b'{"pad":"x"}', b'{"pad":"' + b"x" * 10_000 + b'"}'
    producer = make_producer(settings, max_request_size=4096)
    await producer.start()
    try:
        await DeadLetters(producer, settings.dlq_topic).publish(
            [
                rejected(7, small),
                rejected(8, big),
                rejected(9, big, key=None),
                rejected(10, small, key=b"k" * 10_000),
            ]
        )
    finally:
        await producer.stop()
    letters = {
        d["offset"]: d for d in map(describe, await read_topic(settings, settings.dlq_topic))
    }
    assert letters[7]["value"] == small and letters[7]["value_omitted"] is None
    assert letters[8]["value"] is None and letters[8]["value_omitted"] == len(big)
    assert letters[8]["reason"] == "too_large" and letters[8]["topic"] == settings.orders_topic
    assert letters[8]["detail"] == f"{len(big)} bytes > limit" and letters[8]["key"] == b"u1"
    # Kafka needs a key or a value: a message that came without a key keeps an empty value.
    assert letters[9]["value"] == b"" and letters[9]["value_omitted"] == len(big)
    assert letters[9]["key"] is None and letters[9]["key_omitted"] is None
    # A key too large even without the value is left out too, with its size (fails if such a
    # letter is not sent at all: the consumer would stop on it at every restart).
    assert letters[10]["key"] is None and letters[10]["key_omitted"] == 10_000
    assert letters[10]["value"] == b"" and letters[10]["value_omitted"] == len(small)
    assert letters[10]["reason"] == "too_large" and letters[10]["offset"] == 10
    assert letters[8]["key_omitted"] is None


async def test_events_keyed_by_something_else_are_applied_counted_and_warned_of(
    settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if (feature_consumer.py) the message key is not compared with the user id, a
    # miskeyed event is dropped or dead-lettered instead of applied, or every batch warns.
    monkeypatch.setattr(consumers.feature_consumer, "_MISKEYED_WARN_S", 3600.0)
    events = messy_events(5, users=20, per_user=20)
    messages = [event_message(e) for e in events]
    for i in range(0, len(messages), 3):  # every third: keyed by another user, or by nothing
        messages[i] = (b"u-other" if i % 2 else None, messages[i][1])
    before = REGISTRY.get_sample_value("clv_consumer_miskeyed_events_total") or 0.0
    await publish(settings, messages)
    with caplog.at_level("WARNING", logger="consumers.feature_consumer"):
        [worker] = await _run_group(settings, 1)
    miskeyed = len(range(0, len(messages), 3))
    assert worker.stats.miskeyed == miskeyed
    st = worker.stats
    assert st.applied + st.duplicates + st.too_late == len(events) and st.rejected == 0
    after = REGISTRY.get_sample_value("clv_consumer_miskeyed_events_total")
    assert after == before + miskeyed
    warnings = [r for r in caplog.records if "message key other than their user_id" in r.message]
    assert len(warnings) == 1 and st.batches > 1
    # Nothing lost: what the state refused as too late (arrival order across partitions is
    # not the sending order now, so that differs from an offline fold) is dead-lettered.
    letters = [describe(r) for r in await read_topic(settings, settings.dlq_topic)]
    assert sum(d["reason"] == "too_late" for d in letters) == st.too_late
