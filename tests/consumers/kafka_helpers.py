"""Test helpers around the real broker: produce, read a topic to its end, committed offsets."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from clv.settings import Settings
from feature_store.events import ValidEvent, encode_event
from feature_store.features import ms_to_iso


def unique_settings(broker: str, redis_url: str, **extra: object) -> Settings:
    """Settings with topics, group and key prefix of their own (tests share one broker/Redis)."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        kafka_bootstrap=broker,
        redis_url=redis_url,
        orders_topic=f"orders-{tag}",
        dlq_topic=f"orders-{tag}.dlq",
        alerts_topic=f"alerts-{tag}",
        consumer_group=f"features-{tag}",
        archiver_group=f"archiver-{tag}",
        key_prefix=f"t{tag}",
        orders_partitions=4,
        consume_batch=250,
        **extra,  # type: ignore[arg-type]
    )


def event_message(ev: ValidEvent) -> tuple[bytes, bytes]:
    value = encode_event(
        event_id=ev.event_id,
        type=ev.type,
        user_id=ev.user_id,
        order_id=ev.order_id,
        amount=abs(ev.cents) / 100,
        ts=ms_to_iso(ev.ts_ms) or "",
    )
    return ev.user_id.encode(), value


async def produce(
    settings: Settings, messages: Sequence[tuple[bytes | None, bytes | None]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(settings.orders_topic, key=k, value=v) for k, v in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def end_offsets(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    c = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        await c.topics()  # refreshes the metadata, so the topic's partitions are known
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        return dict(await c.end_offsets(tps)) if tps else {}
    finally:
        await c.stop()


async def read_topic(settings: Settings, topic: str, timeout: float = 30) -> list[ConsumerRecord]:  # type: ignore[type-arg]
    """Every record of ``topic`` from the beginning to its current end."""
    ends = await end_offsets(settings, topic)
    c = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await c.start()
    out: list[ConsumerRecord] = []  # type: ignore[type-arg]
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


async def committed(settings: Settings, group: str, topic: str) -> dict[TopicPartition, int | None]:
    """A group's committed offsets, read with a manually assigned consumer of that group."""
    ends = await end_offsets(settings, topic)
    c = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await c.start()
    try:
        c.assign(list(ends))
        return {tp: await c.committed(tp) for tp in ends}
    finally:
        await c.stop()


async def wait_committed(settings: Settings, group: str, timeout: float = 120) -> None:
    """Until the group has committed the end of every partition of the orders topic."""
    ends = await end_offsets(settings, settings.orders_topic)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        done = await committed(settings, group, settings.orders_topic)
        if all((done.get(tp) or 0) >= end for tp, end in ends.items()):
            return
        if loop.time() > deadline:
            raise TimeoutError(f"group {group} committed {done}, topic ends at {ends}")
        await asyncio.sleep(0.3)
