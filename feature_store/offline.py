"""Offline caller of the feature definition: fold an event table into :class:`UserState`.

The event table is what the archiver writes to the Parquet log (and what
:func:`events_from_orders` makes of an orders file): one row per validated event with
``event_id, type, user_id, order_id, amount, currency, ts_ms, day, cents``.
Point-in-time: only events dated on or before the as-of day are used.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from feature_store.events import id_digest, valid_event_id
from feature_store.features import UserState, compute_features

MS_PER_DAY = 86_400_000
EVENT_COLUMNS: tuple[str, ...] = (
    "event_id",
    "type",
    "user_id",
    "order_id",
    "amount",
    "currency",
    "ts_ms",
    "day",
    "cents",
)


def signed_cents(amount: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Integer cents of each event (half to even, as online), negative for refunds."""
    cents = np.rint(amount * 100).astype(np.int64)
    return np.where(kind == "refund", -cents, cents)


def events_from_orders(orders: pd.DataFrame) -> pd.DataFrame:
    """Normalise an orders table (``user_id, order_id, ts, amount`` and optional ``type,
    event_id, currency``) into the event table. ``ts`` may be strings or datetimes; naive
    times are read as UTC. Without ``event_id`` a purchase's id is ``purchase:<order_id>`` and
    a refund's ``refund:<order_id>:<epoch ms>:<cents>``; where that would not be a valid
    ``event_id`` (too long, or not printable), ``purchase:~`` or ``refund:~`` and a digest of
    it."""
    n = len(orders)
    ts = pd.to_datetime(orders["ts"], utc=True, format="mixed")
    ts_ms = (ts.astype("datetime64[ms, UTC]").astype("int64")).to_numpy()
    kind = (
        orders["type"].astype(str).to_numpy()
        if "type" in orders
        else np.full(n, "purchase", dtype=object)
    )
    amount = orders["amount"].astype(float).to_numpy()
    cents = signed_cents(amount, kind)
    user_id = orders["user_id"].astype(str).to_numpy()
    order_id = orders["order_id"].astype(str).to_numpy()
    if "event_id" in orders:
        event_id = orders["event_id"].astype(str).to_numpy()
    else:
        # One purchase per order, so a repeated purchase row is one event; an order can have
        # several partial refunds, so a refund's id also carries its time and amount.
        purchase_id = pd.Series(order_id).radd("purchase:")
        refund_id = (
            pd.Series(order_id).radd("refund:")
            + ":"
            + pd.Series(ts_ms).astype(str)
            + ":"
            + pd.Series(cents).abs().astype(str)
        )
        made = pd.Series(np.where(kind == "refund", refund_id, purchase_id))
        # (an order id near the length limit, or with a tab: the made id would not pass the
        # schema, and the consumers would dead-letter it) a digest of it instead
        bad = ~made.map(valid_event_id).astype(bool)
        made[bad] = made[bad].map(lambda m: f"{m.split(':', 1)[0]}:{id_digest(m)}")
        event_id = made.to_numpy(dtype=object)
    currency = orders["currency"].to_numpy() if "currency" in orders else np.full(n, None)
    return pd.DataFrame(
        {
            "event_id": event_id,
            "type": kind,
            "user_id": user_id,
            "order_id": order_id,
            "amount": amount,
            "currency": currency,
            "ts_ms": ts_ms,
            "day": ts_ms // MS_PER_DAY,
            "cents": cents,
        }
    )


