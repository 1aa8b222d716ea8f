"""Settings of their own (topics, groups, key prefix) on the session's broker and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from clv.local_stack import LocalProcess
from clv.settings import Settings
from consumers.kafka import ensure_topics

from .kafka_helpers import unique_settings


@pytest.fixture
async def settings(broker: LocalProcess, redis_server: LocalProcess) -> AsyncIterator[Settings]:
    s = unique_settings(broker.address, redis_server.address)
    await ensure_topics(s)
    yield s
