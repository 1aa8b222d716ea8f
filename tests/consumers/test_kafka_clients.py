"""What clv asks of Kafka, recorded rather than sent: the TLS and SASL settings reach every client
it makes (no broker here speaks them), and the topics it creates have the replication asked for."""

from __future__ import annotations

import ssl
import types
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiokafka import TopicPartition

import consumers.kafka as kafka
from clv.errors import ClvError
from clv.settings import Settings

SASL_SSL = {
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "clv",
    "kafka_sasl_password": "s3cret",
}


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA certificate, as CLV_KAFKA_SSL_CAFILE names one."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


class Refused(Exception):
    pass


def _recorded(
    monkeypatch: pytest.MonkeyPatch,
    created: list[Any] | None = None,
    refuse: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Every Kafka client kafka.py makes, as the keyword arguments it was given. Each refuses
    to start, unless ``created`` is given: then an admin client starts, knows no topic, and
    puts there the topics it is asked to create."""
    made: list[dict[str, Any]] = []

    class Client:
        def __init__(self, *_topics: str, **kwargs: Any) -> None:
            made.append(kwargs)

        async def start(self) -> None:
            if created is None:
                raise Refused

        async def list_topics(self) -> list[str]:
            return []

        async def create_topics(self, topics: list[Any]) -> Any:
            assert created is not None
            created.extend(topics)
            codes = refuse or {}
            return types.SimpleNamespace(
                topic_errors=[(t.name, codes.get(t.name, 0), None) for t in topics]
            )

        async def close(self) -> None:
            pass

    for name in ("AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient"):
        monkeypatch.setattr(kafka, name, Client)
    return made


async def test_every_client_gets_tls_and_sasl(
    monkeypatch: pytest.MonkeyPatch, ca_file: Path
) -> None:
    made = _recorded(monkeypatch)
    settings = Settings(**SASL_SSL, kafka_ssl_cafile=ca_file)  # type: ignore[arg-type]
    kafka.make_consumer(settings, "g", "orders")
    kafka.make_producer(settings)
    with pytest.raises(Refused):
        await kafka.ensure_topics(settings)
    with pytest.raises(Refused):
        await kafka.topic_partitions(settings, "orders")
    # The inspection clients `clv demo` uses (end offsets, reading a topic, a group's commits)
    tp = TopicPartition("orders", 0)

    async def one_partition(*_a: Any, **_kw: Any) -> list[TopicPartition]:
        return [tp]

    async def ends(*_a: Any, **_kw: Any) -> dict[TopicPartition, int]:
        return {tp: 1}

    monkeypatch.setattr(kafka, "topic_partitions", one_partition)
    with pytest.raises(Refused):
        await kafka.end_offsets(settings, "orders")
    monkeypatch.setattr(kafka, "end_offsets", ends)
    with pytest.raises(Refused):
        await kafka.read_topic(settings, "orders.dlq")
    with pytest.raises(Refused):
        await kafka.wait_committed(settings, "g")
    # Fails if a client is made without them: against a broker that requires TLS and SASL,
    # that client (the topics' admin, say) could not connect.
    assert len(made) == 7
    for kwargs in made:
        assert kwargs["security_protocol"] == "SASL_SSL"
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
        assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("clv", "s3cret")
        context = kwargs["ssl_context"]
        assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
        assert context.get_ca_certs()  # the bundle named was loaded


async def test_plaintext_clients_get_no_tls_or_sasl(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _recorded(monkeypatch)
    kafka.make_producer(Settings())
    [kwargs] = made
    assert kwargs["security_protocol"] == "PLAINTEXT"
    assert not {"ssl_context", "sasl_mechanism", "sasl_plain_username"} & kwargs.keys()


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs CLV_KAFKA_SASL_USERNAME"),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "clv"},
            "needs CLV_KAFKA_SASL_USERNAME and CLV_KAFKA_SASL_PASSWORD",
        ),
        ({"kafka_sasl_username": "clv", "kafka_sasl_password": "x"}, "set it to SASL_SSL"),
        ({"kafka_ssl_cafile": "CA"}, "set it to SSL or SASL_SSL"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": Path("/no/such/ca.pem")},
            "is not a file",
        ),
        # Fails if a file that holds no certificate passes: the first client then failed with
        # OpenSSL's own words, exit 1, not naming the variable.
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "NOT_PEM"},
            "CLV_KAFKA_SSL_CAFILE '{NOT_PEM}' is no CA bundle (PEM) that can be read: ",
        ),
        ({"kafka_security_protocol": "TLS"}, "'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or"),
    ],
)
def test_kafka_security_settings_that_cannot_work_are_refused(
    changes: dict[str, object], says: str, ca_file: Path, tmp_path: Path
) -> None:
    # Fails if a setting that could only fail at the broker (no credentials sent, a CA file
    # not there) is taken at startup.
    from pydantic import ValidationError

    not_pem = tmp_path / "passwd"
    not_pem.write_text("root:x:0:0:root:/root:/bin/bash\n")
    files = {"CA": ca_file, "NOT_PEM": not_pem}  # a real CA file, and a file that is none
    changes = {k: files.get(v, v) if isinstance(v, str) else v for k, v in changes.items()}
    with pytest.raises(ValidationError) as info:
        Settings(**changes)  # type: ignore[arg-type]
    assert says.replace("{NOT_PEM}", str(not_pem)) in str(info.value)


def test_the_sasl_password_is_not_in_the_settings_repr() -> None:
    assert "s3cret" not in repr(Settings(**SASL_SSL))  # type: ignore[arg-type]


async def test_topics_are_created_with_the_replication_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created: list[Any] = []
    _recorded(monkeypatch, created)
    await kafka.ensure_topics(Settings(topic_replication=3))
    # Fails if the replication factor is fixed at 1: on a cluster of brokers, each partition
    # would live on one broker, and its loss would take the events with it.
    assert {(t.name, t.replication_factor) for t in created} == {
        ("orders", 3),
        ("orders.dlq", 3),
        ("churn-alerts", 3),
    }


async def test_a_topic_the_broker_refuses_to_create_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Fails if the broker's per-topic answer is ignored (aiokafka raises for none): with
    # CLV_TOPIC_REPLICATION above the brokers' count Apache Kafka creates nothing, and every
    # command then waits on topics that do not exist instead of saying why.
    _recorded(monkeypatch, [], refuse={"orders": 38, "orders.dlq": 36})
    with pytest.raises(ClvError, match=r"topic orders: .*CLV_TOPIC_REPLICATION=3"):
        await kafka.ensure_topics(Settings(topic_replication=3))
