"""Champion selection by time-split validation on data at or before the cutoff only.

The history before the cutoff is split once more: candidates are fitted on examples whose
labels end by an inner cutoff and scored on what happened between the inner cutoff and the
cutoff. Windows shrink when the history is short (labels are then rescaled to the horizon), and
with too little history only the label-free candidates compete.

A candidate wins only if it meets the project's targets against the BG/NBD+GG reference on the
validation window (better Gini and decile MAPE, at most 2 % worse RMSE and MAE, total bias
within ±10 % or no worse than the reference's); among those, the best composite score wins.
Otherwise the reference stays champion.

Decile MAPE is compared at a common level (each model's predictions scaled to the actual
total, :func:`~training.metrics.level_adjusted_decile_mape`): a validation window's total is
dominated by seasonality that no candidate models (CDNOW's autumn window runs 19 % above
BG/NBD), and that shared level error would otherwise swamp the calibration of *who* gets how
much, which is what differs between candidates. The level itself is judged by the bias gate.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
import pandas as pd

from clv.errors import ClvError, one_line
from feature_store.features import day_date
from training.datasets import build_training_set, history_days, purchasers_at, window_labels
from training.metrics import all_metrics
from training.models.base import CLVModel, TrainingSet
from training.models.candidates import REFERENCE, UNSUPERVISED, make_candidates
from training.progress import Progress, heartbeat, quiet

#: The youngest training cutoff is at least this many days after the first purchase.
MIN_TRAIN_HISTORY_DAYS = 30
#: Label windows shorter than this teach nothing; only label-free models compete then.
MIN_LABEL_DAYS = 14
RMSE_TOLERANCE = 0.02
BIAS_LIMIT = 0.10
BIAS_ROUNDING = 1e-6  # a model anchored to the reference's total has its bias up to this


@dataclass(frozen=True)
class WindowPlan:
    """How the history before a cutoff is used.

    ``label_days``: label window of the final training set (``<= horizon``);
    ``val_days``: the internal validation window, ending at the cutoff;
    ``supervised``: whether the history allows models that learn from labels at all.
    """

    history_days: int
    horizon_days: int
    label_days: int
    val_days: int

    @property
    def supervised(self) -> bool:
        return self.label_days >= MIN_LABEL_DAYS and self.val_days >= MIN_LABEL_DAYS

    @property
    def short_history(self) -> bool:
        return self.label_days < self.horizon_days

    def label_note(self) -> str | None:
        """What a user should know when labels are shorter than the horizon, else ``None``."""
        if not (self.short_history and self.supervised):
            return None
        note = (
            f"models that learn from labels saw {self.label_days}-day label windows (at most two "
            f"thirds of the {self.history_days}-day history, so that each training cutoff has "
            f"history behind it), scaled to the {self.horizon_days}-day horizon "
            f"(x{self.horizon_days / self.label_days:.2f})"
        )
        if self.history_days < self.horizon_days:
            note += "; the horizon is longer than the history: treat it as extrapolation"
        return note


def plan_windows(history: int, horizon_days: int) -> WindowPlan:
    """Windows for a history of ``history`` days before the cutoff.

    The final fit's label windows span at most two thirds of the history (and the horizon), so
    its latest training cutoff keeps a third of the history behind it. With at least two
    horizons of history, validation scores a whole horizon, fitted on horizon-long labels
    before it; otherwise validation and its fits use half the final window each, so the
    validated fits are trained on cutoffs of the same age as the final fit's.
    """
    usable = max(history - MIN_TRAIN_HISTORY_DAYS, 0)
    label = min(horizon_days, 2 * history // 3, usable)
    val = horizon_days if usable >= 2 * horizon_days else label // 2
    return WindowPlan(history, horizon_days, label, val)


def training_set(
    events: pd.DataFrame,
    cutoff_day: int,
    horizon_days: int,
    label_days: int,
    *,
    n_cutoffs: int = 4,
    step_days: int = 30,
    progress: Progress | None = None,
) -> TrainingSet:
    """Stacked examples for a fit that may use events up to ``cutoff_day``."""
    return build_training_set(
        events,
        cutoff_day,
        horizon_days,
        label_days=label_days,
        n_cutoffs=n_cutoffs,
        step_days=step_days,
        min_history_days=MIN_TRAIN_HISTORY_DAYS,
        progress=progress,
    )


@dataclass
class CandidateScore:
    name: str
    metrics: dict[str, float]
    seconds: float
    error: str | None = None
    qualifies: bool = False
    score: float = float("-inf")
    #: what the libraries warned about while fitting and predicting (one line each, no repeats)
    warnings: list[str] = field(default_factory=list)
    #: the targets against the reference it missed on validation, with both figures
    missed: list[str] = field(default_factory=list)


@dataclass
class Selection:
    """The outcome: the champion's name, why, and every candidate's validation figures."""

    champion: str
    reason: str
    plan: WindowPlan
    inner_cutoff_day: int | None
    scores: dict[str, CandidateScore] = field(default_factory=dict)
    val_actual: np.ndarray | None = field(default=None, repr=False)
    val_predictions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def fallbacks(self) -> list[str]:
        """The label-free candidates of this selection that may stand in, in turn, for a
        champion whose final fit failed (:func:`fallback_order`, the champion left out)."""
        return [
            n for n in fallback_order(list(self.scores)) if n in self.scores and n != self.champion
        ]

    def fall_back(self, name: str, why: str) -> None:
        """``name`` forecasts in place of the champion, whose final fit failed for ``why``."""
        self.reason += f"; the final fit of {self.champion} failed ({why}), so {name} forecasts"
        self.champion = name

    def table(self) -> pd.DataFrame:
        rows = {
            n: {
                **s.metrics,
                # the reference is the yardstick: it neither qualifies nor misses
                "qualifies": "reference" if n == REFERENCE else s.qualifies,
                "missed": "; ".join(s.missed),
                "score": s.score if math.isfinite(s.score) else math.nan,  # no figures: empty
                "seconds": s.seconds,
                "error": s.error or "",
            }
            for n, s in self.scores.items()
        }
        return pd.DataFrame(rows).T


def _bias_allowance(ref: dict[str, float]) -> float:
    """The total bias a challenger may have: the limit, or the reference's own if larger."""
    return max(BIAS_LIMIT, abs(ref["bias"]))


