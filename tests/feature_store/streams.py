"""Event streams with the troubles real streams have: duplicates, reordering, refunds, lateness."""

from __future__ import annotations

import datetime as dt
import json
import random

import pandas as pd
import pytest

from feature_store.events import ValidEvent
from feature_store.redis_store import FeatureStore

MS_PER_DAY = 86_400_000


def messy_events(
    seed: int,
    users: int = 40,
    per_user: int = 30,
    start: dt.date = dt.date(2024, 1, 1),
    span_days: int = 900,
    redated: float = 0.0,
) -> list[ValidEvent]:
    """Purchases spread over ``span_days`` (longer than the longest window, so state folds),
    refunds of earlier orders, ~10% exact duplicates, shuffled locally and a few very late;
    with ``redated``, that share of the events has a copy dated 300 to 420 days later (some
    arriving after the original's dedup entry is dropped, where they are new events)."""
    rng = random.Random(seed)
    base = int(dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC).timestamp() * 1000)
    events: list[ValidEvent] = []
    for u in range(users):
        # unicode ids, and ids with braces (Redis Cluster hash-tag characters), too
        uid = f"u{u}" if u % 7 else f"ü-{u}/名" if u % 2 else f"}}{u}{{x}}"
        for k in range(rng.randint(1, per_user)):
            ts = base + rng.randint(0, span_days * MS_PER_DAY)
            cents = rng.randint(0, 50_000)
            oid = f"o{u}-{k}"
            events.append(_ev(f"p-{oid}", "purchase", uid, oid, cents, ts))
            if rng.random() < 0.15:
                back = rng.randint(1, max(cents, 1))
                rts = ts + rng.randint(0, 60 * MS_PER_DAY)
                events.append(_ev(f"r-{oid}", "refund", uid, oid, -back, rts))
    events.sort(key=lambda e: e.ts_ms)
    # Local reordering: swap neighbours; a few events delivered very late (out of retention).
    for i in range(len(events) - 1):
        if rng.random() < 0.2:
            events[i], events[i + 1] = events[i + 1], events[i]
    for _ in range(len(events) // 50):
        i = rng.randrange(len(events))
        events.append(events.pop(i))
    dups = [e for e in events if rng.random() < 0.1]
    for d in dups:
        events.insert(rng.randrange(len(events) + 1), d)
    for e in [e for e in events if rng.random() < redated]:
        later = e.ts_ms + rng.randint(300, 420) * MS_PER_DAY
        copy = _ev(e.event_id, e.type, e.user_id, e.order_id, e.cents, later)
        i = events.index(e)
        events.insert(rng.randrange(i + 1, len(events) + 1), copy)
    return events


def _ev(eid: str, kind: str, uid: str, oid: str, cents: int, ts: int) -> ValidEvent:
    return ValidEvent(
        event_id=eid,
        type=kind,
        user_id=uid,
        order_id=oid,
        amount=abs(cents) / 100,
        currency=None,
        ts_ms=ts,
        day=ts // MS_PER_DAY,
        cents=cents,
    )


def as_frame(events: list[ValidEvent]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": [e.event_id for e in events],
            "type": [e.type for e in events],
            "user_id": [e.user_id for e in events],
            "order_id": [e.order_id for e in events],
            "amount": [e.amount for e in events],
            "currency": [e.currency for e in events],
            "ts_ms": [e.ts_ms for e in events],
            "day": [e.day for e in events],
            "cents": [e.cents for e in events],
        }
    )


GOOD = {
    "event_id": "e",
    "type": "purchase",
    "user_id": "u",
    "order_id": "o",
    "amount": 1.0,
    "ts": "2024-01-01T00:00:00Z",
}


def _with(**changes: object) -> bytes:
    """A valid event with some fields changed (``...`` removes a field)."""
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


