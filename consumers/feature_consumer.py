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
import math
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import Counter
from redis.exceptions import RedisClusterException, RedisError

from clv.errors import InvalidEvent, StoreUnavailable
from clv.settings import Settings
from clv.stopping import StoppedWhileStarting, stop_or_first_done, unless_stopped
from consumers.dead_letters import DeadLetters, Rejected
from consumers.kafka import (
    COMMIT_ON_STOP_S,
    ensure_topics,
    make_consumer,
    make_producer,
    outcome_ignored,
    stop_consumer,
    validate_record,
)
from consumers.metrics import metrics_served, record_commit, record_fetch
from feature_store.events import ValidEvent
from feature_store.redis_client import connect
from feature_store.redis_store import AnyRedis, ApplyResult, FeatureStore

log = logging.getLogger(__name__)

EVENTS = Counter("clv_consumer_events", "Order events seen by the feature consumer", ["outcome"])
BATCHES = Counter("clv_consumer_batches", "Batches applied by the feature consumer")
REDIS_RETRIES = Counter(
    "clv_consumer_redis_retries", "Times a feature consumer went back to its commits, Redis away"
)
MISKEYED = Counter(
    "clv_consumer_miskeyed_events",
    "Valid events whose message key is not their user id (their user's order is not kept)",
)


_YIELD_EVERY = 256  # messages validated between yields to the event loop (~0.7 ms)
_UNSETTLED = 3  # batches between submission to the store and their commit, at most
_RETRY_FIRST_S, _RETRY_MAX_S = 1.0, 30.0  # waits before going on after Redis went away
_QUIET_S = 60.0  # a try that ran this long before failing starts a new outage
_MISKEYED_WARN_S = 60.0  # at most one warning of miskeyed events a consumer in this time


@dataclass
class ConsumerStats:
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    too_late: int = 0
    batches: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    redis_retries: int = 0  # times it went back to its commits, Redis away
    miskeyed: int = 0  # valid events whose message key is not their user id


