"""Kafka clients built from settings, and topic creation (broker-agnostic: plain aiokafka)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidReplicationFactorError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    for_code,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import ConsumerRecord

from clv.errors import ClvError, InvalidEvent
from clv.settings import Settings
from clv.stopping import stop_or_first_done
from feature_store.events import ValidEvent, event_clock, validate

log = logging.getLogger(__name__)


def validate_record(
    rec: ConsumerRecord[bytes, bytes], settings: Settings, wall_ms: int
) -> ValidEvent:
    """Validate a consumed record the way every reader must, so the feature consumers and the
    archiver accept the same events: the future-time clock is the record's timestamp capped by
    ``wall_ms``, and an unexpected failure is an ``invalid_value`` rejection, never a crash."""
    try:
        return validate(
            rec.value,
            max_bytes=settings.max_event_bytes,
            currency=settings.currency,
            now_ms=event_clock(rec.timestamp, wall_ms),
            future_tolerance_ms=settings.future_tolerance_seconds * 1000,
        )
    except InvalidEvent:
        raise
    except Exception as exc:  # one message must never stop a reader
        log.exception("unexpected error validating %s:%s@%s", rec.topic, rec.partition, rec.offset)
        raise InvalidEvent("invalid_value", f"unexpected: {exc!r}"[:500]) from exc


#: The most a consumer asks for in one fetch response. (A broker still returns a larger first
#: record batch whole; a dead letter for such a message may then be sent without its value.)
FETCH_MAX_BYTES = 64 * 1024 * 1024


def connection_options(settings: Settings) -> dict[str, Any]:
    """What every client of the deployment's Kafka is given: its servers and, where the
    broker asks for them, TLS (``CLV_KAFKA_SSL_CAFILE``, else the system's CAs) and SASL."""
    protocol = settings.kafka_security_protocol
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": protocol,
    }
    if settings.kafka_tls:
        cafile = settings.kafka_ssl_cafile
        opts["ssl_context"] = create_ssl_context(cafile=str(cafile) if cafile else None)
    if settings.kafka_sasl:
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism
        opts["sasl_plain_username"] = settings.kafka_sasl_username
        opts["sasl_plain_password"] = settings.kafka_sasl_password
    return opts


