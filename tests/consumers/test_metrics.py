"""The stream processes' Prometheus endpoint: what `clv consume` and `clv archive` serve at
CLV_METRICS_PORT, scraped over HTTP from a real consumer on the real broker and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import types
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from clv.errors import ClvError
from clv.local_stack import LocalProcess, free_port, start_redis
from clv.replay import publish
from clv.settings import Settings
from consumers.archiver import Archiver, run_archiver
from consumers.dead_letters import DeadLetters
from consumers.feature_consumer import FeatureConsumer, open_clients, run_feature_consumer
from consumers.kafka import end_offsets, ensure_topics, wait_committed
from consumers.metrics import metrics_served, record_commit, record_fetch
from feature_store.redis_store import FeatureStore
from tests.feature_store.streams import messy_events

from .kafka_helpers import event_message, unique_settings


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample served at http://127.0.0.1:port/metrics, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _lags(samples: dict[Any, float], group: str) -> dict[int, float]:
    return {
        int(dict(labels)["partition"]): value
        for (name, labels), value in samples.items()
        if name == "clv_consumer_lag" and dict(labels)["group"] == group
    }


@pytest.mark.integration
@pytest.mark.parametrize("which", ["consume", "archive"])
async def test_a_stream_process_serves_its_lag_and_last_commit(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path, which: str
) -> None:
    port = free_port()
    settings = unique_settings(
        broker.address, redis_server.address, metrics_port=port, event_log_dir=tmp_path / "log"
    )
    run, group = {
        "consume": (run_feature_consumer, settings.consumer_group),
        "archive": (run_archiver, settings.archiver_group),
    }[which]
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop))  # type: ignore[operator]
    await publish(settings, [event_message(e) for e in messy_events(3, users=30, per_user=10)])
    await wait_committed(settings, group)
    samples = await asyncio.to_thread(_scrape, port)
    # Fails if the endpoint is not served, or serves no lag per partition, or a lag that does
    # not fall to zero once every record is committed (an operator would scale up for nothing).
    ends = await end_offsets(settings, settings.orders_topic)
    used = {tp.partition for tp, end in ends.items() if end > 0}
    assert used and set(_lags(samples, group)) >= used
    assert all(lag == 0 for lag in _lags(samples, group).values())
    assert samples[("clv_consumer_last_commit_timestamp_seconds", (("group", group),))] > 0
    stop.set()
    await asyncio.wait_for(task, 60)
    # The endpoint goes with the process's work: the port is free again.
    with pytest.raises(OSError):
        await asyncio.to_thread(_scrape, port)


@pytest.mark.integration
async def test_a_consumer_stuck_before_its_first_commit_shows_its_backlog(
    broker: LocalProcess, tmp_path: Path
) -> None:
    redis = start_redis(free_port(), tmp_path / "redis")  # its own: it is frozen below
    port = free_port()
    settings = unique_settings(broker.address, redis.address, metrics_port=port)
    await ensure_topics(settings)
    await publish(settings, [event_message(e) for e in messy_events(5, users=40, per_user=10)])
    published = await end_offsets(settings, settings.orders_topic)
    ends = {tp.partition: end for tp, end in published.items()}
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as resources:
        # Built here rather than by `clv consume`, which refuses a Redis that does not answer
        # at its start: this one hangs once the consumer runs.
        clients = await open_clients(resources, settings, [settings.consumer_group])
        worker = FeatureConsumer(
            settings,
            clients.consumers[0],
            FeatureStore(clients.redis, prefix=settings.key_prefix),
            DeadLetters(clients.producer, settings.dlq_topic),
        )
        os.kill(redis.proc.pid, signal.SIGSTOP)  # a Redis that hangs: no batch applies
        with metrics_served(settings):
            task = asyncio.create_task(worker.run(stop))
            try:
                lags: dict[int, float] = {}
                for _ in range(120):  # until it has fetched (and so holds) a partition
                    with contextlib.suppress(OSError):
                        lags = _lags(
                            await asyncio.to_thread(_scrape, port), settings.consumer_group
                        )
                    if lags:
                        break
                    await asyncio.sleep(0.5)
                # Fails if a consumer that fetched but never committed reports no lag: its
                # backlog, the case an alert on the lag is for, would not show.
                assert lags and all(lag == ends[p] > 0 for p, lag in lags.items())
            finally:
                os.kill(redis.proc.pid, signal.SIGCONT)
            await wait_committed(settings, settings.consumer_group)
            after = _lags(await asyncio.to_thread(_scrape, port), settings.consumer_group)
            assert set(after.values()) == {0}
            stop.set()
            await asyncio.wait_for(task, 60)
    redis.stop()


def test_a_partition_fetched_but_not_committed_counts_from_its_first_record() -> None:
    p0, p1 = TopicPartition("t-fetch", 0), TopicPartition("t-fetch", 1)
    consumer = _Consumer({p0: 500, p1: 80})
    record = types.SimpleNamespace
    record_fetch(consumer, "g-fetch", {p0: [record(offset=300), record(offset=301)]})  # type: ignore[arg-type, dict-item]
    # Fails if a fetched partition has no lag until its first commit here.
    assert (_gauge("g-fetch", p0), _gauge("g-fetch", p1)) == (200, None)
    record_commit(consumer, "g-fetch", {p0: 302})  # type: ignore[arg-type]
    assert _gauge("g-fetch", p0) == 198
    consumer.assigned = {p1}  # p0 went to another process, p1 came here
    record_fetch(consumer, "g-fetch", {p1: [record(offset=70)]})  # type: ignore[arg-type, dict-item]
    consumer.assigned = {p0, p1}  # p0 back: its first record here starts it afresh
    record_fetch(consumer, "g-fetch", {p0: [record(offset=450)]})  # type: ignore[arg-type, dict-item]
    # Fails if a partition that came back keeps the commit this process made before it left.
    assert (_gauge("g-fetch", p0), _gauge("g-fetch", p1)) == (50, 10)


class _Consumer:
    """What record_commit reads of a consumer: the partitions' ends as fetched, and its
    assignment (a stand-in: the point is the arithmetic and the forgetting)."""

    def __init__(self, ends: dict[TopicPartition, int]) -> None:
        self.ends = ends
        self.assigned = set(ends)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.ends.get(tp)

    def assignment(self) -> set[TopicPartition]:
        return self.assigned


def _gauge(group: str, tp: TopicPartition) -> float | None:
    """The lag a scrape of this process would report for ``tp`` of ``group``."""
    labels = {"group": group, "topic": tp.topic, "partition": str(tp.partition)}
    return REGISTRY.get_sample_value("clv_consumer_lag", labels)


def test_lag_is_the_end_after_the_commit_and_a_lost_partition_is_forgotten() -> None:
    p0, p1 = TopicPartition("t-lag", 0), TopicPartition("t-lag", 1)
    consumer = _Consumer({p0: 120, p1: 50})
    record_commit(consumer, "g-lag", {p0: 100, p1: 50})  # type: ignore[arg-type]
    # Fails if the lag is not the records after the committed offset.
    assert (_gauge("g-lag", p0), _gauge("g-lag", p1)) == (20, 0)
    consumer.ends[p0] = 130  # fetched further, not committed yet
    assert _gauge("g-lag", p0) == 30
    consumer.assigned = {p0}  # p1 went to another process in a rebalance
    # Fails if a partition this process lost keeps its last lag here until the consumer
    # commits again (never, if what it still holds is quiet): two processes would report one
    # partition, one of them stale.
    assert (_gauge("g-lag", p0), _gauge("g-lag", p1)) == (30, None)


def test_a_partition_moved_to_a_sibling_consumer_is_reported_by_it() -> None:
    # clv up --consumers N runs N consumers of one group in one process, and a rebalance
    # (another member joining the group) can move a partition from one of them to another.
    p0, p1 = TopicPartition("t-sib", 0), TopicPartition("t-sib", 1)
    a, b = _Consumer({p0: 10, p1: 10}), _Consumer({})
    record_commit(a, "g-sib", {p0: 10, p1: 10})  # type: ignore[arg-type]
    a.assigned, b.assigned, b.ends = {p0}, {p1}, {p1: 25}  # p1 went from a to b
    record_commit(b, "g-sib", {p1: 20})  # type: ignore[arg-type]
    record_commit(a, "g-sib", {p0: 10})  # type: ignore[arg-type]
    # Fails if the one that lost it removes, or still reports, the lag its sibling reports.
    assert (_gauge("g-sib", p0), _gauge("g-sib", p1)) == (0, 5)


@pytest.mark.parametrize("which", ["consume", "archive"])
async def test_a_commit_that_outlives_its_partition_does_not_stop_the_consumer(
    tmp_path: Path, which: str
) -> None:
    # A real (unstarted) aiokafka consumer: its highwater() asserts the partition is assigned.
    # A commit the client retried (a coordinator moving, say) can go through under the
    # generation of a rebalance that meanwhile gave the partition to another member.
    consumer = AIOKafkaConsumer("orders-gone", group_id="g-gone", bootstrap_servers="127.0.0.1:1")
    tp = TopicPartition("orders-gone", 0)
    consumer._subscription.assign_from_subscribed({tp})

    async def commit(offsets: Any) -> None:
        consumer._subscription.assign_from_subscribed(set())  # the rebalance, mid-commit

    consumer.commit = commit  # type: ignore[method-assign]
    settings = Settings(event_log_dir=tmp_path)
    try:
        # Fails if recording a commit that went through can raise: the commit path would stop
        # the feature consumer (and so clv up) or the archiver over a metric.
        if which == "consume":
            worker = FeatureConsumer(settings, consumer, None, None)  # type: ignore[arg-type]
            await worker._commit({tp: 10})
        else:
            archiver = Archiver(settings, consumer, tmp_path)
            archiver._pending = {tp: 10}
            await archiver.flush()
        assert _gauge("g-gone", tp) is None
    finally:
        await consumer.stop()


def test_a_scrape_while_a_consumer_is_added_still_reports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import consumers.metrics as metrics

    tp = TopicPartition("t-race", 0)
    consumer = _Consumer({tp: 9})
    record_commit(consumer, "g-race", {tp: 4})  # type: ignore[arg-type]
    real = metrics._WATCHED
    reads = []

    class AddedMeanwhile:  # as the event loop's thread adding a consumer during the read
        def items(self) -> Any:
            reads.append(1)
            if len(reads) == 1:
                raise RuntimeError("dictionary changed size during iteration")
            return real.items()

    monkeypatch.setattr(metrics, "_WATCHED", AddedMeanwhile())
    # Fails if the scrape (in the server's thread) errs, or reports nothing, when the watched
    # consumers change while it reads them.
    assert _gauge("g-race", tp) == 5


def test_no_metrics_port_serves_nothing_and_a_port_in_use_is_an_error_at_once() -> None:
    with metrics_served(Settings()):
        pass  # CLV_METRICS_PORT unset: nothing to serve, nothing bound
    port = free_port()
    with metrics_served(Settings(metrics_port=port)):
        # Fails if a second process on the same port starts anyway and serves nothing.
        with (
            pytest.raises(ClvError, match=f"cannot serve metrics at 127.0.0.1:{port}"),
            metrics_served(Settings(metrics_port=port)),
        ):
            pass


async def test_a_metrics_port_in_use_ends_the_archiver_before_it_makes_a_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if the archiver makes its Kafka consumer before it binds the port: the error then
    # left a consumer never closed ("Unclosed AIOKafkaConsumer" after the one-line error).
    import consumers.archiver as archiver_module

    made: list[object] = []
    monkeypatch.setattr(archiver_module, "make_consumer", lambda *a, **k: made.append(a))
    port = free_port()
    settings = Settings(metrics_port=port, event_log_dir=tmp_path / "log")
    with metrics_served(settings), pytest.raises(ClvError, match="cannot serve metrics"):
        await run_archiver(settings, asyncio.Event())
    assert made == []
