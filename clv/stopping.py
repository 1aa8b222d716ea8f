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


#: How long :func:`unless_stopped` waits for a cancelled step before it cancels it again.
#: Python 3.11's ``asyncio.wait_for`` loses a cancellation that comes as the awaitable it
#: wraps finishes (gh-86296, mended in 3.12); redis-py sends every command through one, so a
#: Ctrl-C while it connected to a Redis that does not answer could be lost, and the step went
#: on to wait out the URL's ``socket_timeout``.
RECANCEL_AFTER_S = 2.0


async def unless_stopped(stop: asyncio.Event, step: Awaitable[T]) -> T:
    """``step``'s result, or, when ``stop`` is set first, ``step`` cancelled (again every
    :data:`RECANCEL_AFTER_S` until it ends) and :class:`StoppedWhileStarting`."""
    task = asyncio.ensure_future(step)
    await stop_or_first_done(stop, [task])
    if not task.done():
        await cancel_and_wait(task, again_after=RECANCEL_AFTER_S)
        raise StoppedWhileStarting
    return task.result()


async def cancel_and_wait(task: asyncio.Future[T], *, again_after: float | None = None) -> None:
    """Cancel ``task`` and wait until it has ended (its clean-up done). A cancellation of the
    caller that comes meanwhile is passed on, not taken for the task's own.

    ``again_after``: cancel it again each time it has not ended after that many seconds, for a
    cancellation a library lost (:data:`RECANCEL_AFTER_S`). Only for steps whose clean-up may
    be cut short: one that waits for a child process to end would leave it running."""
    task.cancel()
    try:
        if again_after is not None:
            while not (await asyncio.wait({task}, timeout=again_after))[0]:
                task.cancel()
        await task  # its own failure, also one in its clean-up, is the caller's
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            if not task.done():  # as a plain `await task` passes the caller's on to it
                task.cancel()
            raise