# (message value, the reason it must be rejected with)
BAD: list[tuple[bytes | None, str]] = [
    (b"{not json", "not_json"),
    (b"", "empty"),
    (b"[1, 2, 3]", "not_object"),
    (b'"just a string"', "not_object"),
    *[
        (_with(**{f: ...}), "missing_field")
        for f in ("event_id", "type", "user_id", "order_id", "amount", "ts")
    ],
    (_with(amount="12.5"), "wrong_type"),
    (_with(user_id=42), "wrong_type"),
    (_with(amount=True), "wrong_type"),
    (
        b'{"event_id":"e","type":"purchase","user_id":"u","order_id":"o","amount":NaN,'
        b'"ts":"2024-01-01"}',
        "not_json",
    ),
    (
        b'{"event_id":"e","type":"purchase","user_id":"u","order_id":"o","amount":Infinity,'
        b'"ts":"2024-01-01"}',
        "not_json",
    ),
    (
        b'{"event_id":"e","type":"purchase","user_id":"u",'
        b'"order_id":"o","amount":1e999,"ts":"2024-01-01"}',
        "invalid_value",
    ),
    (_with(amount=-0.01), "invalid_value"),
    (_with(amount=2e9), "invalid_value"),
    (_with(type="exchange"), "invalid_value"),
    (_with(ts="yesterday"), "bad_timestamp"),
    (_with(ts="2024-13-45T00:00:00Z"), "bad_timestamp"),
    (_with(ts="2024-01-01T10:00:00"), "bad_timestamp"),  # no zone offset
    (_with(ts="1960-01-01T00:00:00Z"), "bad_timestamp"),
    (_with(ts="2999-01-01T00:00:00Z"), "future_timestamp"),
    (_with(user_id=""), "invalid_value"),
    (_with(user_id="x" * 129), "invalid_value"),
    (_with(user_id="two words"), "bad_id"),
    (_with(user_id="tab\there"), "bad_id"),
    (_with(event_id=""), "invalid_value"),
    (_with(currency="EUR"), "unsupported_currency"),
    (_with(currency="dollars"), "invalid_value"),
    (b'{"pad":"' + b"x" * (64 * 1024) + b'"}', "too_large"),
    (b"\xff\xfe\x00garbage", "not_json"),
    # invalid UTF-8 inside a string field
    (
        b'{"event_id":"e","type":"purchase","user_id":"u","order_id":"\xff","amount":1,'
        b'"ts":"2024-01-01T00:00:00Z"}',
        "not_json",
    ),
    (
        b'{"event_id":"\xc3","type":"purchase","user_id":"u","order_id":"o","amount":1,'
        b'"ts":"2024-01-01"}',
        "not_json",
    ),
    (_with(ts="1969-12-31T23:59:59.9999Z"), "bad_timestamp"),
    # no UTF-8 where msgspec decodes no string: an unknown field, a member name, a surrogate
    (_with(note="x")[:-1] + b', "n": "\xff\xfe"}', "not_json"),
    (_with(note="x")[:-1] + b', "\xc3\x28": 1}', "not_json"),
    (_with(note="x")[:-1] + b', "n": "\xed\xa0\x80"}', "not_json"),
]


def purchase(i: int, day: int, user: str = "u") -> ValidEvent:
    """Purchase ``e<i>`` of one cent-less dollar by ``user`` on ``day``."""
    return _ev(f"e{i}", "purchase", user, f"o{i}", 100, day * MS_PER_DAY)


async def check_a_batch_after_one_not_applied_is_refused(store: FeatureStore) -> None:
    """The order guard, on a single Redis or a cluster: a batch whose predecessor (to offset
    20) never reached Redis is refused with nothing written; after one that did, it applies."""
    from clv.errors import StoreUnavailable

    await store.apply([purchase(1, 20_000)], group="g", progress={"t:0": 10}, now_ms=0)
    with pytest.raises(StoreUnavailable, match="CLVORDER"):
        await store.apply(
            [purchase(2, 20_400)], group="g", progress={"t:0": 30}, now_ms=0, after={"t:0": 20}
        )
    assert await store.progress("g") == {"t:0": 10}  # nothing written
    state = await store.read_state("u")
    assert state is not None and int(state.state.orders_total[0]) == 1
    result = await store.apply(
        [purchase(2, 20_400)], group="g", progress={"t:0": 30}, now_ms=0, after={"t:0": 10}
    )
    assert result.applied == 1
