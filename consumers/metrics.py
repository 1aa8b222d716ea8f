"""Prometheus metrics of the stream processes, and the endpoint that serves them.

The counters live with their code (``clv_consumer_events_total`` in the feature consumer,
``clv_archiver_events_total`` in the archiver); this module adds what tells an operator whether
the consumers keep up: each partition's lag behind its end after the group's last commit, and
the time of that commit. ``clv consume``, ``clv archive`` and ``clv up`` serve them at
``http://CLV_API_HOST:CLV_METRICS_PORT/metrics`` when ``CLV_METRICS_PORT`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Gauge, start_http_server

from clv.errors import ClvError
from clv.settings import Settings

log = logging.getLogger(__name__)

LAG = Gauge(
    "clv_consumer_lag",
    "Records of a partition after its last commit by the group (its end offset, as the last "
    "fetch saw it, minus the committed offset)",
    ["group", "topic", "partition"],
)
LAST_COMMIT = Gauge(
    "clv_consumer_last_commit_timestamp_seconds",
    "When the group's offsets were last committed by this process (Unix time)",
    ["group"],
)

#: The partitions each consumer set a lag for, so a partition it lost in a rebalance stops
#: being reported by it (its new owner reports it).
_REPORTED: weakref.WeakKeyDictionary[AIOKafkaConsumer, set[TopicPartition]] = (
    weakref.WeakKeyDictionary()
)


def record_commit(
    consumer: AIOKafkaConsumer, group: str, commits: Mapping[TopicPartition, int]
) -> None:
    """After ``commits`` were committed for ``group``: each partition's lag, and the time."""
    for tp, offset in commits.items():
        end = consumer.highwater(tp)
        if end is not None:
            LAG.labels(group, tp.topic, str(tp.partition)).set(max(end - offset, 0))
    reported = _REPORTED.setdefault(consumer, set())
    reported.update(commits)
    assigned = consumer.assignment()
    for tp in reported - assigned:  # revoked: no longer this process's to report
        with contextlib.suppress(KeyError):
            LAG.remove(group, tp.topic, str(tp.partition))
    reported &= assigned
    LAST_COMMIT.labels(group).set_to_current_time()


@contextlib.contextmanager
def metrics_served(settings: Settings) -> Iterator[None]:
    """Serve ``/metrics`` on ``CLV_API_HOST:CLV_METRICS_PORT`` while the block runs (nothing
    when the port is not set). A port in use is a :class:`ClvError` at once, before any work."""
    if settings.metrics_port is None:
        yield
        return
    try:
        server, thread = start_http_server(settings.metrics_port, addr=settings.api_host)
    except OSError as exc:
        raise ClvError(
            f"cannot serve metrics at {settings.api_host}:{settings.metrics_port} "
            f"(CLV_API_HOST, CLV_METRICS_PORT): {exc.strerror or exc}"
        ) from exc
    log.info("metrics at http://%s:%d/metrics", settings.api_host, settings.metrics_port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
