"""``clv backtest``: select and fit a model on orders up to a cutoff, forecast the horizon.

Everything fitted or selected sees only events dated on or before the cutoff (they are cut off
before any model code runs). When the file also holds the whole horizon after the cutoff, the
forecast is scored against it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from clv.errors import ClvError, ModelError
from clv.files import interruptions_deferred, replaced_atomically, staging_dir
from feature_store.features import day_date, day_number
from training import threads
from training.datasets import DatasetError, OrdersFormat, load_orders, purchasers_at, window_labels
from training.metrics import METRIC_NAMES
from training.models.base import PREDICTION_COLUMNS, CLVModel
from training.models.candidates import REFERENCE, UNSUPERVISED, make_candidates
from training.progress import Progress, heartbeat, quiet, resolve
from training.report import decile_plot, gain_plot, tracking_plot, write_html
from training.selection import Selection, evaluate, final_training_set, select_champion

T = TypeVar("T")


@dataclass
class BacktestResult:
    """The forecast and what was learnt on the way."""

    cutoff_day: int
    horizon_days: int
    predictions: pd.DataFrame  # indexed by user_id, PREDICTION_COLUMNS
    champion: CLVModel
    selection: Selection
    future_complete: bool
    actual: np.ndarray | None = None  # realised revenue of each predicted user
    out_of_sample: pd.DataFrame | None = None  # metrics per model against ``actual``
    model_predictions: dict[str, np.ndarray] = field(default_factory=dict)
    fitted_models: dict[str, CLVModel] = field(default_factory=dict)
    report_files: list[Path] = field(default_factory=list)
    #: candidates whose final fit failed or was not possible, and why
    final_fit_errors: dict[str, str] = field(default_factory=dict)
    #: the day of the file's last event (says why there is no actual total)
    last_event_day: int | None = None

    @property
    def forecast_total(self) -> float:
        """The champion's forecast for all the scored customers over the horizon."""
        return float(self.predictions["predicted_value"].sum())

    @property
    def actual_total(self) -> float | None:
        """What they spent in the horizon, when the events cover it."""
        return None if self.actual is None else float(np.sum(self.actual))

    def summary(self, currency: str = "USD") -> str:
        """One line: the champion's forecast total, and against the actual when known."""
        total = self.forecast_total
        line = (
            f"{self.selection.champion} forecasts {total:,.2f} {currency} from "
            f"{len(self.predictions):,} {_plural(len(self.predictions), 'customer')} over the "
            f"{self.horizon_days} days after {day_date(self.cutoff_day)}"
        )
        actual = self.actual_total
        if actual is None:
            if self.last_event_day is not None:
                end = day_date(self.cutoff_day + self.horizon_days)
                line += (
                    f" (a forecast only: the orders end on {day_date(self.last_event_day)}, "
                    f"before the horizon's last day {end})"
                )
            return line
        line += f"; they spent {actual:,.2f} {currency}"
        ref = self.model_predictions.get(REFERENCE)
        if actual > 0:
            line += f" (bias {total / actual - 1:+.1%}"
            if ref is not None and self.selection.champion != REFERENCE:
                line += f"; BG/NBD+GG {float(np.sum(ref)) / actual - 1:+.1%}"
            line += ")"
        return line


def _plural(n: int, word: str) -> str:
    return word if n == 1 else f"{word}s"


