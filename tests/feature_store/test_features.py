"""The feature definition on hand-checked examples (window edges, refunds, repeat value)."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd

from feature_store.events import validate
from feature_store.features import (
    FEATURE_NAMES,
    RETENTION_DAYS,
    day_number,
    features_record,
    iso_times,
    ms_to_iso,
)
from feature_store.offline import events_from_orders, features_at, too_late_mask
from tests.feature_store.streams import GOOD

from .streams import MS_PER_DAY, _ev, as_frame


def _orders(rows: list[tuple[str, str, float, str]]) -> pd.DataFrame:
    return events_from_orders(
        pd.DataFrame(
            [
                {
                    "user_id": "u",
                    "order_id": f"o{i}",
                    "ts": ts,
                    "amount": amt,
                    "type": kind,
                    "event_id": f"{kind}-{i}-{note}",
                }
                for i, (ts, kind, amt, note) in enumerate(rows)
            ]
        )
    )


def test_windows_cover_the_last_w_days_including_the_as_of_day() -> None:
    ev = _orders(
        [
            ("2024-01-01T10:00:00Z", "purchase", 10.0, "a"),
            ("2024-01-01T18:00:00Z", "purchase", 5.0, "b"),  # same day: one purchase day
            ("2024-03-25T00:00:00Z", "purchase", 20.0, "c"),  # 7 days before 2024-04-01
            ("2024-03-26T00:00:00Z", "purchase", 30.0, "d"),  # 6 days before: inside 7d
            ("2024-04-01T23:59:59Z", "refund", 4.0, "e"),  # refund on the as-of day
        ]
    )
    f = features_at(ev, day_number(dt.date(2024, 4, 1))).loc["u"]
    assert list(f.index[: len(FEATURE_NAMES)]) == list(FEATURE_NAMES)
    assert f["orders_total"] == 4 and f["revenue_total"] == 61.0
    assert f["orders_7d"] == 1 and f["revenue_7d"] == 26.0  # 30 - 4
    assert f["orders_30d"] == 2 and f["revenue_30d"] == 46.0
    assert f["orders_90d"] == 2  # 2024-01-01 is 91 days before
    assert f["orders_365d"] == 4
    assert f["purchase_days"] == 3 and f["frequency"] == 2
    assert f["recency_days"] == 85 and f["age_days"] == 91
    # Repeat days: revenue after the first purchase day (20 + 30 - 4) over 2 repeat days.
    assert f["avg_repeat_value"] == 23.0
    assert f["first_order_at"] == "2024-01-01T10:00:00Z"
    assert f["last_order_at"] == "2024-03-26T00:00:00Z"


def test_duplicates_count_once_and_later_events_are_invisible() -> None:
    ev = _orders(
        [
            ("2024-01-01", "purchase", 10.0, "a"),
            ("2024-01-05", "purchase", 10.0, "b"),
            ("2024-02-01", "purchase", 99.0, "c"),
        ]
    )
    ev = pd.concat([ev, ev.iloc[[0]]], ignore_index=True)  # a redelivered event
    f = features_at(ev, day_number(dt.date(2024, 1, 31))).loc["u"]
    assert f["orders_total"] == 2 and f["revenue_total"] == 20.0 and f["age_days"] == 30


def test_refunds_beyond_the_repeat_revenue_leave_a_repeat_value_of_zero() -> None:
    """Net repeat revenue below zero (a refund of the first day's order, dated later) is
    clamped: a mean spend per repeat day cannot be negative, and Gamma-Gamma needs it >= 0."""
    ev = _orders(
        [
            ("2024-01-01T10:00:00Z", "purchase", 10.0, "a"),
            ("2024-01-02T10:00:00Z", "purchase", 5.0, "b"),
            ("2024-01-02T12:00:00Z", "refund", 20.0, "c"),
        ]
    )
    f = features_at(ev, day_number(dt.date(2024, 1, 2))).loc["u"]
    assert f["frequency"] == 1 and f["revenue_total"] == -5.0
    assert f["avg_repeat_value"] == 0.0


def test_the_offline_too_late_edge_is_the_retention_to_the_day() -> None:
    """As online (test_the_too_late_edge_is_the_retention_to_the_day): an event dated
    exactly the retention before the user's latest day is too late, one a day later is not."""
    newest = _ev("n", "purchase", "u", "o1", 100, 1365 * MS_PER_DAY)
    at_edge = _ev("e", "purchase", "u", "o2", 100, (1365 - RETENTION_DAYS) * MS_PER_DAY)
    inside = _ev("i", "purchase", "u", "o3", 100, (1366 - RETENTION_DAYS) * MS_PER_DAY)
    frame = as_frame([newest, at_edge, inside])
    assert list(too_late_mask(frame, RETENTION_DAYS)) == [False, True, False]
    f = features_at(frame, 1365, late_after_days=RETENTION_DAYS).loc["u"]
    assert f["orders_total"] == 2  # the one the online state rejects is left out


def test_an_event_dated_after_the_as_of_day_makes_no_earlier_one_late() -> None:
    # A purchase on day 1000 that arrived after one on day 1400 is too late online, but at
    # day 1010 the later one is not there yet: a lookup as of then counts it, as training at
    # that cutoff does. Fails if the late rule is applied before the as-of day's cut.
    newer = _ev("b", "purchase", "u", "o2", 500, 1400 * MS_PER_DAY)
    older = _ev("a", "purchase", "u", "o1", 1000, 1000 * MS_PER_DAY)
    frame = as_frame([newer, older])  # arrival order
    before = features_at(frame, 1010, late_after_days=RETENTION_DAYS)
    pd.testing.assert_frame_equal(before, features_at(frame, 1010))
    assert before.loc["u", "orders_total"] == 1
    # From the later one's day on, the state's view again: the older one is left out.
    after = features_at(frame, 1400, late_after_days=RETENTION_DAYS).loc["u"]
    assert after["orders_total"] == 1 and after["revenue_total"] == 5.0


# Fails if frequency = purchase_days - 1 is not clamped at 0.
def test_a_user_with_only_refunds_has_no_purchase_days_and_a_frequency_of_zero() -> None:
    ev = _orders(
        [("2024-01-01T10:00:00Z", "refund", 5.0, ""), ("2024-01-03T10:00:00Z", "refund", 1.0, "")]
    )
    f = features_record(features_at(ev, day_number(dt.date(2024, 1, 10))), "u")
    assert f["orders_total"] == 0 and f["revenue_total"] == -6.0
    assert f["purchase_days"] == 0 and f["frequency"] == 0
    assert f["recency_days"] == 0 and f["age_days"] == 0 and f["avg_repeat_value"] == 0.0
    assert f["first_order_at"] is None and f["last_order_at"] is None


# Fails if iso_times always formats whole seconds: milliseconds are kept, exactly.
def test_order_times_keep_their_milliseconds_and_whole_seconds_have_none() -> None:
    ev = _orders(
        [
            ("2024-01-01T10:00:00.250Z", "purchase", 1.0, ""),
            ("2024-01-05T10:00:00Z", "purchase", 1.0, ""),
        ]
    )
    f = features_at(ev, day_number(dt.date(2024, 1, 5))).loc["u"]
    assert f["first_order_at"] == "2024-01-01T10:00:00.250Z"
    assert f["last_order_at"] == "2024-01-05T10:00:00Z"


# Fails if the one-value formatter (datetime) and the many-value one (numpy) differ anywhere.
def test_one_time_is_written_as_many_are() -> None:
    rng = np.random.default_rng(7)
    ms = np.concatenate(
        [
            rng.integers(0, 4_102_444_800_000, 2000),  # to 2100
            rng.integers(0, 4_102_444_800, 500) * 1000,  # whole seconds
            [0, 1, 999, 1000, 86_399_999, 253_402_300_799_999, 253_402_300_800_000, -1],
        ]
    )
    assert [ms_to_iso(int(m)) for m in ms] == list(iso_times(ms))


# Fails if iso_times formats only ms > 0: a purchase at epoch millisecond 0 is a purchase.
def test_an_order_at_the_first_instant_of_1970_has_an_order_time() -> None:
    assert ms_to_iso(0) == "1970-01-01T00:00:00Z"
    f = features_at(_orders([("1970-01-01T00:00:00Z", "purchase", 1.0, "")]), 0).loc["u"]
    assert f["first_order_at"] == f["last_order_at"] == "1970-01-01T00:00:00Z"


# Fails if to_cents or the offline signed_cents truncates: 0.29 * 100 is
# 28.999999999999996 and 1.15 * 100 is 114.99999999999999 in binary floating point.
def test_an_amount_whose_hundredfold_falls_just_below_a_cent_rounds_to_it_online_and_offline() -> (
    None
):
    for amount, cents in ((0.29, 29), (1.15, 115), (4.35, 435)):
        assert (
            validate(json.dumps({**GOOD, "amount": amount}).encode(), now_ms=1 << 42).cents == cents
        )
        ev = _orders([("2024-01-01", "purchase", amount, ""), ("2024-01-02", "refund", amount, "")])
        assert list(ev["cents"]) == [cents, -cents]


# Was a defect (avg_repeat_value): a refund dated before the user's first purchase day is no
# repeat purchase day's revenue (contract: "mean revenue of the repeat purchase days"; README:
# "net revenue after the first purchase day ... divided by the repeat purchase days"). The
# unfixed code subtracts it from the repeat revenue (20.0 here).
def test_a_refund_dated_before_the_first_purchase_is_no_repeat_days_revenue() -> None:
    ev = _orders(
        [
            ("2024-01-01T10:00:00Z", "refund", 10.0, ""),  # an order bought before the log began
            ("2024-01-11T10:00:00Z", "purchase", 20.0, ""),  # first purchase day
            ("2024-01-21T10:00:00Z", "purchase", 30.0, ""),  # the one repeat purchase day
        ]
    )
    f = features_at(ev, day_number(dt.date(2024, 1, 21))).loc["u"]
    assert f["revenue_total"] == 40.0 and f["frequency"] == 1
    assert f["avg_repeat_value"] == 30.0


def test_no_purchase_is_none_in_a_frame_of_many_users_as_in_a_frame_of_one() -> None:
    # Fails if the timestamp columns are left to pandas' inference: a refund-only user's frame
    # of one then holds None in an object column, many users' frame NaN in a string column, so
    # online (one user) and offline (many users) differ. Fails too if a record gives NaN (not
    # JSON) for no purchase.
    events = [
        _ev("a", "purchase", "u1", "o1", 100, 20_000 * MS_PER_DAY),
        _ev("b", "refund", "u2", "o2", -100, 20_000 * MS_PER_DAY),
    ]
    many = features_at(as_frame(events), 20_001)
    one = features_at(as_frame(events[1:]), 20_001)
    pd.testing.assert_frame_equal(many.loc[["u2"]], one)
    for frame in (many, one):
        record = features_record(frame, "u2")
        assert record["first_order_at"] is None and record["last_order_at"] is None
        json.dumps(record, allow_nan=False)
    assert features_record(many, "u1")["first_order_at"] == "2024-10-04T00:00:00Z"


def test_timestamp_features_are_string_columns_not_python_objects() -> None:
    # Fails with object columns of str: a Python string per cell took the final fit of
    # make bench-train 2 GiB more memory (5.2 GiB against 3.1 on a million users).
    events = [_ev("a", "purchase", "u1", "o1", 100, 20_000 * MS_PER_DAY)]
    frame = features_at(as_frame(events), 20_001)
    for name in ("first_order_at", "last_order_at"):
        assert pd.api.types.is_string_dtype(frame[name].dtype) and frame[name].dtype != object
