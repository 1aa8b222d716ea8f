"""A Redis of a test's own, for tests that kill or close it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from clv.local_stack import LocalProcess, free_port, start_redis
from feature_store.redis_client import connect


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[tuple[LocalProcess, Redis]]:
    """A redis-server only this test uses (it may kill it) and a client of it."""
    server = start_redis(free_port(), tmp_path / "redis")
    client = connect(server.address)
    try:
        yield server, client  # type: ignore[misc]
    finally:
        await client.aclose()
        server.stop()
