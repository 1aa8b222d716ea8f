"""The backtest's outputs, its use of the past only, the short-history case, and the CLI."""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

import clv
from clv.commands.backtest import backtest
from clv.errors import ClvError, ModelError
from clv.files import OWNER_FILE
from feature_store.features import day_date, day_number
from training.backtest import (
    REPORT_FILES,
    BacktestResult,
    backtest_events,
    plotted_models,
    run_backtest,
    write_report,
)
from training.datasets import DatasetError, load_orders, purchasers_at
from training.metrics import METRIC_NAMES, all_metrics
from training.report import COLUMN_MEANINGS
from training.selection import Selection, WindowPlan, plan_windows

FAST = ["naive_rate", "bgnbd_gg", "hybrid_btyd_residual"]


def _check_predictions(path: Path, events: pd.DataFrame, cutoff: dt.date) -> pd.DataFrame:
    pred = pd.read_csv(path, dtype={"user_id": str})
    assert list(pred.columns) == ["user_id", "predicted_value", "expected_orders", "p_alive"]
    day = day_number(cutoff)
    buyers = set(events.loc[(events["day"] <= day) & (events["type"] == "purchase"), "user_id"])
    assert pred["user_id"].is_unique
    assert set(pred["user_id"]) == buyers  # one row per user with an order by the cutoff
    values = pred[["predicted_value", "expected_orders", "p_alive"]].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all()
    assert (pred["p_alive"] <= 1).all()
    return pred


