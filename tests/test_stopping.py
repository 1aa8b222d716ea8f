"""Cancelling a step and waiting for its clean-up (clv.stopping)."""

from __future__ import annotations

import asyncio

import pytest

from clv.stopping import cancel_and_wait


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
