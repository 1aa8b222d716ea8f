"""Cancelling a step and waiting for its clean-up (clv.stopping)."""

from __future__ import annotations

import asyncio

import pytest

from clv.stopping import StoppedWhileStarting, cancel_and_wait, unless_stopped


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
    await cancel_and_wait(task)
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
    await cleaning.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert went_on == []


def _losing_step(cancels: list[int]) -> asyncio.Task[None]:
    """A step that loses its first cancellation, as Python 3.11's ``asyncio.wait_for`` does
    when the cancellation comes as the awaitable it wraps finishes (redis-py sends every
    command through one), and then waits for good."""

    async def step() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancels.append(1)  # lost: the step goes on
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancels.append(2)
            raise

    return asyncio.create_task(step())


async def _bounded(step: object, what: str) -> None:
    try:
        await asyncio.wait_for(step, 60)  # type: ignore[arg-type]
    except TimeoutError:
        pytest.fail(f"{what} still waited 60 s after the stop")


async def test_a_step_that_lost_its_cancellation_is_cancelled_again() -> None:
    # Fails if cancel_and_wait(again_after=...) cancels once and waits: a step whose
    # cancellation a library lost is never ended (clv features waited out the Redis URL's
    # socket_timeout after a Ctrl-C).
    cancels: list[int] = []
    task = _losing_step(cancels)
    await asyncio.sleep(0)
    await _bounded(cancel_and_wait(task, again_after=0.05), "cancel_and_wait")
    assert task.cancelled() and cancels == [1, 2]


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
    await cancel_and_wait(task, again_after=30)
    assert task.cancelled() and cleaned == [True]
