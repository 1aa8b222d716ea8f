"""The archiver: orders topic -> the offline event log (date-partitioned Parquet).

Its own consumer group, so it reads every event whatever the feature consumers do. Valid events
are buffered and flushed to Parquet by size or age; offsets are committed only after the flush,
so a crash re-writes at most one buffer, which readers deduplicate by event id. Invalid messages
are skipped here: the feature consumer dead-letters them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pandas as pd
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import Counter

from clv.errors import InvalidEvent
from clv.files import check_usable_dir
from clv.settings import Settings
from clv.stopping import StoppedWhileStarting, unless_stopped
from consumers.kafka import (
    COMMIT_ON_STOP_S,
    commit_unless_stopping,
    ensure_topics,
    make_consumer,
    stop_consumer,
    validate_record,
)
from consumers.metrics import metrics_served, record_commit, record_fetch
from feature_store.event_log import ARRIVAL_COLUMNS, remove_stale_parts, write_events
from feature_store.offline import EVENT_COLUMNS

log = logging.getLogger(__name__)

ARCHIVED = Counter("clv_archiver_events", "Events written to the offline event log")


class Archiver:
    def __init__(self, settings: Settings, consumer: AIOKafkaConsumer, root: Path) -> None:
        self._settings = settings
        self._consumer = consumer
        self._root = Path(root)
        self._rows: dict[str, list[object]] = {c: [] for c in _COLUMNS}
        self._pending: dict[TopicPartition, int] = {}
        self._since = time.monotonic()
        self.written = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Archive until ``stop`` (or a cancel), then flush what is buffered. On an error the
        buffer is left as it is: its records were not committed, so a restart reads them again
        (a second write here could fail the same way and hide the first error)."""
        s = self._settings
        removed = await asyncio.to_thread(remove_stale_parts, self._root)
        if removed:
            log.info("removed %d temporary parts left by archivers killed mid-write", removed)
        try:
            while not stop.is_set():
                batch = await self._consumer.getmany(timeout_ms=200, max_records=s.consume_batch)
                record_fetch(self._consumer, s.archiver_group, batch)
                self._buffer(batch)
                full = len(self._rows["event_id"]) >= s.archive_flush_events
                old = time.monotonic() - self._since >= s.archive_flush_seconds
                if self._pending and (full or old):
                    await self.flush(stop)
        except asyncio.CancelledError:
            if self._pending:
                stopped = asyncio.Event()  # cancelled outright: bounded as after a stop
                stopped.set()
                await self.flush(stopped)
            raise
        if self._pending:
            await self.flush(stop)

    def _buffer(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        s = self._settings
        now_ms = time.time_ns() // 1_000_000
        rows = self._rows
        for tp, records in batch.items():
            for rec in records:
                try:
                    ev = validate_record(rec, s, now_ms)
                except InvalidEvent:  # the feature consumers dead-letter it
                    continue
                for col, value in (
                    ("event_id", ev.event_id),
                    ("type", ev.type),
                    ("user_id", ev.user_id),
                    ("order_id", ev.order_id),
                    ("amount", ev.amount),
                    ("currency", ev.currency),
                    ("ts_ms", ev.ts_ms),
                    ("day", ev.day),
                    ("cents", ev.cents),
                    ("partition", rec.partition),
                    ("offset", rec.offset),
                ):
                    rows[col].append(value)
            if records:
                self._pending[tp] = records[-1].offset + 1

    async def flush(self, stop: asyncio.Event | None = None) -> None:
        """Write the buffer as a part, then commit its offsets; once ``stop`` is set the commit
        is waited for at most :data:`~consumers.kafka.COMMIT_ON_STOP_S`
        (:func:`~consumers.kafka.commit_unless_stopping`)."""
        frame = pd.DataFrame(self._rows)
        # Parquet writing is blocking file I/O: keep it off the event loop.
        await asyncio.to_thread(write_events, self._root, frame)
        try:
            committed = await commit_unless_stopping(
                self._consumer, self._pending, stop or asyncio.Event()
            )
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            log.warning(
                "archiver commit failed (events will be re-written, then deduplicated): %s", exc
            )
        else:
            if committed:
                record_commit(self._consumer, self._settings.archiver_group, self._pending)
            else:
                log.warning(
                    "archiver stopping without its last commit (not answered within %gs): the "
                    "events will be re-written after the restart, then deduplicated",
                    COMMIT_ON_STOP_S,
                )
        self.written += len(frame)
        ARCHIVED.inc(len(frame))
        self._rows = {c: [] for c in _COLUMNS}
        self._pending = {}
        self._since = time.monotonic()


_COLUMNS = (*EVENT_COLUMNS, *ARRIVAL_COLUMNS)


async def run_archiver(settings: Settings, stop: asyncio.Event) -> int:
    """Entry point: archive until ``stop``; returns the number of events written."""
    check_usable_dir(settings.event_log_dir, "the event log", "CLV_EVENT_LOG_DIR")
    with metrics_served(settings):  # first: a port in use ends it before a client is made
        consumer = make_consumer(settings, settings.archiver_group, settings.orders_topic)
        archiver = Archiver(settings, consumer, settings.event_log_dir)
        try:  # a stop while starting (the group join can wait minutes) ends it here
            await unless_stopped(stop, ensure_topics(settings))
            await unless_stopped(stop, consumer.start())
            await archiver.run(stop)
        except StoppedWhileStarting:
            pass
        finally:
            await stop_consumer(consumer)  # also after a failed or cancelled start
    return archiver.written
