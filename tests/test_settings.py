"""Settings: what the environment may say, and the one-line refusal of anything else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from clv.settings import Settings, settings_error


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
        {"redis_url": "redis://node-1:7000/0?cluster=True&socket_timeout=3"},
        {"redis_url": "redis://cache:6379/0?cluster=false"},
        {"redis_url": "unix:///run/redis.sock?db=2&health_check_interval=30"},
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
        # Fails if an option redis-py does not take passes: every command then died at its
        # first connection with a traceback (clv up: a Redis that "does not answer" after 60 s).
        ({"redis_url": "redis://cache:6379/0?foo=bar"}, "redis-py takes no option 'foo'"),
        ({"redis_url": "unix:///run/redis.sock?foo=1"}, "redis-py takes no option 'foo'"),
        ({"redis_url": "redis+cluster://node-1:7000?foo=bar"}, "redis-py takes no option 'foo'"),
        ({"redis_url": "redis://cache:6379/0?cluster=maybe"}, "'maybe' is neither true nor false"),
        # Fails if redis-py's own errors escape the check: a traceback at every settings load
        # (clv train, which never touches Redis, included).
        ({"redis_url": "redis://cache:6379/0?protocol=9"}, "protocol must be either 2 or 3"),
        ({"redis_url": "unix:///run/redis.sock?cluster=true"}, "not supported in cluster mode"),
        ({"redis_url": "redis://c:1?cluster=true&cluster=false"}, "given more than once"),
        ({"orders_topic": ""}, "is not a Kafka topic name"),
        ({"orders_topic": "bad topic!"}, "is not a Kafka topic name"),
        ({"alerts_topic": ".."}, "is not a Kafka topic name"),
        ({"dlq_topic": "x" * 250}, "is not a Kafka topic name"),
        ({"dlq_topic": "orders"}, "CLV_DLQ_TOPIC is 'orders', the same topic as CLV_ORDERS_TOPIC"),
        ({"alerts_topic": "orders.dlq"}, "the same topic as CLV_DLQ_TOPIC"),
        ({"archiver_group": "clv-features"}, "CLV_CONSUMER_GROUP and CLV_ARCHIVER_GROUP are both"),
        ({"consumer_group": " "}, "must not be empty"),
        ({"key_prefix": "shop{eu}"}, "must not hold { or }"),
        ({"key_prefix": "x}"}, "the user id is the Redis Cluster hash tag"),
    ],
)
def test_what_no_client_could_use_is_refused(changes: dict[str, str], says: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**changes)  # type: ignore[arg-type]
    assert says in str(info.value)


CLV_VARS = (
    "KAFKA_BOOTSTRAP", "REDIS_URL", "ORDERS_TOPIC", "ALERTS_TOPIC", "DLQ_TOPIC",
    "CONSUMER_GROUP", "MODEL_DIR", "EVENT_LOG_DIR", "HORIZON_DAYS", "CLOCK", "API_HOST",
    "API_PORT", "API_KEY",
)  # fmt: skip


def test_the_defaults_are_the_contracts(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/contract.md, "Names and settings": what a process gets with no CLV_ variable."""
    for name in CLV_VARS:
        monkeypatch.delenv(f"CLV_{name}", raising=False)
    s = Settings()
    assert (s.kafka_bootstrap, s.redis_url) == ("localhost:9092", "redis://localhost:6379/0")
    assert (s.orders_topic, s.alerts_topic, s.dlq_topic) == ("orders", "churn-alerts", "orders.dlq")
    assert s.consumer_group == "clv-features"
    assert (s.model_dir, s.event_log_dir) == (Path("./models"), Path("./data/events"))
    assert (s.horizon_days, s.clock) == (365, "wall")
    assert (s.api_host, s.api_port, s.api_key) == ("127.0.0.1", 8000, None)


def test_settings_are_read_from_clv_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLV_HORIZON_DAYS", "90")
    monkeypatch.setenv("CLV_CLOCK", "event")
    monkeypatch.setenv("CLV_API_PORT", "9000")
    s = Settings()
    assert (s.horizon_days, s.clock, s.api_port) == (90, "event", 9000)
    with pytest.raises(ValidationError):
        s.horizon_days = 1  # type: ignore[misc]  # frozen: built once, passed inward


