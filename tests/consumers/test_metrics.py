"""The stream processes' Prometheus endpoint: what `clv consume` and `clv archive` serve at
CLV_METRICS_PORT, scraped over HTTP from a real consumer on the real broker and Redis."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from clv.errors import ClvError
from clv.local_stack import LocalProcess, free_port
from clv.replay import publish
from clv.settings import Settings
from consumers.archiver import run_archiver
from consumers.feature_consumer import run_feature_consumer
from consumers.kafka import end_offsets, wait_committed
from consumers.metrics import LAG, metrics_served, record_commit
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
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Any, which: str
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
    for metric in LAG.collect():
        for s in metric.samples:
            if s.labels == {"group": group, "topic": tp.topic, "partition": str(tp.partition)}:
                return s.value
    return None


def test_lag_is_the_end_after_the_commit_and_a_lost_partition_is_forgotten() -> None:
    p0, p1 = TopicPartition("t-lag", 0), TopicPartition("t-lag", 1)
    consumer = _Consumer({p0: 120, p1: 50})
    record_commit(consumer, "g-lag", {p0: 100, p1: 50})  # type: ignore[arg-type]
    # Fails if the lag is not the records after the committed offset.
    assert (_gauge("g-lag", p0), _gauge("g-lag", p1)) == (20, 0)
    consumer.assigned = {p0}  # p1 went to another process in a rebalance
    record_commit(consumer, "g-lag", {p0: 120})  # type: ignore[arg-type]
    # Fails if a partition this process lost keeps its last lag here (its new owner reports
    # it: two processes would report one partition, one of them stale).
    assert (_gauge("g-lag", p0), _gauge("g-lag", p1)) == (0, None)


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
