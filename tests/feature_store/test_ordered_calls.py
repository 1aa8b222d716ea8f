"""Pipelined batch applies on a single Redis: submitted in order, run in order, answered alone.

Against a real redis-server: the order Redis runs requests in, what a script error or a lost
connection does to the calls outstanding, and a script cache flushed between batches.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from redis.asyncio import Redis

from clv.errors import StoreError
from clv.local_stack import LocalProcess
from feature_store.features import RETENTION_DAYS
from feature_store.redis_store import FeatureStore

from .streams import MS_PER_DAY, _ev

pytestmark = pytest.mark.integration

DAY0 = 20_000


def _purchase(eid: str, uid: str, day: int) -> object:
    return _ev(eid, "purchase", uid, eid, 1_000, day * MS_PER_DAY + 1)


async def test_batches_submitted_without_waiting_run_in_the_order_submitted(redis: Redis) -> None:
    # Fails if submitted batches can overtake each other (say, on connections of their own):
    # a user's recent order applied first makes the older one, submitted before it, too late.
    store = FeatureStore(redis)
    answers = []
    for u in range(40):
        old = [_purchase(f"old-{u}", f"u{u}", DAY0)]
        new = [_purchase(f"new-{u}", f"u{u}", DAY0 + RETENTION_DAYS + 5)]
        for batch in (old, new):
            answers.append(
                await store.submit(batch, group="g", progress={"orders:0": len(answers)}, now_ms=1)  # type: ignore[arg-type]
            )
    results = [await a for a in answers]
    assert all(r.applied == 1 and not r.too_late for r in results)
    assert await store.progress("g") == {"orders:0": len(answers) - 1}


async def test_a_call_that_fails_in_redis_fails_alone(redis: Redis) -> None:
    # Fails if one error reply breaks the calls written after it on the same connection
    # (answers then shift: a call gets the answer of the one before it).
    store = FeatureStore(redis)
    assert store._ordered is not None
    first = await store.submit(
        [_purchase("a", "ua", DAY0)],  # type: ignore[list-item]
        group="g",
        progress={},
        now_ms=1,
    )
    broken = await store._ordered.call(
        ["clv:progress:{g}"], [b"\xc1 not msgpack", b"\x90", 1, 365, -1]
    )
    last = await store.submit(
        [_purchase("b", "ub", DAY0), _purchase("c", "ub", DAY0 + 1)],  # type: ignore[list-item]
        group="g",
        progress={},
        now_ms=1,
    )
    assert (await first).applied == 1
    with pytest.raises(Exception, match="Bad data format"):
        await broken
    assert (await last).applied == 2


async def test_a_script_cache_flushed_between_batches_is_loaded_again(redis: Redis) -> None:
    store = FeatureStore(redis)
    await store.apply([_purchase("a", "ua", DAY0)], group="g", progress={}, now_ms=1)  # type: ignore[list-item]
    await redis.script_flush()
    again = await store.apply([_purchase("b", "ua", DAY0 + 1)], group="g", progress={}, now_ms=1)  # type: ignore[list-item]
    assert again.applied == 1


async def test_a_lost_connection_fails_every_call_outstanding_and_the_next_one(
    own_redis: tuple[LocalProcess, Redis],
) -> None:
    # Fails if calls outstanding on a connection that dies are left waiting (the consumer would
    # hang instead of stopping), or answered with what a later call gets, or if the dead
    # connection is used again.
    server, client = own_redis
    store = FeatureStore(client)
    await store.apply([_purchase("a", "ua", DAY0)], group="g", progress={}, now_ms=1)  # type: ignore[list-item]
    # A first batch that keeps Redis busy for a while (some 10^5 events), then two more:
    # the server dies while all three are outstanding.
    big = [_purchase(f"big-{i}", f"u{i}", DAY0) for i in range(100_000)]
    pending = [await store.submit(big, group="g", progress={}, now_ms=1)]  # type: ignore[arg-type]
    for i in range(2):
        pending.append(
            await store.submit([_purchase(f"e{i}", "ua", DAY0)], group="g", progress={}, now_ms=1)  # type: ignore[list-item]
        )
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    for answer in pending:
        with pytest.raises(StoreError, match="applying a batch failed"):
            await asyncio.wait_for(answer, timeout=60)
    with pytest.raises(StoreError, match="applying a batch failed"):
        await asyncio.wait_for(
            store.apply([_purchase("z", "ua", DAY0)], group="g", progress={}, now_ms=1),  # type: ignore[list-item]
            timeout=60,
        )