@dataclass
class _Batch:
    """A fetched batch after validation, ready to apply."""

    good: list[ValidEvent] = field(default_factory=list)
    sources: list[ConsumerRecord[bytes, bytes]] = field(default_factory=list)
    bad: list[Rejected] = field(default_factory=list)
    progress: dict[str, int] = field(default_factory=dict)
    commits: dict[TopicPartition, int] = field(default_factory=dict)
    now_ms: int = 0
    miskeyed: list[int] = field(default_factory=list)  # indexes into ``good``


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
        self._applied_at = -math.inf  # monotonic time of the last batch applied
        # Per partition, the offsets dead-lettered as bad and not committed yet: a batch
        # fetched again after a rewind does not send them again.
        self._lettered: dict[TopicPartition, set[int]] = {}
        # Held, and checked against Redis's progress since assigned or since the last outage.
        self._checked: set[TopicPartition] = set()
        self._miskeyed_warned = -math.inf  # monotonic time of the last such warning

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, riding out a Redis that is away for a while.

        When an apply fails because Redis is away (:class:`StoreUnavailable`: down, restarting,
        not answering, a failover), nothing after the last committed batch was committed; the
        consumer waits (1 s, doubling up to 30 s, no later than the allowance's end, or until
        ``stop``), moves the partitions it holds back to the group's commits and goes on from
        there; what had reached Redis counts once, by the events' dedup. An outage runs from
        its first failure until a batch applies, or until a try runs :data:`_QUIET_S` without
        failing; one that lasts ``CLV_REDIS_OUTAGE_SECONDS`` stops the consumer with the error,
        as any other failure does at once.
        """
        s = self._settings
        delay = _RETRY_FIRST_S
        failing_since: float | None = None
        while True:
            began = time.monotonic()
            try:
                await self._consume(stop)
                return
            except StoreUnavailable as exc:
                now = time.monotonic()
                if (
                    failing_since is None
                    or failing_since < self._applied_at
                    or now - began >= _QUIET_S
                ):
                    failing_since, delay = now, _RETRY_FIRST_S  # a new outage
                away = now - failing_since
                if away >= s.redis_outage_seconds:
                    if not s.redis_outage_seconds:
                        raise  # no allowance: the error as it came
                    raise StoreUnavailable(
                        f"Redis away {away:.0f}s, the CLV_REDIS_OUTAGE_SECONDS allowed "
                        f"({s.redis_outage_seconds:g}); last: {exc}"
                    ) from exc
                REDIS_RETRIES.inc()
                self.stats.redis_retries += 1
                # The last try comes when the allowance ends, not up to a backoff step later.
                wait = min(delay, s.redis_outage_seconds - away)
                log.warning(
                    "Redis is away (%s); retrying from the last commit in %gs "
                    "(away %.0fs of CLV_REDIS_OUTAGE_SECONDS=%g)",
                    exc,
                    wait,
                    away,
                    s.redis_outage_seconds,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            try:  # the group coordinator may be slow to answer: a stop does not wait for it
                await unless_stopped(stop, self._rewind())
            except StoppedWhileStarting:
                return
            delay = min(delay * 2, _RETRY_MAX_S)

    async def _rewind(self) -> None:
        """Move the partitions held to the group's last commits (the first offset for one
        never committed: ``auto_offset_reset="earliest"``, as a restart would), dropping
        what was fetched past them."""
        consumer = self._consumer
        for tp in consumer.assignment():
            offset = await consumer.committed(tp)
            try:
                if offset is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, offset)
            except IllegalStateError:  # revoked meanwhile: its new owner starts at the commit
                continue
        self._checked.clear()  # Redis is back: checked again before the next batch

    async def _commits_of(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's commits for ``partitions`` (none for a partition never committed, or when
        the coordinator cannot say: the check they are for only warns)."""
        commits: dict[TopicPartition, int] = {}
        for tp in partitions:
            try:
                offset = await self._consumer.committed(tp)
            except KafkaError as exc:
                log.warning("could not read the group's commit of %s: %s", tp, exc)
                continue
            if offset is not None:
                commits[tp] = offset
        return commits

    async def _check_nothing_lost(self, partitions: set[TopicPartition]) -> None:
        """Say so, loudly, when Redis came back without writes it had acknowledged (a replica
        promoted before it had them, a restart without persistence): its recorded progress is
        short of what the group committed, and the events in between are not in the state
        (re-consuming the topic from the start mends it: deduplication keeps that exact). A
        Redis still away is not asked."""
        commits = await self._commits_of(partitions)
        try:
            progress = await self._store.progress(self._settings.consumer_group)
        except Exception:  # still away: the next try will tell
            return
        for tp, end in commits.items():
            have = progress.get(f"{tp.topic}:{tp.partition}", -1)
            if have < end - 1:
                log.error(
                    "Redis lost acknowledged writes: it holds %s:%s up to offset %s, but the "
                    "group committed up to %s; the events in between are missing from the "
                    "online state (reset the group's offsets to the start to apply them again)",
                    tp.topic,
                    tp.partition,
                    have,
                    end - 1,
                )

    async def _consume(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; the batches in hand are finished and committed first.

        Per batch, in order: validate it, dead-letter its bad messages, and submit its apply to
        the store, which queues it behind the batches before it (on a single Redis the request
        is in Redis's hands while Redis runs the one before, so Redis never waits for this
        loop); then, in a task of its own once its apply is answered, settle it: dead-letter
        what the state refused as too late, and commit, after the batch before it is settled.
        Up to ``_UNSETTLED`` batches are between submission and commit; meanwhile the next
        one is fetched and validated. A failure (Redis gone, a commit refused) ends the run and
        commits nothing after the batch that failed.
        """
        unsettled: deque[asyncio.Task[None]] = deque()
        # Where the batches submitted since this try began ended, per partition: each next
        # batch is applied only after them (the first after a rewind starts at the commits).
        submitted: dict[str, int] = {}
        try:
            while not stop.is_set():
                batch = await self._consumer.getmany(
                    timeout_ms=200, max_records=self._settings.consume_batch
                )
                # A failure stops the consumer now, not when the next batch arrives, which on a
                # quiet topic may be never.
                while unsettled and unsettled[0].done():
                    unsettled.popleft().result()
                # Every poll, as the archiver's: an empty one still forgets what was revoked
                record_fetch(self._consumer, self._settings.consumer_group, batch)
                # Before any batch of a partition just assigned here, or after an outage:
                # does Redis hold what the group committed (it may have come back empty)?
                held = self._consumer.assignment()
                if held != self._checked:
                    new, self._checked = held - self._checked, set(held)
                    if new:
                        # It only warns: a Redis or a coordinator that does not answer it must
                        # not hold a stop up (it waited out the Redis URL's socket_timeout).
                        try:
                            await unless_stopped(stop, self._check_nothing_lost(new))
                        except StoppedWhileStarting:
                            return
                if not batch:
                    continue
                prepared = await self._prepare(batch)
                while len(unsettled) >= _UNSETTLED:
                    # Waited for, never cancelled here (cancelled, this loop must not cancel the
                    # oldest settle task, which may not have run yet: its batch's pending result
                    # would never be awaited). A stop asked for meanwhile does not wait for it
                    # (its commit may hang): ``finally`` settles what is in hand, within a bound;
                    # this batch, not submitted, is fetched again after the restart.
                    await stop_or_first_done(stop, [unsettled[0]])
                    if not unsettled[0].done():
                        return
                    unsettled.popleft().result()
                # Dead letters first: once the batch's progress is recorded nothing may be
                # left to do but the commit (and the dead letters of what the state refused).
                await self._dead_letter(prepared.bad)
                s = self._settings
                applied = await self._store.submit(
                    prepared.good,
                    group=s.consumer_group,
                    progress=prepared.progress,
                    now_ms=prepared.now_ms,
                    after={p: submitted[p] for p in prepared.progress if p in submitted},
                )
                submitted.update(prepared.progress)
                previous = unsettled[-1] if unsettled else None
                unsettled.append(asyncio.create_task(self._settle(prepared, applied, previous)))
        finally:
            if unsettled:
                task = asyncio.current_task()
                # Cancelled: the batches in hand are still awaited, but their failure (which the
                # cancellation may have caused itself: a write cut short fails every call
                # outstanding on its connection) does not replace the cancellation.
                await _settle_in_hand(unsettled, quiet=task is not None and task.cancelling() > 0)

    async def _dead_letter(self, bad: list[Rejected]) -> None:
        """Publish the bad messages of a batch, but none this process sent before and has not
        committed past (a batch fetched again after a rewind holds the same ones; a message
        is judged again there, and may be judged otherwise: the clock moved)."""
        sent = self._lettered
        fresh = [r for r in bad if r.record.offset not in sent.get(_partition(r.record), ())]
        if not fresh:
            return
        await self._dlq.publish(fresh)
        for r in fresh:
            sent.setdefault(_partition(r.record), set()).add(r.record.offset)

    async def _prepare(
        self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> _Batch:
        """Validate a fetched batch. It yields to the event loop every ``_YIELD_EVERY``
        messages, so that the replies of the applies in flight are read and their batches
        settled meanwhile (a batch validated in one go held them up by its whole validation
        time)."""
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
                    ev = validate_record(rec, s, now_ms)
                except InvalidEvent as exc:
                    bad.append(Rejected(rec, exc.reason, exc.detail))
                    continue
                if rec.key != ev.user_id.encode():
                    # Valid, so applied (the store's updates are atomic and take any order),
                    # but the producer breaks the contract's per-user partitioning.
                    out.miskeyed.append(len(good))
                good.append(ev)
                sources.append(rec)
            last = records[-1].offset
            out.progress[f"{tp.topic}:{tp.partition}"] = last
            out.commits[tp] = last + 1
        out.now_ms = now_ms
        return out

    async def _settle(
        self,
        b: _Batch,
        applied: Awaitable[ApplyResult],
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Once the batch's apply is answered and the batch before is settled: dead-letter what
        the state refused as too late, then commit. A failure of the batch before fails this
        one too, so nothing after a failed batch is committed."""
        try:
            result = await applied
        finally:
            if previous is not None:
                await previous
        self._applied_at = time.monotonic()  # Redis is back, if it was away
        if b.good:
            # Before the commit: a crash between the apply and this mark re-delivers the batch,
            # and its users are marked then. A mark that fails is left to the scorer's daily
            # sweep (the features are applied; only their score waits).
            try:
                await self._store.mark_changed(e.user_id for e in b.good)
            except (RedisError, RedisClusterException) as exc:
                log.warning("the scorer was not told of %d changed events: %s", len(b.good), exc)
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
        st.miskeyed += len(b.miskeyed)
        st.batches += 1
        for r in b.bad:
            st.reasons[r.reason] = st.reasons.get(r.reason, 0) + 1
        EVENTS.labels("applied").inc(result.applied)
        EVENTS.labels("duplicate").inc(result.duplicates)
        EVENTS.labels("too_late").inc(len(result.too_late))
        EVENTS.labels("rejected").inc(len(b.bad))
        BATCHES.inc()
        if b.miskeyed:
            MISKEYED.inc(len(b.miskeyed))
            self._warn_miskeyed(b)

    def _warn_miskeyed(self, b: _Batch) -> None:
        """One warning a minute at most: a producer that keys by something else does it to
        every message."""
        now = time.monotonic()
        if now - self._miskeyed_warned < _MISKEYED_WARN_S:
            return
        self._miskeyed_warned = now
        rec, ev = b.sources[b.miskeyed[0]], b.good[b.miskeyed[0]]
        log.warning(
            "%d events in a batch have a message key other than their user_id (the first: "
            "%s:%s@%s, key %r, user %r): a user's events may then be spread over partitions "
            "and consumers, and the order they arrive in (which decides what is too late) is "
            "not the order they were sent in; the producer should key by user_id",
            len(b.miskeyed),
            rec.topic,
            rec.partition,
            rec.offset,
            rec.key[:64] if rec.key is not None else None,
            ev.user_id,
        )

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
        else:
            record_commit(self._consumer, self._settings.consumer_group, commits)
            for tp, end in commits.items():  # what is committed is never fetched again here
                if tp in self._lettered:
                    self._lettered[tp] = {o for o in self._lettered[tp] if o >= end}


async def _settle_in_hand(unsettled: deque[asyncio.Task[None]], *, quiet: bool) -> None:
    """Settle the batches in hand as the consumer stops (asked to, cancelled, or failed): the
    last one's task awaits every one before, for at most :data:`COMMIT_ON_STOP_S`. Their applies
    are Redis's already; what can hang is the commit, which the client retries for as long as
    the group coordinator does not answer (a broker away, a group stuck in a rebalance), and a
    stop must not wait for that. What is not settled by then is left running on its own (its
    outcome retrieved, never raised; cancelling it would cut the client's commit in two and
    leave its inner request failing unobserved) and uncommitted: the group delivers it again
    and the events' dedup absorbs it, as after a crash. A failure within the bound is raised,
    unless ``quiet``."""
    last = unsettled[-1]
    await asyncio.wait({last}, timeout=COMMIT_ON_STOP_S)
    if not last.done():
        log.warning(
            "stopping without committing the last %d batch(es): the commit did not finish "
            "within %gs; the group will deliver them again, and deduplication absorbs them",
            sum(not t.done() for t in unsettled),
            COMMIT_ON_STOP_S,
        )
        for t in unsettled:
            t.add_done_callback(outcome_ignored)
        return
    if quiet:
        with contextlib.suppress(Exception):
            last.result()
    else:
        last.result()


def _partition(record: ConsumerRecord[bytes, bytes]) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)


