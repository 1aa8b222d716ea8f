"""Orders loading, point-in-time labels, and no leakage from after a cutoff."""

from __future__ import annotations

import datetime as dt
import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feature_store.features import day_number
from feature_store.offline import events_from_orders, features_at
from training.datasets import (
    DatasetError,
    build_training_set,
    history_days,
    load_orders,
    purchasers_at,
    window_labels,
)

CUTOFF = day_number(dt.date(1997, 9, 30))


def test_cdnow_master_format_keeps_same_day_records_apart(tmp_path: Path) -> None:
    text = (
        " customer_id  date number_of_cds  dollar_value\n"
        " 00002 19970112  1   12.00\n 00002 19970112  5   77.00\n 00003 19970102  2   20.76\n"
    )
    path = tmp_path / "m.txt.gz"
    path.write_bytes(gzip.compress(text.encode()))
    ev = load_orders(path, "cdnow")
    assert len(ev) == 3 and ev["order_id"].is_unique and ev["event_id"].is_unique
    assert ev.loc[ev["user_id"] == "00002", "cents"].sum() == 8900
    assert set(ev["day"]) == {day_number(dt.date(1997, 1, 12)), day_number(dt.date(1997, 1, 2))}


def test_cdnow_sample_format(sample_events: pd.DataFrame) -> None:
    assert sample_events["user_id"].nunique() == 2357
    assert len(sample_events) == 6919
    assert sample_events["event_id"].is_unique


def test_csv_with_refunds(tmp_path: Path) -> None:
    path = tmp_path / "o.csv"
    path.write_text(
        "user_id,order_id,ts,amount,type\n"
        "u1,o1,2024-01-01T10:00:00Z,10.0,purchase\n"
        "u1,o1,2024-01-05,4.0,refund\n"
    )
    ev = load_orders(path, "csv")
    assert list(ev["cents"]) == [1000, -400]


#: Bad CDNOW records, each with the text of the error it must give.
BAD_CDNOW = [
    (" 00001 19600101 1 5.00\n", "before 1970"),
    (" 0\u00a01 19970101 1 5.00\n", "printable characters with no white space"),
    (f" {'9' * 129} 19970101 1 5.00\n", "1 to 128"),
    (" 00001 19970101 1 11.77\n 00002 0002 19970112 1 12.00\n", "different lengths"),
    # after a good record
    ("00001 19970101 1 11.77\n00001 19970101 1 1e300\n", "from 0 to 1e"),
    ("user_id,order_id,ts,amount\nu,o,2024-01-01,1\n", "found 1 (an orders CSV? leave out --fo"),
    ("00001 19970101 1 11.77\n00001 1997013x 1 5.0\n", "record 2: date '1997013x' is not a"),
    ("00001 19970101 1 11.77\n00002 19970102 -2 3\n", "record 2: cds '-2' is not a count"),
    ("00001 19970101 1 11.77\n\n00002 19970102 1 x\n", "record 2: amount 'x' is not a number"),
    (" 00001 0001 19970101 1 11.77\n 00002 0002 19970101\n", "record 2: too few fields"),
    ("00001 19970101 1 11.77\n00002 1997013 1 5.0\n", "record 2: date '1997013' is not a"),
    ("00001 19970101 1 11.77\n00002 19970103 NA 5.0\n", "record 2: cds 'NA' is not a count"),
    ("00001 19970101 1 11.77\n00002 19970103 \u0663 5.0\n", "record 2: cds '\u0663' is not"),
]