def backtest_events(
    events: pd.DataFrame,
    cutoff_day: int,
    horizon_days: int,
    *,
    candidates: list[str] | None = None,
    score_all: bool = False,
    progress: Progress = quiet,
) -> BacktestResult:
    """Select on the past, fit the champion on the past, forecast, and score on the future
    when the events cover it (the champion and the BG/NBD+GG reference; every candidate with
    ``score_all``)."""
    if horizon_days <= 0:
        raise DatasetError("the horizon must be a positive number of days")
    past = events[events["day"].to_numpy() <= cutoff_day]
    feats = purchasers_at(past, cutoff_day)
    if feats.empty:
        raise DatasetError(f"no purchase on or before the cutoff {day_date(cutoff_day)}")
    progress(
        f"{len(past):,} {_plural(len(past), 'event')} up to the cutoff, {len(feats):,} "
        f"{_plural(len(feats), 'customer')} to score"
    )
    last = int(events["day"].max())
    if last < cutoff_day:
        progress(
            f"the last event is on {day_date(last)}: the {cutoff_day - last} days from it to the "
            "cutoff count as days without orders"
        )
    selection = select_champion(past, cutoff_day, horizon_days, names=candidates, progress=progress)
    progress(f"champion: {selection.champion} ({selection.reason})")
    plan = selection.plan
    if note := plan.label_note():
        progress(note)

    future_complete = last >= cutoff_day + horizon_days
    if not future_complete and last > cutoff_day:
        progress(
            f"the events end on {day_date(last)}, before the horizon's last day "
            f"{day_date(cutoff_day + horizon_days)}: a forecast only, no out-of-sample figures"
        )
    names = [selection.champion]
    if future_complete:
        names += [REFERENCE, *(make_candidates(candidates) if score_all else [])]
        names = list(dict.fromkeys(names))
    models = make_candidates(names)
    supervised_ds = final_training_set(
        past, cutoff_day, horizon_days, selection.plan, True, progress=progress
    )
    unsup_ds = final_training_set(past, cutoff_day, horizon_days, selection.plan, False)
    actual = None
    if future_complete:
        actual, _ = window_labels(events, feats.index, cutoff_day, horizon_days)
    preds: dict[str, pd.DataFrame] = {}
    errors: dict[str, str] = {}
    table = {}

    def final_fit(name: str) -> None:
        """Fit ``name`` on the cutoff's snapshot and forecast: into ``preds``, or ``errors``."""
        model = models.setdefault(name, make_candidates([name])[name])
        supervised = name not in UNSUPERVISED and len(supervised_ds) > 0
        ds = supervised_ds if supervised else unsup_ds
        if not supervised and name not in UNSUPERVISED:
            errors[name] = (
                "too little history before the cutoff for a model that learns from labels"
            )
            return
        rows = len(ds) if supervised else len(ds.current)
        progress(f"final fit: {name} on {rows:,} rows")
        with heartbeat(progress, f"fitting {name} for the final fit"):
            scores, p = evaluate(
                {name: model},
                ds,
                feats,
                actual if actual is not None else np.zeros(len(feats)),
                horizon_days,
                quiet,
            )
        for line in scores[name].warnings:
            progress(f"final fit: {name} warned: {line}")
        if name not in p:
            progress(f"final fit: {name} failed: {scores[name].error}")
            errors[name] = str(scores[name].error)
            return
        preds[name] = p[name]
        if actual is not None:
            table[name] = scores[name].metrics

    for name in models:
        final_fit(name)
    if (failed := selection.champion) not in preds:
        # Selected on the inner cutoff, it may not fit on the cutoff's own snapshot (a refund
        # after the inner cutoff can leave Gamma-Gamma too few repeat buyers): the first
        # label-free candidate of the selection that can forecast takes its place, as in a
        # selection without validation.
        why = errors.get(failed, "unknown error")
        for name in selection.fallbacks():
            if name not in preds and name not in errors:
                final_fit(name)
            if name in preds:
                selection.fall_back(name, why)
                progress(f"final fit: {failed} failed, {name} forecasts instead")
                break
        else:
            raise ModelError(f"the champion {failed} could not be fitted: {why}")
    result = BacktestResult(
        cutoff_day=cutoff_day,
        horizon_days=horizon_days,
        predictions=preds[selection.champion][list(PREDICTION_COLUMNS)],
        champion=models[selection.champion],
        selection=selection,
        future_complete=future_complete,
        actual=actual,
        out_of_sample=pd.DataFrame(table).T[list(METRIC_NAMES)] if table else None,
        model_predictions={n: p["predicted_value"].to_numpy() for n, p in preds.items()},
        fitted_models={n: models[n] for n in preds},
        final_fit_errors=errors,
        last_event_day=last,
    )
    return result


#: Every file :func:`write_report` may write (with no ``img_prefix``): ``clv backtest`` removes
#: an earlier run's copies that this run does not replace, so no stale figure is left.
REPORT_FILES: tuple[str, ...] = (
    "validation_metrics.csv",
    "out_of_sample_metrics.csv",
    "validation_deciles.png",
    "validation_gain.png",
    "oos_deciles.png",
    "oos_gain.png",
    "tracking.png",
    "index.html",
)


#: Compressions of ``--out`` by its name (as ``--orders`` reads them).
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}


def _predictions_csv(predictions: pd.DataFrame, path: Path, target: Path) -> None:
    """Write the predictions to ``path``, compressed as the name of ``target`` (where the
    staging file ``path`` goes) says: pandas would read the staging name's."""
    out = predictions[list(PREDICTION_COLUMNS)].copy()
    out.index.name = "user_id"
    compression = _COMPRESSIONS.get(target.suffix.lower())
    out.to_csv(path, float_format="%.6f", compression=compression)


def write_predictions(predictions: pd.DataFrame, path: Path) -> Path:
    """``user_id,predicted_value,expected_orders,p_alive``, one row per user; written to a
    staging file renamed into place, so a failure leaves the previous file as it was."""
    with replaced_atomically(path) as staged:
        _predictions_csv(predictions, staged, path)
    return path


