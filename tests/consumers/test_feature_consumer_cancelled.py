"""The consumer cancelled while it writes a batch to the store ends cancelled.

Fakes on purpose (test_feature_consumer_steps.py's): the moment is inside a write."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from clv.errors import StoreError
from feature_store.events import ValidEvent
from feature_store.redis_store import ApplyResult

from .test_feature_consumer_steps import FakeKafka, FakeStore, Steps, consumer, event, record


class WritingStore(FakeStore):
    """As the real store on a single Redis: the first batch's answer is outstanding, and the
    second batch's submission hangs in its write; a caller cancelled there breaks the
    connection, which fails every call outstanding on it (here the first batch's)."""

    def __init__(self, steps: Steps) -> None:
        super().__init__(steps)
        self.first: asyncio.Future[ApplyResult] | None = None
        self.writing = asyncio.Event()

    async def submit(self, events: list[ValidEvent], **kw: object) -> Awaitable[ApplyResult]:
        self.steps.log.append(("apply", [e.event_id for e in events]))
        if self.first is None:
            self.first = asyncio.get_running_loop().create_future()
            return self.first
        self.writing.set()
        try:
            await asyncio.Event().wait()  # the write, never done
        except asyncio.CancelledError:
            self.first.set_exception(StoreError("applying a batch failed: a call was cancelled"))
            raise
        raise AssertionError("unreachable")


async def test_a_consumer_cancelled_mid_write_ends_cancelled() -> None:
    # Fails if run()'s finally re-raises the failure that the cancellation itself caused in
    # the batches outstanding (StoreError "cancelled"): a cancelled consumer task then ends
    # with a StoreError instead of CancelledError (asyncio.run logs it as an unhandled
    # exception on shutdown; a TaskGroup sees a failure).
    steps = Steps()
    kafka = FakeKafka(steps, [[record(0, event("e1"))], [record(1, event("e2"))]])
    worker = consumer(steps, kafka)
    worker._store = store = WritingStore(steps)  # type: ignore[assignment]
    run = asyncio.create_task(worker.run(steps.stop))
    await asyncio.wait_for(store.writing.wait(), timeout=10)
    run.cancel()
    done, _ = await asyncio.wait([run], timeout=10)
    assert done and run.cancelled(), f"ended with {run.exception()!r}"
    assert kafka.commits == {}
