"""The consumer cancelled while it waits for the oldest unsettled batch, that batch's settle
task not yet started. Real FeatureStore on a real redis-server; Kafka faked (its
getmany returns buffered records without yielding, as aiokafka's does)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import warnings
from typing import Any

import pytest
from redis.asyncio import Redis

from feature_store.redis_client import HiredisPackConnection
from feature_store.redis_store import FeatureStore

from ..feature_store.streams import MS_PER_DAY, _ev
from ..feature_store.test_ordered_calls_interleavings import loop_errors
from .test_feature_consumer_steps import FakeKafka, Steps, consumer, event, record

pytestmark = pytest.mark.integration


class CancellingKafka(FakeKafka):
    """Buffered batches, returned without yielding; on the first fetch a callback that cancels
    the consumer task is already queued (a signal handler, a TaskGroup sibling failing, a
    wait_for timing out), so it runs in the next loop iteration."""

    run: asyncio.Task[Any] | None = None

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, Any]:
        if self.run is not None:
            asyncio.get_running_loop().call_soon(self.run.cancel)
            self.run = None
        return await super().getmany(timeout_ms, max_records)


async def test_a_consumer_cancelled_before_its_oldest_settle_started_leaves_no_coroutine_unawaited(
    redis_server: Any,
) -> None:
    # Fails if the consumer's wait for its oldest unsettled batch (``await
    # unsettled.popleft()``) passes its cancellation to a settle task that has not run yet:
    # that task's coroutine is closed before its body runs, so the batch's pending result
    # (FeatureStore._result(answer), a coroutine) is never awaited ("coroutine ... was never
    # awaited"; had the answer failed, "Future exception was never retrieved" too).
    # No socket timeout (CLV_REDIS_URL may say so; redis-py's default of 5 s makes every write
    # go through asyncio.wait_for, which yields once): a submit then yields nowhere.
    redis = Redis.from_url(
        redis_server.address, connection_class=HiredisPackConnection, socket_timeout=None
    )
    assert redis.connection_pool.make_connection().socket_timeout is None
    await redis.flushdb()
    store = FeatureStore(redis)
    # A big batch outstanding: the pipelined connection is held, so the consumer's submits
    # below write without yielding (as under a steady stream).
    big = [
        _ev(f"big-{i}", "purchase", f"b{i}", f"big-{i}", 1_000, 20_000 * MS_PER_DAY + 1)
        for i in range(50_000)
    ]
    pre = await store.submit(big, group="other", progress={}, now_ms=1)  # type: ignore[arg-type]
    steps = Steps()
    kafka = CancellingKafka(steps, [[record(i, event(f"e{i}"))] for i in range(4)])
    worker = consumer(steps, kafka)  # type: ignore[arg-type]
    worker._store = store
    results: list[Any] = []  # each batch's pending result, as submit returned it
    submit = store.submit

    async def recording_submit(*args: Any, **kw: Any) -> Any:
        results.append(await submit(*args, **kw))
        return results[-1]

    store.submit = recording_submit  # type: ignore[method-assign]
    with warnings.catch_warnings(record=True) as caught, loop_errors() as seen:
        warnings.simplefilter("always")
        run = asyncio.create_task(worker.run(steps.stop))
        kafka.run = run
        done, _ = await asyncio.wait([run], timeout=30)
        assert done, (steps.log, run, [t for t in asyncio.all_tasks()])
        await pre
        for _ in range(20):
            await asyncio.sleep(0.01)
        gc.collect()
    assert run.cancelled(), f"ended with {run.exception()!r}"
    states = [inspect.getcoroutinestate(r) for r in results]
    assert "CORO_CREATED" not in states, f"a batch's result never awaited: {states}"
    unawaited = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert unawaited == []
    assert [c.get("message") for c in seen] == []
    await redis.aclose()
