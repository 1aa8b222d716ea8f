"""Edges of the one feature definition that a mutation review found unpinned: each test fails
under a plausible change of the code that every other test let pass (rounding, day 0, integer
types, half cents, the window's cut day, refunds without ids, re-dated copies, zero amounts)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
from redis.asyncio import Redis

from feature_store.events import validate
from feature_store.features import RETENTION_DAYS, day_number, features_record
from feature_store.offline import features_at, too_late_mask
from feature_store.redis_store import FeatureStore, decode_hash
from training.datasets import load_orders

from .streams import GOOD, MS_PER_DAY, _ev, as_frame
from .test_features import _orders


# Fails if avg_repeat_value is truncated to the cent instead of rounded to the nearest.
def test_avg_repeat_value_rounds_to_the_nearest_cent() -> None:
    ev = _orders(
        [
            ("2024-01-01T10:00:00Z", "purchase", 10.00, ""),
            ("2024-01-02T10:00:00Z", "purchase", 3.00, ""),
            ("2024-01-03T10:00:00Z", "purchase", 3.00, ""),
            ("2024-01-04T10:00:00Z", "purchase", 4.01, ""),
        ]
    )
    f = features_at(ev, day_number(dt.date(2024, 1, 4))).loc["u"]
    assert f["frequency"] == 3
    assert f["avg_repeat_value"] == 3.34  # 10.01 / 3 = 3.3366…, floor would give 3.33


# Fails if day 0 (1970-01-01) is taken for "no purchase": recency and age would be 0.
def test_a_first_purchase_on_1970_01_01_has_an_age_and_a_recency() -> None:
    ev = _orders(
        [
            ("1970-01-01T00:00:00Z", "purchase", 1.0, ""),
            ("1970-01-06T00:00:00Z", "purchase", 1.0, ""),
        ]
    )
    f = features_at(ev, 10).loc["u"]
    assert f["recency_days"] == 5 and f["age_days"] == 10


# Fails if an integer feature reaches a record (what `clv features` prints) as a float: 91.0.
def test_integer_features_are_integers_in_a_record() -> None:
    ev = _orders(
        [
            ("2024-01-01T10:00:00Z", "purchase", 1.0, ""),
            ("2024-01-05T10:00:00Z", "purchase", 1.0, ""),
        ]
    )
    rec = features_record(features_at(ev, day_number(dt.date(2024, 1, 10))), "u")
    for name in (
        "orders_total",
        "orders_7d",
        "purchase_days",
        "frequency",
        "recency_days",
        "age_days",
    ):
        assert type(rec[name]) is int, name
    assert '"age_days": 9' in json.dumps(rec)


# Fails if the offline path rounds exact half cents otherwise than validation does online
# (half to even: 0.125 -> 12 cents): offline would then be a cent off online.
def test_exact_half_cents_round_half_to_even_online_and_offline() -> None:
    for amount, cents in ((0.125, 12), (0.375, 38), (0.625, 62)):
        assert (
            validate(json.dumps({**GOOD, "amount": amount}).encode(), now_ms=1 << 42).cents == cents
        )
        ev = _orders([("2024-01-01", "purchase", amount, ""), ("2024-01-02", "refund", amount, "")])
        assert list(ev["cents"]) == [cents, -cents]


# Fails if offline's too-late rule and the online one part at the window's cut day: a copy
# arriving after the batch that moved its original's day out of the window is too late in both.
async def test_a_copy_after_its_day_left_the_window_is_too_late_online_and_offline(
    redis: Redis,
) -> None:
    x = _ev("x", "purchase", "u", "o1", 1000, 1000 * MS_PER_DAY)
    y = _ev("y", "purchase", "u", "o2", 500, (1000 + RETENTION_DAYS) * MS_PER_DAY)
    store = FeatureStore(redis, prefix="copylate")
    results = [await store.apply([e], group="g", progress={}, now_ms=1) for e in (x, y, x)]
    assert results[2].too_late == [0]
    assert list(too_late_mask(as_frame([x, y, x]), RETENTION_DAYS)) == [False, False, True]


# Fails if, in an orders file without event ids, two equal partial refunds of one order made at
# different times get one derived id and count once.
def test_two_equal_partial_refunds_at_different_times_both_count(tmp_path: Path) -> None:
    path = tmp_path / "o.csv"
    path.write_text(
        "user_id,order_id,ts,amount,type\n"
        "u1,o1,2024-01-01T10:00:00Z,100,purchase\n"
        "u1,o1,2024-01-05T10:00:00Z,10,refund\n"
        "u1,o1,2024-02-05T10:00:00Z,10,refund\n"
    )
    assert load_orders(path, "csv")["cents"].sum() == 8000


# Fails if a copy dated otherwise re-dates the original's dedup entry (HSET for HSETNX): the
# entry then leaves with the copy's earlier day while the original's day is still in the
# window, and a later redelivery of the original counts twice.
async def test_a_copy_dated_earlier_does_not_let_the_original_count_twice(redis: Redis) -> None:
    store = FeatureStore(redis, prefix="copyearly")
    e1 = _ev("e1", "purchase", "u", "o1", 1000, 1000 * MS_PER_DAY)
    e0 = _ev("e0", "purchase", "u", "o0", 100, 700 * MS_PER_DAY)
    e1_copy = _ev("e1", "purchase", "u", "o1", 1000, 600 * MS_PER_DAY)
    e2 = _ev("e2", "purchase", "u", "o2", 10, 1066 * MS_PER_DAY)
    events = [e1, e0, e1_copy, e2, e1]
    for e in events:
        await store.apply([e], group="g", progress={}, now_ms=1)
    online = await store.features("u", 1066)
    assert online is not None and online.loc["u", "orders_total"] == 3
    offline = features_at(as_frame(events), 1066, late_after_days=RETENTION_DAYS)
    pd.testing.assert_frame_equal(online, offline.loc[["u"]], check_dtype=False)


# Fails if a day holding only a zero-amount refund keeps its dedup id past the window (memory
# that is never freed).
async def test_a_zero_refund_only_day_leaves_the_window_on_time(redis: Redis) -> None:
    store = FeatureStore(redis, prefix="zeroref")
    evs = [
        _ev("p900", "purchase", "u", "o1", 100, 900 * MS_PER_DAY),
        _ev("r1000", "refund", "u", "o1", 0, 1000 * MS_PER_DAY),
        _ev("p1100", "purchase", "u", "o2", 100, 1100 * MS_PER_DAY),
        _ev("p1265", "purchase", "u", "o3", 100, 1265 * MS_PER_DAY),
        _ev("p1366", "purchase", "u", "o4", 100, 1366 * MS_PER_DAY),
    ]
    for e in evs:
        await store.apply([e], group="g", progress={}, now_ms=1)
    state = decode_hash(await redis.hgetall(store.user_key("u")))
    assert "r1000" not in state["dedup"]
    assert min(state["dedup"].values()) > state["latest_day"] - RETENTION_DAYS


# Fails if online a purchase is told by its amount's sign: a free order (0.00) would be no
# order and no purchase day online while offline counts it.
async def test_a_free_purchase_is_an_order_online_as_offline(redis: Redis) -> None:
    store = FeatureStore(redis, prefix="free")
    events = [_ev("p", "purchase", "u", "o1", 0, 1000 * MS_PER_DAY)]
    await store.apply(events, group="g", progress={}, now_ms=1)
    online = await store.features("u", 1000)
    assert online is not None
    f = online.loc["u"]
    assert f["orders_total"] == 1 and f["purchase_days"] == 1
    assert f["first_order_at"] == "1972-09-27T00:00:00Z"
    offline = features_at(as_frame(events), 1000, late_after_days=RETENTION_DAYS)
    pd.testing.assert_frame_equal(online, offline.loc[["u"]], check_dtype=False)


# Fails if the lookup of an earlier date reads the log deduplicated before the too-late rule:
# it kept the copy refused as too late, dropped it as late, and lost the corrected re-send of
# the same id that Redis applied (the script keeps no dedup entry for a refused copy).
async def test_an_earlier_date_counts_a_corrected_resend_of_a_too_late_event(
    redis: Redis, tmp_path: Path
) -> None:
    from clv.lookup import find_features
    from clv.settings import Settings
    from feature_store.event_log import write_events

    events = [  # arrival order, one partition
        _ev("a", "purchase", "u", "o1", 1000, 1000 * MS_PER_DAY),
        _ev("x", "purchase", "u", "o2", 500, 600 * MS_PER_DAY),  # too late: 600 <= 1000 - 365
        _ev("x", "purchase", "u", "o2", 500, 900 * MS_PER_DAY),  # the same id, date corrected
        _ev("b", "purchase", "u", "o3", 700, 1010 * MS_PER_DAY),
    ]
    then, store = FeatureStore(redis, prefix="then"), FeatureStore(redis, prefix="now")
    for offset, e in enumerate(events):
        got = await store.apply([e], group="g", progress={"orders:0": offset}, now_ms=1)
        if offset < 3:  # what Redis held before b came
            await then.apply([e], group="g", progress={"orders:0": offset}, now_ms=1)
        assert got.too_late == ([0] if offset == 1 else [])
    frame = as_frame(events)
    frame["partition"], frame["offset"] = 0, range(len(frame))
    for _ in range(2):  # twice, as an archiver restarted before its commit writes its buffer
        write_events(tmp_path, frame, durable=False)
    settings = Settings(event_log_dir=tmp_path)
    for day in (1000, 1005, 1009):
        found = await find_features(settings, store, "u", dt.date(1970, 1, 1) + dt.timedelta(day))
        assert found is not None and found.source == "event_log"
        held = await then.features("u", day)
        assert held is not None and held.loc["u", "orders_total"] == 2
        pd.testing.assert_frame_equal(found.frame, held, check_dtype=False)


async def _applied_and_logged(
    store: FeatureStore, root: Path, events: list, partition: int
) -> list:
    """Apply ``events`` one by one from ``partition`` as a consumer would and write them to the
    event log at ``root`` as the archiver would; each apply's too-late positions."""
    from feature_store.event_log import write_events

    late = []
    for offset, e in enumerate(events):
        got = await store.apply([e], group="g", progress={f"orders:{partition}": offset}, now_ms=1)
        late.append(got.too_late)
    frame = as_frame(events)
    frame["partition"], frame["offset"] = partition, range(len(frame))
    write_events(root, frame, durable=False)
    return late


