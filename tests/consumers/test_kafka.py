"""The inspection helpers against the real broker: where a topic ends, and a group's commits."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from clv.settings import Settings
from consumers.kafka import committed, end_offsets, make_producer, wait_committed

pytestmark = pytest.mark.integration


async def _produce(settings: Settings, n: int) -> Counter[int]:
    """``n`` records sent in bursts (record batches of many records); the records acknowledged
    per partition, from the producer's acknowledgements, not from the broker's offsets API."""
    producer = make_producer(settings)
    await producer.start()
    try:
        acks = []
        for i in range(0, n, 500):
            sent = [
                await producer.send(settings.orders_topic, key=f"u{k % 37}".encode(), value=b"{}")
                for k in range(i, min(n, i + 500))
            ]
            acks += await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return Counter(md.partition for md in acks)


async def test_end_offsets_are_where_the_records_end(settings: Settings) -> None:
    """One past each partition's last record, also when its last record batch holds many
    records (the local broker's ListOffsets answers the batch's first offset plus one)."""
    topic = settings.orders_topic
    assert set((await end_offsets(settings, topic)).values()) == {0}  # an empty topic
    per_partition = await _produce(settings, 3_000)
    ends = await end_offsets(settings, topic)
    assert {tp.partition: end for tp, end in ends.items()} == {
        p: per_partition.get(p, 0) for p in range(settings.orders_partitions)
    }
    assert await end_offsets(settings, "no-such-topic") == {}


async def test_wait_committed_waits_for_the_last_record(settings: Settings) -> None:
    per_partition = await _produce(settings, 2_000)
    ends = {TopicPartition(settings.orders_topic, p): n for p, n in per_partition.items()}
    assert len(ends) == settings.orders_partitions and all(n > 1 for n in ends.values())
    group = "inspect-" + settings.consumer_group
    member = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await member.start()
    try:
        member.assign(list(ends))
        await member.commit({tp: end - 1 for tp, end in ends.items()})  # one short everywhere
        with pytest.raises(TimeoutError):
            await wait_committed(settings, group, timeout=2)
        last = TopicPartition(settings.orders_topic, 0)
        await member.commit({last: ends[last]})
        assert (await committed(settings, group, settings.orders_topic))[last] == ends[last]
        with pytest.raises(TimeoutError):  # the other partitions are still one short
            await wait_committed(settings, group, timeout=2)
        await member.commit(ends)
        await wait_committed(settings, group, timeout=30)
    finally:
        await member.stop()
