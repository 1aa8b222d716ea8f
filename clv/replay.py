"""``clv replay``: publish the orders of a file to the orders topic as order events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from clv.settings import Settings
from feature_store.events import encode_event
from feature_store.features import iso_times


def load_events(path: Path, fmt: str, currency: str = "USD") -> pd.DataFrame:
    """The file's orders as the event table, in time order (a replay is history played live);
    a CSV row in another currency than ``currency`` is refused before anything is sent."""
    from training.datasets import load_orders

    events = load_orders(path, fmt, currency=currency)  # type: ignore[arg-type]
    order = np.argsort(events["ts_ms"].to_numpy(), kind="stable")
    return events.iloc[order].reset_index(drop=True)


def encode_rows(events: pd.DataFrame) -> list[tuple[bytes, bytes]]:
    """(key, value) of every event: the key is the user id, so a user's events share a partition."""
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
        out.append((r.user_id.encode(), value))
    return out


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
    ends after the chunk in hand (acknowledged): the number sent is then a prefix of
    ``messages``, from which a later replay can resume."""
    from consumers.kafka import make_producer

    stop = stop or asyncio.Event()  # (never set: no stop asked for)
    producer = make_producer(settings)
    await producer.start()
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
            await asyncio.gather(*futures)
            sent += len(futures)
            if progress:
                progress(len(futures))
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:  # a wait that a stop ends
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), ahead)
    finally:
        await producer.stop()
    return sent