# Fails if the error for a date before the user's first event counts every copy in the log: a
# re-send online dedup ignored, dated earlier, named a "first" day before the day asked; or a
# copy Redis refused as too late (review).
async def test_a_date_before_the_first_event_names_the_first_copies_day(
    redis: Redis, tmp_path: Path
) -> None:
    import pytest

    from clv.lookup import UnknownThen, find_features
    from clv.settings import Settings

    store, settings = FeatureStore(redis, prefix="firstcopy"), Settings(event_log_dir=tmp_path)
    resent = [
        _ev("x", "purchase", "u", "o1", 100, 900 * MS_PER_DAY),
        _ev("x", "purchase", "u", "o1", 100, 500 * MS_PER_DAY),  # a duplicate online
        _ev("y", "purchase", "u", "o2", 100, 950 * MS_PER_DAY),
    ]
    assert await _applied_and_logged(store, tmp_path, resent, 0) == [[], [], []]
    with pytest.raises(UnknownThen, match=r"\(2 after it, the first on 1972-06-19\)"):
        await find_features(settings, store, "u", dt.date(1970, 1, 1) + dt.timedelta(600))
    late = [
        _ev("x", "purchase", "v", "o1", 100, 1500 * MS_PER_DAY),
        _ev("x", "purchase", "v", "o1", 100, 900 * MS_PER_DAY),  # a duplicate online
        _ev("y", "purchase", "v", "o2", 100, 400 * MS_PER_DAY),  # too late: 400 <= 1500 - 365
    ]
    assert await _applied_and_logged(store, tmp_path, late, 1) == [[], [], [0]]
    with pytest.raises(UnknownThen, match=r"\(1 after it, the first on 1974-02-09\)"):
        await find_features(settings, store, "v", dt.date(1970, 1, 1) + dt.timedelta(1000))
