"""Session fixtures: a real redis-server and a real Kafka-protocol broker on free ports."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from clv.local_stack import LocalProcess, free_port, start_broker, start_redis
from feature_store.redis_client import connect


def _ignored_in_the_suite(_signum: int, _frame: object) -> None:
    """Stands in for an ignore the suite was started with: the suite itself stays immune, but
    not as SIG_IGN, which the processes a test starts would inherit."""


@pytest.fixture(autouse=True)
def signals_not_ignored() -> Iterator[None]:
    """Each test, and every process it starts, with Ctrl-C and a hangup not ignored. A suite
    started under ``nohup`` inherits SIGHUP ignored, and one started in the background by a
    shell without job control (``make test &`` in a script) SIGINT; clv keeps a signal ignored
    at its start ignored, as Python does SIGINT, so every test of what a Ctrl-C or a hangup
    does failed or waited for good. A handler that does nothing takes the ignore's place for
    the test (a process started by exec gets the default), and the ignore comes back after."""
    found = {}
    for sig in (signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_IGN:
            found[sig] = signal.signal(sig, _ignored_in_the_suite)
    try:
        yield
    finally:
        for sig, handler in found.items():
            signal.signal(sig, handler)


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