def test_backtest_writes_predictions_and_report(small_orders_csv: Path, tmp_path: Path) -> None:
    out, rep = tmp_path / "pred.csv", tmp_path / "report"
    cutoff = dt.date(1997, 12, 31)
    result = run_backtest(
        small_orders_csv, "csv", cutoff, 181, out, rep, progress=False, candidates=FAST
    )
    events = load_orders(small_orders_csv, "csv")
    pred = _check_predictions(out, events, cutoff)
    assert pred["predicted_value"].sum() > 0
    assert sorted(p.name for p in rep.iterdir()) == sorted(REPORT_FILES)  # no staging left
    for name in REPORT_FILES:
        if name.endswith(".png"):
            assert (rep / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name
    page = _Page()
    page.feed((rep / "index.html").read_text(encoding="utf-8"))
    assert sorted(page.images) == sorted(n for n in REPORT_FILES if n.endswith(".png"))
    assert len(page.tables) == 2  # internal validation, out of sample
    for table in page.tables:
        header, *rows = table
        assert set(METRIC_NAMES) <= set(header), header
        assert {r[0] for r in rows} >= {result.selection.champion, "bgnbd_gg"}
    assert set(FAST) <= {r[0] for r in page.tables[0][1:]}  # every candidate validated
    val = pd.read_csv(rep / "validation_metrics.csv", index_col="model")
    assert set(FAST) <= set(val.index)  # every candidate's internal validation
    oos = pd.read_csv(rep / "out_of_sample_metrics.csv", index_col="model")
    assert sorted(oos.index) == sorted(FAST)  # every candidate scored after the cutoff too
    assert {r[0] for r in page.tables[1][1:]} == set(FAST)
    for table in (val, oos):  # every metric the issue names, as a finite number
        assert set(METRIC_NAMES) <= set(table.columns), table.columns
        assert np.isfinite(table.loc[list(FAST), list(METRIC_NAMES)].to_numpy(float)).all()
    assert result.future_complete and result.out_of_sample is not None
    assert result.selection.champion in FAST
    text = (rep / "index.html").read_text(encoding="utf-8")
    assert set(val.columns) | set(oos.columns) <= set(COLUMN_MEANINGS)  # every column explained
    for column in [*val.columns, *oos.columns]:
        assert f"<dt><b>{column}</b></dt><dd>{html.escape(COLUMN_MEANINGS[column])}" in text
    plotted = plotted_models(result.selection)
    assert plotted[0] == result.selection.champion and "bgnbd_gg" in plotted
    assert len(plotted) == (2 if result.selection.champion == "bgnbd_gg" else 3)
    roles = {result.selection.champion: "champion", "bgnbd_gg": "reference"}
    if result.selection.champion == "bgnbd_gg":
        roles["bgnbd_gg"] = "champion, reference"
    labels = [f"{n} ({roles.get(n, 'runner-up on the validation composite')})" for n in plotted]
    assert f"The plots show {', '.join(labels)}." in text
    forecast = result.predictions["predicted_value"].sum()
    actual_total = float(result.actual.sum())
    assert (
        f"forecast total for the horizon: {forecast:,.2f} USD, against {actual_total:,.2f} USD "
        f"actually spent by these customers ({forecast / actual_total - 1:+.1%})"
    ) in text

    # scored against what each customer spent in the 181 days after the cutoff, read from the
    # file itself, not through the code under test
    raw = pd.read_csv(small_orders_csv, dtype={"user_id": str})
    when = pd.to_datetime(raw["ts"]).dt.date
    after = (when > cutoff) & (when <= cutoff + dt.timedelta(days=181))
    spent = raw[after].groupby("user_id")["amount"].sum().reindex(pred["user_id"], fill_value=0)
    assert spent.gt(0).sum() > 20 and spent.sum() < raw.loc[when > cutoff, "amount"].sum()
    np.testing.assert_allclose(result.actual, spent.to_numpy(), rtol=1e-9)
    champion_row = oos.loc[result.selection.champion, list(METRIC_NAMES)]
    expected = all_metrics(spent.to_numpy(), pred["predicted_value"].to_numpy())
    np.testing.assert_allclose(
        champion_row.to_numpy(float), [expected[m] for m in METRIC_NAMES], rtol=1e-4, atol=1e-9
    )


class _Page(HTMLParser):
    """The report page's images and tables (cell texts, row by row)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None


def test_future_orders_change_nothing(sample_events: pd.DataFrame) -> None:
    """Predictions at a cutoff depend only on orders at or before it."""
    users = sorted(sample_events["user_id"].unique())[:300]
    ev = sample_events[sample_events["user_id"].isin(users)]
    cutoff = day_number(dt.date(1997, 9, 30))
    a = backtest_events(ev, cutoff, 91, candidates=FAST[1:])
    future = ev[ev["day"] > cutoff].copy()
    future["cents"] *= 5
    changed = pd.concat([ev[ev["day"] <= cutoff], future.iloc[::2]])
    b = backtest_events(changed, cutoff, 91, candidates=FAST[1:])
    assert a.selection.champion == b.selection.champion
    pd.testing.assert_frame_equal(a.predictions, b.predictions)
    assert not np.allclose(a.actual, b.actual)  # the future did change


def test_short_history_still_works(sample_events: pd.DataFrame, tmp_path: Path) -> None:
    """Three months of history, a one-year horizon: shorter windows, still a forecast."""
    cutoff = day_number(dt.date(1997, 3, 31))
    history = cutoff - int(sample_events["day"].min())
    plan = plan_windows(history, 365)
    assert plan.short_history and plan.label_days < 365 and plan.val_days < 365
    said: list[str] = []
    result = backtest_events(sample_events, cutoff, 365, candidates=FAST, progress=said.append)
    assert len(result.predictions) == 2357
    assert np.isfinite(result.predictions.to_numpy()).all()
    assert result.predictions["predicted_value"].sum() > 0
    scale = 365 / plan.label_days
    note = (
        f"saw {plan.label_days}-day label windows (at most two thirds of the {history}-day "
        "history, so that each training cutoff has history behind it), scaled to "
    )
    assert any(note in m and f"(x{scale:.2f}); the horizon is longer" in m for m in said), said
    said.clear()
    cutoff = day_number(dt.date(1998, 3, 31))
    backtest_events(sample_events, cutoff, 91, candidates=FAST, progress=said.append)
    assert not any("label windows" in m for m in said)  # a year of history: nothing to say
    said.clear()
    history = cutoff - int(sample_events["day"].min())  # 454 days: longer than the horizon,
    plan = plan_windows(history, 365)  # but labels of 2/3 of it, so scaled all the same
    assert history > 365 and plan.label_days < 365
    backtest_events(sample_events, cutoff, 365, candidates=FAST, progress=said.append)
    scaled = [m for m in said if "label windows" in m]
    assert len(scaled) == 1 and "longer than the history" not in scaled[0], said


def test_no_history_to_learn_from_falls_back_to_label_free_models(
    sample_events: pd.DataFrame,
) -> None:
    cutoff = int(sample_events["day"].min()) + 12
    result = backtest_events(sample_events, cutoff, 90, candidates=FAST)
    assert result.selection.champion == "bgnbd_gg"
    assert not result.future_complete or result.out_of_sample is not None
    assert (result.predictions["predicted_value"] >= 0).all()


def test_the_plots_draw_the_champion_the_reference_and_the_runner_up() -> None:
    from training.selection import CandidateScore, Selection, WindowPlan

    def sel(champion: str, **scores: float) -> Selection:
        rows = {n: CandidateScore(n, {}, 0.0, score=v) for n, v in scores.items()}
        rows["failed"] = CandidateScore("failed", {}, 0.0, "it failed")
        return Selection(champion, "", WindowPlan(365, 91, 91, 91), None, rows)

    scores = {"bgnbd_gg": 0.0, "ridge": -0.4, "hgb_poisson": 0.2, "naive_rate": -2.0}
    assert plotted_models(sel("bgnbd_gg", **scores)) == ["bgnbd_gg", "hgb_poisson"]
    assert plotted_models(sel("ridge", **scores)) == ["ridge", "bgnbd_gg", "hgb_poisson"]
    assert plotted_models(sel("hgb_poisson", **scores)) == ["hgb_poisson", "bgnbd_gg", "ridge"]
    assert plotted_models(sel("bgnbd_gg", bgnbd_gg=0.0)) == ["bgnbd_gg"]


def test_every_candidate_scored_after_the_cutoff_includes_the_reference(
    sample_events: pd.DataFrame,
) -> None:
    """Even when the candidates named leave BG/NBD+GG out: it is what the others are judged
    against, in the selection and in the report."""
    cutoff = day_number(dt.date(1997, 12, 31))
    names = ["naive_rate", "hybrid_btyd_residual"]
    result = backtest_events(sample_events, cutoff, 91, candidates=names, score_all=True)
    assert result.out_of_sample is not None
    assert sorted(result.out_of_sample.index) == sorted([*names, "bgnbd_gg"])


def test_the_tracking_curves_run_from_nothing_to_the_horizons_totals(
    sample_events: pd.DataFrame,
) -> None:
    """Day 0 is nothing yet; the last day is the horizon, where the actual curve is what the
    customers spent and each model's is its forecast total, the figures the tables score."""
    from training.backtest import tracking_curves

    cutoff = day_number(dt.date(1997, 12, 31))
    result = backtest_events(sample_events, cutoff, 60, candidates=FAST, score_all=True)
    assert result.actual is not None
    past = sample_events[sample_events["day"] <= cutoff]
    feats = purchasers_at(past, cutoff)
    days, actual, pred = tracking_curves(sample_events, result, result.fitted_models, feats)
    assert days[0] == 0 and days[-1] == 60
    assert actual[0] == 0 and all(p[0] == 0 for p in pred.values())
    assert np.all(np.diff(actual) >= 0)
    assert actual[-1] == pytest.approx(result.actual.sum())
    for name, curve in pred.items():
        assert curve[-1] == pytest.approx(result.model_predictions[name].sum())


def test_a_horizon_the_file_does_not_cover_is_said_and_forecast(
    sample_events: pd.DataFrame,
) -> None:
    lines: list[str] = []
    cutoff = day_number(dt.date(1998, 5, 31))  # the data ends on 1998-06-30
    result = backtest_events(
        sample_events, cutoff, 90, candidates=["naive_rate", "bgnbd_gg"], progress=lines.append
    )
    assert not result.future_complete and result.actual is None
    assert (
        "the events end on 1998-06-30, before the horizon's last day 1998-08-29: a forecast "
        "only, no out-of-sample figures"
    ) in lines
    assert "they spent" not in result.summary()
    assert result.summary().endswith(
        " (a forecast only: the orders end on 1998-06-30, before the horizon's last day 1998-08-29)"
    )


def test_the_one_line_outcome() -> None:
    from training.backtest import BacktestResult
    from training.selection import Selection, WindowPlan

    def result(champion: str, actual: list[float] | None, ref: list[float]) -> BacktestResult:
        preds = pd.DataFrame({"predicted_value": [30.0, 20.0]}, index=["a", "b"])
        return BacktestResult(
            cutoff_day=day_number(dt.date(1997, 12, 31)),
            horizon_days=91,
            predictions=preds,
            champion=None,  # type: ignore[arg-type]
            selection=Selection(champion, "", WindowPlan(365, 91, 91, 91), None),
            future_complete=actual is not None,
            actual=None if actual is None else np.array(actual),
            model_predictions={"bgnbd_gg": np.array(ref)},
        )

    head = "{} forecasts 50.00 EUR from 2 customers over the 91 days after 1997-12-31"
    assert result("ridge", None, [1, 1]).summary("EUR") == head.format("ridge")
    assert result("ridge", [40, 0], [30, 2]).summary("EUR") == head.format("ridge") + (
        "; they spent 40.00 EUR (bias +25.0%; BG/NBD+GG -20.0%)"
    )
    assert result("bgnbd_gg", [40, 0], [30, 20]).summary("EUR") == head.format("bgnbd_gg") + (
        "; they spent 40.00 EUR (bias +25.0%)"  # the reference is the champion: said once
    )
    assert result("ridge", [0, 0], [30, 2]).summary("EUR") == head.format("ridge") + (
        "; they spent 0.00 EUR"  # no bias against nothing
    )


def test_a_report_without_the_horizon_gives_the_forecast_total_in_its_currency(
    sample_events: pd.DataFrame, tmp_path: Path
) -> None:
    cutoff = day_number(dt.date(1998, 5, 31))  # the data ends a month later
    result = backtest_events(sample_events, cutoff, 90, candidates=["naive_rate", "bgnbd_gg"])
    write_report(sample_events, result, tmp_path, currency="EUR")
    page = html.unescape((tmp_path / "index.html").read_text(encoding="utf-8"))
    total = result.predictions["predicted_value"].sum()
    assert f"forecast total for the horizon: {total:,.2f} EUR. The file does not cover" in page
    assert "amounts in EUR" in page


def test_a_report_says_which_candidates_had_no_forecast(
    sample_events: pd.DataFrame, tmp_path: Path
) -> None:
    """Twelve days of history hold no label window: the label-free candidates are scored after
    the cutoff and the report names the one that learns from labels, and why it is missing."""
    cutoff = int(sample_events["day"].min()) + 12
    result = backtest_events(sample_events, cutoff, 90, candidates=FAST, score_all=True)
    assert result.out_of_sample is not None
    assert sorted(result.out_of_sample.index) == ["bgnbd_gg", "naive_rate"]
    assert list(result.final_fit_errors) == ["hybrid_btyd_residual"]
    write_report(sample_events, result, tmp_path)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "hybrid_btyd_residual: no forecast (too little history before the cutoff" in page


def test_days_of_history_without_a_repeat_buyer_still_give_a_forecast(
    sample_events: pd.DataFrame,
) -> None:
    """Four days in, nobody has bought twice: Gamma-Gamma cannot be fitted, so the
    naive rate forecasts, and the selection says why."""
    cutoff = int(sample_events["day"].min()) + 4
    past = sample_events[sample_events["day"] <= cutoff]
    assert past.groupby("user_id")["day"].nunique().max() == 1  # no repeat purchase day
    result = backtest_events(sample_events, cutoff, 365, candidates=FAST)
    assert result.selection.champion == "naive_rate"
    assert "bgnbd_gg: " in result.selection.reason
    assert set(result.predictions.index) == set(past["user_id"])
    value = result.predictions["predicted_value"]
    assert (value >= 0).all() and value.sum() > 0


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("backtest")(backtest)
    app.command("noop")(lambda: None)  # a second command keeps "backtest" a sub-command
    return app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--orders", "missing.csv", "--cutoff", "1997-12-31"], "not found"),
        (["--orders", "ORDERS", "--cutoff", "1997-13-01"], "--cutoff"),
        (["--orders", "ORDERS", "--cutoff", "1997-12-31", "--horizon-days", "0"], "horizon"),
        (["--orders", "ORDERS", "--cutoff", "1997-12-31", "--horizon-days", "3651"], "3650"),
        (["--orders", "BADCOLS", "--cutoff", "1997-12-31"], "lacks column"),
        (["--orders", "ORDERS", "--cutoff", "1990-01-01"], "no purchase"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, small_orders_csv: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("customer,when,amount\nu,2024-01-01,1\n")
    args = [
        str(small_orders_csv) if a == "ORDERS" else str(bad) if a == "BADCOLS" else a for a in args
    ]
    if "--horizon-days" not in args:
        args += ["--horizon-days", "30"]
    out, rep = tmp_path / "p.csv", tmp_path / "rep"
    out.write_text("user_id,predicted_value,expected_orders,p_alive\nearlier,1,1,1\n")
    rep.mkdir()
    (rep / "index.html").write_text("an earlier report")
    before = _snapshot(tmp_path)
    full = ["backtest", *args, "--out", str(out), "--report", str(rep), "--quiet"]
    result = CliRunner().invoke(_app(), full)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    err = result.stderr.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert _snapshot(tmp_path) == before  # bad input changes nothing, adds nothing


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` and the bytes of its files."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in folder.rglob("*")
    }


@pytest.mark.parametrize("quiet", [[], ["-q"], ["--quiet"]])
def test_cli_happy_path(
    quiet: list[str], small_orders_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.backtest as bt
    import training.threads as threads

    real = bt.run_backtest

    def fast(*a: object, **kw: object) -> object:
        return real(*a, **kw, candidates=FAST)  # type: ignore[arg-type]

    monkeypatch.setattr(bt, "run_backtest", fast)
    limited: list[bool] = []
    monkeypatch.setattr(threads, "one_thread_unless_set", lambda: limited.append(True) or True)
    # The clock counts from the process's start (imports included), not from the fitting's.
    monkeypatch.setattr(clv, "STARTED", time.perf_counter() - 10_000)
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(
        _app(),
        [
            "backtest",
            "--orders",
            str(small_orders_csv),
            "--cutoff",
            "1997-09-30",
            "--horizon-days",
            "91",
            "--out",
            str(out),
            "--format",
            "csv",
            *quiet,
        ],
    )
    assert result.exit_code == 0, result.output
    assert ("champion" in result.stderr) == (not quiet)  # progress lines unless quiet
    clocks = [float(m) for m in re.findall(r"^\[backtest +([0-9.]+)s\]", result.stderr, re.M)]
    assert bool(clocks) == (not quiet)
    # stdout: one line with the outcome, quiet or not
    said = r"\S+ forecasts [\d,.]+ USD from [\d,]+ customers over the 91 days after 1997-09-30; "
    said += r"they spent [\d,.]+ USD \(bias [+-][\d.]+%(; BG/NBD\+GG [+-][\d.]+%)?\)\n"
    assert re.fullmatch(said, result.stdout), result.stdout
    assert all(c >= 10_000 for c in clocks)
    assert limited == [True]  # one thread per pool unless the environment says
    _check_predictions(out, load_orders(small_orders_csv, "csv"), dt.date(1997, 9, 30))


def test_cli_refuses_outputs_that_overwrite_the_input_or_each_other(
    small_orders_csv: Path, tmp_path: Path
) -> None:
    orders = tmp_path / "orders.csv"
    orders.write_bytes(small_orders_csv.read_bytes())
    report = tmp_path / "rep"
    inside = report / "validation_metrics.csv"  # a name the report writes
    report.mkdir()
    inside.write_bytes(orders.read_bytes())
    base = ["backtest", "--cutoff", "1997-12-31", "--horizon-days", "30", "--quiet"]
    cases = [
        (["--orders", str(orders), "--out", str(orders)], "is the orders file itself"),
        (["--orders", str(orders), "--out", str(tmp_path / "." / "orders.csv")], "itself"),
        (
            ["--orders", str(orders), "--out", str(report / "index.html"), "--report", str(report)],
            "a file the report writes",
        ),
        (["--orders", str(orders), "--out", str(report), "--report", str(report)], "directory"),
        (
            ["--orders", str(inside), "--out", str(tmp_path / "p.csv"), "--report", str(report)],
            "a file the report writes",
        ),
    ]
    for args, message in cases:
        result = CliRunner().invoke(_app(), [*base, *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    assert orders.read_bytes() == small_orders_csv.read_bytes() == inside.read_bytes()
    assert not (tmp_path / "p.csv").exists()


def test_staging_names_never_clobber_the_input(small_orders_csv: Path, tmp_path: Path) -> None:
    """The predictions are staged under a fresh unique name, not ``.<out>.tmp``."""
    orders = tmp_path / ".p.csv.tmp"
    orders.write_bytes(small_orders_csv.read_bytes())
    run_backtest(
        orders,
        "csv",
        dt.date(1997, 12, 31),
        30,
        tmp_path / "p.csv",
        progress=False,
        candidates=FAST,
    )
    assert orders.read_bytes() == small_orders_csv.read_bytes()
    assert (tmp_path / "p.csv").is_file()


def test_a_report_that_fails_leaves_the_predictions_file_alone(
    small_orders_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.backtest as bt

    out, rep = tmp_path / "pred.csv", tmp_path / "report"
    out.write_text("OLD\n")
    rep.mkdir()
    (rep / "index.html").write_text("OLD REPORT")
    (rep / ".staging.abandoned").mkdir()  # as a kill -9 of an earlier run leaves it: its
    (rep / ".staging.abandoned" / OWNER_FILE).touch()  # owner file, held by nobody now
    (rep / ".staging.abandoned" / "gain.png").write_bytes(b"half")
    real = bt.write_report

    def half_written(
        events: object, result: object, folder: Path, *a: object, **kw: object
    ) -> list[Path]:
        real(events, result, folder, *a, **kw)  # type: ignore[arg-type]
        raise OSError(28, "No space left on device")  # as if the disk filled up at the end

    monkeypatch.setattr(bt, "write_report", half_written)
    with pytest.raises(OSError):
        run_backtest(
            small_orders_csv, "csv", dt.date(1997, 12, 31), 91, out, rep, False, candidates=FAST
        )
    assert out.read_text() == "OLD\n"
    assert sorted(p.name for p in rep.iterdir()) == ["index.html"]  # no staging left either
    assert (rep / "index.html").read_text() == "OLD REPORT"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_report_file_name_taken_by_a_directory_is_refused_and_changes_nothing(
    small_orders_csv: Path, tmp_path: Path
) -> None:
    out, rep = tmp_path / "pred.csv", tmp_path / "report"
    out.write_text("OLD\n")
    (rep / "tracking.png").mkdir(parents=True)  # a rename cannot replace a directory
    (rep / "index.html").write_text("OLD REPORT")
    with pytest.raises(ClvError, match=r"tracking\.png is a directory"):
        run_backtest(
            small_orders_csv, "csv", dt.date(1997, 12, 31), 91, out, rep, False, candidates=FAST
        )
    assert out.read_text() == "OLD\n"
    assert sorted(p.name for p in rep.iterdir()) == ["index.html", "tracking.png"]
    # the command refuses it before any work
    args = ["backtest", "--orders", str(small_orders_csv), "--cutoff", "1997-12-31"]
    result = CliRunner().invoke(
        _app(), [*args, "--horizon-days", "91", "--out", str(out), "--report", str(rep)]
    )
    assert result.exit_code == 2 and "tracking.png is a directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_report_is_staged_inside_its_directory(
    small_orders_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renames from the staging folder never cross a file system (``--report`` may be a mount
    point, whose parent is another file system) and the parent need not be writable."""
    import clv.files as files  # where the staging folder is made

    made: list[Path] = []
    real = files.tempfile.mkdtemp

    def spy(*a: object, **kw: object) -> str:
        path = real(*a, **kw)  # type: ignore[call-overload]
        made.append(Path(path))
        return str(path)

    monkeypatch.setattr(files.tempfile, "mkdtemp", spy)
    rep = tmp_path / "mnt" / "report"
    cutoff = dt.date(1997, 12, 31)
    run_backtest(small_orders_csv, "csv", cutoff, 91, rep / "p.csv", rep, False, candidates=FAST)
    assert [p.parent for p in made] == [rep]
    assert not [p for p in rep.iterdir() if p.name.startswith(".")]  # and removed after
    assert (rep / "index.html").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", ""], "--out must be a path, not empty"),
        (["--out", "P", "--report", " "], "--report must be a path, not empty"),
        (["--out", "P", "--currency", "dollars"], "not an ISO 4217 code"),
        (["--out", "P", "--currency", "usd"], "not an ISO 4217 code"),
    ],
)
def test_cli_refuses_empty_paths_and_bad_currency_codes(
    extra: list[str],
    message: str,
    small_orders_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # where an empty path would have written
    extra = [str(tmp_path / "p.csv") if a == "P" else a for a in extra]
    args = ["backtest", "--orders", str(small_orders_csv), "--cutoff", "1997-12-31"]
    result = CliRunner().invoke(_app(), [*args, "--horizon-days", "30", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_cli_refuses_an_output_directory_it_cannot_write_before_any_work(
    small_orders_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import clv.commands.backtest as cmd
    import training.backtest as bt

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access

    def access(path: object, mode: int) -> bool:  # root passes permission checks: pretend
        return Path(str(path)) != locked and real(path, mode)  # type: ignore[arg-type]

    def never(*a: object, **kw: object) -> None:
        raise AssertionError("the work started")

    monkeypatch.setattr(cmd.os, "access", access)
    monkeypatch.setattr(bt, "run_backtest", never)
    args = ["backtest", "--orders", str(small_orders_csv), "--cutoff", "1997-12-31"]
    for extra, flag in (
        (["--out", str(locked / "p.csv")], "--out"),
        (["--out", str(tmp_path / "p.csv"), "--report", str(locked)], "--report"),
    ):
        result = CliRunner().invoke(_app(), [*args, "--horizon-days", "30", *extra])
        assert result.exit_code == 2, result.output
        assert f"{flag}: cannot write in directory {locked}" in result.stderr
    # a link to a file in it: written through, so refused as well (it failed after the work)
    link = tmp_path / "link.csv"
    link.symlink_to(locked / "p.csv")
    result = CliRunner().invoke(_app(), [*args, "--horizon-days", "30", "--out", str(link)])
    assert result.exit_code == 2, result.output
    assert f"--out: cannot write in directory {locked} (where {link} leads)" in result.stderr
    link.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked"]


def test_cli_says_it_ran_out_of_memory_in_one_line(
    small_orders_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if a MemoryError escapes clv backtest as a traceback (train and synth say it).
    import training.backtest as bt

    def short(*a: object, **kw: object) -> None:
        raise MemoryError

    monkeypatch.setattr(bt, "run_backtest", short)
    out = tmp_path / "new" / "p.csv"
    args = ["backtest", "--orders", str(small_orders_csv), "--cutoff", "1997-12-31"]
    result = CliRunner().invoke(_app(), [*args, "--horizon-days", "30", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        f"clv: error: not enough memory for a backtest of {small_orders_csv}"
    )
    assert list(tmp_path.iterdir()) == []  # the folder it made is gone


def test_a_rerun_into_a_report_directory_leaves_no_stale_figures(
    small_orders_csv: Path, tmp_path: Path
) -> None:
    rep = tmp_path / "report"
    rep.mkdir()
    for stale in ("out_of_sample_metrics.csv", "oos_gain.png", "tracking.png"):
        (rep / stale).write_text("from an earlier run")
    (rep / "notes.txt").write_text("the user's own file")
    # a cutoff whose horizon the file does not cover: no out-of-sample figures this time
    run_backtest(  # the predictions inside the report directory: a layout that is fine
        small_orders_csv,
        "csv",
        dt.date(1998, 6, 1),
        91,
        rep / "predictions.csv",
        rep,
        False,
        candidates=FAST,
    )
    assert (rep / "predictions.csv").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    assert not [p for p in rep.iterdir() if p.name.startswith(".")]
    assert not (rep / "out_of_sample_metrics.csv").exists()
    assert not (rep / "oos_gain.png").exists() and not (rep / "tracking.png").exists()
    assert (rep / "validation_metrics.csv").is_file() and (rep / "index.html").is_file()
    assert (rep / "notes.txt").read_text() == "the user's own file"


def test_a_failed_run_removes_the_directories_it_made(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,order_id,ts,amount\nu1,o1,2024-01-01,abc\n")
    out, rep = tmp_path / "new" / "deeper" / "p.csv", tmp_path / "newrep"
    args = ["backtest", "--orders", str(bad), "--cutoff", "2024-01-01", "--horizon-days", "5"]
    result = CliRunner().invoke(_app(), [*args, "--out", str(out), "--report", str(rep)])
    assert result.exit_code == 2 and "amount 'abc' is not a number" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


_TERMINATED_AT_FIRST_RENAME = """
import datetime as dt, os, pathlib, signal, sys
from clv.errors import Terminated
from clv.files import stops_unwind
from training.backtest import run_backtest

real_replace = pathlib.Path.replace
sent = []

def replace(self, target):
    if not sent and self.parent.name.startswith(".staging."):  # the first report file's rename
        sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
    return real_replace(self, target)

pathlib.Path.replace = replace
orders, out, report = sys.argv[1:4]
try:
    with stops_unwind():
        run_backtest(orders, "csv", dt.date(1997, 9, 30), 30, out, report, progress=False,
                     candidates=["naive_rate", "bgnbd_gg"])
    print("finished")
except Terminated:
    print("terminated")
"""


def test_sigterm_during_the_renames_lets_them_finish(
    small_orders_csv: Path, tmp_path: Path
) -> None:
    """A SIGTERM between the report's renames waits for the predictions' too: what is left is
    this run's outputs, all of them, not a mix with the earlier run's; then the run ends."""
    import subprocess
    import sys

    def files(folder: Path) -> dict[str, str]:  # the CSVs, less the fits' run times
        return {
            p.name: pd.read_csv(p).drop(columns=["seconds"], errors="ignore").to_csv()
            for p in folder.iterdir()
            if p.suffix == ".csv"
        }

    out, rep = tmp_path / "p.csv", tmp_path / "rep"
    fast = ["naive_rate", "bgnbd_gg"]
    run_backtest(small_orders_csv, "csv", dt.date(1997, 9, 30), 60, out, rep, progress=False,
                 candidates=fast)  # fmt: skip
    expected = tmp_path / "expected"
    run_backtest(small_orders_csv, "csv", dt.date(1997, 9, 30), 30, expected / "p.csv",
                 expected / "rep", progress=False, candidates=fast)  # fmt: skip
    assert files(rep) != files(expected / "rep")  # the earlier run's differ
    done = subprocess.run(
        [sys.executable, "-c", _TERMINATED_AT_FIRST_RENAME, str(small_orders_csv), str(out),
         str(rep)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.stdout.strip() == "terminated", done.stderr
    assert files(rep) == files(expected / "rep")
    assert out.read_bytes() == (expected / "p.csv").read_bytes()
    assert not [p for p in rep.iterdir() if p.name.startswith(".")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_final_fits_warnings_and_a_cutoff_after_the_data_are_said(
    sample_events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    import warnings

    from training.models.btyd import BGNBDGammaGamma
    from training.models.naive import HistoricalRate

    def noisy(fit):  # type: ignore[no-untyped-def]
        def fit_and_warn(self, ds):  # type: ignore[no-untyped-def]
            warnings.warn(f"{self.name} is unsure", UserWarning, stacklevel=2)
            return fit(self, ds)

        return fit_and_warn

    for cls in (HistoricalRate, BGNBDGammaGamma):
        monkeypatch.setattr(cls, "fit", noisy(cls.fit))
    last = int(sample_events["day"].max())
    said: list[str] = []
    result = backtest_events(
        sample_events, last + 10, 30, candidates=["naive_rate"], progress=said.append
    )
    assert result.future_complete is False
    assert f"the last event is on {dt.date(1998, 6, 30)}: the 10 days" in " | ".join(said)
    champion = result.selection.champion
    assert f"final fit: {champion} warned: UserWarning: {champion} is unsure" in said, said


def test_an_order_after_the_cutoff_neither_adds_a_row_nor_moves_a_forecast(
    small_orders_csv: Path, tmp_path: Path
) -> None:
    """The first second after the cutoff is already the future: a user whose only order is
    then gets no row, and a known user's order then changes no forecast. The last second of
    the cutoff day still counts."""
    cutoff = dt.date(1997, 12, 31)
    raw = pd.read_csv(small_orders_csv, dtype={"user_id": str})
    known = raw["user_id"].iloc[0]
    extra = pd.DataFrame(
        [
            {
                "user_id": "on_the_cutoff",
                "order_id": "e1",
                "ts": "1997-12-31T23:59:59Z",
                "amount": 50.0,
            },
            {
                "user_id": "late_only",
                "order_id": "l1",
                "ts": "1998-01-01T00:00:00Z",
                "amount": 50.0,
            },
            {"user_id": known, "order_id": "l2", "ts": "1998-01-01T00:00:00Z", "amount": 5000.0},
        ]
    )
    with_late, without = tmp_path / "with_late.csv", tmp_path / "without.csv"
    pd.concat([raw, extra]).to_csv(with_late, index=False)
    pd.concat([raw, extra.iloc[:1]]).to_csv(without, index=False)
    for orders, out in ((with_late, "a.csv"), (without, "b.csv")):
        run_backtest(orders, "csv", cutoff, 91, tmp_path / out, progress=False, candidates=FAST)
    pred = pd.read_csv(tmp_path / "a.csv", dtype={"user_id": str})
    assert "late_only" not in set(pred["user_id"])
    assert {"on_the_cutoff", known} <= set(pred["user_id"])
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_the_one_line_outcome_gives_the_horizon_asked_for_not_a_window_of_the_plan() -> None:
    preds = pd.DataFrame({"predicted_value": [30.0, 20.0]}, index=["a", "b"])
    result = BacktestResult(
        cutoff_day=day_number(dt.date(1997, 3, 31)),
        horizon_days=365,
        predictions=preds,
        champion=None,  # type: ignore[arg-type]
        selection=Selection("ridge", "", WindowPlan(89, 365, 59, 29), None),
        future_complete=False,
    )
    assert result.summary() == (
        "ridge forecasts 50.00 USD from 2 customers over the 365 days after 1997-03-31"
    )


def test_the_report_states_the_horizon_windows_and_customers_it_used(
    sample_events: pd.DataFrame, tmp_path: Path
) -> None:
    """Three months of history, a year's horizon: label window, validation window and horizon
    all differ, and the page gives each its own figure."""
    result = backtest_events(sample_events, day_number(dt.date(1997, 3, 31)), 365, candidates=FAST)
    plan = result.selection.plan
    assert len({365, plan.label_days, plan.val_days}) == 3
    write_report(sample_events, result, tmp_path)
    page = html.unescape((tmp_path / "index.html").read_text(encoding="utf-8"))
    assert "Cutoff 1997-03-31, horizon 365 days, 2,357 customers scored; amounts in USD." in page
    inner = dt.date(1997, 3, 31) - dt.timedelta(days=plan.val_days)  # the window ends at the cutoff
    assert day_date(result.selection.inner_cutoff_day) == inner
    assert (
        f"Validation: fitted on data up to {inner}, scored on the following {plan.val_days} "
        f"days; final label window {plan.label_days} days (history {plan.history_days} days)."
    ) in page


def _html_table(rows: list[list[str]]) -> pd.DataFrame:
    header, *body = rows
    return pd.DataFrame([r[1:] for r in body], index=[r[0] for r in body], columns=header[1:])


def test_the_reports_tables_put_each_figure_under_its_own_name(
    sample_events: pd.DataFrame, tmp_path: Path
) -> None:
    """Every figure of both tables, in the CSVs and on the page, recomputed from the
    predictions and the actual values: none is shown under another metric's name."""
    result = backtest_events(
        sample_events, day_number(dt.date(1997, 12, 31)), 91, candidates=FAST, score_all=True
    )
    sel = result.selection
    assert result.actual is not None and sel.val_actual is not None
    write_report(sample_events, result, tmp_path)
    page = _Page()
    page.feed((tmp_path / "index.html").read_text(encoding="utf-8"))
    shown = [_html_table(t) for t in page.tables]
    csvs = [
        pd.read_csv(tmp_path / name, index_col="model")
        for name in ("validation_metrics.csv", "out_of_sample_metrics.csv")
    ]
    truths = [(sel.val_actual, sel.val_predictions), (result.actual, result.model_predictions)]
    for csv, table, (actual, predictions) in zip(csvs, shown, truths, strict=True):
        assert set(FAST) <= set(predictions)
        for name, pred in predictions.items():
            expected = all_metrics(actual, pred)
            for m in METRIC_NAMES:
                assert float(csv.loc[name, m]) == pytest.approx(expected[m], rel=1e-6, abs=1e-12)
                assert float(table.loc[name, m]) == pytest.approx(expected[m], rel=1e-3, abs=1e-9)


def test_the_plots_name_each_model_by_its_role_when_the_reference_is_not_champion(
    sample_events: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.backtest as bt

    result = backtest_events(
        sample_events, day_number(dt.date(1997, 12, 31)), 91, candidates=FAST, score_all=True
    )
    # whichever won, the page must tell a champion that is not the reference from it
    result.selection = dataclasses.replace(result.selection, champion="naive_rate")
    legends: list[list[str]] = []

    def spy(real):  # type: ignore[no-untyped-def]
        def draw(*a, **kw):  # type: ignore[no-untyped-def]
            preds = next(x for x in (*a, *kw.values()) if isinstance(x, dict))
            legends.append(list(preds))
            return real(*a, **kw)

        return draw

    for name in ("decile_plot", "gain_plot", "tracking_plot"):
        monkeypatch.setattr(bt, name, spy(getattr(bt, name)))
    write_report(sample_events, result, tmp_path)
    expected = [
        "naive_rate (champion)",
        "bgnbd_gg (reference)",
        "hybrid_btyd_residual (runner-up)",
    ]
    assert len(legends) == 5 and all(keys == expected for keys in legends), legends
    page = html.unescape((tmp_path / "index.html").read_text(encoding="utf-8"))
    assert (
        "The plots show naive_rate (champion), bgnbd_gg (reference), hybrid_btyd_residual "
        "(runner-up on the validation composite)."
    ) in page


def test_cli_says_and_reports_in_the_currency_given(
    small_orders_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.backtest as bt

    real = bt.run_backtest
    monkeypatch.setattr(bt, "run_backtest", lambda *a, **kw: real(*a, **kw, candidates=FAST[:2]))
    monkeypatch.setattr(clv, "STARTED", time.perf_counter())
    rep = tmp_path / "rep"
    args = ["backtest", "--orders", str(small_orders_csv), "--cutoff", "1997-09-30"]
    args += ["--horizon-days", "91", "--out", str(tmp_path / "p.csv"), "--report", str(rep)]
    result = CliRunner().invoke(_app(), [*args, "--currency", "EUR", "-q"])
    assert result.exit_code == 0, result.output
    assert " EUR from " in result.stdout and "USD" not in result.stdout
    page = html.unescape((rep / "index.html").read_text(encoding="utf-8"))
    assert "amounts in EUR" in page and "USD" not in page


def test_cli_takes_todays_date_as_a_cutoff(
    small_orders_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a day after today is the future; today's orders are known (so far)."""
    import training.backtest as bt

    real = bt.run_backtest
    monkeypatch.setattr(bt, "run_backtest", lambda *a, **kw: real(*a, **kw, candidates=FAST[:2]))
    today = dt.datetime.now(dt.UTC).date()
    args = ["backtest", "--orders", str(small_orders_csv), "--cutoff", today.isoformat()]
    result = CliRunner().invoke(
        _app(), [*args, "--horizon-days", "30", "--out", str(tmp_path / "p.csv"), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert f"over the 30 days after {today} (a forecast only" in result.stdout
    assert (tmp_path / "p.csv").is_file()


def test_the_predictions_file_has_a_row_for_every_user_even_a_zero_forecast(
    tmp_path: Path,
) -> None:
    from training.backtest import write_predictions

    preds = pd.DataFrame(
        {"p_alive": [0.5, 0.0, 1.0], "expected_orders": [1.25, 0.0, 3.0],
         "predicted_value": [12.5, 0.0, 1e-7]},
        index=pd.Index(["007", "b", "c"]),
    )  # fmt: skip
    write_predictions(preds, tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text().splitlines() == [
        "user_id,predicted_value,expected_orders,p_alive",
        "007,12.500000,1.250000,0.500000",
        "b,0.000000,0.000000,0.000000",
        "c,0.000000,3.000000,1.000000",
    ]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OSError(28, "No space left on device"), 1),
        (ModelError("no candidate could be fitted"), 1),
        (DatasetError("row 3: amount 'abc' is not a number"), 2),
    ],
    ids=["disk full", "no model", "bad orders"],
)
def test_cli_tells_a_failure_while_running_from_bad_input(
    small_orders_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    code: int,
) -> None:
    """Exit 2 is bad input, which the user can fix in the command or the file; a disk that fills
    up or models that cannot be fitted are failures while running: exit 1. Either way one line,
    and the directories the run made are gone."""
    import training.backtest as bt

    def failing(*a: object, **kw: object) -> None:
        raise error

    monkeypatch.setattr(bt, "run_backtest", failing)
    out = tmp_path / "new" / "p.csv"
    args = ["backtest", "--orders", str(small_orders_csv), "--cutoff", "1997-12-31"]
    result = CliRunner().invoke(_app(), [*args, "--horizon-days", "30", "--out", str(out)])
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("clv: error: ") and len(err.splitlines()) == 1
    assert str(error.args[-1]) in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("name", "magic"),
    [("pred.csv.gz", b"\x1f\x8b"), ("pred.csv.bz2", b"BZh"), ("pred.csv.xz", b"\xfd7zXZ")],
)
@pytest.mark.parametrize("report", [False, True])
def test_predictions_named_compressed_are_compressed(
    small_orders_csv: Path, tmp_path: Path, name: str, magic: bytes, report: bool
) -> None:
    # Fails if (training/backtest.py) pandas takes the compression from the staging file's
    # name (.pred.csv.gz.<hex>.tmp): --out pred.csv.gz was plain text under a .gz name,
    # which no reader of the name could open.
    out, cutoff = tmp_path / name, dt.date(1997, 12, 31)
    run_backtest(
        small_orders_csv,
        "csv",
        cutoff,
        91,
        out,
        tmp_path / "report" if report else None,
        progress=False,
        candidates=["bgnbd_gg"],
    )
    assert out.read_bytes().startswith(magic)
    _check_predictions(out, load_orders(small_orders_csv, "csv"), cutoff)
