"""The archiver writes the offline event log; features from it equal the online ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pandas as pd
import pytest
from aiokafka import AIOKafkaConsumer

from clv.local_stack import LocalProcess
from clv.replay import publish
from clv.settings import Settings
from consumers.archiver import Archiver
from consumers.kafka import committed, end_offsets, ensure_topics, make_consumer
from feature_store.event_log import read_events
from feature_store.features import RETENTION_DAYS
from feature_store.offline import features_at
from feature_store.redis_client import connect
from feature_store.redis_store import FeatureStore
from tests.feature_store.streams import BAD, messy_events

from .kafka_helpers import event_message, unique_settings
from .test_feature_consumer import _interleave, _run_group

pytestmark = pytest.mark.integration


@pytest.fixture
async def settings(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path
) -> AsyncIterator[Settings]:
    s = unique_settings(
        broker.address,
        redis_server.address,
        event_log_dir=tmp_path / "events",
        archive_flush_events=700,
        archive_flush_seconds=0.5,
    )
    await ensure_topics(s)
    yield s


class _Killed(Exception):
    """The archiver's process dying between writing a batch and committing its offsets."""


async def _archive_all(settings: Settings, *, die_at_second_commit: bool = False) -> None:
    """Run the archiver until its group has committed the whole topic, or, with
    ``die_at_second_commit``, until it dies after writing its second batch, uncommitted."""
    ends = await end_offsets(settings, settings.orders_topic)
    stop = asyncio.Event()
    consumer = make_consumer(settings, settings.archiver_group, settings.orders_topic)
    await consumer.start()
    if die_at_second_commit:
        real_commit, commits = consumer.commit, []

        async def commit(offsets: object = None) -> None:
            commits.append(offsets)
            if len(commits) > 1:
                raise _Killed  # the batch is in the log; its offsets are never committed
            await real_commit(offsets)  # type: ignore[arg-type]

        consumer.commit = commit  # type: ignore[method-assign]
    archiver = Archiver(settings, consumer, settings.event_log_dir)
    task = asyncio.create_task(archiver.run(stop))
    try:
        while not task.done():
            await asyncio.sleep(0.2)
            done = await committed(settings, settings.archiver_group, settings.orders_topic)
            if all((done.get(tp) or 0) >= end for tp, end in ends.items()):
                break
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()
    if die_at_second_commit:
        assert isinstance(task.exception(), _Killed)


async def test_offline_features_from_the_log_equal_the_online_ones(settings: Settings) -> None:
    events = messy_events(8, users=80, per_user=30)
    await publish(settings, _interleave(events, [m for m, _ in BAD[:6]], 9))
    ends = await end_offsets(settings, settings.orders_topic)
    await _archive_all(settings, die_at_second_commit=True)
    done = await committed(settings, settings.archiver_group, settings.orders_topic)
    assert sum(done.get(tp) or 0 for tp in ends) < sum(ends.values())  # records left to re-read
    raw = read_events(settings.event_log_dir, dedupe=False)
    assert raw.value_counts(["partition", "offset"]).max() == 1  # each record written once
    done_at = {tp.partition: offset or 0 for tp, offset in done.items()}
    uncommitted = raw[raw["offset"] >= raw["partition"].map(done_at)]
    assert len(uncommitted) > 0  # written before the crash, to be read and written again
    await _archive_all(settings)  # restart: re-reads from the last commit
    await _run_group(settings, 1)
    for group in (settings.archiver_group, settings.consumer_group):
        done = await committed(settings, group, settings.orders_topic)
        assert {tp: done.get(tp) for tp in ends} == ends, group  # the end exactly: none skipped

    log = read_events(settings.event_log_dir, arrival_order=True)
    assert log["event_id"].is_unique and set(log["event_id"]) == {e.event_id for e in events}
    copies = read_events(settings.event_log_dir, dedupe=False).value_counts(["partition", "offset"])
    again = copies.index.isin(uncommitted.set_index(["partition", "offset"]).index)
    assert again.sum() == len(uncommitted) and (copies[again] == 2).all()  # written again
    assert (copies[~again] == 1).all()  # the committed ones were not re-read
    assert len(list(Path(settings.event_log_dir).glob("date=*/part-*.parquet"))) > 1
    as_of = int(log["day"].max())
    offline = features_at(log, as_of, late_after_days=RETENTION_DAYS).sort_index()
    redis = connect(settings.redis_url)
    try:
        store = FeatureStore(redis, prefix=settings.key_prefix)
        online = pd.concat([await store.features(u, as_of) for u in offline.index]).sort_index()
    finally:
        await redis.aclose()
    pd.testing.assert_frame_equal(online, offline, check_dtype=False)


async def test_the_log_is_partitioned_by_event_date(settings: Settings) -> None:
    events = messy_events(3, users=10, per_user=10)
    await publish(settings, [event_message(e) for e in events])
    await _archive_all(settings)
    for folder in Path(settings.event_log_dir).glob("date=*"):
        part = pd.read_parquet(folder)
        dates = pd.to_datetime(part["ts_ms"], unit="ms").dt.date.astype(str).unique()
        assert list(dates) == [folder.name.removeprefix("date=")]
    one_user = events[0].user_id
    mine = read_events(settings.event_log_dir, user_id=one_user)
    assert set(mine["event_id"]) == {e.event_id for e in events if e.user_id == one_user}


async def _buffered(consumer: AIOKafkaConsumer, ends: dict[object, int]) -> None:
    """Until the archiver has been handed (and so buffered) every record of the topic."""
    while len(consumer.assignment()) < len(ends) or [
        tp for tp, end in ends.items() if await consumer.position(tp) < end
    ]:
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_the_buffer_is_flushed_and_committed_when_the_archiver_stops(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path, how: str
) -> None:
    # Fails if the flush after the loop (stop) or in the CancelledError handler (cancel) is
    # dropped: the buffered events are neither written nor committed at shutdown (a restart
    # reads them again, but `clv up` stopping leaves the log behind the topic).
    s = unique_settings(
        broker.address,
        redis_server.address,
        event_log_dir=tmp_path / "events",
        archive_flush_events=10**6,  # neither flush condition is met while it runs
        archive_flush_seconds=24 * 3600,
    )
    await ensure_topics(s)
    events = messy_events(6, users=5, per_user=5)
    await publish(s, [event_message(e) for e in events])
    ends = await end_offsets(s, s.orders_topic)
    stop = asyncio.Event()
    consumer = make_consumer(s, s.archiver_group, s.orders_topic)
    await consumer.start()
    archiver = Archiver(s, consumer, s.event_log_dir)
    task = asyncio.create_task(archiver.run(stop))
    try:
        await asyncio.wait_for(_buffered(consumer, ends), timeout=60)
        assert archiver.written == 0  # all of it is still in the buffer
        if how == "stop":
            stop.set()
            await task
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        done = await committed(s, s.archiver_group, s.orders_topic)
        await consumer.stop()
    assert archiver.written == len(events)
    assert {tp: c or 0 for tp, c in done.items()} == ends  # an empty partition has none
    assert len(read_events(s.event_log_dir, dedupe=False)) == len(events)
