"""``clv replay``: publish the orders of a file to the orders topic as order events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from clv.errors import ClvError
from clv.settings import Settings
from clv.stopping import StoppedWhileStarting, stop_or_first_done, unless_stopped
from feature_store.events import encode_event
from feature_store.features import iso_times


def load_events(path: Path, fmt: str, settings: Settings | None = None) -> pd.DataFrame:
    """The file's orders as the event table, in time order (a replay is history played live);
    what the consumers would dead-letter under ``settings`` (a CSV row in another currency
    than ``CLV_CURRENCY``, a time more than ``CLV_FUTURE_TOLERANCE_SECONDS`` ahead) is refused
    before anything is sent."""
    from training.datasets import load_orders

    settings = settings or Settings.model_construct()  # (the defaults, not the environment)
    events = load_orders(
        path,
        fmt,  # type: ignore[arg-type]
        currency=settings.currency,
        future_tolerance_ms=settings.future_tolerance_seconds * 1000,
    )
    order = np.argsort(events["ts_ms"].to_numpy(), kind="stable")
    return events.iloc[order].reset_index(drop=True)


def encode_rows(events: pd.DataFrame, max_bytes: int | None = None) -> list[tuple[bytes, bytes]]:
    """(key, value) of every event: the key is the user id, so a user's events share a
    partition. A value over ``max_bytes`` (``CLV_MAX_EVENT_BYTES``, which the consumers
    dead-letter) is a :class:`ClvError` before any is sent."""
    out = []
    times = iso_times(events["ts_ms"].to_numpy())
    for r, ts in zip(events.itertuples(index=False), times, strict=True):
        value = encode_event(
            event_id=r.event_id,
            type=r.type,
            user_id=r.user_id,
            order_id=r.order_id,
            amount=float(r.amount),
            ts=ts,
            currency=r.currency if isinstance(r.currency, str) else None,
        )
        if max_bytes is not None and len(value) > max_bytes:
            raise ClvError(
                f"order {r.order_id!r} of user {r.user_id!r} makes an event of {len(value):,} "
                f"bytes, over CLV_MAX_EVENT_BYTES ({max_bytes:,}), which the consumers refuse"
            )
        out.append((r.user_id.encode(), value))
    return out


#: After a stop, how long the chunk in hand may take to be acknowledged (a broker that hangs
#: would hold it for the client's whole request timeout, and a second signal does nothing).
ACK_GRACE_S = 5.0


class PublishError(ClvError):
    """Publishing failed part way; ``sent`` messages (a prefix) were acknowledged."""

    def __init__(self, message: str, sent: int) -> None:
        super().__init__(message)
        self.sent = sent


async def publish(
    settings: Settings,
    messages: Sequence[tuple[bytes | None, bytes | None]],
    *,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Send ``messages`` to the orders topic, at most ``rate`` per second when given; returns
    the number sent once the broker has acknowledged all of them. When ``stop`` is set, it
    ends after the chunk in hand, acknowledged (or, when the broker does not acknowledge it
    within :data:`ACK_GRACE_S`, without it): the number returned is then a prefix of
    ``messages``, all acknowledged, from which a later replay can resume (a message of the
    chunk left unacknowledged may be on the topic all the same; sent again, it is the same
    event, which the consumers count once). A broker error part way is a
    :class:`PublishError` that says how many were acknowledged."""
    from consumers.kafka import make_producer

    stop = stop or asyncio.Event()  # (never set: no stop asked for)
    producer = make_producer(settings)
    try:
        await unless_stopped(stop, producer.start())
    except StoppedWhileStarting:
        await _close(producer)
        return 0
    sent = 0
    start = time.monotonic()
    chunk = 2000 if rate is None else max(1, min(2000, int(rate // 10) or 1))
    try:
        for i in range(0, len(messages), chunk):
            if stop.is_set():
                break
            futures = [
                await producer.send(settings.orders_topic, key=k, value=v)
                for k, v in messages[i : i + chunk]
            ]
            if not await _acknowledged(asyncio.create_task(_all(futures)), stop):
                break
            sent += len(futures)
            if progress:
                progress(len(futures))
            if rate and sent < len(messages):  # (none after the last: nothing is left to pace)
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:  # a wait that a stop ends
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), ahead)
    except KafkaError as exc:
        raise PublishError(
            f"publishing to {settings.orders_topic} failed ({exc}) after the broker "
            f"acknowledged the first {sent} of {len(messages)} order events",
            sent,
        ) from exc
    finally:
        await _close(producer)
    return sent


async def _all(futures: list[asyncio.Future[object]]) -> list[object]:
    return await asyncio.gather(*futures)


async def _acknowledged(acks: asyncio.Task[list[object]], stop: asyncio.Event) -> bool:
    """Whether ``acks`` came: waited for until ``stop``, then for :data:`ACK_GRACE_S` more
    (not in time: cancelled, ``False``). A failed send raises its error."""
    await stop_or_first_done(stop, [acks])
    if not acks.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(acks), ACK_GRACE_S)
    if not acks.done():
        acks.cancel()
        with contextlib.suppress(asyncio.CancelledError, KafkaError):
            await acks
        return False
    acks.result()
    return True


async def _close(producer: AIOKafkaProducer) -> None:
    """Stop ``producer``, giving up after :data:`ACK_GRACE_S` (a broker that hangs would hold
    the flush of what is unacknowledged for the client's whole request timeout)."""
    with contextlib.suppress(TimeoutError, KafkaError):
        await asyncio.wait_for(producer.stop(), ACK_GRACE_S)
