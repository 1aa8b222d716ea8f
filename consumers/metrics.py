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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from clv.errors import ClvError
from clv.settings import Settings

log = logging.getLogger(__name__)

LAST_COMMIT = Gauge(
    "clv_consumer_last_commit_timestamp_seconds",
    "When the group's offsets were last committed by this process (Unix time)",
    ["group"],
)


@dataclass
class _Watched:
    group: str
    committed: dict[TopicPartition, int] = field(default_factory=dict)


#: The consumers whose fetches or commits were recorded, with where the group's commit stands
#: for each partition they hold. Read at each scrape, so a partition a consumer lost in a
#: rebalance is not reported by it from then on, whether or not it commits again, and one its
#: sibling in this process took is reported by that one.
_WATCHED: weakref.WeakKeyDictionary[AIOKafkaConsumer, _Watched] = weakref.WeakKeyDictionary()


def record_fetch(
    consumer: AIOKafkaConsumer,
    group: str,
    batch: Mapping[TopicPartition, Sequence[ConsumerRecord[bytes, bytes]]],
) -> None:
    """After a fetch: a partition first fetched by ``consumer`` since it was assigned counts
    its lag from the first record's offset, which is where the group's last commit left it,
    so a consumer stuck before its first commit (a Redis that hangs) shows its backlog. What
    it no longer holds is forgotten, so a partition it gets back starts afresh."""
    watched = _WATCHED.setdefault(consumer, _Watched(group))
    held = consumer.assignment()
    for tp in [tp for tp in watched.committed if tp not in held]:
        del watched.committed[tp]
    for tp, records in batch.items():
        if records and tp not in watched.committed:
            watched.committed[tp] = records[0].offset


def record_commit(
    consumer: AIOKafkaConsumer, group: str, commits: Mapping[TopicPartition, int]
) -> None:
    """After ``commits`` were committed for ``group`` by ``consumer``. Only notes them (the lag
    is worked out when scraped): nothing here can fail a commit that went through."""
    watched = _WATCHED.setdefault(consumer, _Watched(group))
    watched.committed.update(commits)
    LAST_COMMIT.labels(group).set_to_current_time()


def _watched_now() -> list[tuple[AIOKafkaConsumer, _Watched]]:
    """The watched consumers, read from the scrape's thread while the event loop's may add one
    (a change during the read makes it start over)."""
    for _ in range(10):
        try:
            return list(_WATCHED.items())
        except RuntimeError:  # changed size during the read
            continue
    return []


class _LagCollector(Collector):
    """``clv_consumer_lag``: for each partition a consumer here holds and has fetched from or
    committed, its end as the consumer's last fetch saw it minus the group's last commit."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        lag = GaugeMetricFamily(
            "clv_consumer_lag",
            "Records of a partition after its last commit by the group (its end offset, as "
            "the last fetch saw it, minus the committed offset)",
            labels=["group", "topic", "partition"],
        )
        for consumer, watched in _watched_now():
            try:  # the scrape runs in the server's thread: the consumer may change meanwhile
                held = list(consumer.assignment())
            except Exception:  # a consumer closing: it reports nothing
                continue
            for tp in held:
                committed = watched.committed.get(tp)
                try:
                    end = consumer.highwater(tp)
                except Exception:  # revoked since: its new owner reports it
                    continue
                if committed is not None and end is not None:
                    lag.add_metric(
                        [watched.group, tp.topic, str(tp.partition)], max(end - committed, 0)
                    )
        yield lag


REGISTRY.register(_LagCollector())


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
