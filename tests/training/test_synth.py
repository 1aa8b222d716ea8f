"""Synthetic order log: exact counts, refunds that reference real orders, heterogeneity, outputs."""

from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer

from feature_store.event_log import read_events
from feature_store.features import day_number
from feature_store.offline import EVENT_COLUMNS
from training.datasets import load_orders
from training.synth import (
    SynthConfig,
    SynthError,
    _seasonality,
    events_frame,
    generate,
    write_csv,
    write_log,
)


@pytest.fixture(scope="module")
def log():  # type: ignore[no-untyped-def]
    return generate(SynthConfig(users=5_000, orders=40_000, seed=7, days=540))


def test_counts_are_exact(log) -> None:  # type: ignore[no-untyped-def]
    purchases = ~log.refund
    assert purchases.sum() == 40_000
    assert set(np.unique(log.user[purchases])) == set(range(1, 5_001))  # every user buys
    assert np.array_equal(np.sort(log.order[purchases]), np.arange(1, 40_001))  # unique ids
    assert 0.01 < log.refund.mean() < 0.05  # "a few %" of events are refunds


def test_events_are_in_time_order_within_the_window(log) -> None:  # type: ignore[no-untyped-def]
    assert np.all(np.diff(log.ts_s) >= 0)
    start = int(pd.Timestamp("2024-01-01", tz="UTC").timestamp())
    assert log.ts_s.min() >= start and log.ts_s.max() < start + 540 * 86_400
    # Purchase order numbers follow time.
    assert np.all(np.diff(log.order[~log.refund]) > 0)


def test_refunds_reference_earlier_orders_of_the_same_user(log) -> None:  # type: ignore[no-untyped-def]
    p = pd.DataFrame({"order": log.order, "user": log.user, "ts": log.ts_s, "cents": log.cents})[
        ~log.refund
    ].set_index("order")
    r = pd.DataFrame({"order": log.order, "user": log.user, "ts": log.ts_s, "cents": log.cents})[
        log.refund
    ]
    assert len(r) > 0 and r["order"].is_unique
    assert r["order"].isin(p.index).all()
    bought = p.loc[r["order"]]
    assert np.array_equal(bought["user"].to_numpy(), r["user"].to_numpy())
    assert (r["ts"].to_numpy() > bought["ts"].to_numpy()).all()
    assert (r["cents"].to_numpy() <= bought["cents"].to_numpy()).all()
    assert (r["cents"] > 0).all()
    full = r["cents"].to_numpy() == bought["cents"].to_numpy()
    assert 0.5 < full.mean() < 0.95  # mostly full refunds, some partial


def test_customers_are_heterogeneous(log) -> None:  # type: ignore[no-untyped-def]
    purchases = ~log.refund
    per_user = np.bincount(log.user[purchases])[1:]
    # A homogeneous Poisson population has variance ~ mean; gamma-mixed rates are overdispersed.
    assert per_user.var() > 5 * per_user.mean()
    assert 0.1 < (per_user == 1).mean() < 0.7  # many one-time buyers, not all
    # Gamma-gamma spend: customers' mean order values differ far beyond the noise of their orders.
    spend = pd.Series(log.cents[purchases]).groupby(log.user[purchases]).mean()
    big = per_user >= 10
    assert spend.to_numpy()[big].std() / spend.to_numpy()[big].mean() > 0.3
    assert 25 < log.cents[purchases].mean() / 100 < 45  # mean order value near the configured 35


