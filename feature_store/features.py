"""The one feature definition: per-user state summaries + day buckets -> the contract's features.

Both callers go through :func:`compute_features`:

* online, :mod:`feature_store.redis_store` decodes one user's Redis hash into a one-row
  :class:`UserState`;
* offline, :mod:`feature_store.offline` folds the event log into a many-row :class:`UserState`
  with pandas.

Money is kept in integer cents (exact sums, so online and offline agree to the cent); time is
kept as UTC day numbers (days since 1970-01-01) and epoch milliseconds.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

WINDOWS: tuple[int, ...] = (7, 30, 90, 365)
#: Day detail older than this many days before a user's latest event is never needed.
RETENTION_DAYS: int = max(WINDOWS)

#: The contract's features, in a fixed order (the model's input order too).
FEATURE_NAMES: tuple[str, ...] = (
    "orders_total",
    "revenue_total",
    *(f"orders_{w}d" for w in WINDOWS),
    *(f"revenue_{w}d" for w in WINDOWS),
    "purchase_days",
    "frequency",
    "recency_days",
    "age_days",
    "avg_repeat_value",
)
#: Non-numeric features (timestamps), reported beside the numeric ones.
TIMESTAMP_FEATURES: tuple[str, ...] = ("first_order_at", "last_order_at")

EPOCH = dt.date(1970, 1, 1)
NO_DAY = -1  # first_day/latest_day of a user with no purchase yet


def day_number(d: dt.date) -> int:
    """UTC day number (days since 1970-01-01) of a date."""
    return (d - EPOCH).days


def day_date(n: int) -> dt.date:
    return EPOCH + dt.timedelta(days=int(n))


def iso_date(text: str) -> dt.date:
    """``YYYY-MM-DD`` -> a date; anything else a ValueError. ``fromisoformat`` alone (Python
    3.11+) also takes 19971231 and 1997-W01-1, which the contract and the orders files do not."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text, flags=re.ASCII):
        raise ValueError(text)
    return dt.date.fromisoformat(text)


def now_iso() -> str:
    """The wall clock as RFC 3339 UTC, as :func:`ms_to_iso` writes times."""
    return ms_to_iso(time.time_ns() // 1_000_000) or ""


def ms_to_iso(ms: int) -> str | None:
    """Epoch milliseconds -> RFC 3339 UTC string (``None`` for a user without purchases): one
    value as :func:`iso_times` writes many (through ``datetime``: numpy's string conversion
    costs a served answer more than the rest of reading it)."""
    if ms < 0:
        return None
    try:
        t = _EPOCH_TIME + dt.timedelta(milliseconds=int(ms))
    except OverflowError:  # after the year 9999: numpy's wider range
        text: str | None = iso_times(np.asarray([ms]))[0]
        return text
    return t.isoformat(timespec="milliseconds" if ms % 1000 else "seconds") + "Z"


_EPOCH_TIME = dt.datetime(1970, 1, 1)


def to_cents(amount: float) -> int:
    """Currency units -> integer cents, half to even (the same rule as ``np.rint`` offline)."""
    return round(amount * 100)


@dataclass(frozen=True, slots=True)
class UserState:
    """Columnar per-user state: one row per user plus their day buckets.

    ``days_*`` arrays describe (user row, day, purchases, net cents) buckets. Only buckets
    within :data:`RETENTION_DAYS` of the as-of day matter; older ones may be absent (online
    state folds them into the lifetime totals).
    """

    user_id: np.ndarray  # object (str)
    orders_total: np.ndarray  # int64, purchases
    cents_total: np.ndarray  # int64, purchases minus refunds
    purchase_days: np.ndarray  # int64, distinct purchase dates
    first_ts_ms: np.ndarray  # int64, earliest purchase time (-1: none)
    last_ts_ms: np.ndarray  # int64, latest purchase time (-1: none)
    first_day: np.ndarray  # int64, day of the earliest purchase (-1: none)
    first_day_cents: np.ndarray  # int64, net cents dated on or before first_day
    latest_day: np.ndarray  # int64, day of the latest event of any type
    days_user: np.ndarray  # int64, row index into the per-user arrays
    days_day: np.ndarray  # int64
    days_orders: np.ndarray  # int64
    days_cents: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.user_id)


