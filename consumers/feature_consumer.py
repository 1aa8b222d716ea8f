"""The feature consumer: orders topic -> validated events -> Redis state, effectively once.

Per fetched batch: validate every message (bad ones go to the dead-letter topic), apply the good
ones with their dedup and the consumer's progress in one Redis script, dead-letter the ones the
state rejects as too late, and only then commit the offsets. A crash anywhere re-delivers from
the last commit; re-applied events are duplicates, so nothing counts twice and nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import Counter

from clv.errors import InvalidEvent
from clv.settings import Settings
from consumers.dead_letters import DeadLetters, Rejected
from consumers.kafka import ensure_topics, make_consumer, make_producer, validate_record
from feature_store.events import ValidEvent
from feature_store.redis_client import connect
from feature_store.redis_store import AnyRedis, ApplyResult, FeatureStore

log = logging.getLogger(__name__)

EVENTS = Counter("clv_consumer_events", "Order events seen by the feature consumer", ["outcome"])
BATCHES = Counter("clv_consumer_batches", "Batches applied by the feature consumer")


_YIELD_EVERY = 256  # messages validated between yields to the event loop (~0.7 ms)


@dataclass
class ConsumerStats:
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    too_late: int = 0
    batches: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Batch:
    """A fetched batch after validation, ready to apply."""

    good: list[ValidEvent] = field(default_factory=list)
    sources: list[ConsumerRecord[bytes, bytes]] = field(default_factory=list)
    bad: list[Rejected] = field(default_factory=list)
    progress: dict[str, int] = field(default_factory=dict)
    commits: dict[TopicPartition, int] = field(default_factory=dict)
    now_ms: int = 0


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
        """Consume until ``stop`` is set; the batches in hand are finished and committed first.

        Three stages overlap: while Redis applies one batch (on its own core), the next one is
        fetched and validated here and the one before is settled (its too-late events
        dead-lettered, its offsets committed). Redis waits only for the next batch's request,
        not for the broker's commit round trip. Applies happen strictly in order, and so do
        commits, each after its own batch's apply.
        """
        applying: asyncio.Task[tuple[_Batch, ApplyResult]] | None = None
        settling: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                batch = await self._consumer.getmany(
                    timeout_ms=200, max_records=self._settings.consume_batch
                )
                # A failure (Redis gone, a commit refused) stops the consumer now, not when the
                # next batch arrives, which on a quiet topic may be never; it is not committed.
                if applying is not None and applying.done():
                    done, applying = applying, None
                    settling = self._settle_later(done.result(), settling)
                if settling is not None and settling.done():
                    settling.result()
                    settling = None
                if not batch:
                    continue
                prepared = await self._prepare(batch)
                if applying is not None:
                    done, applying = applying, None
                    settling = self._settle_later(await done, settling)
                applying = asyncio.create_task(self._apply(prepared))
                await asyncio.sleep(0)  # it sends its request before the next fetch is parsed
        finally:
            try:
                if applying is not None:
                    settling = self._settle_later(await applying, settling)
            finally:
                if settling is not None:
                    await settling

    async def _prepare(
        self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> _Batch:
        """Validate a fetched batch. It yields to the event loop every ``_YIELD_EVERY``
        messages: the apply in flight needs the loop to start (a fetch served from the client's
        buffer returns without yielding), to write out its request (a few hundred KiB, more
        than a socket takes at once) and to read Redis's reply, and the commit needs it too; a
        batch validated in one go held all of them up by its whole validation time."""
        s = self._settings
        out = _Batch()
        good, sources, bad = out.good, out.sources, out.bad
        now_ms = time.time_ns() // 1_000_000
        n = 0
        for tp, records in batch.items():
            for rec in records:
                n += 1
                if n % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                try:
                    good.append(validate_record(rec, s, now_ms))
                    sources.append(rec)
                except InvalidEvent as exc:
                    bad.append(Rejected(rec, exc.reason, exc.detail))
            last = records[-1].offset
            out.progress[f"{tp.topic}:{tp.partition}"] = last
            out.commits[tp] = last + 1
        out.now_ms = now_ms
        return out

    async def _apply(self, b: _Batch) -> tuple[_Batch, ApplyResult]:
        s = self._settings
        # Dead letters first: once the batch's progress is recorded nothing may be left to do
        # but the commit (and the dead letters of what the state refused as too late).
        if b.bad:
            await self._dlq.publish(b.bad)
        result = await self._store.apply(
            b.good, group=s.consumer_group, progress=b.progress, now_ms=b.now_ms
        )
        return b, result

    def _settle_later(
        self, applied: tuple[_Batch, ApplyResult], previous: asyncio.Task[None] | None
    ) -> asyncio.Task[None]:
        return asyncio.create_task(self._settle(*applied, previous))

    async def _settle(
        self, b: _Batch, result: ApplyResult, previous: asyncio.Task[None] | None
    ) -> None:
        """Dead-letter what the state refused as too late, then commit, after the batch
        before: a failure there fails this batch too, so nothing after it is committed."""
        if previous is not None:
            await previous
        if result.too_late:
            late = [
                Rejected(
                    b.sources[i],
                    "too_late",
                    f"dated {b.good[i].day} at or before the user's latest event day minus "
                    "the longest window",
                )
                for i in result.too_late
            ]
            await self._dlq.publish(late)
        await self._commit(b.commits)
        st = self.stats
        st.applied += result.applied
        st.duplicates += result.duplicates
        st.too_late += len(result.too_late)
        st.rejected += len(b.bad)
        st.batches += 1
        for r in b.bad:
            st.reasons[r.reason] = st.reasons.get(r.reason, 0) + 1
        EVENTS.labels("applied").inc(result.applied)
        EVENTS.labels("duplicate").inc(result.duplicates)
        EVENTS.labels("too_late").inc(len(result.too_late))
        EVENTS.labels("rejected").inc(len(b.bad))
        BATCHES.inc()

    async def _commit(self, commits: dict[TopicPartition, int]) -> None:
        """Commit ``commits``. The client retries retriable errors itself (for as long as it
        takes); what reaches here is a rebalance, skipped (the new owner re-delivers from the
        last commit and the state's dedup absorbs the repeat), or an error no retry mends (an
        authorisation refused, say), which stops this consumer rather than let it run on
        committing nothing: its batches are re-delivered after a restart, nothing is lost."""
        try:
            await self._consumer.commit(commits)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("offset commit skipped after a rebalance: %s", exc)
        except KafkaError as exc:
            log.error("offset commit refused, stopping this consumer: %s", exc)
            raise


@dataclass
class Clients:
    """The clients a process of the stack needs, started and registered for closing."""

    redis: AnyRedis
    producer: AIOKafkaProducer
    consumers: list[AIOKafkaConsumer]


async def open_clients(
    resources: contextlib.AsyncExitStack, settings: Settings, groups: list[str]
) -> Clients:
    """Redis, a producer and one orders-topic consumer per entry of ``groups``; each is closed
    by ``resources`` on the way out, also when a later one fails to start."""

    redis = connect(settings.redis_url)
    resources.push_async_callback(redis.aclose)
    producer = make_producer(settings)
    await producer.start()
    resources.push_async_callback(producer.stop)
    consumers = []
    for group in groups:
        consumer = make_consumer(settings, group, settings.orders_topic)
        await consumer.start()
        resources.push_async_callback(consumer.stop)
        consumers.append(consumer)
    return Clients(redis, producer, consumers)


async def run_feature_consumer(settings: Settings, stop: asyncio.Event) -> ConsumerStats:
    """Entry point of ``clv consume``: build the clients, consume until ``stop``, close all."""

    await ensure_topics(settings)
    async with contextlib.AsyncExitStack() as resources:
        clients = await open_clients(resources, settings, [settings.consumer_group])
        worker = FeatureConsumer(
            settings,
            clients.consumers[0],
            FeatureStore(clients.redis, prefix=settings.key_prefix),
            DeadLetters(clients.producer, settings.dlq_topic),
        )
        await worker.run(stop)
    return worker.stats
