"""Session fixtures: a real redis-server and a real Kafka-protocol broker on free ports."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from clv.local_stack import LocalProcess, free_port, start_broker, start_redis
from feature_store.redis_client import connect


@pytest.fixture(autouse=True)
def hangup_by_default() -> Iterator[None]:
    """Each test, and every process it starts, with SIGHUP at its default: the suite run under
    ``nohup`` inherits it ignored, and clv keeps an ignored hangup ignored (``nohup clv up``),
    so every test of what a hangup does failed or waited for good. Between tests it stays as
    the suite found it."""
    found = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, found)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProcess]:
    proc = start_redis(free_port(), tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProcess]:
    proc = start_broker(free_port(), tmp_path_factory.mktemp("broker"))
    yield proc
    proc.stop()


@pytest.fixture
async def redis(redis_server: LocalProcess) -> AsyncIterator[Redis]:
    client = connect(redis_server.address)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def data_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "clv" / "data"