def make_consumer(
    settings: Settings, group_id: str, *topics: str, **overrides: object
) -> AIOKafkaConsumer:
    """A consumer that never auto-commits: offsets are committed after the state is written."""
    opts: dict[str, object] = {
        **connection_options(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
        "fetch_max_bytes": FETCH_MAX_BYTES,
        "client_id": f"clv-{group_id}",
    }
    opts.update(overrides)
    return AIOKafkaConsumer(*topics, **opts)


#: How long closing a consumer may take before it is left to the process's end (see
#: :func:`stop_consumer`).
CONSUMER_CLOSE_S = 10.0

#: How long a consumer asked to stop waits for its last commit. The client retries a commit for
#: as long as the group coordinator does not answer (a broker away, a group stuck in a
#: rebalance); after this, what was not committed is delivered again after the restart and
#: deduplicated, as after a crash.
COMMIT_ON_STOP_S = 10.0


def outcome_ignored(task: asyncio.Future[Any]) -> None:
    """A done callback for a task left to finish on its own: its outcome is retrieved, so that
    asyncio does not log its failure as never retrieved (the caller has said what it left)."""
    if not task.cancelled():
        task.exception()


async def commit_unless_stopping(
    consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int], stop: asyncio.Event
) -> bool:
    """Commit ``offsets``; ``False`` when it was left unfinished because ``stop`` was set.

    The client retries a commit for as long as the group coordinator does not answer (a broker
    away, a group stuck in a rebalance). Once ``stop`` is set (before or during the commit) the
    commit gets :data:`COMMIT_ON_STOP_S` more; then it is left running on its own, its outcome
    retrieved, not cancelled (cancelling cuts the client's commit in two, and its inner request
    then fails unobserved). The offsets stay uncommitted: the group delivers them again. The
    commit's own error is raised."""
    commit = asyncio.ensure_future(consumer.commit(offsets))
    try:
        await stop_or_first_done(stop, [commit])
        if not commit.done():
            await asyncio.wait({commit}, timeout=COMMIT_ON_STOP_S)
    except asyncio.CancelledError:
        commit.add_done_callback(outcome_ignored)
        raise
    if not commit.done():
        commit.add_done_callback(outcome_ignored)
        return False
    commit.result()
    return True


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Close ``consumer``, or give up after :data:`CONSUMER_CLOSE_S` with a warning.

    A consumer closed while it joins its group first waits for the broker's JoinGroup answer,
    which a rebalance can hold for minutes (a member that died is waited for up to the
    rebalance timeout); a process asked to stop must not wait for it. A consumer that joined
    closes well within the bound: offsets are committed by then, leaving the group is one
    request."""
    try:
        await asyncio.wait_for(consumer.stop(), CONSUMER_CLOSE_S)
    except TimeoutError:
        # Left half-closed (its connections end with the process): the commands that call this
        # end right after. It never sent LeaveGroup, so the group waits its session timeout.
        log.warning("a Kafka consumer did not close within %ss; leaving it", CONSUMER_CLOSE_S)


def make_producer(settings: Settings, **overrides: object) -> AIOKafkaProducer:
    # acks=all; no idempotent producer (not every Kafka-protocol broker supports it): consumers
    # deduplicate by event id instead. Any message a consumer can fetch must fit in a request:
    # a dead letter carries the original bytes (aiokafka's default, 1 MiB, refused a larger
    # orders message client-side, which stopped the feature consumer on every restart).
    opts: dict[str, object] = {
        **connection_options(settings),
        "acks": "all",
        "max_request_size": FETCH_MAX_BYTES + 1024 * 1024,  # room for the dead letter's headers
        "linger_ms": 5,
        "max_batch_size": 512 * 1024,
        "client_id": "clv-producer",
    }
    opts.update(overrides)
    return AIOKafkaProducer(**opts)


async def ensure_topics(settings: Settings, partitions: int | None = None) -> None:
    """Create the orders, DLQ and alerts topics when missing (idempotent)."""
    parts = partitions or settings.orders_partitions
    admin = AIOKafkaAdminClient(**connection_options(settings))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        copies = settings.topic_replication
        wanted = [
            NewTopic(settings.orders_topic, num_partitions=parts, replication_factor=copies),
            NewTopic(settings.dlq_topic, num_partitions=1, replication_factor=copies),
            NewTopic(settings.alerts_topic, num_partitions=parts, replication_factor=copies),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            # aiokafka returns the broker's answer per topic and raises for none of them: a
            # topic the broker refused (more copies than brokers, say) would go unsaid.
            answer = await admin.create_topics(missing)
            for topic, code, *message in answer.topic_errors:
                if code in (0, TopicAlreadyExistsError.errno):  # made, or by another process
                    continue
                why = (message[0] if message else None) or for_code(code).__name__
                if code == InvalidReplicationFactorError.errno:
                    why += f" (CLV_TOPIC_REPLICATION={copies}: at most the number of brokers)"
                raise ClvError(f"the broker refused to create the topic {topic}: {why}")
    finally:
        await admin.close()


# Inspection helpers (`clv up`, `clv demo`, tests): each uses short-lived clients of its own.


async def topic_partitions(
    settings: Settings, topic: str, timeout: float = 30
) -> list[TopicPartition]:
    """The partitions of ``topic`` (none when the broker does not know it), from a Metadata
    request naming it. Not from a consumer's metadata: its bootstrap asks for an empty topic
    list, which from Metadata v1 on means no topic at all, and ``topics()`` does not update it,
    so on Apache Kafka a consumer without a subscription knows no partition. A topic just
    created may have no leader yet: it is asked again until ``timeout``."""
    admin = AIOKafkaAdminClient(**connection_options(settings))
    try:
        await admin.start()
        # Named only once known to exist: a broker may create a topic a Metadata request names
        # (tansu does; Apache Kafka with auto.create.topics.enable).
        if topic not in await admin.list_topics():
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            [described] = await admin.describe_topics([topic])
            code, parts = described["error_code"], described["partitions"]
            if code == UnknownTopicOrPartitionError.errno:
                return []
            if code == 0 and parts and all(p["error_code"] == 0 for p in parts):
                return [TopicPartition(topic, n) for n in sorted(p["partition"] for p in parts)]
            if loop.time() > deadline:
                raise TimeoutError(f"{topic} not described within {timeout:g}s (error {code})")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def end_offsets(
    settings: Settings, topic: str, timeout: float = 30
) -> dict[TopicPartition, int]:
    """The end offset (high watermark) of every partition of ``topic``.

    The larger of the ListOffsets answer and the high watermark of a fetch response, which on
    Apache Kafka are the same: tansu (the local stack's broker) answers ListOffsets with the
    first offset of a partition's last record batch plus one, short of the end whenever that
    batch holds several records (found when a test's "whole topic committed" came early).
    """
    tps = await topic_partitions(settings, topic, timeout)
    if not tps:
        return {}
    c = AIOKafkaConsumer(
        **connection_options(settings),
        enable_auto_commit=False,
        fetch_max_wait_ms=20,  # a fetch at the end answers at once with the watermark
    )
    await c.start()
    try:
        listed = await c.end_offsets(tps)
        c.assign(tps)
        for tp in tps:
            c.seek(tp, listed[tp])  # the fetch from there returns little beyond the watermark
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(c.highwater(tp) is None for tp in tps):
            if loop.time() > deadline:
                raise TimeoutError(f"no fetch response from {topic} within {timeout:g}s")
            await c.getmany(timeout_ms=50, max_records=1)
        return {tp: max(listed[tp], c.highwater(tp) or 0) for tp in tps}
    finally:
        await c.stop()


async def read_topic(
    settings: Settings, topic: str, timeout: float = 30
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from the beginning to its current end."""
    ends = await end_offsets(settings, topic, timeout)
    c = AIOKafkaConsumer(
        **connection_options(settings),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await c.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        c.assign(list(ends))
        await c.seek_to_beginning(*ends)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while [tp for tp, end in ends.items() if await c.position(tp) < end]:
            if loop.time() > deadline:
                raise TimeoutError(f"could not read {topic} to its end")
            batch = await c.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
    finally:
        await c.stop()
    return out


@asynccontextmanager
async def _group_member(settings: Settings, group: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer of ``group`` that never joins it: partitions are assigned by hand, so it can
    read the group's commits without triggering a rebalance."""
    c = AIOKafkaConsumer(**connection_options(settings), group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def _read_commits(
    c: AIOKafkaConsumer, tps: Iterable[TopicPartition]
) -> dict[TopicPartition, int | None]:
    # ``committed`` asks the group coordinator every call, so one consumer can poll
    return {tp: await c.committed(tp) for tp in tps}


async def committed(settings: Settings, group: str, topic: str) -> dict[TopicPartition, int | None]:
    """A group's committed offsets, read with a manually assigned consumer of that group."""
    tps = await topic_partitions(settings, topic)
    async with _group_member(settings, group) as c:
        c.assign(tps)
        return await _read_commits(c, tps)


async def wait_committed(settings: Settings, group: str, timeout: float = 120) -> None:
    """Until ``group`` has committed the end of every partition of the orders topic (the feature
    consumers commit after the Redis write, the archiver after the Parquet flush)."""
    ends = await end_offsets(settings, settings.orders_topic, timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with _group_member(settings, group) as c:
        c.assign(list(ends))
        while True:
            done = await _read_commits(c, ends)
            if all((done.get(tp) or 0) >= end for tp, end in ends.items()):
                return
            if loop.time() > deadline:
                raise TimeoutError(f"group {group} committed {done}, topic ends at {ends}")
            await asyncio.sleep(0.3)
