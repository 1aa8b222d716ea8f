"""Kafka clients built from settings, and topic creation (broker-agnostic: plain aiokafka)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from clv.settings import Settings


def make_consumer(
    settings: Settings, group_id: str, *topics: str, **overrides: object
) -> AIOKafkaConsumer:
    """A consumer that never auto-commits: offsets are committed after the state is written."""
    opts: dict[str, object] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
        "fetch_max_bytes": 64 * 1024 * 1024,
        "client_id": f"clv-{group_id}",
    }
    opts.update(overrides)
    return AIOKafkaConsumer(*topics, **opts)


def make_producer(settings: Settings, **overrides: object) -> AIOKafkaProducer:
    # acks=all; no idempotent producer (not every Kafka-protocol broker supports it): consumers
    # deduplicate by event id instead.
    opts: dict[str, object] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "acks": "all",
        "linger_ms": 5,
        "max_batch_size": 512 * 1024,
        "client_id": "clv-producer",
    }
    opts.update(overrides)
    return AIOKafkaProducer(**opts)


async def ensure_topics(settings: Settings, partitions: int | None = None) -> None:
    """Create the orders, DLQ and alerts topics when missing (idempotent)."""
    parts = partitions or settings.orders_partitions
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(settings.orders_topic, num_partitions=parts, replication_factor=1),
            NewTopic(settings.dlq_topic, num_partitions=1, replication_factor=1),
            NewTopic(settings.alerts_topic, num_partitions=parts, replication_factor=1),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
