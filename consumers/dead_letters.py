"""The dead-letter topic: rejected messages with their original bytes, reason and source."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

# Header names of a dead letter; the value and key are the original message's, byte for byte.
REASON = "clv-reason"
DETAIL = "clv-detail"
SOURCE_TOPIC = "clv-source-topic"
SOURCE_PARTITION = "clv-source-partition"
SOURCE_OFFSET = "clv-source-offset"


@dataclass(frozen=True, slots=True)
class Rejected:
    record: ConsumerRecord[bytes, bytes]
    reason: str
    detail: str


class DeadLetters:
    """Publishes rejected messages and waits until the broker has them all."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    async def publish(self, rejected: Sequence[Rejected]) -> None:
        futures = []
        for r in rejected:
            m = r.record
            headers = [
                (REASON, r.reason.encode()),
                (DETAIL, r.detail[:1000].encode("utf-8", "replace")),
                (SOURCE_TOPIC, m.topic.encode()),
                (SOURCE_PARTITION, str(m.partition).encode()),
                (SOURCE_OFFSET, str(m.offset).encode()),
            ]
            futures.append(
                await self._producer.send(self._topic, value=m.value, key=m.key, headers=headers)
            )
        if futures:
            await asyncio.gather(*futures)


def describe(record: ConsumerRecord[bytes, bytes]) -> dict[str, object]:
    """A dead letter as a dict (for tools and tests): reason, detail, source, original bytes."""
    h = {k: v.decode() for k, v in (record.headers or ())}
    return {
        "reason": h.get(REASON),
        "detail": h.get(DETAIL),
        "topic": h.get(SOURCE_TOPIC),
        "partition": int(h[SOURCE_PARTITION]) if SOURCE_PARTITION in h else None,
        "offset": int(h[SOURCE_OFFSET]) if SOURCE_OFFSET in h else None,
        "value": record.value,
        "key": record.key,
    }
