"""The feature consumer: orders topic -> validated events -> Redis state, effectively once.

Per fetched batch: validate every message (bad ones go to the dead-letter topic), apply the good
ones with their dedup and the consumer's progress in one Redis script, dead-letter the ones the
state rejects as too late, and only then commit the offsets. A crash anywhere re-delivers from
the last commit; re-applied events are duplicates, so nothing counts twice and nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import Counter

from clv.errors import InvalidEvent
from clv.settings import Settings
from consumers.dead_letters import DeadLetters, Rejected
from feature_store.events import ValidEvent, validate
from feature_store.redis_store import FeatureStore

log = logging.getLogger(__name__)

EVENTS = Counter("clv_consumer_events", "Order events seen by the feature consumer", ["outcome"])
BATCHES = Counter("clv_consumer_batches", "Batches applied by the feature consumer")


@dataclass
class ConsumerStats:
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    too_late: int = 0
    batches: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class FeatureConsumer:
    """One member of the feature consumer group. Collaborators are passed in (tests and the
    benchmark build them against the real broker and Redis)."""

    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        store: FeatureStore,
        dead_letters: DeadLetters,
    ) -> None:
        self._settings = settings
        self._consumer = consumer
        self._store = store
        self._dlq = dead_letters
        self.stats = ConsumerStats()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; the batch in hand is finished and committed first."""
        s = self._settings
        tolerance_ms = s.future_tolerance_seconds * 1000
        while not stop.is_set():
            batch = await self._consumer.getmany(timeout_ms=200, max_records=s.consume_batch)
            if batch:
                await self._process(batch, tolerance_ms)

    async def _process(
        self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]], tolerance_ms: int
    ) -> None:
        s = self._settings
        good: list[ValidEvent] = []
        sources: list[ConsumerRecord[bytes, bytes]] = []
        bad: list[Rejected] = []
        progress: dict[str, int] = {}
        commits: dict[TopicPartition, int] = {}
        now_ms = time.time_ns() // 1_000_000
        max_bytes, currency = s.max_event_bytes, s.currency
        for tp, records in batch.items():
            for rec in records:
                try:
                    good.append(
                        validate(
                            rec.value,
                            max_bytes=max_bytes,
                            currency=currency,
                            now_ms=now_ms,
                            future_tolerance_ms=tolerance_ms,
                        )
                    )
                    sources.append(rec)
                except InvalidEvent as exc:
                    bad.append(Rejected(rec, exc.reason, exc.detail))
            last = records[-1].offset
            progress[f"{tp.topic}:{tp.partition}"] = last
            commits[tp] = last + 1
        # Dead letters first: once the batch's progress is recorded nothing may be left to do
        # but the commit.
        if bad:
            await self._dlq.publish(bad)
        result = await self._store.apply(
            good, group=s.consumer_group, progress=progress, now_ms=now_ms
        )
        if result.too_late:
            late = [
                Rejected(
                    sources[i],
                    "too_late",
                    f"dated {good[i].day} at or before the user's latest event day minus "
                    "the longest window",
                )
                for i in result.too_late
            ]
            await self._dlq.publish(late)
        await self._commit(commits)
        st = self.stats
        st.applied += result.applied
        st.duplicates += result.duplicates
        st.too_late += len(result.too_late)
        st.rejected += len(bad)
        st.batches += 1
        for r in bad:
            st.reasons[r.reason] = st.reasons.get(r.reason, 0) + 1
        EVENTS.labels("applied").inc(result.applied)
        EVENTS.labels("duplicate").inc(result.duplicates)
        EVENTS.labels("too_late").inc(len(result.too_late))
        EVENTS.labels("rejected").inc(len(bad))
        BATCHES.inc()

    async def _commit(self, commits: dict[TopicPartition, int]) -> None:
        try:
            await self._consumer.commit(commits)
        except (CommitFailedError, IllegalStateError) as exc:
            # A rebalance took the partitions away: the new owner re-delivers from the last
            # commit and the state's dedup absorbs the repeat.
            log.warning("offset commit skipped after a rebalance: %s", exc)
        except KafkaError as exc:
            log.warning("offset commit failed (will be retried by the next batch): %s", exc)


async def run_feature_consumer(settings: Settings, stop: asyncio.Event) -> ConsumerStats:
    """Entry point of ``clv consume``: build the clients, consume until ``stop``, close all."""
    from redis.asyncio import Redis

    from consumers.kafka import make_consumer, make_producer

    redis = Redis.from_url(settings.redis_url)
    consumer = make_consumer(settings, settings.consumer_group, settings.orders_topic)
    producer = make_producer(settings)
    await producer.start()
    await consumer.start()
    worker = FeatureConsumer(
        settings, consumer, FeatureStore(redis, prefix=settings.key_prefix),
        DeadLetters(producer, settings.dlq_topic),
    )
    try:
        await worker.run(stop)
    finally:
        await consumer.stop()
        await producer.stop()
        await redis.aclose()
    return worker.stats
