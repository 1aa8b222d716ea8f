"""A stop asked for while a service is still starting ends it at once.

Starting can wait a long time: a broker that accepts but does not answer, or a consumer group
whose rebalance waits on a member that died (``AIOKafkaConsumer.start`` returns only once the
group has assigned partitions). ``clv consume`` and ``clv archive`` used to act on SIGTERM only
once consuming, so a stop while starting went unheard until the wait ran out, or for good."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.protocol.group import JoinGroupRequest

import consumers.kafka
from clv.local_stack import LocalProcess
from clv.settings import Settings
from consumers.archiver import run_archiver
from consumers.feature_consumer import ConsumerStats, run_feature_consumer

from .kafka_helpers import unique_settings


class SilentBroker:
    """Accepts connections and never answers; ``reached`` is set once a client connected."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.reached.set()
        await reader.read()  # until the client goes


@pytest.fixture
async def silent_broker() -> AsyncIterator[tuple[SilentBroker, str]]:
    broker = SilentBroker()
    server = await asyncio.start_server(broker._hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield broker, f"127.0.0.1:{port}"
    finally:
        for w in broker.writers:
            w.close()
        server.close()
        await server.wait_closed()


async def _stopped_while_waiting(
    waiting: asyncio.Event, run: Callable[[asyncio.Event], Awaitable[object]], what: str
) -> object:
    """Run ``run(stop)``, set ``stop`` once ``waiting`` says it waits, and return its result;
    fails if it does not end once stopped."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(stop))
    await asyncio.wait_for(waiting.wait(), 60)
    assert not task.done()
    stop.set()
    done, _ = await asyncio.wait({task}, timeout=30)
    if not done:
        task.cancel()
    assert done, f"the stop asked for while {what} was not acted on"
    return task.result()


async def test_clv_consume_stopped_while_starting_ends_at_once(
    silent_broker: tuple[SilentBroker, str], redis_server: LocalProcess
) -> None:
    broker, address = silent_broker
    settings = unique_settings(address, redis_server.address)
    stats = await _stopped_while_waiting(
        # Fails if the start is not raced with stop: it waits for the broker's answer
        # (aiokafka's 40 s request timeout, then an error).
        broker.reached,
        lambda stop: run_feature_consumer(settings, stop),
        "starting",
    )
    assert stats == ConsumerStats()  # nothing consumed, nothing raised


async def test_clv_archive_stopped_while_starting_ends_at_once(
    silent_broker: tuple[SilentBroker, str], redis_server: LocalProcess, tmp_path: Path
) -> None:
    broker, address = silent_broker
    settings: Settings = unique_settings(
        address, redis_server.address, event_log_dir=tmp_path / "events"
    )
    written = await _stopped_while_waiting(
        broker.reached, lambda stop: run_archiver(settings, stop), "starting"
    )
    assert written == 0
    assert not any((tmp_path / "events").rglob("*.parquet"))


@pytest.fixture
def held_join(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The broker's JoinGroup answer held for good, as a rebalance waiting on a member that died
    holds it (up to the rebalance timeout); set once a consumer sent its JoinGroup."""
    joining = asyncio.Event()
    send = GroupCoordinator._send_req

    async def held(self: GroupCoordinator, request: object) -> object:
        if isinstance(request, JoinGroupRequest):
            joining.set()
            await asyncio.Event().wait()
        return await send(self, request)

    monkeypatch.setattr(GroupCoordinator, "_send_req", held)
    monkeypatch.setattr(consumers.kafka, "CONSUMER_CLOSE_S", 0.5)  # the bound, kept short here
    return joining


async def test_clv_consume_stopped_while_joining_its_group_ends(
    broker: LocalProcess, redis_server: LocalProcess, held_join: asyncio.Event
) -> None:
    settings = unique_settings(broker.address, redis_server.address)
    stats = await _stopped_while_waiting(
        # Fails if closing the consumer waits for the JoinGroup answer: here it never comes.
        held_join,
        lambda stop: run_feature_consumer(settings, stop),
        "joining the group",
    )
    assert stats == ConsumerStats()


async def test_clv_archive_stopped_while_joining_its_group_ends(
    broker: LocalProcess, redis_server: LocalProcess, held_join: asyncio.Event, tmp_path: Path
) -> None:
    settings = unique_settings(broker.address, redis_server.address, event_log_dir=tmp_path)
    run = lambda stop: run_archiver(settings, stop)  # noqa: E731
    assert await _stopped_while_waiting(held_join, run, "joining the group") == 0
