"""clv's Kafka TLS settings against a real broker, through a real TLS connection.

tansu 0.6.0 (the only broker here) does not serve TLS itself: its ``--cert`` and ``--key``
cannot be given together, and either one alone leaves the listener plaintext (the file is not
even read). So TLS is terminated in front of it, by a small proxy in this test with a
certificate made at test time (trustme), and tansu advertises the proxy's address: every
connection a client makes (bootstrap, then the broker from the metadata, the group
coordinator) is TLS and is verified against ``CLV_KAFKA_SSL_CAFILE``. What this tests is clv's
client side: that ``connection_options`` gives every client it builds the TLS settings. SASL is
not tested: tansu offers only SCRAM, and keeps its users in the broker's memory, where ``tansu
user create`` cannot add one to a broker that requires authentication (it is refused as not
authenticated).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiokafka.errors import KafkaConnectionError

from clv.local_stack import LocalProcess, free_port, start_broker
from clv.settings import Settings
from consumers.feature_consumer import run_feature_consumer
from consumers.kafka import ensure_topics, make_consumer, make_producer, stop_consumer
from feature_store.events import encode_event
from feature_store.features import ms_to_iso
from feature_store.redis_client import connect
from feature_store.redis_store import FeatureStore

from .kafka_helpers import unique_settings

pytestmark = pytest.mark.integration


@dataclass
class TlsProxy:
    """Accepts TLS on ``port`` and relays the plaintext to ``upstream``."""

    port: int
    upstream: int
    context: ssl.SSLContext
    handshakes: int = 0  # connections that completed a TLS handshake
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.handshakes += 1  # asyncio calls this only after the handshake succeeded
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
        await asyncio.gather(self._pipe(cr, uw), self._pipe(ur, cw))

    def _track(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(cr, cw))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TlsProxy]:
        server = await asyncio.start_server(
            self._track, "127.0.0.1", self.port, ssl=self.context, ssl_handshake_timeout=5
        )
        try:
            yield self
        finally:
            server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await server.wait_closed()


@dataclass
class TlsBroker:
    address: str  # what clients bootstrap from: the TLS port
    ca: Path  # the CA that signed the server certificate
    other_ca: Path  # a CA that did not
    proxy: TlsProxy


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, trustme.LeafCert]:
    """A CA's certificate (what CLV_KAFKA_SSL_CAFILE names), another CA's, and a server
    certificate for 127.0.0.1 and localhost signed by the first."""
    folder = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    return folder / "ca.pem", folder / "other-ca.pem", ca.issue_cert("127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalProcess, int]]:
    """A tansu of its own that tells clients to come back through the TLS port."""
    tls_port = free_port()
    proc = start_broker(free_port(), tmp_path_factory.mktemp("tls-broker"), f"127.0.0.1:{tls_port}")
    yield proc, tls_port
    proc.stop()


@pytest.fixture
async def tls_broker(
    certs: tuple[Path, Path, trustme.LeafCert], tls_upstream: tuple[LocalProcess, int]
) -> AsyncIterator[TlsBroker]:
    ca, other, server_cert = certs
    proc, tls_port = tls_upstream
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    proxy = TlsProxy(tls_port, int(proc.address.rsplit(":", 1)[1]), context)
    async with proxy.running():
        yield TlsBroker(f"127.0.0.1:{tls_port}", ca, other, proxy)


def tls_settings(broker: TlsBroker, redis_url: str, **extra: object) -> Settings:
    return unique_settings(
        broker.address,
        redis_url,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=broker.ca,
        **extra,
    )


async def test_topics_produce_and_group_consume_over_tls(
    tls_broker: TlsBroker, redis_server: LocalProcess
) -> None:
    s = tls_settings(tls_broker, redis_server.address)
    await ensure_topics(s)
    producer = make_producer(s)
    await producer.start()
    try:
        sent = [f"message {i}".encode() for i in range(20)]
        for i, value in enumerate(sent):
            await producer.send_and_wait(s.orders_topic, value, key=f"u{i % 3}".encode())
    finally:
        await producer.stop()
    consumer = make_consumer(s, s.consumer_group, s.orders_topic)
    await consumer.start()
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + 60
        while len(got) < len(sent) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            got += [r.value or b"" for recs in batches.values() for r in recs]
        await consumer.commit()  # through the group coordinator, over TLS too
        assert sorted(got) == sorted(sent)
        commits = [await consumer.committed(tp) for tp in consumer.assignment()]
        assert sum(c or 0 for c in commits) == len(sent)
    finally:
        await stop_consumer(consumer)
    assert tls_broker.proxy.handshakes >= 3  # admin, producer, consumer: each made its own


async def test_the_feature_consumer_applies_events_over_tls(
    tls_broker: TlsBroker, redis_server: LocalProcess
) -> None:
    # clv consume's whole path (ensure_topics, its producer and consumer) with TLS settings.
    s = tls_settings(tls_broker, redis_server.address)
    day_ms = 86_400_000
    base = (int(time.time() * 1000) // day_ms - 3) * day_ms
    users = {"alice": [12.5, 7.5], "bob": [30.0]}
    stop = asyncio.Event()
    task = asyncio.create_task(run_feature_consumer(s, stop))
    producer = make_producer(s)
    await producer.start()
    try:
        for user, amounts in users.items():
            for n, amount in enumerate(amounts):
                value = encode_event(
                    event_id=uuid.uuid4().hex,
                    user_id=user,
                    order_id=f"{user}-{n}",
                    amount=amount,
                    ts=ms_to_iso(base + n * day_ms) or "",
                )
                await producer.send_and_wait(s.orders_topic, value, key=user.encode())
    finally:
        await producer.stop()
    redis = connect(s.redis_url)
    store = FeatureStore(redis, prefix=s.key_prefix)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = {u: await store.read_state(u) for u in users}
            if all(states.values()):
                break
            await asyncio.sleep(0.2)
        for user in users:
            state = await store.read_state(user)
            assert state is not None, f"{user} was never applied"
            frame = await store.features(user)
            assert frame is not None
    finally:
        stop.set()
        stats = await asyncio.wait_for(task, 60)
        await redis.aclose()
    assert stats.applied == 3


async def test_a_plaintext_client_cannot_use_the_tls_port(
    tls_broker: TlsBroker, redis_server: LocalProcess
) -> None:
    # What every client would do if connection_options stopped passing the TLS settings.
    s = unique_settings(tls_broker.address, redis_server.address)
    assert s.kafka_security_protocol == "PLAINTEXT"
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(ensure_topics(s), 60)


async def test_a_server_certificate_from_another_ca_is_refused(
    tls_broker: TlsBroker, redis_server: LocalProcess
) -> None:
    # CLV_KAFKA_SSL_CAFILE is what the server is verified against: trusting another CA fails.
    s = tls_settings(tls_broker, redis_server.address).model_copy(
        update={"kafka_ssl_cafile": tls_broker.other_ca}
    )
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(ensure_topics(s), 60)
    assert tls_broker.proxy.handshakes == 0
