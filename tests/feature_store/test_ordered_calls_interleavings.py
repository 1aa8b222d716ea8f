"""Pipelined calls (``_OrderedCalls``) under cancellation, closing, bursts and a flushed
script cache, against a real redis-server: no answer shifted, no connection leaked or reused
half-written, nothing left unretrieved."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from clv.local_stack import LocalProcess
from feature_store.redis_store import FeatureStore, _OrderedCalls

from .streams import MS_PER_DAY, _ev

pytestmark = pytest.mark.integration

DAY0 = 20_000

# Keeps Redis busy for ARGV[2] ms, then answers {#ARGV[1], ARGV[3]}: a call's answer names it.
SLOW = """
local function now() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end
local start = now()
while now() - start < tonumber(ARGV[2]) do end
return {#ARGV[1], tonumber(ARGV[3])}
"""

BIG = b"x" * (64 << 20)  # far more than the socket buffers: its write waits for Redis


def _purchase(eid: str, uid: str, day: int) -> object:
    return _ev(eid, "purchase", uid, eid, 1_000, day * MS_PER_DAY + 1)


def _in_use(redis: Any) -> int:
    return len(redis.connection_pool._in_use_connections)


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What the event loop reports to its exception handler ("Future exception was never
    retrieved", "Task exception was never retrieved", ...) while inside."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    try:
        yield seen
    finally:
        gc.collect()
        loop.set_exception_handler(old)


async def _settle_loop() -> None:
    for _ in range(50):
        await asyncio.sleep(0.01)
    gc.collect()
    await asyncio.sleep(0)


async def _cancel_mid_send(calls: _OrderedCalls, slow_ms: int) -> asyncio.Future[Any]:
    """A call that keeps Redis busy, then one whose write cannot finish meanwhile, cancelled
    while it writes (as the consumer task is, cancelled inside ``submit``). Returns the
    first call's answer."""
    first = await calls.call([], [b"", slow_ms, 1])
    writer = asyncio.create_task(calls.call([], [BIG, 0, 2]))
    await asyncio.sleep(0.3)
    assert not writer.done(), "the big write should still be waiting for Redis"
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    return first


async def test_a_call_after_a_caller_cancelled_mid_write_is_answered(redis: Redis) -> None:
    # Fails if the reader of the connection that the cancelled write broke lives on: the next
    # call takes the same connection object from the pool (reconnected), sees a reader
    # "running" and starts none; the old reader, stuck on the old socket until its closing
    # transport has flushed the half-written request, then disconnects the *new* socket and
    # fails the new call with the old connection's error.
    calls = _OrderedCalls(redis, SLOW)
    first = await _cancel_mid_send(calls, slow_ms=1500)
    with contextlib.suppress(Exception):
        await first  # failed with the connection (whether it ran is unknown): fine
    later = await asyncio.wait_for(calls.call([], [b"", 0, 3]), timeout=20)
    assert await asyncio.wait_for(later, timeout=20) == [0, 3]
    await _settle_loop()
    assert _in_use(redis) == 0


async def test_a_cancelled_write_leaves_no_exception_unretrieved(redis: Redis) -> None:
    # Fails if the cancelled call's own future is failed but never handed to anyone: asyncio
    # then logs "Future exception was never retrieved" (and the old reader may die on an
    # empty queue: "Task exception was never retrieved").
    calls = _OrderedCalls(redis, SLOW)
    with loop_errors() as seen:
        first = await _cancel_mid_send(calls, slow_ms=300)
        with contextlib.suppress(Exception):
            await first
        await asyncio.sleep(1.0)  # the old transport flushes, the old reader ends
        await _settle_loop()
    assert [c.get("message") for c in seen] == []
    assert _in_use(redis) == 0


async def test_another_user_of_the_pool_is_not_disconnected_by_a_stale_reader(
    redis: Redis,
) -> None:
    # Fails if the connection broken by a cancelled write goes back to the pool while its
    # reader still runs: a plain command of the same client takes it (reconnected), and the
    # stale reader's error handling closes that command's socket under it.
    calls = _OrderedCalls(redis, SLOW)
    first = await _cancel_mid_send(calls, slow_ms=1500)
    with contextlib.suppress(Exception):
        await first
    # A plain command of the same client takes the connection object the cancelled write
    # gave back (the pool is last in, first out) and blocks in Redis for a while.
    assert await asyncio.wait_for(redis.blpop(["absent"], timeout=3), timeout=20) is None
    await _settle_loop()
    assert _in_use(redis) == 0


async def test_aclose_with_calls_outstanding_fails_them_and_leaks_nothing(
    own_redis: tuple[LocalProcess, Redis],
) -> None:
    # Fails if redis.aclose() while calls are outstanding leaves them waiting, or keeps the
    # connection out of the pool.
    _, client = own_redis
    calls = _OrderedCalls(client, SLOW)  # type: ignore[arg-type]
    with loop_errors() as seen:
        pending = [await calls.call([], [b"", 500, i]) for i in range(3)]
        await client.aclose()
        for answer in pending:
            with pytest.raises(Exception):  # noqa: B017
                await asyncio.wait_for(answer, timeout=20)
        await _settle_loop()
    assert [c.get("message") for c in seen] == []
    assert _in_use(client) == 0


async def test_bursts_errors_and_cancelled_waiters_leak_no_connection(redis: Redis) -> None:
    # Fails if bursts, error replies or callers cancelled while waiting for the lock shift an
    # answer to another call or keep a connection of the pool.
    store = FeatureStore(redis)
    assert store._ordered is not None
    for burst in range(20):
        answers: list[tuple[Any, Any]] = []
        for i in range(5):
            if i == 2:
                answers.append(
                    (
                        "bad",
                        await store._ordered.call(
                            ["clv:progress:{g}"], [b"\xc1", b"\x90", 1, 365, -1]
                        ),
                    )
                )
                continue
            uid = f"u{burst}-{i}"
            answers.append(
                (
                    i,
                    await store.submit(
                        [_purchase(f"e{burst}-{i}-{j}", uid, DAY0) for j in range(i + 1)],  # type: ignore[misc]
                        group="g",
                        progress={},
                        now_ms=1,
                    ),
                )
            )
        # Callers queued for the lock behind a writer, cancelled there.
        waiters = [
            asyncio.create_task(
                store.submit(
                    [_purchase(f"w{burst}-{k}", "w", DAY0)],  # type: ignore[list-item]
                    group="g",
                    progress={},
                    now_ms=1,
                )
            )
            for k in range(3)
        ]
        await asyncio.sleep(0)
        waiters[1].cancel()
        for t in waiters:
            with contextlib.suppress(asyncio.CancelledError):
                r = await t
                await r
        for tag, answer in answers:
            if tag == "bad":
                with pytest.raises(Exception, match="Bad data format"):
                    await answer
            else:
                assert (await answer).applied == tag + 1
    await _settle_loop()
    assert _in_use(redis) == 0


async def test_a_caller_cancelled_while_its_connection_is_set_up_breaks_nothing(
    redis: Redis,
) -> None:
    # Fails if a caller cancelled while its new connection is set up (the handshake waits:
    # Redis is busy with another client's call) keeps the connection, or breaks the next
    # call.
    other = _OrderedCalls(redis, SLOW)  # another connection of the same pool keeps Redis busy
    busy = await other.call([], [b"", 800, 0])
    calls = _OrderedCalls(redis, SLOW)
    with loop_errors() as seen:
        caller = asyncio.create_task(calls.call([], [b"", 0, 1]))
        await asyncio.sleep(0.2)
        assert not caller.done()
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        assert await busy == [0, 0]
        later = await asyncio.wait_for(calls.call([], [b"", 0, 2]), timeout=20)
        assert await asyncio.wait_for(later, timeout=20) == [0, 2]
        await _settle_loop()
    assert [c.get("message") for c in seen] == []
    assert _in_use(redis) == 0


async def test_a_script_flush_while_the_connection_is_held_fails_no_batch(redis: Redis) -> None:
    # Fails if the calls name the script by its hash only: under a steady stream the
    # pipelined connection is never given back, so a script loaded when it is taken is never
    # loaded again, and a SCRIPT FLUSH (an operator, a script cache reset) makes every later
    # batch answer NOSCRIPT and the consumer stop.
    store = FeatureStore(redis)
    pending: list[Any] = []
    failures: list[str] = []
    flush: asyncio.Future[Any] | None = None
    for i in range(60):
        if len(pending) >= 3:
            try:
                await pending.pop(0)
            except Exception as exc:
                failures.append(str(exc))
        batch = [_purchase(f"f{i}-{j}", f"u{j}", DAY0) for j in range(2000)]
        pending.append(await store.submit(batch, group="g", progress={}, now_ms=1))  # type: ignore[arg-type]
        if i == 30:  # from another connection, while this one has calls outstanding
            flush = asyncio.ensure_future(redis.script_flush())
    assert flush is not None
    await flush
    for p in pending:
        try:
            await p
        except Exception as exc:
            failures.append(str(exc))
    assert failures == []


async def test_on_the_cluster_path_a_cancelled_caller_cancels_no_later_batch(
    redis: Redis,
) -> None:
    # Fails if on the Redis Cluster chain (run here on one node with every key in slot 0) a
    # batch's task passes on the cancellation of the task before it: one caller cancelled
    # (asyncio.wait_for timing out on apply, say) then cancels every batch submitted after
    # it, unapplied, and their callers, who cancelled nothing, get CancelledError.
    store = FeatureStore(redis)
    store._ordered = None  # the cluster path
    redis.keyslot = lambda key: 0  # type: ignore[attr-defined]
    first = await store.submit([_purchase("c1", "uc", DAY0)], group="g", progress={}, now_ms=1)  # type: ignore[list-item]
    second = await store.submit([_purchase("c2", "uc", DAY0 + 1)], group="g", progress={}, now_ms=1)  # type: ignore[list-item]
    first.cancel()  # type: ignore[attr-defined]
    with contextlib.suppress(asyncio.CancelledError):
        await first
    assert (await asyncio.wait_for(second, timeout=10)).applied == 1


async def test_random_cancellations_never_shift_an_answer_or_leak(redis: Redis) -> None:
    # Callers cancelled at random points (waiting for the lock, mid-write of a request larger
    # than the socket buffers, after writing), with Redis kept slow now and then: every answer
    # that comes is its own call's (the script answers with the call's number), nothing waits
    # forever, the connections all go back and the loop reports nothing.
    rng = random.Random(7)
    calls = _OrderedCalls(redis, SLOW)
    sizes = [0, 10, 1 << 16, 8 << 20]
    with loop_errors() as seen:
        for burst in range(12):
            answers: dict[int, asyncio.Future[Any]] = {}

            async def one(
                i: int, size: int, slow_ms: int, into: dict[int, asyncio.Future[Any]]
            ) -> None:
                into[i] = await calls.call([], [b"y" * size, slow_ms, i])

            tasks = []
            expected_len = {}
            for k in range(6):
                i = burst * 100 + k
                size = rng.choice(sizes)
                expected_len[i] = size
                tasks.append(
                    asyncio.create_task(one(i, size, rng.choice([0, 0, 20, 150]), answers))
                )
            for t in tasks:
                if rng.random() < 0.4:
                    await asyncio.sleep(rng.choice([0, 0.001, 0.01, 0.05]))
                    t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(t, timeout=30)
            for i, answer in answers.items():
                try:
                    got = await asyncio.wait_for(answer, timeout=30)
                except TimeoutError:
                    raise AssertionError(f"call {i} left waiting") from None
                except Exception:
                    continue  # failed with its connection: allowed
                assert got == [expected_len[i], i], f"call {i} got another call's answer {got}"
        await _settle_loop()
    assert [c.get("message") for c in seen] == []
    assert _in_use(redis) == 0


# ARGV[3] == "1": keeps Redis busy ARGV[2] ms, then answers an error reply that redis-py maps
# to a *connection* error (LOADING -> BusyLoadingError): the reader dies on it, the socket is
# closed by redis-py, while the next call's big request is still being flushed.
LOADING = """
local function now() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end
if ARGV[3] == '1' then
  local start = now()
  while now() - start < tonumber(ARGV[2]) do end
  return redis.error_reply('LOADING pretend the dataset is loading')
end
return {#ARGV[1], tonumber(ARGV[3])}
"""


async def test_a_reader_cancelled_before_its_first_step_still_gives_the_connection_back(
    redis: Redis,
) -> None:
    # Fails if _kill cancels a reader task that has not run yet: asyncio then throws
    # CancelledError into the coroutine before its ``try`` is entered, its ``finally: _leave``
    # never runs, ``held.users`` stays at 1 and the connection never goes back to the pool.
    # Here: a call (its reader created, not yet run), then at once (no await that yields in
    # between) a call whose write fails before any byte is written (an argument hiredis
    # cannot pack).
    calls = _OrderedCalls(redis, SLOW)
    with loop_errors() as seen:
        first = await calls.call([], [b"", 0, 1])
        with pytest.raises(TypeError):
            await calls.call([], [None])  # type: ignore[list-item]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(first, timeout=10)
        await _settle_loop()
    assert [c.get("message") for c in seen] == []
    assert _in_use(redis) == 0, "the connection of the killed held never went back"


async def test_a_writer_cancelled_while_it_gives_back_leaves_no_answer_unretrieved(
    redis: Redis,
) -> None:
    # Fails if a call whose request went out whole, but whose connection's reader died
    # meanwhile (its answer already failed by _kill), is cancelled while _leave awaits the
    # shielded _give_back: call() then raises CancelledError and drops ``answer``, failed and
    # never handed to anyone ("Future exception was never retrieved").
    calls = _OrderedCalls(redis, LOADING)
    orig = calls._give_back
    writer: asyncio.Task[Any] | None = None

    async def give_back(held: Any) -> None:
        # The cancellation lands while the shielded give-back runs (a wait_for timing out
        # then, say); made deterministic here.
        if writer is not None and asyncio.current_task() is not writer and not writer.done():
            writer.cancel()
        await orig(held)

    calls._give_back = give_back  # type: ignore[method-assign]
    with loop_errors() as seen:
        first = await calls.call([], [b"", 300, 1])
        writer = asyncio.create_task(calls.call([], [BIG, 0, 2]))
        await asyncio.sleep(0.1)
        assert not writer.done(), "the big write should be waiting for Redis"
        with contextlib.suppress(Exception):
            await asyncio.wait_for(first, timeout=10)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(writer, timeout=20)
        outcome = "cancelled" if writer.cancelled() else repr(writer.exception())
        writer = None
        await _settle_loop()
        gc.collect()
    assert outcome == "cancelled", f"setup: the writer should end cancelled, got {outcome}"
    assert [c.get("message") for c in seen] == []
    assert _in_use(redis) == 0