#: Bad CSV files, each with the text of the error it must give.
BAD_CSV = [
    ("user,order_id,ts,amount\nu,o,2024-01-01,1\n", "lacks column"),
    ("user_id,order_id,ts,amount\nu,o,2024-01-01,-1\n", "1e+09 (a refund is a positive amount"),
    (
        "00001 19970101 1 11.77\n",
        "lacks column(s) user_id, order_id, ts, amount; needs user_id,order_id,"
        "ts,amount (CDNOW's text format? give --format cdnow)",
    ),
    ("user_id,order_id,ts,amount\nu,o,2024-01-01,abc\n", "row 1: amount 'abc' is not a number"),
    ("user_id,order_id,ts,amount\nu,o,2024-01-01,1\nu,o2,2024-01-02,-3\n", "row 2: amount '-3'"),
    ("user_id,order_id,ts,amount\nu,o,2024-01-01,1e300\n", "from 0 to 1e"),
    ("user_id,order_id,ts,amount\nu,o,not a time,1\n", "row 1: ts 'not a time' is not RFC"),
    ("user_id,order_id,ts,amount\nu,o,NaT,1\n", "is not RFC 3339"),
    ("user_id,order_id,ts,amount\nu,o,now,1\n", "is not RFC 3339"),
    ("user_id,order_id,ts,amount\nu,o,Jan 5,1\n", "is not RFC 3339"),
    ("user_id,order_id,ts,amount\nu,o,01/02/2023,1\n", "is not RFC 3339"),
    ("user_id,order_id,ts,amount\nu,o,2024-01-01T10:00:00,1\n", "with a zone"),
    ("user_id,order_id,ts,amount\nu,o,1950-06-01T00:00:00Z,1\n", "before 1970"),
    ("user_id,order_id,ts,amount\nu,o,2023-02-30,1\n", "row 1: ts '2023-02-30' is not a valid"),
    ("user_id,order_id,ts,amount\nu,o,2024-01-01T24:00:00Z,1\n", "not a valid time"),
    ("user_id,order_id,ts,amount\nu,o,9999-12-31,1\n", "in the future"),
    ("user_id,order_id,ts,amount\nu,o,2200-01-01,1\n", "in the future"),
    (
        "user_id,order_id,ts,amount\nu,o,2024-01-01,5\n\nu,o2,2024-01-02,5,9,9\n",
        "row 2 has 6 fields, more than the header's 4",
    ),
    ("user_id,order_id,ts,amount\nu,o,2024-01-01,5,9\n", "row 1 has 5 fields"),
    ("user_id,order_id,ts,amount\nu 1,o,2024-01-01,1\n", "no white space"),
    ("user_id,order_id,ts,amount\n,o,2024-01-01,1\n", "user_id '' is empty"),
    (
        "user_id,order_id,ts,amount,event_id\nu,o,2024-01-01,1,e1\nu,o2,2024-01-02,1,\n",
        "row 2: event_id '' is empty",
    ),
    ("user_id,order_id,ts,amount,type\nu,o,2024-01-01,1,gift\n", "purchase or refund"),
    ("user_id,order_id,ts,amount,currency\nu,o,2024-01-01,1,EUR\n", "deployment's USD"),
    ("user_id,order_id,ts,amount\n", "the CSV has a header but no orders"),
    ("user_id,order_id,ts,amount,amount\nu,o,2024-01-01,1,99\n", "names amount more than once"),
    ("user_id,order_id,ts,amount,user_id\nu,o,2024-01-01,1,v\n", "names user_id more than"),
    (
        "user_id;order_id;ts;amount\nu;o;2024-01-01;1\n",
        "(the header has ';': fields must be separated by commas)",
    ),
]


@pytest.mark.parametrize(
    ("fmt", "content", "message"),
    [*(("cdnow", *case) for case in BAD_CDNOW), *(("csv", *case) for case in BAD_CSV)],
)
def test_bad_orders_files_are_a_dataset_error(
    tmp_path: Path, fmt: str, content: str, message: str
) -> None:
    path = tmp_path / f"bad.{fmt}"
    path.write_text(content)
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_orders(path, fmt)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fmt", "content", "hint"),
    [
        ("csv", "user_id,order_id,ts,amount\nu,o,2024-01-01,abc\nu,o2,2024-01-02,-3\n", "refund"),
        ("csv", "user,order_id,ts,amount\nu,o,2024-01-01,1\n", "--format cdnow"),
        ("cdnow", "00001 19970101 1 x\n", "leave out --format cdnow"),
        ("csv", "user,order_id,ts,amount\nu,o,2024-01-01,1\n", "separated by commas"),
    ],
)
def test_a_hint_only_where_it_applies(tmp_path: Path, fmt: str, content: str, hint: str) -> None:
    """The refund hint for the row the error names only; the format hints for files that look
    like the other format only."""
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(DatasetError) as caught:
        load_orders(path, fmt)  # type: ignore[arg-type]
    assert hint not in str(caught.value)


