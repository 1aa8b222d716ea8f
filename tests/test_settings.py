"""Settings: what the environment may say, and the one-line refusal of anything else."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from clv.settings import Settings


@pytest.mark.parametrize(
    "changes",
    [
        {"kafka_bootstrap": "localhost:9092"},
        {"kafka_bootstrap": "kafka-1:9092, kafka-2:9093,kafka-3"},  # no port: Kafka's 9092
        {"kafka_bootstrap": "[::1]:9092"},
        {"kafka_bootstrap": "::1"},  # a bare IPv6 address: the default port
        {"kafka_bootstrap": "[fe80::1%eth0]:9092,kafka_1.internal:9093"},
        {"redis_url": "redis://:secret@cache.internal:6380/2"},
        {"redis_url": "rediss://cache.internal"},
        {"redis_url": "unix:///run/redis.sock"},
        {"redis_url": "redis+cluster://node-1:7000"},
        {"redis_url": "redis://node-1:7000/0?cluster=true"},
        {"orders_topic": "shop.orders_v2-eu", "dlq_topic": "shop.orders.dlq"},
    ],
)
def test_what_a_deployment_writes_is_accepted(changes: dict[str, str]) -> None:
    s = Settings(**changes)  # type: ignore[arg-type]
    assert all(getattr(s, k) == v for k, v in changes.items())


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"kafka_bootstrap": "127.0.0.1:abc"}, "'127.0.0.1:abc' is not a server"),
        ({"kafka_bootstrap": "a:9092,,b:9092"}, "'' is not a server"),
        ({"kafka_bootstrap": "a:70000"}, "port 1 to 65535"),
        ({"kafka_bootstrap": "http://a:9092"}, "is not a server"),
        ({"kafka_bootstrap": "a:b:c"}, "is not a server"),
        ({"kafka_bootstrap": "a:9092,"}, "'' is not a server"),
        ({"redis_url": "notaurl"}, "Redis URL must specify one of the following schemes"),
        ({"redis_url": "http://cache:6379"}, "schemes"),
        ({"redis_url": "redis://127.0.0.1:abc/0"}, "Port could not be cast"),
        ({"redis_url": "redis://cache:6379/one"}, "the database 'one' is not a number"),
        ({"redis_url": "redis:///0"}, "names no host"),
        ({"orders_topic": ""}, "is not a Kafka topic name"),
        ({"orders_topic": "bad topic!"}, "is not a Kafka topic name"),
        ({"alerts_topic": ".."}, "is not a Kafka topic name"),
        ({"dlq_topic": "x" * 250}, "is not a Kafka topic name"),
        ({"dlq_topic": "orders"}, "CLV_DLQ_TOPIC is 'orders', the same topic as CLV_ORDERS_TOPIC"),
        ({"alerts_topic": "orders.dlq"}, "the same topic as CLV_DLQ_TOPIC"),
        ({"archiver_group": "clv-features"}, "CLV_CONSUMER_GROUP and CLV_ARCHIVER_GROUP are both"),
        ({"consumer_group": " "}, "must not be empty"),
    ],
)
def test_what_no_client_could_use_is_refused(changes: dict[str, str], says: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**changes)  # type: ignore[arg-type]
    assert says in str(info.value)