def missed_targets(m: dict[str, float], ref: dict[str, float]) -> list[str]:
    """The targets ``m`` misses against the reference's figures on the same window, each with
    both figures, so a user sees why a candidate with a better score was not chosen; empty
    when it meets them all."""
    unusable = [k for k in ("rmse", "mae", "gini", "bias") if not math.isfinite(m.get(k, math.nan))]
    if unusable:
        return [f"{', '.join(unusable)} not a finite number"]
    missed = []
    if not m["gini"] > ref["gini"]:
        missed.append(f"Gini {m['gini']:.4f} not above {ref['gini']:.4f}")
    key = "decile_mape_level"
    if math.isfinite(ref[key]) and not m[key] < ref[key]:
        missed.append(f"level-adjusted decile MAPE {m[key]:.4f} not below {ref[key]:.4f}")
    for k, label in (("rmse", "RMSE"), ("mae", "MAE")):
        if not m[k] <= ref[k] * (1 + RMSE_TOLERANCE):
            missed.append(
                f"{label} {m[k]:.4g} more than {RMSE_TOLERANCE:.0%} above {ref[k]:.4g} "
                + (f"({m[k] / ref[k] - 1:+.2%})" if ref[k] else "(the reference's is 0)")
            )
    allowance = _bias_allowance(ref)
    if not abs(m["bias"]) <= allowance + BIAS_ROUNDING:
        widened = f" (the reference's own; the target is ±{BIAS_LIMIT:.0%})"
        missed.append(
            f"total bias {m['bias']:+.2%} outside ±{allowance:.2%}"
            + (widened if allowance > BIAS_LIMIT else "")
        )
    return missed