def test_weekly_seasonality(log) -> None:  # type: ignore[no-untyped-def]
    weekday = ((log.ts_s[~log.refund] // 86_400) + 3) % 7  # 0 = Monday
    share = np.bincount(weekday, minlength=7) / (~log.refund).sum()
    assert share[5] > share[1] * 1.1  # Saturday busier than Tuesday


def test_orders_come_at_a_web_shops_hours(log) -> None:  # type: ignore[no-untyped-def]
    hour = log.ts_s[~log.refund] % 86_400 // 3600
    share = np.bincount(hour, minlength=24) / (~log.refund).sum()
    assert share[19:22].mean() > 5 * share[3:5].mean()  # evening peak, quiet small hours
    assert share[12] > share[7]  # the day has started by lunchtime


def test_orders_are_items_at_price_points(log) -> None:  # type: ignore[no-untyped-def]
    """Each item costs whole dollars less a cent, so an order of k items ends in 100 - k cents."""
    cents = log.cents[~log.refund]
    items = -cents % 100
    assert items.min() >= 1 and items.max() <= 12
    counts = np.bincount(items)
    assert counts[1] > counts[2] > counts[3] > 0  # one item mostly, some baskets
    # A partial refund of a several-item order gives back whole items: a multiple of a price.
    bought = pd.Series(log.cents[~log.refund], index=log.order[~log.refund])
    refunded = pd.Series(log.cents[log.refund], index=log.order[log.refund])
    paid = bought.loc[refunded.index]
    k = -paid % 100
    several = (k > 1) & (refunded < paid)
    assert several.any()
    price = (paid[several] + k[several]) // k[several] - 1  # one item's price in cents
    assert (refunded[several] % price == 0).all()


def test_annual_seasonality_has_a_pre_christmas_rush(log) -> None:  # type: ignore[no-untyped-def]
    day = log.ts_s[~log.refund] // 86_400

    def per_day(first: dt.date, last: dt.date) -> float:
        inside = (day >= day_number(first)) & (day <= day_number(last))
        return float(inside.sum()) / ((last - first).days + 1)

    october = per_day(dt.date(2024, 10, 1), dt.date(2024, 10, 15))
    rush = per_day(dt.date(2024, 12, 6), dt.date(2024, 12, 20))
    after = per_day(dt.date(2025, 1, 20), dt.date(2025, 2, 3))
    # the rush beats the weeks before it and after it, although customers keep dropping out
    assert rush > 1.3 * october and rush > 1.1 * after


def test_same_seed_same_log_other_seed_differs() -> None:
    a = generate(SynthConfig(users=200, orders=1_000, seed=1))
    b = generate(SynthConfig(users=200, orders=1_000, seed=1))
    c = generate(SynthConfig(users=200, orders=1_000, seed=2))
    assert np.array_equal(a.ts_s, b.ts_s) and np.array_equal(a.cents, b.cents)
    assert not np.array_equal(a.ts_s[:50], c.ts_s[:50])


def test_orders_must_cover_users() -> None:
    with pytest.raises(SynthError, match="at least --users"):
        generate(SynthConfig(users=10, orders=9))


def test_one_order_per_user_is_allowed() -> None:
    log = generate(SynthConfig(users=50, orders=50, seed=3))
    assert np.array_equal(np.sort(log.user[~log.refund]), np.arange(1, 51))


@pytest.mark.parametrize("name", ["orders.csv", "orders.csv.gz"])
def test_csv_reads_back_as_the_event_table(tmp_path: Path, name: str) -> None:
    log = generate(SynthConfig(users=300, orders=2_000, seed=5, start=dt.date(1997, 1, 1)))
    path = tmp_path / name
    assert write_csv(log, path) == len(log)
    with gzip.open(path, "rt") if name.endswith(".gz") else path.open() as f:
        assert f.readline() == "user_id,order_id,ts,amount,type,event_id\n"
    from_csv = load_orders(path)
    direct = events_frame(log)
    assert len(from_csv) == len(direct)
    cols = ["event_id", "type", "user_id", "order_id", "ts_ms", "day", "cents"]
    pd.testing.assert_frame_equal(
        from_csv[cols].astype(str).reset_index(drop=True),
        direct[cols].astype(str).reset_index(drop=True),
    )


def test_event_log_round_trip(tmp_path: Path) -> None:
    log = generate(SynthConfig(users=300, orders=2_000, seed=6, days=60))
    files = write_log(log, tmp_path / "events")
    assert 1 < files <= 61
    back = read_events(tmp_path / "events")
    assert set(EVENT_COLUMNS) <= set(back.columns)
    direct = events_frame(log)
    key = ["event_id"]
    a = back.sort_values(key).reset_index(drop=True)
    b = direct.sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) == len(log)
    assert a["event_id"].tolist() == b["event_id"].tolist()
    assert np.array_equal(a["cents"].to_numpy(), b["cents"].to_numpy())
    assert (a.loc[a["type"] == "refund", "cents"] < 0).all()


def test_a_failed_csv_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.synth as synth

    log = generate(SynthConfig(users=50, orders=200, seed=1))
    real = synth.orders_table
    calls = {"n": 0}

    def failing(part):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 1:  # the schema comes from the first call; fail while writing
            raise OSError(28, "No space left on device")
        return real(part)

    monkeypatch.setattr(synth, "orders_table", failing)
    target = tmp_path / "orders.csv"
    with pytest.raises(OSError, match="No space"):
        write_csv(log, target)
    assert list(tmp_path.iterdir()) == []  # neither the CSV nor its temporary file


def test_a_failed_event_log_write_leaves_no_partial_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training on a half-written log would look like success: a failure leaves no partition."""
    import feature_store.event_log as event_log

    log = generate(SynthConfig(users=300, orders=2_000, seed=6, days=60))
    real = event_log.write_events

    def fill_up(root, frame, **kw):  # type: ignore[no-untyped-def]
        real(root, frame[: len(frame) // 2], **kw)  # some partitions land, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(event_log, "write_events", fill_up)
    with pytest.raises(OSError, match="No space"):
        write_log(log, tmp_path / "new" / "events")
    assert list(tmp_path.iterdir()) == []  # not even the directories it made
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="No space"):
        write_log(log, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []  # an existing directory is kept, empty
    assert read_events(tmp_path / "empty").empty


def test_the_cli_refuses_a_log_reaching_past_today(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    app = _synth_app()
    start = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=30)).isoformat()
    args = ["synth", "--users", "5", "--orders", "9", "--start", start, "--out", str(tmp_path)]
    for days in ("60", "31"):  # 31 ends today, whose later hours are still to come
        result = CliRunner().invoke(app, [*args, "--days", days, "-q"])
        assert result.exit_code == 2 and "not before today" in result.stderr, result.output
        assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(app, [*args, "--days", "30", "-q"])  # ends yesterday: fine
    assert result.exit_code == 0, result.output


def test_a_hard_killed_runs_staging_does_not_block_the_next(tmp_path: Path) -> None:
    """``kill -9`` during ``clv synth --out DIR`` leaves the staging folder; the next run into
    DIR removes it (no live process holds its lock) instead of refusing DIR as not empty."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    hold = (
        "import sys; from pathlib import Path; from clv.files import staging_dir\n"
        "with staging_dir(Path(sys.argv[1]), '.synth.') as d:\n"
        "    (d / 'date=1997-01-01').mkdir(); print(d, flush=True); sys.stdin.read()\n"
    )
    out = tmp_path / "events"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", hold, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],  # this checkout's clv
    )
    assert proc.stdout is not None
    left = Path(proc.stdout.readline().decode().strip())
    app = _synth_app()
    args = ["synth", "--users", "5", "--orders", "9", "--start", "2020-01-01", "--out", str(out)]
    try:
        result = CliRunner().invoke(app, [*args, "--days", "30", "-q"])
        assert result.exit_code == 2 and "not empty" in result.stderr  # a live run: refused
    finally:
        proc.kill()
        proc.wait()
    assert left.is_dir()
    result = CliRunner().invoke(app, [*args, "--days", "30", "-q"])
    assert result.exit_code == 0, result.output
    assert not left.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert len(read_events(out)) >= 9