def test_cdnow_master_read_as_csv_gets_the_format_hint(tmp_path: Path) -> None:
    path = tmp_path / "master.txt"
    path.write_text(" customer_id  date number_of_cds  dollar_value\n 00001 19970101  1   11.77\n")
    with pytest.raises(DatasetError, match=re.escape("(CDNOW's text format? give --format cdnow)")):
        load_orders(path, "csv")


def test_a_negative_cdnow_amount_gets_no_refund_hint(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("00001 19970101 1 -5\n")  # CDNOW holds no refunds: no hint about them
    with pytest.raises(DatasetError, match=r"is not a number from 0 to 1e\+09 \(1 such\)$"):
        load_orders(path, "cdnow")


def test_csv_currency_column_may_be_blank_or_the_deployments(tmp_path: Path) -> None:
    path = tmp_path / "o.csv"
    path.write_text(
        "user_id,order_id,ts,amount,currency\nu,o1,2024-01-01,1,USD\nu,o2,2024-01-02,2,\n"
    )
    assert load_orders(path, "csv")["cents"].sum() == 300
    with pytest.raises(DatasetError, match="currency 'USD' is not this deployment's EUR"):
        load_orders(path, "csv", currency="EUR")


def test_partial_refunds_of_one_order_all_count(tmp_path: Path) -> None:
    """Without event ids a refund's id carries its time: two partial refunds are two events,
    while a repeated line stays one."""
    path = tmp_path / "o.csv"
    path.write_text(
        "user_id,order_id,ts,amount,type\n"
        "u1,o1,2024-01-01T10:00:00Z,100,purchase\n"
        "u1,o1,2024-01-05T10:00:00Z,10,refund\n"
        "u1,o1,2024-02-05T10:00:00Z,20,refund\n"
        "u1,o1,2024-02-05T10:00:00Z,20,refund\n"
        "u1,o1,2024-02-05,2,refund\n"
        "u1,o1,2024-02-05,3,refund\n"
        "u1,o1,2024-01-01T10:00:00Z,100,purchase\n"
    )
    ev = load_orders(path, "csv")
    assert ev["cents"].sum() == 6500


def test_unreadable_bytes_are_dataset_errors(tmp_path: Path) -> None:
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"user_id,order_id,ts,amount\ncaf\xe9,o,2024-01-01,1\n")
    with pytest.raises(DatasetError, match="not UTF-8 text"):
        load_orders(latin, "csv")
    garbage = tmp_path / "garbage.csv.gz"
    garbage.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbagegarbage")
    with pytest.raises(DatasetError, match="not valid gzip"):
        load_orders(garbage, "csv")
    whole = gzip.compress(b"user_id,order_id,ts,amount\n" + b"u,o,2024-01-01,1\n" * 500)
    truncated = tmp_path / "truncated.csv.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match="not valid gzip"):
        load_orders(truncated, "csv")


def test_cdnow_first_record_with_a_letter_id_is_not_a_header(tmp_path: Path) -> None:
    path = tmp_path / "cdnow.txt"
    path.write_text(" A0001 19970101  2   29.33\n 00002 19970102  1   10.00\n")
    ev = load_orders(path, "cdnow")
    assert sorted(ev["user_id"]) == ["00002", "A0001"]
    path.write_text(" 00001 1997-01-01  2   29.33\n 00002 19970102  1   10.00\n")
    with pytest.raises(DatasetError, match="date"):  # a bad first record is no header either
        load_orders(path, "cdnow")


def test_missing_file_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_orders(tmp_path / "nope.csv", "csv")


def test_labels_count_the_window_after_the_cutoff_only() -> None:
    orders = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "a", "b"],
            "order_id": ["1", "2", "3", "2", "4"],
            "ts": ["2024-01-01", "2024-01-10", "2024-01-11", "2024-01-11", "2024-01-20"],
            "amount": [5.0, 7.0, 11.0, 2.0, 13.0],
            "type": ["purchase", "purchase", "purchase", "refund", "purchase"],
        }
    )
    ev = events_from_orders(orders)
    start = day_number(dt.date(2024, 1, 1))
    revenue, count = window_labels(ev, pd.Index(["a", "b"]), start, 10)  # Jan 2..Jan 11
    assert list(revenue) == [16.0, 0.0]  # 7 + 11 - 2 refund
    assert list(count) == [2, 0]