def tracking_curves(
    events: pd.DataFrame,
    result: BacktestResult,
    models: dict[str, CLVModel],
    features: pd.DataFrame,
    step_days: int = 7,
) -> tuple[list[int], np.ndarray, dict[str, np.ndarray]]:
    """Cumulative actual revenue of the scored users after the cutoff, and each model's
    forecast for the same number of days, every ``step_days`` from day 0 (nothing yet) to the
    horizon's last day."""
    H = result.horizon_days
    days = sorted({*range(0, H, step_days), H})
    users = set(features.index)
    ev = events[(events["day"] > result.cutoff_day) & events["user_id"].isin(users)]
    ev = ev.drop_duplicates(["user_id", "event_id"])
    rel = (ev["day"] - result.cutoff_day).to_numpy()
    cents = ev["cents"].to_numpy()
    actual = np.array([cents[rel <= d].sum() / 100.0 for d in days])
    pred = {
        name: np.array(
            [m.predict(features, d)["predicted_value"].sum() if d else 0.0 for d in days]
        )
        for name, m in models.items()
    }
    return days, actual, pred


def plotted_models(sel: Selection) -> list[str]:
    """The models the report's plots draw: the champion, BG/NBD+GG, and the runner-up (the
    other candidate best on the validation composite), so that a plot compares even when the
    reference stayed champion."""
    others = [
        s for s in sel.scores.values() if not s.error and s.name not in (sel.champion, REFERENCE)
    ]
    runner_up = [max(others, key=lambda s: s.score).name] if others else []
    return list(dict.fromkeys([sel.champion, REFERENCE, *runner_up]))