@pytest.mark.parametrize("name", ["orders.csv", "orders.csv.gz"])
def test_the_cli_writes_an_orders_file_the_backtest_reads(tmp_path: Path, name: str) -> None:
    """``clv synth --out FILE.csv[.gz]``: every purchase and refund asked for, into folders it
    makes, in a file ``clv backtest --format csv`` reads; the same seed gives the same file."""
    from typer.testing import CliRunner

    app = _synth_app()
    args = ["synth", "--users", "40", "--orders", "300", "--seed", "11", "--start", "2020-01-01"]
    path = tmp_path / "new" / name
    result = CliRunner().invoke(app, [*args, "--days", "90", "--out", str(path), "-q"])
    assert result.exit_code == 0, result.output
    events = load_orders(path, "csv")
    buys = events[events["type"] == "purchase"]
    assert len(buys) == 300 and buys["user_id"].nunique() == 40
    refunds = events[events["type"] == "refund"]
    assert len(refunds) > 0 and set(refunds["order_id"]) <= set(buys["order_id"])
    first, last = dt.date(2020, 1, 1), dt.date(2020, 1, 1) + dt.timedelta(days=89)
    assert day_number(first) <= events["day"].min() and events["day"].max() <= day_number(last)
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # no staging left
    again = tmp_path / "again" / name
    result = CliRunner().invoke(app, [*args, "--days", "90", "--out", str(again), "-q"])
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(load_orders(again, "csv"), events)


def _synth_app() -> typer.Typer:
    """``clv synth`` alone (a second command keeps "synth" a sub-command)."""
    from clv.commands.synth import synth

    app = typer.Typer()
    app.command("synth")(synth)
    app.command("noop")(lambda: None)
    return app