def _perturb_future(events: pd.DataFrame, cutoff_day: int) -> pd.DataFrame:
    """Change every order after the cutoff, drop some, add new users and new orders."""
    rng = np.random.default_rng(7)
    ev = events.copy()
    after = ev["day"] > cutoff_day
    ev.loc[after, "cents"] = ev.loc[after, "cents"] * 3 + 1
    ev.loc[after, "amount"] = ev.loc[after, "cents"] / 100
    ev = ev.drop(ev.index[after.to_numpy() & (rng.random(len(ev)) < 0.3)])
    extra = ev[ev["day"] <= cutoff_day].sample(200, random_state=1).copy()
    extra["day"] = cutoff_day + 1 + rng.integers(0, 200, len(extra))
    extra["ts_ms"] = extra["day"] * 86_400_000 + 3_600_000
    extra["event_id"] = "future-" + pd.Series(range(len(extra)), index=extra.index).astype(str)
    new_user = extra.iloc[:20].copy()
    new_user["user_id"] = "new-" + new_user["user_id"]
    new_user["event_id"] = "new-" + new_user["event_id"]
    return pd.concat([ev, extra, new_user], ignore_index=True).sample(frac=1, random_state=2)


def test_no_leakage_into_features_at_the_cutoff(sample_events: pd.DataFrame) -> None:
    before = features_at(sample_events, CUTOFF)
    after = features_at(_perturb_future(sample_events, CUTOFF), CUTOFF)
    pd.testing.assert_frame_equal(before.sort_index(), after.sort_index())


def test_no_leakage_into_the_training_set(sample_events: pd.DataFrame) -> None:
    a = build_training_set(sample_events, CUTOFF, 91, n_cutoffs=3, step_days=30)
    b = build_training_set(
        _perturb_future(sample_events, CUTOFF), CUTOFF, 91, n_cutoffs=3, step_days=30
    )
    assert len(a) > 0 and len(a.cutoffs) == 3
    for x, y in ((a, b),):
        ka = pd.MultiIndex.from_arrays([x.cutoff_day, x.features.index])
        kb = pd.MultiIndex.from_arrays([y.cutoff_day, y.features.index])
        fa = x.features.set_axis(ka).sort_index()
        fb = y.features.set_axis(kb).sort_index()
        pd.testing.assert_frame_equal(fa, fb)
        la = pd.Series(x.label, index=ka).sort_index()
        lb = pd.Series(y.label, index=kb).sort_index()
        pd.testing.assert_series_equal(la, lb)  # labels end at the cutoff too
    pd.testing.assert_frame_equal(a.current.sort_index(), b.current.sort_index())