def qualifies(m: dict[str, float], ref: dict[str, float]) -> bool:
    """Meets the targets against the reference's figures on the same window."""
    return not missed_targets(m, ref)


def composite_score(m: dict[str, float], ref: dict[str, float]) -> float:
    """Sum of relative improvements over the reference (Gini, level-adjusted decile MAPE, RMSE,
    MAE), less a penalty for total bias beyond the limit (or the reference's own bias, if
    larger). Higher is better; the reference scores 0. A reference figure that is not a number
    (a level-adjusted decile MAPE when it forecast no revenue) leaves its term out, as the
    targets leave that comparison out."""

    def rel(better: float, worse: float) -> float:
        return (worse - better) / abs(worse) if worse and math.isfinite(worse) else 0.0

    s = (
        rel(-m["gini"], -ref["gini"])
        + rel(m["decile_mape_level"], ref["decile_mape_level"])
        + rel(m["rmse"], ref["rmse"])
        + rel(m["mae"], ref["mae"])
        - 5.0 * max(abs(m["bias"]) - _bias_allowance(ref), 0.0)
    )
    return float(s) if math.isfinite(s) else float("-inf")


@contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """Collect the warnings this thread raises inside as distinct one-line messages instead of
    printing them.

    Fitting on a small history makes scikit-learn warn (a GLM solver that stops early, a forest
    bootstrap of a few rows): worth keeping with the candidate's figures, not printing past
    ``--quiet`` as multi-line noise on stderr. Only those notes are taken (``UserWarning``, which
    scikit-learn's warnings derive from, and numpy's ``RuntimeWarning``): a ``FutureWarning`` or
    ``DeprecationWarning`` about how this code calls a library still follows the process's
    filters (an error under the test suite's). Warnings of other threads (an event loop sharing
    the process) are shown as before, not taken for the fit's."""
    found: list[str] = []
    owner = threading.get_ident()
    with warnings.catch_warnings():  # restores the filters and the printing hook on the way out
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("always", RuntimeWarning)
        show = warnings.showwarning

        def record(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if threading.get_ident() != owner:
                show(message, category, filename, lineno, file, line)
                return
            note = f"{category.__name__}: {one_line(message)}"
            if note not in found:
                found.append(note)

        warnings.showwarning = record
        yield found


def evaluate(
    models: dict[str, CLVModel],
    ds: TrainingSet,
    features: pd.DataFrame,
    actual: np.ndarray,
    horizon_days: int,
    progress: Progress = quiet,
    stage: str = "",
) -> tuple[dict[str, CandidateScore], dict[str, pd.DataFrame]]:
    """Fit every model on ``ds`` and score its predictions for ``features`` against
    ``actual``. A candidate that fails is recorded with its error, not fatal."""
    scores: dict[str, CandidateScore] = {}
    preds: dict[str, pd.DataFrame] = {}
    beat: Progress = (lambda line: progress(stage + line)) if progress is not quiet else quiet
    for i, (name, model) in enumerate(models.items(), 1):
        progress(f"{stage}fitting {name} ({i}/{len(models)}) on {len(ds):,} rows")
        t0 = time.perf_counter()
        try:
            with recorded_warnings() as warned, heartbeat(beat, f"fitting {name}"):
                model.fit(ds)
                p = model.predict(features, horizon_days)
        except (ClvError, ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
            why = one_line(exc)
            scores[name] = CandidateScore(name, {}, time.perf_counter() - t0, why, warnings=warned)
            progress(f"{stage}{name} failed: {why}")
            continue
        for line in warned:
            progress(f"{stage}{name} warned: {line}")
        preds[name] = p
        m = all_metrics(actual, p["predicted_value"].to_numpy())
        scores[name] = CandidateScore(name, m, time.perf_counter() - t0, warnings=warned)
    return scores, preds


def select_champion(
    events: pd.DataFrame,
    cutoff_day: int,
    horizon_days: int,
    *,
    names: list[str] | None = None,
    progress: Progress = quiet,
) -> Selection:
    """Pick the champion for forecasting ``horizon_days`` after ``cutoff_day`` using only
    events dated on or before ``cutoff_day``."""
    events = events[events["day"].to_numpy() <= cutoff_day]
    plan = plan_windows(history_days(events, cutoff_day), horizon_days)
    names = list(make_candidates(names)) if names is None else names
    skipped: dict[str, str] = {}  # candidates left out, and why: listed with the scores
    if not plan.supervised:
        skipped = {
            n: f"needs label and validation windows of {MIN_LABEL_DAYS}+ days (here "
            f"{plan.label_days} and {plan.val_days})"
            for n in names
            if n not in UNSUPERVISED
        }
        names = [n for n in names if n in UNSUPERVISED]
    if REFERENCE not in names:
        names = [REFERENCE, *names]
    if plan.val_days < 1:
        sel = _unvalidated(events, cutoff_day, horizon_days, names, plan)
        sel.scores.update(_skipped_scores(skipped))
        return sel
    inner = cutoff_day - plan.val_days
    try:
        ds = training_set(events, inner, plan.val_days, plan.val_days)  # (val <= label always)
    except ClvError as exc:
        # not even one labelled cutoff: the label-free models can still be compared
        skipped |= {n: f"no labelled training rows: {exc}" for n in names if n not in UNSUPERVISED}
        names = [n for n in names if n in UNSUPERVISED]
        ds = _unlabelled(events, inner, plan.val_days)
    feats = ds.current  # everyone with a purchase by the inner cutoff: who validation scores
    actual, _ = window_labels(events, feats.index, inner, plan.val_days)
    progress(
        f"validation: fit on orders up to {day_date(inner)}, score the next {plan.val_days} days "
        f"({len(feats):,} customers)"
    )
    scores, preds = evaluate(
        make_candidates(names), ds, feats, actual, plan.val_days, progress, "validation: "
    )
    scores |= _skipped_scores(skipped)
    kept = {n: p["predicted_value"].to_numpy() for n, p in preds.items()}
    ref = scores.get(REFERENCE)
    if ref is None or ref.error:
        ok = {n: s for n, s in scores.items() if not s.error}
        if not ok:
            raise ClvError("no candidate model could be fitted")
        best = min(ok, key=lambda n: ok[n].metrics["rmse"])
        return Selection(
            best, "reference failed; lowest validation RMSE", plan, inner, scores, actual, kept
        )
    for s in scores.values():
        if not s.error:
            s.missed = [] if s.name == REFERENCE else missed_targets(s.metrics, ref.metrics)
            s.qualifies = s.name != REFERENCE and not s.missed
            s.score = composite_score(s.metrics, ref.metrics)
    ref.score = 0.0
    # A winner meets the targets and is better on balance (the reference scores 0), so ranking
    # by the composite alone, as promotion does, agrees with this choice.
    winners = [s for s in scores.values() if s.qualifies and s.score > 0]
    if not winners:
        met = any(s.qualifies for s in scores.values())
        why = (
            "candidates met the targets against BG/NBD+GG on validation but none beat it on "
            "the composite score"
            if met
            else "no candidate met the targets against BG/NBD+GG on validation"
        )
        if refused := _best_refused(scores, above=0.0):
            why += f"; best on the composite: {refused.name} ({refused.score:+.3f}), which "
            why += "missed " + "; ".join(refused.missed)
        return Selection(
            REFERENCE,
            why,
            plan,
            inner,
            scores,
            actual,
            kept,
        )
    top = max(winners, key=lambda s: s.score)
    n_met = sum(s.qualifies for s in scores.values())
    why = (
        f"the only candidate to meet the targets against BG/NBD+GG (composite {top.score:+.3f})"
        if n_met == 1
        else f"met the targets against BG/NBD+GG with the best composite score of the {n_met} "
        f"that did ({top.score:+.3f})"
    )
    if refused := _best_refused(scores, above=top.score):
        why += f"; {refused.name} scored higher ({refused.score:+.3f}) but missed "
        why += "; ".join(refused.missed)
    return Selection(
        top.name,
        why,
        plan,
        inner,
        scores,
        actual,
        kept,
    )


def _best_refused(scores: dict[str, CandidateScore], above: float) -> CandidateScore | None:
    """The candidate a user would ask about: the best on the composite above the choice's
    score, yet refused for the targets it missed (``None`` when there is none)."""
    refused = [s for s in scores.values() if s.missed and s.score > above]
    return max(refused, key=lambda s: s.score) if refused else None


def _skipped_scores(skipped: dict[str, str]) -> dict[str, CandidateScore]:
    """Rows for the candidates the history left out, so every candidate is accounted for."""
    return {n: CandidateScore(n, {}, 0.0, f"not fitted: {why}") for n, why in skipped.items()}


def fallback_order(names: list[str]) -> list[str]:
    """The label-free models a forecast falls back to, in turn, when the one chosen cannot
    forecast: the reference, then the other label-free candidates among ``names``."""
    return [REFERENCE, *(n for n in names if n in UNSUPERVISED and n != REFERENCE)]


def _unvalidated(
    events: pd.DataFrame, cutoff_day: int, horizon_days: int, names: list[str], plan: WindowPlan
) -> Selection:
    """No history to validate on: the reference, or when it cannot forecast from so little (a
    few days hold no repeat buyer for Gamma-Gamma) the first other label-free candidate that
    can, so a forecast is still made."""
    ds = _unlabelled(events, cutoff_day, horizon_days)
    why = "no history before the cutoff to validate on"
    failures = []
    for name in fallback_order(names):
        try:  # a forecast, not only a fit: BG/NBD+GG refuses non-finite values at predict
            with recorded_warnings() as warned:
                make_candidates([name])[name].fit(ds).predict(ds.current, horizon_days)
        except (ClvError, ValueError, ArithmeticError) as exc:
            failures.append(f"{name}: {one_line(exc)}")
            continue
        failures += [f"{name} warned: {w}" for w in warned]
        if failures:
            why += f"; {'; '.join(failures)}"
        return Selection(name, why, plan, None)
    raise ClvError(f"{why}, and no label-free model could be fitted ({'; '.join(failures)})")


def _unlabelled(events: pd.DataFrame, as_of_day: int, horizon_days: int) -> TrainingSet:
    """A training set with no labelled rows, only the latest snapshot (label-free models)."""
    current = purchasers_at(events, as_of_day)
    empty = np.zeros(0, dtype=np.int64)
    return TrainingSet(
        features=current.iloc[:0],
        cutoff_day=empty,
        label=empty.astype(np.float64),
        label_orders=empty,
        label_days=empty,
        horizon_days=horizon_days,
        as_of_day=as_of_day,
        current=current,
    )


def final_training_set(
    events: pd.DataFrame,
    cutoff_day: int,
    horizon_days: int,
    plan: WindowPlan,
    supervised: bool,
    progress: Progress | None = None,
) -> TrainingSet:
    """The training set of the champion's final fit (all history up to the cutoff)."""
    events = events[events["day"].to_numpy() <= cutoff_day]
    if supervised and plan.supervised:
        try:
            return training_set(
                events, cutoff_day, horizon_days, plan.label_days, progress=progress
            )
        except ClvError:
            pass
    return _unlabelled(events, cutoff_day, horizon_days)