def compute_features(state: UserState, as_of_day: int | np.ndarray) -> pd.DataFrame:
    """The contract's features of every user in ``state`` as of the end of ``as_of_day``.

    ``as_of_day`` is a UTC day number (scalar, or one per user); every user's state must hold
    all of that user's events dated on or before it. Returns one row per user, indexed by
    ``user_id``, with :data:`FEATURE_NAMES` (numbers) and :data:`TIMESTAMP_FEATURES`.
    """
    n = len(state)
    as_of = np.broadcast_to(np.asarray(as_of_day, dtype=np.int64), (n,))
    cols: dict[str, np.ndarray] = {
        "orders_total": state.orders_total.astype(np.int64),
        "revenue_total": state.cents_total / 100.0,
    }
    bucket_as_of = as_of[state.days_user] if n else np.zeros(0, dtype=np.int64)
    age_of_bucket = bucket_as_of - state.days_day  # 0 = on the as-of day itself
    for w in WINDOWS:
        inside = (age_of_bucket >= 0) & (age_of_bucket < w)
        users = state.days_user[inside]
        cols[f"orders_{w}d"] = np.bincount(
            users, weights=state.days_orders[inside], minlength=n
        ).astype(np.int64)
        cols[f"revenue_{w}d"] = (
            np.bincount(users, weights=state.days_cents[inside], minlength=n).round() / 100.0
        )
    has_purchase = state.first_day >= 0
    purchase_days = state.purchase_days.astype(np.int64)
    frequency = np.maximum(purchase_days - 1, 0)
    last_day = np.where(has_purchase, state.last_ts_ms // 86_400_000, NO_DAY)
    repeat_cents = np.maximum(state.cents_total - state.first_day_cents, 0)
    cols["purchase_days"] = purchase_days
    cols["frequency"] = frequency
    cols["recency_days"] = np.where(has_purchase, last_day - state.first_day, 0)
    cols["age_days"] = np.where(has_purchase, as_of - state.first_day, 0)
    cols["avg_repeat_value"] = np.where(
        frequency > 0, np.round(repeat_cents / np.maximum(frequency, 1)) / 100.0, 0.0
    )
    frame = pd.DataFrame(cols, index=pd.Index(state.user_id, name="user_id"))
    frame = frame[list(FEATURE_NAMES)]
    # String columns, missing where there is no purchase, however many users (left to infer,
    # pandas made one refund-only user's column of None an object column, and many users' a
    # string column with NaN: the frames said "no purchase" differently). Not object columns
    # of None and str: a Python string per cell took a million users' training 2 GiB more
    # (make bench-train's final fit, 5.2 GiB against 3.1). features_record gives None.
    for name, ms in (("first_order_at", state.first_ts_ms), ("last_order_at", state.last_ts_ms)):
        frame[name] = pd.Series(iso_times(ms), index=frame.index, dtype="str")
    return frame


def iso_times(ms: np.ndarray) -> np.ndarray:
    """Epoch milliseconds -> RFC 3339 UTC strings, exact (``1997-03-02T10:15:00Z``, with
    ``.fff`` only when there are milliseconds); None where ``ms`` < 0."""
    ms = np.asarray(ms, dtype=np.int64)
    out = np.full(len(ms), None, dtype=object)
    has = ms >= 0
    if has.any():
        t = ms[has].astype("datetime64[ms]")
        text = np.where(
            ms[has] % 1000 == 0,
            np.datetime_as_string(t, unit="s"),
            np.datetime_as_string(t, unit="ms"),
        )
        out[has] = np.char.add(text.astype(str), "Z").astype(object)
    return out


def features_record(frame: pd.DataFrame, user_id: str) -> dict[str, object]:
    """One user's row of :func:`compute_features` as plain JSON-ready Python values."""
    [record] = features_records(frame.loc[[user_id]])
    return record


def features_records(frame: pd.DataFrame) -> list[dict[str, object]]:
    """Every row of :func:`compute_features` as plain JSON-ready Python values, in order
    (column by column: a scorer's batch of thousands, where row access would cost more than
    the scoring)."""
    columns: list[tuple[str, list[object]]] = []
    for name in FEATURE_NAMES:
        kind = int if name.startswith("orders") or name in _INT_FEATURES else float
        columns.append((name, [kind(v) for v in frame[name].to_numpy()]))
    for name in TIMESTAMP_FEATURES:  # no purchase: null in JSON, not NaN
        columns.append((name, [None if pd.isna(v) else str(v) for v in frame[name].to_numpy()]))
    return [{name: values[i] for name, values in columns} for i in range(len(frame))]


_INT_FEATURES = frozenset({"purchase_days", "frequency", "recency_days", "age_days"})
