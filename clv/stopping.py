"""Waiting for a step, or for ``stop``, whichever comes first.

A service's start can wait a long time: a broker that accepts but does not answer, or a
consumer group whose rebalance waits on a member that died (``AIOKafkaConsumer.start`` returns
only once the group has assigned partitions). A stop asked for meanwhile (Ctrl-C, SIGTERM)
must not wait for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class StoppedWhileStarting(Exception):
    """``stop`` was set before the step it raced with was done."""


async def stop_or_first_done(stop: asyncio.Event, tasks: list[asyncio.Task[T]]) -> None:
    """Return when ``stop`` is set or any of ``tasks`` is done."""
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({waiter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


async def unless_stopped(stop: asyncio.Event, step: Awaitable[T]) -> T:
    """``step``'s result, or, when ``stop`` is set first, ``step`` cancelled and
    :class:`StoppedWhileStarting`."""
    task = asyncio.ensure_future(step)
    await stop_or_first_done(stop, [task])
    if not task.done():
        await cancel_and_wait(task)
        raise StoppedWhileStarting
    return task.result()


async def cancel_and_wait(task: asyncio.Future[T]) -> None:
    """Cancel ``task`` and wait until it has ended (its clean-up done). A cancellation of the
    caller that comes meanwhile is passed on, not taken for the task's own."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