def _orders_csv(events: pd.DataFrame, path: Path) -> Path:
    ts = pd.to_datetime(events["ts_ms"], unit="ms", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    table = pd.DataFrame(
        {"user_id": events["user_id"], "order_id": events["order_id"], "ts": ts}
    ).assign(amount=(events["cents"] / 100).map("{:.2f}".format))
    table.to_csv(path, index=False)
    return path


def test_a_later_copy_of_an_order_first_in_the_file_changes_no_feature_at_the_cutoff(
    sample_events: pd.DataFrame, tmp_path: Path
) -> None:
    """A file is not in arrival order: a copy of an order re-dated after the cutoff, written
    before the original, must not take the original's place in the cutoff's features."""
    past = sample_events[sample_events["day"] <= CUTOFF]
    clean = load_orders(_orders_csv(sample_events, tmp_path / "clean.csv"), "csv")
    copies = past.sample(300, random_state=3).copy()
    copies["ts_ms"] += (CUTOFF + 30 - copies["day"]) * 86_400_000
    copies["cents"] *= 7
    dirty = pd.concat([copies, sample_events], ignore_index=True)
    loaded = load_orders(_orders_csv(dirty, tmp_path / "dirty.csv"), "csv")
    assert len(loaded) == len(clean)  # each copy dropped as a repeat of its order
    pd.testing.assert_frame_equal(
        features_at(clean, CUTOFF).sort_index(), features_at(loaded, CUTOFF).sort_index()
    )


def test_a_repeated_event_id_keeps_its_earliest_copy(tmp_path: Path) -> None:
    path = tmp_path / "o.csv"
    path.write_text(
        "user_id,order_id,ts,amount,event_id\n"
        "u1,o2,2024-03-01T00:00:00Z,500.00,e2\n"
        "u1,o1,2024-01-01T00:00:00Z,10.00,e1\n"
        "u1,o2,2024-01-10T00:00:00Z,20.00,e2\n"
        "u2,o3,2024-01-05T00:00:00Z,3.00,e3\n"
        "u2,o3,2024-01-05T00:00:00Z,4.00,e3\n"
    )
    ev = load_orders(path, "csv")  # a tie in time: the first in the file
    assert list(ev["event_id"]) == ["e1", "e2", "e3"]
    assert list(ev["cents"]) == [1000, 2000, 300]
    f = features_at(ev, day_number(dt.date(2024, 1, 31))).loc["u1"]
    assert f["orders_total"] == 2 and f["revenue_total"] == 30.0


def test_leakage_check_can_fail(sample_events: pd.DataFrame) -> None:
    """The perturbation does reach features one day later (the check has teeth)."""
    changed = _perturb_future(sample_events, CUTOFF)
    a = purchasers_at(sample_events, CUTOFF + 200)
    b = purchasers_at(changed, CUTOFF + 200)
    common = a.index.intersection(b.index)
    assert not a.loc[common].equals(b.loc[common])


def test_training_rows_are_features_at_their_cutoff(sample_events: pd.DataFrame) -> None:
    heard: list[str] = []
    ds = build_training_set(
        sample_events, CUTOFF, 60, n_cutoffs=2, step_days=45, progress=heard.append
    )
    assert len(heard) == 2 and all("60-day labels" in m for m in heard)  # one line per cutoff
    c = int(ds.cutoffs[0])
    rows = ds.cutoff_day == c
    expected = purchasers_at(sample_events, c)
    pd.testing.assert_frame_equal(ds.features[rows], expected[ds.features.columns])
    assert np.all(ds.features["age_days"] >= 0)
    assert ds.horizon_days == 60 and (ds.label_days == 60).all()


def test_too_short_history_is_a_dataset_error(sample_events: pd.DataFrame) -> None:
    first = int(sample_events["day"].min())
    with pytest.raises(DatasetError):
        build_training_set(sample_events, first + 10, 30)


def test_a_directory_or_a_pipe_is_not_an_orders_file(tmp_path: Path) -> None:
    import os

    with pytest.raises(DatasetError, match="is a directory; give a file"):
        load_orders(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(DatasetError, match="not a regular file"):
        load_orders(tmp_path / "pipe")
    with pytest.raises(DatasetError, match="orders file not found"):
        load_orders(tmp_path / "nothing.csv")


CUTOFF = day_number(dt.date(1997, 9, 30))


def test_a_shorter_label_window_sets_the_cutoffs_and_is_recorded(
    sample_events: pd.DataFrame,
) -> None:
    """Cutoffs are as_of - label_days - k * step (not the horizon), and each row records its
    label window, by which models rescale a 30-day label to the 365-day horizon."""
    ds = build_training_set(sample_events, CUTOFF, 365, label_days=30, n_cutoffs=2, step_days=30)
    assert list(ds.cutoffs) == [CUTOFF - 60, CUTOFF - 30]
    assert ds.horizon_days == 365 and (ds.label_days == 30).all()
    last = ds.cutoff_day == CUTOFF - 30
    revenue, _ = window_labels(sample_events, ds.features.index[last], CUTOFF - 30, 30)
    np.testing.assert_array_equal(ds.label[last], revenue)
    np.testing.assert_allclose(ds.scaled_label()[last], revenue * 365 / 30)


def test_a_cutoff_exactly_min_history_days_after_the_first_purchase_is_kept(
    sample_events: pd.DataFrame,
) -> None:
    first = int(sample_events.loc[sample_events["type"] == "purchase", "day"].min())
    ds = build_training_set(
        sample_events, first + 230, 30, n_cutoffs=10, step_days=30, min_history_days=140
    )
    assert list(ds.cutoffs) == [first + 140, first + 170, first + 200]


def _events(rows: list[tuple[str, str, str, float, str]]) -> pd.DataFrame:
    """(user, event_id, date, amount, type) -> the event table, in this (arrival) order."""
    return events_from_orders(
        pd.DataFrame(
            [
                {"user_id": u, "order_id": e, "event_id": e, "ts": ts, "amount": a, "type": t}
                for u, e, ts, a, t in rows
            ]
        )
    )


def test_labels_count_a_redelivered_event_once() -> None:
    """An event log keeps redelivered copies (read_events(dedupe=False), a raw frame):
    the label counts each event once, as the features do."""
    ev = _events(
        [
            ("a", "e1", "2024-01-01", 5.0, "purchase"),
            ("a", "e2", "2024-01-05", 7.0, "purchase"),
            ("a", "e2", "2024-01-05", 7.0, "purchase"),  # redelivered
        ]
    )
    revenue, count = window_labels(ev, pd.Index(["a"]), day_number(dt.date(2024, 1, 1)), 10)
    assert list(revenue) == [7.0] and list(count) == [1]


def test_an_event_counts_in_the_features_or_in_the_label_never_both() -> None:
    """Copies of one event on both sides of the cutoff (arrival order: the later-dated copy
    first): the first copy wins in the features as in the labels (and online), so the event
    is a label only, not also a feature."""
    cutoff = day_number(dt.date(2024, 1, 10))
    ev = _events(
        [
            ("u", "e0", "2024-01-01", 1.0, "purchase"),
            ("u", "e1", "2024-01-15", 10.0, "purchase"),
            ("u", "e1", "2024-01-05", 10.0, "purchase"),
        ]
    )
    f = features_at(ev, cutoff).loc["u"]
    revenue, count = window_labels(ev, pd.Index(["u"]), cutoff, 30)
    assert f["orders_total"] == 1 and f["revenue_total"] == 1.0
    assert list(count) == [1] and list(revenue) == [10.0]


def test_training_rows_and_the_snapshot_are_purchasers_only() -> None:
    """A user whose only event by a cutoff is a refund is no customer yet there."""
    ev = _events(
        [
            ("a", "p1", "2024-01-01", 10.0, "purchase"),
            ("r", "r1", "2024-01-20", 3.0, "refund"),
            ("r", "p2", "2024-02-15", 30.0, "purchase"),
            ("a", "p3", "2024-03-01", 5.0, "purchase"),
        ]
    )
    as_of = day_number(dt.date(2024, 3, 1))
    ds = build_training_set(ev, as_of, 30, n_cutoffs=1)  # cutoff 2024-01-31
    assert list(ds.features.index) == ["a"]
    assert list(purchasers_at(ev, as_of - 30).index) == ["a"]
    assert sorted(ds.current.index) == ["a", "r"]


def test_the_snapshot_includes_orders_on_the_as_of_day() -> None:
    ev = _events(
        [
            ("a", "p1", "2024-01-01", 10.0, "purchase"),
            ("b", "p2", "2024-03-01T23:00:00Z", 5.0, "purchase"),  # on the as-of day
        ]
    )
    as_of = day_number(dt.date(2024, 3, 1))
    ds = build_training_set(ev, as_of, 30, n_cutoffs=1)
    assert sorted(ds.current.index) == ["a", "b"]
    pd.testing.assert_frame_equal(ds.current, purchasers_at(ev, as_of))


def test_no_history_before_the_first_purchase() -> None:
    ev = _events([("a", "p1", "2024-01-10", 10.0, "purchase")])
    first = day_number(dt.date(2024, 1, 10))
    assert history_days(ev, first - 5) == 0
    assert history_days(ev, first + 5) == 5


def test_equally_dated_copies_keep_the_first_in_the_file(tmp_path: Path) -> None:
    """Many copies of each event over a few times: the earliest copy, and among equally dated
    ones the first in the file (a sort that is not stable would pick any of them)."""
    rows = ["user_id,order_id,ts,amount,event_id"]
    expected: dict[tuple[str, str], tuple[int, int]] = {}
    for i in range(3000):
        user, event, day = f"u{i % 3}", f"e{i % 6}", 1 + (i // 7) % 3
        rows.append(f"{user},o{i},2024-01-0{day}T00:00:00Z,{i + 1}.00,{event}")
        expected[(user, event)] = min(expected.get((user, event), (9, 0)), (day, (i + 1) * 100))
    path = tmp_path / "o.csv"
    path.write_text("\n".join(rows) + "\n")
    ev = load_orders(path, "csv")
    got = dict(zip(zip(ev["user_id"], ev["event_id"], strict=True), ev["cents"], strict=True))
    assert got == {key: cents for key, (_, cents) in expected.items()}