@dataclass
class Clients:
    """The clients a process of the stack needs, started and registered for closing."""

    redis: AnyRedis
    producer: AIOKafkaProducer
    consumers: list[AIOKafkaConsumer]


async def open_clients(
    resources: contextlib.AsyncExitStack,
    settings: Settings,
    groups: list[str],
    redis: AnyRedis | None = None,
) -> Clients:
    """Redis (``redis`` when given, registered for closing by the caller), a producer and one
    orders-topic consumer per entry of ``groups``; each is closed by ``resources`` on the way
    out, also when a later one fails to start."""

    if redis is None:
        redis = connect(settings.redis_url)
        resources.push_async_callback(redis.aclose)
    # Each client is closed also when its start fails or is cancelled (a stop while a
    # consumer waits for the group to assign partitions): the group member it joined as is
    # left, and its background tasks end.
    producer = make_producer(settings)
    resources.push_async_callback(producer.stop)
    await producer.start()
    consumers = []
    for group in groups:
        consumer = make_consumer(settings, group, settings.orders_topic)
        resources.push_async_callback(stop_consumer, consumer)
        await consumer.start()
        consumers.append(consumer)
    return Clients(redis, producer, consumers)


async def run_feature_consumer(settings: Settings, stop: asyncio.Event) -> ConsumerStats:
    """Entry point of ``clv consume``: build the clients, consume until ``stop``, close all."""

    with metrics_served(settings):
        return await _run_feature_consumer(settings, stop)


async def _run_feature_consumer(settings: Settings, stop: asyncio.Event) -> ConsumerStats:
    async with contextlib.AsyncExitStack() as resources:
        try:  # a stop while starting (the group join can wait minutes) ends it here
            # A Redis missing at the start is a setting to fix, said at once, and before
            # anything touches Kafka: a member that joins the group only to leave it rebalances
            # the running consumers twice. One that goes away later is waited for
            # (``FeatureConsumer.run``).
            redis = connect(settings.redis_url)
            resources.push_async_callback(redis.aclose)
            await unless_stopped(stop, redis.ping())
            await unless_stopped(stop, ensure_topics(settings))
            clients = await unless_stopped(
                stop, open_clients(resources, settings, [settings.consumer_group], redis)
            )
        except StoppedWhileStarting:
            return ConsumerStats()
        worker = FeatureConsumer(
            settings,
            clients.consumers[0],
            FeatureStore(clients.redis, prefix=settings.key_prefix),
            DeadLetters(clients.producer, settings.dlq_topic),
        )
        await worker.run(stop)
    return worker.stats
