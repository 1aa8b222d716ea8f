"""The dead-letter topic: rejected messages with their original bytes, reason and source."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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
# Likewise the key's size, on a letter that was still too large without its value.
KEY_OMITTED = "clv-key-omitted"

# Refused for its size: by the producer before sending, or by the broker.
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
# What a letter carries of the original message: all of it, its key, or neither.
_Shape = Literal["whole", "no_value", "bare"]
_SHAPES: tuple[_Shape, ...] = ("whole", "no_value", "bare")
# The publishing turn of each producer (see DeadLetters.__init__).
_TURNS: weakref.WeakKeyDictionary[object, asyncio.Lock] = weakref.WeakKeyDictionary()


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
    A key too large even then is left out as well (``clv-key-omitted``).
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        # One publish at a time per producer: the broker refuses a record batch whole, and a
        # letter batched with another publish's too-large one (another consumer's, or a settle
        # task's) would be taken for too large itself.
        self._turn = _TURNS.setdefault(producer, asyncio.Lock())

    async def publish(self, rejected: Sequence[Rejected]) -> None:
        async with self._turn:
            await self._publish(rejected)

    async def _publish(self, rejected: Sequence[Rejected]) -> None:
        acks = [await self._send(r, "whole") for r in rejected]
        results = await asyncio.gather(*acks, return_exceptions=True)
        refused = [
            r for r, res in zip(rejected, results, strict=True) if isinstance(res, _TOO_LARGE)
        ]
        for res in results:
            if isinstance(res, BaseException) and not isinstance(res, _TOO_LARGE):
                raise res
        # Letters batched with a too-large one were refused with it: each is tried again
        # alone; one refused alone is too large itself, and is sent without its value, then (a
        # key above the limit) without its key. Refused even then, the publish fails.
        for r in refused:
            for shape in _SHAPES:
                try:
                    await (await self._send(r, shape))
                    break
                except _TOO_LARGE:
                    if shape == _SHAPES[-1]:
                        raise

    async def _send(self, r: Rejected, shape: _Shape) -> asyncio.Future[object]:
        m = r.record
        headers = [
            (REASON, r.reason.encode()),
            (DETAIL, r.detail[:1000].encode("utf-8", "replace")),
            (SOURCE_TOPIC, m.topic.encode()),
            (SOURCE_PARTITION, str(m.partition).encode()),
            (SOURCE_OFFSET, str(m.offset).encode()),
        ]
        value, key = m.value, m.key
        if shape != "whole":
            headers.append((VALUE_OMITTED, str(len(m.value or b"")).encode()))
            value = None
        if shape == "bare":
            headers.append((KEY_OMITTED, str(len(m.key or b"")).encode()))
            key = None
        if key is None and value is None:
            value = b""  # Kafka needs a key or a value
        try:
            return await self._producer.send(self._topic, value=value, key=key, headers=headers)
        except _TOO_LARGE as exc:  # larger than a request may be: refused before sending
            future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
            return future


def describe(record: ConsumerRecord[bytes, bytes]) -> dict[str, object]:
    """A dead letter as a dict (for tools and tests): reason, detail, source, original bytes (or
    ``value_omitted`` / ``key_omitted``: their sizes, when they were too large to send)."""
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
        "key_omitted": int(h[KEY_OMITTED]) if KEY_OMITTED in h else None,
    }