@pytest.mark.parametrize("name", ["x.parquet", "X.PARQUET", "x.json", "x.pq"])
def test_an_output_named_like_another_format_is_refused(tmp_path: Path, name: str) -> None:
    from typer.testing import CliRunner

    out = tmp_path / name
    args = ["synth", "--users", "5", "--orders", "9", "--start", "2020-01-01", "--out", str(out)]
    result = CliRunner().invoke(_synth_app(), args)
    assert result.exit_code == 2 and "not a " in result.stderr and "file" in result.stderr
    assert not out.exists()


def test_a_directory_meant_as_one_may_have_any_name(tmp_path: Path) -> None:
    """A trailing slash, or a directory that is already there, says it is the event log."""
    from typer.testing import CliRunner

    made = tmp_path / "log.json"
    existing = tmp_path / "events.txt"
    existing.mkdir()
    for out in (f"{made}/", str(existing)):
        args = ["synth", "--users", "5", "--orders", "9", "--start", "2020-01-01", "--out", out]
        result = CliRunner().invoke(_synth_app(), [*args, "-q"])
        assert result.exit_code == 0, result.output
    assert made.is_dir() and any(made.iterdir()) and any(existing.iterdir())


def _first_day(log):  # type: ignore[no-untyped-def]
    """Each purchase's day (from the log's start), its user, and that user's first day."""
    buys = ~log.refund
    day = log.ts_s[buys] // 86_400 - day_number(log.start)
    user = log.user[buys]
    first = np.full(user.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, user, day)
    return day, user, first


def test_customers_drop_out(log) -> None:  # type: ignore[no-untyped-def]
    """The customers acquired in the first two months: far fewer still buy a year later than
    right after (the same season, so not seasonality). Without dropout the two are alike."""
    day, user, first = _first_day(log)
    early = first[user] < 60

    def buyers(lo: int, hi: int) -> int:
        return len(np.unique(user[early & (day >= lo) & (day < hi)]))

    soon, later = buyers(60, 150), buyers(450, 540)  # Mar-May 2024 against Mar-Jun 2025
    assert later < 0.7 * soon


def test_acquisition_is_seasonal(log) -> None:  # type: ignore[no-untyped-def]
    """First orders follow the weekly profile too: Friday-Sunday busier than Monday-Wednesday."""
    _, _, first = _first_day(log)
    weekday = (first[1:] + day_number(log.start) + 3) % 7  # 0 = Monday
    per_day = np.bincount(weekday, minlength=7)
    assert per_day[4:].sum() > 1.1 * per_day[:3].sum()


def test_seasonality_profile() -> None:
    """Weekends busier than early weekdays, a broad winter peak over a summer trough, and
    the pre-Christmas rush on top."""
    start = dt.date(2024, 1, 1)  # a Monday
    g = _seasonality(start, 366)
    assert np.isclose(g[5] / g[1], 1.13 / 0.90, rtol=0.01)  # Saturday 6th / Tuesday 2nd
    days = [start + dt.timedelta(days=i) for i in range(366)]
    month = np.array([d.month for d in days])
    dom = np.array([d.day for d in days])
    summer = g[(month >= 6) & (month <= 8)].mean()
    january = g[month == 1].mean()
    rush = g[(month == 12) & (dom >= 5) & (dom <= 15)].mean()
    assert january > 1.25 * summer  # the broad winter peak alone (no rush in January)
    assert rush > 1.15 * january


def test_the_cli_never_replaces_an_existing_orders_file(tmp_path: Path) -> None:
    # Fails if `clv synth --out FILE.csv` replaces a file that is there (a user's real orders,
    # say) as it refuses a folder that is not empty: one line, exit 2, the file as it was.
    from typer.testing import CliRunner

    real = tmp_path / "orders.csv"
    text = "user_id,order_id,ts,amount\nreal-customer,o-1,2024-03-01T10:00:00Z,99.00\n"
    real.write_text(text)
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "nowhere.csv")
    for out in (real, link):
        args = ["synth", "--users", "5", "--orders", "10", "--out", str(out), "-q"]
        result = CliRunner().invoke(_synth_app(), args)
        assert result.exit_code == 2, result.output
        assert "exists" in result.output and "Traceback" not in result.output
    assert real.read_text() == text and not (tmp_path / "nowhere.csv").exists()