@pytest.mark.parametrize(
    "changes",
    [
        {"horizon_days": 1},
        {"horizon_days": 3650},
        {"api_port": 1},
        {"api_port": 65535},
        {"kafka_bootstrap": "a:1,b:65535"},
        {"orders_topic": "x" * 249},
        {"orders_partitions": 2**31 - 1},
        {"model_keep": 1},
        {"topic_replication": 32767},
    ],
)
def test_the_bounds_themselves_are_accepted(changes: dict[str, object]) -> None:
    s = Settings(**changes)  # type: ignore[arg-type]
    assert all(getattr(s, k) == v for k, v in changes.items())


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"horizon_days": 0}, "greater than or equal to 1"),
        ({"horizon_days": 3651}, "less than or equal to 3650"),
        ({"api_port": 0}, "greater than or equal to 1"),
        ({"api_port": 65536}, "less than or equal to 65535"),
        ({"kafka_bootstrap": "a:0"}, "port 1 to 65535"),
        # Fails if port 0 in CLV_REDIS_URL is taken: redis-py (and `clv up`) read it as "no
        # port" and use 6379, another server than the one named.
        ({"redis_url": "redis://127.0.0.1:0/0"}, "port 0 is not a port"),
        ({"redis_url": "redis+cluster://node-1:0"}, "port 0 is not a port"),
        # Fails if more partitions than Kafka's int32 count are taken: clv up / consume /
        # archive / replay then die in topic creation with a traceback.
        ({"orders_partitions": 2**31}, "less than or equal to 2147483647"),
        ({"orders_topic": "."}, "is not a Kafka topic name"),
        ({"model_keep": 0}, "greater than or equal to 1"),
        ({"topic_replication": 0}, "greater than or equal to 1"),
        ({"metrics_port": 0}, "greater than or equal to 1"),
        ({"metrics_port": 65536}, "less than or equal to 65535"),
        ({"topic_replication": 32768}, "less than or equal to 32767"),
        ({"clock": "utc"}, "'wall' or 'event'"),
        ({"model_dir": ""}, "must be a directory path, not empty"),
        ({"event_log_dir": " "}, "must be a directory path, not empty"),
    ],
)
def test_just_past_the_bounds_is_refused(changes: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**changes)  # type: ignore[arg-type]
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@localhost:6380/abc", "'redis://***@localhost:6380/abc'"),
        ("redis://user:hunter2@localhost:0/0", "'redis://***@localhost:0/0'"),
        ("redis://:hunter2@localhost/0?bogus_opt=1", "'redis://***@localhost/0?bogus_opt=1'"),
        ("redis://:hunter2@localhost/0?cluster=maybe", "'redis://***@localhost/0?cluster=maybe'"),
        ("redis://:hunter2@/0", "'redis://***@/0'"),
        ("redis://u:p@hunter2@[::1/0", "'redis://***': it does not parse"),  # no parse
        ("redis://h/x?db=1&PASSWORD=hunter2#f", "'redis://h/x?db=1&PASSWORD=***#f'"),
        # a password with / # ? unencoded: a parser takes part of it for the port and says so
        ("redis://user:hunter2/x@localhost:6390/0", "'redis://***': it does not parse"),
        ("redis://user:hunter2#x@localhost:6390/0", "'redis://***': it does not parse"),
        ("redis://user:hunter2?x@localhost:6390/0", "'redis://***': it does not parse"),
        ("redis://u:123/ab'hunter2/e\"f@host/0", "'redis://***': it does not parse"),
        # an @ in a password= value: the query is no user part (its tail was shown)
        (
            "redis://cache:6379?password=hunter2@Horse&socket_timeout=abc",
            "'redis://cache:6379?password=***&socket_timeout=abc'",
        ),
        ("redis://cache/x?password=hunter2@prod", "'redis://cache/x?password=***'"),
        ("redis://hunter2@localhost:6390/x", "'redis://***@localhost:6390/x'"),  # no colon
        ("redis://h/0?pass%77ord=hunter2&db=x", "'redis://h/0?pass%77ord=***&db=x'"),
        ("redis://h/0?password=hun%74er2&db=x", "'redis://h/0?password=***&db=x'"),
    ],
)
def test_a_bad_redis_url_is_quoted_without_its_password(url: str, shown: str) -> None:
    # Fails if (settings.py) the refusal quotes the URL as given: the password went to the
    # terminal and, under compose, to the log (the contract: no secret in code or logs).
    with pytest.raises(ValidationError) as err:
        Settings(redis_url=url)
    said = settings_error(err.value)
    assert said.startswith(f"bad setting CLV_REDIS_URL: {shown}")
    assert not {"hunter2", "Horse", "prod"} & set(re.split(r"\W+", said)), said


# Fails if an empty CLV_API_KEY counts as a key (compose's `${CLV_API_KEY:-}` would then ask
# every admin call for an empty token), if a key with spaces around it is taken (no header can
# carry it), or if the key shows in the settings' repr (it is a secret, as the SASL password).
def test_the_api_key_empty_is_unset_padded_is_refused_and_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLV_API_KEY", "")
    assert Settings().api_key is None
    for padded in (" k3y", "k3y\n", "   "):
        monkeypatch.setenv("CLV_API_KEY", padded)
        with pytest.raises(ValidationError) as err:
            Settings()
        said = settings_error(err.value)
        assert said.startswith("bad setting CLV_API_KEY: has spaces") and "k3y" not in said
    monkeypatch.setenv("CLV_API_KEY", "s3cr3t-key")
    s = Settings()
    assert s.api_key == "s3cr3t-key" and "s3cr3t-key" not in repr(s)


def test_a_redis_password_never_shows_in_the_settings_repr() -> None:
    # Fails if redis_url is in the repr: a log of the settings would carry the password.
    s = Settings(redis_url="redis://user:pa55w0rd@redis:6379/0")
    assert "pa55w0rd" not in repr(s) and s.redis_url.endswith("@redis:6379/0")