def online_decisions(events: pd.DataFrame, late_after_days: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (in arrival order) the online state rejects as too late, and the rows it applies,
    decided as the apply script does, one row at a time (its decisions do not depend on where
    the batches end). A row is too late when dated at or before its user's latest applied
    event day minus ``late_after_days``. A copy of an applied event whose dedup entry is still
    kept is a duplicate (neither, and its day moves nothing, even when it differs); an entry
    dated at or before the cut is gone, so such a copy is judged afresh: too late, or applied
    as a new event when it is dated inside the window. An applied row moves its user's latest
    day."""
    late = np.zeros(len(events), dtype=bool)
    applied = np.zeros(len(events), dtype=bool)
    latest: dict[str, int] = {}
    kept: dict[tuple[str, str], int] = {}  # the dedup entries: applied copy's day
    rows = zip(
        events["user_id"].tolist(),
        events["event_id"].tolist(),
        events["day"].tolist(),
        strict=True,
    )
    for i, (user, event_id, day) in enumerate(rows):
        last = latest.get(user)
        cut = None if last is None else last - late_after_days
        entry = kept.get((user, event_id))
        if entry is not None and (cut is None or entry > cut):
            continue  # a duplicate
        if cut is not None and day <= cut:
            late[i] = True
            continue
        applied[i] = True
        kept[(user, event_id)] = day
        if last is None or day > last:
            latest[user] = day
    return late, applied


def too_late_mask(events: pd.DataFrame, late_after_days: int) -> np.ndarray:
    """Rows (in arrival order) the online state rejects as too late (:func:`online_decisions`)."""
    return online_decisions(events, late_after_days)[0]


def build_state(
    events: pd.DataFrame, as_of_day: int, *, late_after_days: int | None = None
) -> UserState:
    """Fold ``events`` (deduplicated by ``event_id`` within a user, first one wins: the online
    dedup set lives in the user's own hash slot) dated on or before
    ``as_of_day`` into the state the feature definition reads.

    With ``late_after_days`` (the online path's retention), rows are taken in arrival order and
    only the ones the online state applies count (:func:`online_decisions`), so the result
    equals Redis for any ``as_of_day`` on or after the user's latest event; only the events
    dated by ``as_of_day`` decide what is late. By default every event counts (event-time
    truth, what training wants).
    """
    ev = events
    by_then = ev["day"].to_numpy() <= as_of_day
    if late_after_days is not None and len(ev):
        # Only what is dated by ``as_of_day`` decides what is late: an event dated later must
        # not make an earlier one late (training, at that cutoff, counts it). The copies the
        # online state applies count, a copy dated inside the window after its original's
        # dedup entry was dropped as well (online it is a new event).
        applied = np.zeros(len(ev), dtype=bool)
        applied[by_then] = online_decisions(ev[by_then], late_after_days)[1]
        # A copy dated after ``as_of_day`` that came first makes the event a later one.
        after = pd.Series((~by_then).astype(np.int64))
        ids = [ev["user_id"].to_numpy(), ev["event_id"].to_numpy()]
        later_first = after.groupby(ids, sort=False).cumsum().to_numpy() > 0
        ev = ev[applied & ~later_first]
    else:
        # First copy wins before the cut: a copy dated after ``as_of_day`` that came first
        # makes the event a later one (a label at this cutoff, not a feature).
        first = ~ev.duplicated(["user_id", "event_id"], keep="first").to_numpy()
        ev = ev[first & by_then]
    codes, uniques = pd.factorize(ev["user_id"], sort=True)
    n = len(uniques)
    codes = codes.astype(np.int64)
    is_p = (ev["type"] == "purchase").to_numpy()
    day = ev["day"].to_numpy(np.int64)
    cents = ev["cents"].to_numpy(np.int64)
    ts = ev["ts_ms"].to_numpy(np.int64)

    # Day buckets: one int64 key per (user, day), grouped with one sort (two-column groupbys
    # cost several times more on millions of events).
    d0 = int(day.min()) if len(day) else 0
    span = int(day.max()) - d0 + 1 if len(day) else 1
    key = codes * span + (day - d0)
    keys, inverse = np.unique(key, return_inverse=True)
    days_user = keys // span
    days_day = keys % span + d0
    days_orders = np.bincount(inverse, weights=is_p, minlength=len(keys)).astype(np.int64)
    days_cents = np.bincount(inverse, weights=cents, minlength=len(keys)).round().astype(np.int64)

    pu, pts = codes[is_p], ts[is_p]
    first_ts = np.full(n, -1, dtype=np.int64)
    last_ts = np.full(n, -1, dtype=np.int64)
    if len(pu):
        by = pd.Series(pts).groupby(pu)
        mins, maxs = by.min(), by.max()
        first_ts[mins.index.to_numpy()] = mins.to_numpy()
        last_ts[maxs.index.to_numpy()] = maxs.to_numpy()
    first_day = np.where(first_ts >= 0, first_ts // MS_PER_DAY, -1)
    # Net cents dated on or before the first purchase day: not repeat revenue (a refund dated
    # before the first purchase is no repeat day's either).
    on_first = days_day <= first_day[days_user]
    first_day_cents = np.zeros(n, dtype=np.int64)
    np.add.at(first_day_cents, days_user[on_first], days_cents[on_first])
    latest_day = np.full(n, -1, dtype=np.int64)
    np.maximum.at(latest_day, days_user, days_day)
    return UserState(
        user_id=np.asarray(uniques, dtype=object),
        orders_total=np.bincount(codes[is_p], minlength=n).astype(np.int64),
        cents_total=np.bincount(codes, weights=cents, minlength=n).round().astype(np.int64),
        purchase_days=np.bincount(days_user[days_orders > 0], minlength=n).astype(np.int64),
        first_ts_ms=first_ts,
        last_ts_ms=last_ts,
        first_day=first_day,
        first_day_cents=first_day_cents,
        latest_day=latest_day,
        days_user=days_user,
        days_day=days_day,
        days_orders=days_orders,
        days_cents=days_cents,
    )


def features_at(
    events: pd.DataFrame, as_of_day: int, *, late_after_days: int | None = None
) -> pd.DataFrame:
    """Point-in-time features of every user with an event on or before ``as_of_day``."""
    return compute_features(
        build_state(events, as_of_day, late_after_days=late_after_days), as_of_day
    )