def write_report(
    events: pd.DataFrame,
    result: BacktestResult,
    report_dir: Path,
    title: str = "",
    img_prefix: str = "",
    currency: str = "USD",
) -> list[Path]:
    """Metrics tables, plots and ``index.html`` under ``report_dir`` (see :data:`REPORT_FILES`;
    ``clv backtest`` writes them to a staging directory and moves them in when all are done)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    sel = result.selection
    files: list[Path] = []
    images: list[Path] = []
    val = sel.table()
    val.to_csv(report_dir / "validation_metrics.csv", index_label="model")
    files.append(report_dir / "validation_metrics.csv")
    shown = plotted_models(sel)
    roles = {REFERENCE: "reference", sel.champion: "champion"}
    if sel.champion == REFERENCE:
        roles[REFERENCE] = "champion, reference"

    def labelled(preds: dict[str, T]) -> dict[str, T]:  # the plots' legends and titles
        return {f"{n} ({roles.get(n, 'runner-up')})": p for n, p in preds.items()}

    if sel.val_actual is not None and sel.val_predictions:
        vp = labelled({n: sel.val_predictions[n] for n in shown if n in sel.val_predictions})
        images.append(
            decile_plot(
                sel.val_actual,
                vp,
                report_dir / f"{img_prefix}validation_deciles.png",
                "Internal validation: decile calibration",
                currency,
            )
        )
        images.append(
            gain_plot(
                sel.val_actual,
                vp,
                report_dir / f"{img_prefix}validation_gain.png",
                "Internal validation: gain curve",
            )
        )
    tables = {"Internal validation (every candidate, data before the cutoff only)": val}
    if result.out_of_sample is not None and result.actual is not None:
        result.out_of_sample.to_csv(report_dir / "out_of_sample_metrics.csv", index_label="model")
        files.append(report_dir / "out_of_sample_metrics.csv")
        tables["Out of sample (against the actual revenue after the cutoff)"] = result.out_of_sample
        op = labelled(
            {n: result.model_predictions[n] for n in shown if n in result.model_predictions}
        )
        images.append(
            decile_plot(
                result.actual,
                op,
                report_dir / f"{img_prefix}oos_deciles.png",
                "Out of sample: decile calibration",
                currency,
            )
        )
        images.append(
            gain_plot(
                result.actual,
                op,
                report_dir / f"{img_prefix}oos_gain.png",
                "Out of sample: gain curve",
            )
        )
        fitted = result.fitted_models
        feats = purchasers_at(events[events["day"] <= result.cutoff_day], result.cutoff_day)
        days, act, pred = tracking_curves(
            events, result, {n: fitted[n] for n in shown if n in fitted}, feats
        )
        tracking = report_dir / f"{img_prefix}tracking.png"
        images.append(tracking_plot(days, act, labelled(pred), tracking, currency=currency))
    cutoff = day_date(result.cutoff_day)
    inner = "-" if sel.inner_cutoff_day is None else day_date(sel.inner_cutoff_day)
    notes = [
        f"Cutoff {cutoff}, horizon {result.horizon_days} days, "
        f"{len(result.predictions):,} {_plural(len(result.predictions), 'customer')} scored; "
        f"amounts in {currency}.",
        f"Champion: {sel.champion} ({sel.reason}).",
        f"Validation: fitted on data up to {inner}, "
        f"scored on the following {sel.plan.val_days} days; final label window "
        f"{sel.plan.label_days} days (history {sel.plan.history_days} days).",
    ]
    forecast_total = result.forecast_total
    if not result.future_complete:
        notes.append(
            f"The champion's forecast total for the horizon: {forecast_total:,.2f} {currency}. "
            "The file does not cover the whole horizon after the cutoff: no out-of-sample figures."
        )
    else:
        actual_total = result.actual_total or 0.0
        vs = f" ({forecast_total / actual_total - 1:+.1%})" if actual_total > 0 else ""
        notes.append(
            f"The champion's forecast total for the horizon: {forecast_total:,.2f} {currency}, "
            f"against {actual_total:,.2f} {currency} actually spent by these customers{vs}."
        )
        notes.append(
            "Out of sample, each candidate is scored as if it had been chosen; the champion was "
            "picked on the internal validation alone, before any of it."
        )
    for name, why in result.final_fit_errors.items():
        notes.append(f"{name}: no forecast ({why}).")
    if images:
        labels = [f"{n} ({roles.get(n, 'runner-up on the validation composite')})" for n in shown]
        notes.append(f"The plots show {', '.join(labels)}.")
    page = write_html(
        report_dir / "index.html", title or f"CLV backtest {cutoff}", notes, tables, images
    )
    return [*files, *images, page]


def run_backtest(
    orders_path: str | Path,
    fmt: OrdersFormat,
    cutoff: dt.date,
    horizon_days: int,
    out_csv: str | Path,
    report_dir: str | Path | None = None,
    progress: bool | Progress = True,
    *,
    candidates: list[str] | None = None,
    currency: str = "USD",
) -> BacktestResult:
    """The ``clv backtest`` command's work: read, select, fit, forecast, write (with one
    thread per numeric pool unless the environment sets them, :mod:`training.threads`).
    ``progress``: a callable for the progress lines, or whether to print them on stderr."""
    threads.one_thread_unless_set()  # in the thread that fits: OpenMP's limit is per thread
    say = resolve(progress, "backtest")
    say(f"reading {orders_path} ({fmt})")
    events = load_orders(orders_path, fmt, currency=currency)
    result = backtest_events(
        events,
        day_number(cutoff),
        horizon_days,
        candidates=candidates,
        score_all=report_dir is not None,  # a report compares every candidate after the cutoff
        progress=say,
    )
    out = Path(out_csv)
    if report_dir is None:
        write_predictions(result.predictions, out)
    else:
        result.report_files = _write_outputs(events, result, out, Path(report_dir), currency)
        say(f"wrote the report to {report_dir}/index.html")
    n = len(result.predictions)
    say(f"wrote {n:,} {_plural(n, 'prediction')} to {out_csv}")
    return result


def check_report_targets(report_dir: Path) -> None:
    """Refuse a report directory where a name the report writes is taken by a directory,
    which a rename cannot replace."""
    for name in REPORT_FILES:
        target = report_dir / name
        if target.is_dir() and not target.is_symlink():
            raise ClvError(f"--report: {target} is a directory; remove it first")


def _write_outputs(
    events: pd.DataFrame, result: BacktestResult, out: Path, report_dir: Path, currency: str
) -> list[Path]:
    """The report and the predictions, all written to staging names first and renamed into
    place only when every one of them is complete and every target can take a file: a failure
    while writing changes neither output. The report is staged inside its own directory, so
    the renames never cross a file system (the directory may be a mount point) and its parent
    need not be writable."""
    report_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        commit = stack.enter_context(contextlib.ExitStack())  # closed last: after the CSV rename
        staging = stack.enter_context(staging_dir(report_dir, ".staging."))
        staged_csv = stack.enter_context(replaced_atomically(out))  # renamed last
        _predictions_csv(result.predictions, staged_csv, out)
        staged = write_report(events, result, staging, currency=currency)
        check_report_targets(report_dir)
        # From the first removal to the CSV's rename, SIGTERM waits: cut short, it would leave
        # a mix of the earlier run's outputs and this one's.
        commit.enter_context(interruptions_deferred())
        for name in REPORT_FILES:  # the earlier run's files, where this run has none
            old = report_dir / name
            if old.is_file() and not (staging / name).exists():
                old.unlink()
        for f in staged:
            f.replace(report_dir / f.name)
    return [report_dir / f.name for f in staged]
