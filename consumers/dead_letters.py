"""The dead-letter topic: rejected messages with their original bytes, reason and source."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
from aiokafka.structs import ConsumerRecord

# Header names of a dead letter; the value and key are the original message's, byte for byte.
REASON = "clv-reason"
DETAIL = "clv-detail"
SOURCE_TOPIC = "clv-source-topic"
SOURCE_PARTITION = "clv-source-partition"
SOURCE_OFFSET = "clv-source-offset"
# Set (to the original value's size in bytes) on a dead letter sent without the value, which
# was too large for the dead-letter topic; the value stays at the source offset.
VALUE_OMITTED = "clv-value-omitted"

# Refused for its size: by the producer before sending, or by the broker.
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)


@dataclass(frozen=True, slots=True)
class Rejected:
    record: ConsumerRecord[bytes, bytes]
    reason: str
    detail: str


class DeadLetters:
    """Publishes rejected messages and waits until the broker has them all.

    A dead letter carries the original bytes. One too large for the dead-letter topic (a broker
    whose ``max.message.bytes`` for it is below the orders topic's) is sent again without its
    value, marked ``clv-value-omitted``, rather than stopping the consumer on it at every
    restart: its reason and source (topic, partition, offset) still say where the bytes are.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    async def publish(self, rejected: Sequence[Rejected]) -> None:
        acks = [await self._send(r, whole=True) for r in rejected]
        results = await asyncio.gather(*acks, return_exceptions=True)
        refused = [
            r for r, res in zip(rejected, results, strict=True) if isinstance(res, _TOO_LARGE)
        ]
        for res in results:
            if isinstance(res, BaseException) and not isinstance(res, _TOO_LARGE):
                raise res
        for r in refused:
            # The broker refuses a whole record batch: letters batched with a too-large one
            # were refused with it. Each is tried again alone, and sent without its value only
            # if it is still refused (a letter refused alone is too large itself).
            if len(refused) > 1:
                try:
                    await (await self._send(r, whole=True))
                    continue
                except _TOO_LARGE:
                    pass
            await (await self._send(r, whole=False))

    async def _send(self, r: Rejected, *, whole: bool) -> asyncio.Future[object]:
        m = r.record
        headers = [
            (REASON, r.reason.encode()),
            (DETAIL, r.detail[:1000].encode("utf-8", "replace")),
            (SOURCE_TOPIC, m.topic.encode()),
            (SOURCE_PARTITION, str(m.partition).encode()),
            (SOURCE_OFFSET, str(m.offset).encode()),
        ]
        if whole:
            try:
                return await self._producer.send(
                    self._topic, value=m.value, key=m.key, headers=headers
                )
            except _TOO_LARGE as exc:  # larger than a request may be: refused before sending
                future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
                future.set_exception(exc)
                return future
        headers.append((VALUE_OMITTED, str(len(m.value or b"")).encode()))
        # Kafka needs a key or a value: a key-less message keeps an empty value instead.
        value = None if m.key is not None else b""
        return await self._producer.send(self._topic, value=value, key=m.key, headers=headers)


def describe(record: ConsumerRecord[bytes, bytes]) -> dict[str, object]:
    """A dead letter as a dict (for tools and tests): reason, detail, source, original bytes (or
    ``value_omitted``: their size, when they were too large to send)."""
    h = {k: v.decode() for k, v in (record.headers or ())}
    return {
        "reason": h.get(REASON),
        "detail": h.get(DETAIL),
        "topic": h.get(SOURCE_TOPIC),
        "partition": int(h[SOURCE_PARTITION]) if SOURCE_PARTITION in h else None,
        "offset": int(h[SOURCE_OFFSET]) if SOURCE_OFFSET in h else None,
        "value": record.value,
        "key": record.key,
        "value_omitted": int(h[VALUE_OMITTED]) if VALUE_OMITTED in h else None,
    }
