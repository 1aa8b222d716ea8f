"""Cancelling a step and waiting for its clean-up (clv.stopping)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import pytest

from clv.stopping import StoppedWhileStarting, cancel_and_wait, unless_stopped

T = TypeVar("T")


def _step(cleaning: asyncio.Event, cleaned: list[bool]) -> asyncio.Task[None]:
    async def step() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await asyncio.sleep(0.2)  # a clean-up that takes a while
            cleaned.append(True)
            raise

    return asyncio.create_task(step())


async def test_a_step_is_cancelled_and_its_clean_up_waited_for() -> None:
    # Fails if cancel_and_wait returns before the step's clean-up ran, or passes the step's
    # own cancellation on to its caller.
    cleaned: list[bool] = []
    task = _step(asyncio.Event(), cleaned)
    await asyncio.sleep(0)  # the step is running
    await _bounded(cancel_and_wait(task), "cancel_and_wait")
    assert task.cancelled() and cleaned == [True]


async def test_a_cancel_of_the_caller_while_the_step_cleans_up_is_passed_on() -> None:
    # Fails if the caller's own cancellation, come while it waited for the step, is taken for
    # the step's and swallowed: the caller (run_stack under a cancelled task) went on as if
    # nothing had happened.
    cleaning = asyncio.Event()
    task = _step(cleaning, [])
    await asyncio.sleep(0)
    went_on: list[bool] = []

    async def caller() -> None:
        await cancel_and_wait(task)
        went_on.append(True)

    outer = asyncio.create_task(caller())
    await _bounded(cleaning.wait(), "the step's clean-up")
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await _bounded(outer, "the cancelled caller")
    assert went_on == []


_LOSING: list[asyncio.Task[None]] = []


@pytest.fixture(autouse=True)
async def _reap_losing_steps() -> AsyncIterator[None]:
    """Ends the steps that lose cancellations which a test left running (code that does not
    cancel them often enough), so that such a test fails instead of hanging the loop's close."""
    yield
    while _LOSING:
        task = _LOSING.pop()
        for _ in range(100):
            if task.done():
                break
            task.cancel()
            await asyncio.sleep(0)


def _losing_step(cancels: list[int], lose: int = 1) -> asyncio.Task[None]:
    """A step that loses its first ``lose`` cancellations, as Python 3.11's
    ``asyncio.wait_for`` does when the cancellation comes as the awaitable it wraps finishes
    (redis-py sends every command through one), waiting for good after each."""

    async def step() -> None:
        for n in range(1, lose + 1):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancels.append(n)  # lost: the step goes on
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancels.append(lose + 1)
            raise

    task = asyncio.create_task(step())
    _LOSING.append(task)
    return task


async def _bounded(step: Awaitable[T], what: str, bound: float = 60) -> T:
    """``step``'s outcome, or a failure once it has run ``bound`` seconds. Not wait_for: its
    cancellation on the timeout would go to the step it waits on, which may lose it too, and
    the test would wait for good instead of failing (the step is reaped after the test)."""
    task = asyncio.ensure_future(step)
    if not (await asyncio.wait({task}, timeout=bound))[0]:
        _LOSING.append(task)  # type: ignore[arg-type]
        pytest.fail(f"{what} still waited {bound:g} s after the stop")
    return task.result()


async def test_a_step_that_lost_its_cancellation_is_cancelled_again() -> None:
    # Fails if cancel_and_wait(again_after=...) cancels once and waits: a step whose
    # cancellation a library lost is never ended (clv features waited out the Redis URL's
    # socket_timeout after a Ctrl-C).
    cancels: list[int] = []
    task = _losing_step(cancels)
    await asyncio.sleep(0)
    await _bounded(cancel_and_wait(task, again_after=0.05), "cancel_and_wait")
    assert task.cancelled() and cancels == [1, 2]


async def test_a_step_is_cancelled_again_as_often_as_it_takes() -> None:
    # Fails if cancel_and_wait cancels it a second time only: a library that loses two
    # cancellations in a row (a retry around the call that lost the first) kept the stop waiting.
    cancels: list[int] = []
    task = _losing_step(cancels, lose=3)
    await asyncio.sleep(0)
    await _bounded(cancel_and_wait(task, again_after=0.01), "cancel_and_wait")
    assert task.cancelled() and cancels == [1, 2, 3, 4]


async def test_unless_stopped_ends_a_step_that_lost_its_cancellation() -> None:
    # Fails if unless_stopped does not cancel its step again: the stop waited on the step.
    cancels: list[int] = []
    stop = asyncio.Event()

    async def stopped_soon() -> None:
        await asyncio.sleep(0.01)
        stop.set()

    setter = asyncio.create_task(stopped_soon())
    with pytest.raises(StoppedWhileStarting):
        await _bounded(unless_stopped(stop, _losing_step(cancels)), "unless_stopped")
    await setter
    assert cancels == [1, 2]


async def test_cancelling_again_leaves_a_clean_up_shorter_than_the_wait_alone() -> None:
    # Fails if again_after cancels the step again before the time is up (cutting short a
    # clean-up that would have finished).
    cleaned: list[bool] = []
    task = _step(asyncio.Event(), cleaned)
    await asyncio.sleep(0)
    # Fails too if it waits out again_after whatever the step does (every stop took 2 s).
    await _bounded(cancel_and_wait(task, again_after=3600), "cancel_and_wait")
    assert task.cancelled() and cleaned == [True]


@pytest.mark.parametrize("again_after", [None, 0.01])
async def test_a_step_that_fails_in_its_clean_up_fails_its_caller(
    again_after: float | None,
) -> None:
    # Fails if the step's own error on the way out (a clean-up that raised) is hidden behind
    # the stop: unless_stopped would say only "stopped", and asyncio log "Task exception was
    # never retrieved".
    async def step() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise OSError("close failed") from None

    task = asyncio.create_task(step())
    await asyncio.sleep(0)
    with pytest.raises(OSError, match="close failed"):
        await _bounded(cancel_and_wait(task, again_after=again_after), "cancel_and_wait")
    stop = asyncio.Event()
    stop.set()
    with pytest.raises(OSError, match="close failed"):
        await _bounded(unless_stopped(stop, step()), "unless_stopped")


async def test_a_cancel_of_the_caller_is_passed_on_to_a_step_that_lost_its_own() -> None:
    # Fails if a caller cancelled while cancel_and_wait(again_after=...) waits leaves the step
    # running with its cancellation lost (a plain `await task` passes the caller's on to it).
    cancels: list[int] = []
    task = _losing_step(cancels)
    await asyncio.sleep(0)
    outer = asyncio.create_task(cancel_and_wait(task, again_after=3600))
    for _ in range(10_000):
        if cancels:  # the first cancellation has been lost
            break
        await asyncio.sleep(0)
    else:
        pytest.fail("the step was never cancelled")
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await _bounded(outer, "the cancelled caller")
    with pytest.raises(asyncio.CancelledError):
        await _bounded(task, "the step")
    assert cancels == [1, 2]


def test_each_test_runs_with_ctrl_c_and_a_hangup_not_ignored() -> None:
    # Fails if the suite's fixture does not undo an ignore the suite was started with (`nohup
    # make test`, `make test &` in a script): each Ctrl-C or hangup test would fail or hang.
    import signal

    assert signal.getsignal(signal.SIGINT) != signal.SIG_IGN
    assert signal.getsignal(signal.SIGHUP) != signal.SIG_IGN
