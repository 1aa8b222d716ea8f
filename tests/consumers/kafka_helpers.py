"""Test helpers around the real broker: produce, read a topic to its end, committed offsets."""

from __future__ import annotations

import uuid

from clv.local_stack import free_port
from clv.settings import Settings
from feature_store.events import ValidEvent, encode_event
from feature_store.features import ms_to_iso


def unique_settings(broker: str, redis_url: str, **extra: object) -> Settings:
    """Settings with topics, group and key prefix of their own (tests share one broker/Redis)."""
    tag = uuid.uuid4().hex[:8]
    extra.setdefault("api_port", free_port())  # `clv up` serves the API: not on a shared port
    return Settings(
        kafka_bootstrap=broker,
        redis_url=redis_url,
        orders_topic=f"orders-{tag}",
        dlq_topic=f"orders-{tag}.dlq",
        alerts_topic=f"alerts-{tag}",
        consumer_group=f"features-{tag}",
        archiver_group=f"archiver-{tag}",
        key_prefix=f"t{tag}",
        orders_partitions=4,
        consume_batch=250,
        **extra,  # type: ignore[arg-type]
    )


def event_message(ev: ValidEvent) -> tuple[bytes, bytes]:
    value = encode_event(
        event_id=ev.event_id,
        type=ev.type,
        user_id=ev.user_id,
        order_id=ev.order_id,
        amount=abs(ev.cents) / 100,
        ts=ms_to_iso(ev.ts_ms) or "",
    )
    return ev.user_id.encode(), value
