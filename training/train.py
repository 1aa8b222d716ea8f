"""``clv train``: event log -> champion selection -> registered model -> promoted if it wins.

The cutoff is the latest event day in the log; the horizon is ``CLV_HORIZON_DAYS``, shortened
to the history's length when the log is younger than that (a forecast further out than
anything observed cannot be validated). Selection (:mod:`training.selection`) picks the
challenger on a time split before the cutoff; the registry promotes it only if it beats the
champion on the challenger's validation window (:mod:`training.registry`).

At scale, the event table is first compacted (string ids -> integer codes: the models never
see ids) and, above ``max_users`` customers, selection and the final fit use a uniform sample
of customers with all their events (the BTYD likelihood and the regressors' losses are means
over customers, so a 200k-customer sample estimates them to well under the noise between
validation windows). The sample is drawn with a seed derived from the data, so retraining on
the same log gives the same model.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from clv.errors import ClvError, ModelError, Terminated
from clv.files import interruptions_deferred, stops_unwind
from clv.orphans import die_with_parent
from clv.settings import Settings, settings_error
from training import threads
from training.registry import (
    ChampionScore,
    DataWindow,
    Decision,
    Evaluate,
    LoadedModel,
    ModelRegistry,
    Validation,
    library_versions,
)

log = logging.getLogger(__name__)

#: Above this many customers, selection uses a sample of customers (the champion's final fit
#: always uses every customer).
DEFAULT_MAX_USERS = 50_000
#: Candidates left out (unless asked for by name) when selecting on more customers than
#: SLOW_CANDIDATES_MAX_USERS: on a 30k-customer synthetic log they cost 2-3x the histogram
#: booster and lost to it and to both BTYD hybrids on validation (composite -0.99 and -2.61
#: vs -0.70, +0.31, +0.57), so at scale they spend minutes to lose.
SLOW_CANDIDATES: tuple[str, ...] = ("random_forest", "gradient_boosting")
SLOW_CANDIDATES_MAX_USERS = 20_000
#: A long horizon is never shortened below this (days); a shorter one is kept as asked.
MIN_HORIZON_DAYS = 7
COMPOSITE = "composite_vs_bgnbd_gg"

Say = Callable[[str], None]


class TrainingError(ClvError):
    """Training cannot run (no events, no history)."""


@dataclass(frozen=True)
class TrainResult:
    version: str
    promoted: bool
    decision: Decision
    champion_version: str | None
    model_name: str
    selection_reason: str
    cutoff_day: int
    horizon_days: int
    requested_horizon_days: int
    events: int
    users: int
    sampled_users: int
    validation: Validation
    candidates: dict[str, dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    #: Nothing was trained: ``version`` was already trained on this log with the same inputs.
    skipped: bool = False

    def summary(self) -> str:
        """One line: what was registered, whether it became the champion and why."""
        head = f"model {self.version} ({self.model_name})"
        if self.skipped:
            return (
                f"nothing to train: {head} was trained on this same event log with the same "
                f"code, libraries and settings; the champion is {self.champion_version} "
                "(`clv train --again` trains anyway)"
            )
        if self.promoted:
            return f"{head} promoted to champion: {self.decision.reason}"
        return (
            f"{head} registered, not promoted: {self.decision.reason}; "
            f"the champion stays {self.champion_version}"
        )


# --- preparing the event table ----------------------------------------------------------------


def compact_events(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.Index]:
    """The columns training reads, with integer user ids (group-bys 2-5x faster than on
    strings), and the user ids the codes stand for.

    Codes follow the sorted user ids and rows are put in one canonical order (user, time,
    amount, type), so the same events give the same training set and the same model however
    the log's files happen to be laid out: row order reaches the models (the histogram
    boosters' early-stopping split is drawn by position).

    ``events`` must already be deduplicated by ``event_id`` (``read_events`` does that).
    """
    codes, uniques = pd.factorize(events["user_id"], sort=True)
    ts_ms = events["ts_ms"].to_numpy(np.int64)
    cents = events["cents"].to_numpy(np.int64)
    kind = pd.Categorical(events["type"], categories=["purchase", "refund"])
    order = np.lexsort((kind.codes, cents, ts_ms, codes))  # the last key sorts first
    compact = pd.DataFrame(
        {
            "event_id": np.arange(len(events), dtype=np.int64),
            "type": kind[order],
            "user_id": codes[order].astype(np.int64),
            "ts_ms": ts_ms[order],
            "day": events["day"].to_numpy(np.int64)[order],
            "cents": cents[order],
        }
    )
    return compact, pd.Index(uniques)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread uint64 per input (vectorised)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def compact_fingerprint(compact: pd.DataFrame, user_ids: pd.Index) -> str:
    """sha256 over the training content (user id, type, time, signed cents) of every event,
    independent of row order (the log's file layout may change; its content is what counts)."""
    user_hash = pd.util.hash_pandas_object(user_ids, index=False).to_numpy()
    codes = compact["user_id"].to_numpy()
    with np.errstate(over="ignore"):
        row = user_hash[codes] if len(codes) else np.zeros(0, dtype=np.uint64)
        row = _mix(row ^ _mix(compact["ts_ms"].to_numpy(np.int64).view(np.uint64)))
        row = _mix(row ^ _mix(compact["cents"].to_numpy(np.int64).view(np.uint64)))
        row = _mix(row ^ compact["type"].cat.codes.to_numpy().astype(np.uint64))
        total = int(row.sum(dtype=np.uint64))
        xor = int(np.bitwise_xor.reduce(row)) if len(row) else 0
    return hashlib.sha256(f"{len(row)}:{total}:{xor}".encode()).hexdigest()


def data_fingerprint(events: pd.DataFrame) -> str:
    """:func:`compact_fingerprint` of an event table."""
    return compact_fingerprint(*compact_events(events))


def code_fingerprint() -> str:
    """sha256 over the source of the code a model comes from (the training and feature
    packages: each module's path and bytes), so a changed model or feature definition counts
    as new inputs. Hidden files (an editor's lock link, ``.#train.py``) are not source."""
    import feature_store
    import training

    digest = hashlib.sha256()
    for package in (training, feature_store):
        root = Path(package.__file__ or "").resolve().parent
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root.parent)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            digest.update(f"{rel.as_posix()}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def training_inputs(
    settings: Settings, *, candidates: list[str] | None, max_users: int
) -> dict[str, Any]:
    """What decides a model besides the event log: recorded with every version (``extra.inputs``)
    so a run whose log and inputs match a registered version's can skip the work."""
    from clv import __version__

    return {
        "clv": __version__,
        "code_sha256": code_fingerprint(),
        "libraries": library_versions(),
        "requested_horizon_days": settings.horizon_days,
        "currency": settings.currency,
        "candidates": None if candidates is None else list(candidates),
        "max_users": max_users,
    }


def choose_horizon(history_days: int, requested: int) -> int:
    """``requested``, or the history's length when that is shorter; shortening stops at a week
    (a shorter request is kept as asked)."""
    return min(requested, max(history_days, MIN_HORIZON_DAYS))


def sample_users(
    compact: pd.DataFrame, n_users: int, max_users: int, seed: int
) -> tuple[pd.DataFrame, int]:
    """All events of a uniform sample of ``max_users`` customers (the table itself if fewer)."""
    if n_users <= max_users:
        return compact, n_users
    rng = np.random.default_rng(seed)
    keep = np.zeros(n_users, dtype=bool)
    keep[rng.choice(n_users, size=max_users, replace=False)] = True
    return compact[keep[compact["user_id"].to_numpy()]].reset_index(drop=True), max_users


# --- training -------------------------------------------------------------------------------


class _Clock:
    """Per-phase wall times, announced to ``say`` and an optional phase hook."""

    def __init__(self, say: Say, on_phase: Callable[[str], None] | None) -> None:
        self.say, self.on_phase = say, on_phase
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.on_phase:
            self.on_phase(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - start
            self.say(f"{name}: {self.timings[name]:.1f}s")
            if self.on_phase:
                self.on_phase("")


def _score_on(candidate: Any, metric: str) -> float:
    """A selection candidate's validation score on ``metric`` (the composite or a raw metric)."""
    return float(candidate.score if metric == COMPOSITE else candidate.metrics[metric])


def _validation(selection: Any, fingerprint: str) -> Validation:
    """The challenger's promotion yardstick: the selection's composite score against the
    BG/NBD+GG reference on the validation window (RMSE when the reference failed)."""
    from training.metrics import HIGHER_IS_BETTER
    from training.selection import REFERENCE

    score = selection.scores.get(selection.champion)
    ref = selection.scores.get(REFERENCE)
    users = 0 if selection.val_actual is None else len(selection.val_actual)
    inner = selection.inner_cutoff_day
    window = Validation(
        metric=COMPOSITE,
        higher_is_better=True,
        score=float("nan"),  # nothing validated (no history before the cutoff)
        train_end_day=-1 if inner is None else int(inner),
        label_days=int(selection.plan.val_days),
        users=users,
        data_fingerprint=fingerprint,
    )
    if score is None or score.error:
        return window
    if ref is None or ref.error:
        window = replace(window, metric="rmse", higher_is_better=HIGHER_IS_BETTER["rmse"])
    elif score.missed:
        # A label-free model that took the place of a champion whose final fit failed, though
        # the selection refused it for the targets it missed: it ranks below the reference, as
        # a stored champion that misses them does (_champion_evaluator), so it is promoted only
        # where there is no champion to keep.
        return replace(window, score=float("-inf"))
    return replace(window, score=_score_on(score, window.metric))


def _check_model_dir(root: Path) -> None:
    """:meth:`ModelRegistry.check_writable`, as a training error."""
    try:
        ModelRegistry(root).check_writable()
    except ModelError as exc:
        raise TrainingError(str(exc)) from exc


def _check_forecasts(model: Any, ds: Any) -> None:
    """The final fit forecasts every customer of its snapshot (it is fitted
    on more users than the validated fits, so it is checked before it can be registered)."""
    try:  # predict refuses non-finite forecasts (prediction_frame)
        model.predict(ds.current, ds.horizon_days)
    except ModelError as exc:
        raise TrainingError(f"the final fit cannot forecast: {exc}") from exc


def _label_free_fallback(
    selection: Any, events: pd.DataFrame, cutoff: int, horizon: int, exc: Exception, say: Say
) -> tuple[Any, list[str]]:
    """The challenger was selected on the inner cutoff and its final fit failed on the
    cutoff's snapshot (a refund after the inner cutoff can leave Gamma-Gamma too few repeat
    buyers): the first label-free model that can forecast takes its place, as in a selection
    without validation; ``selection`` is updated to name it."""
    from clv.errors import one_line
    from training.models.candidates import make_candidates
    from training.selection import final_training_set, recorded_warnings

    failed, why = selection.champion, one_line(exc)
    ds = final_training_set(events, cutoff, horizon, selection.plan, supervised=False)
    for name in selection.fallbacks():  # only the candidates asked for
        model = make_candidates([name])[name]
        try:
            with recorded_warnings() as warned:
                model.fit(ds)
                _check_forecasts(model, ds)
        except (ClvError, ValueError, ArithmeticError):
            continue
        say(f"final fit of {failed} failed ({why}): {name} takes its place")
        selection.fall_back(name, why)
        return model, warned
    if isinstance(exc, ClvError):
        raise exc
    # (one line, as every other refusal: a ValueError of the model's is no traceback)
    raise TrainingError(
        f"the final fit of {failed} failed ({why}) and no label-free candidate could take its place"
    ) from exc


def _check_times(raw: pd.DataFrame, root: Path, tolerance: int) -> None:
    """Refuse a log holding a time the consumers refuse, so one they did not write."""
    from training.datasets import DatasetError, check_times

    try:
        check_times(raw, tolerance * 1000)
    except DatasetError as exc:
        raise TrainingError(
            f"the event log {root}: {exc}; the consumers refuse such times (none before "
            f"1970, none over CLV_FUTURE_TOLERANCE_SECONDS={tolerance} ahead of the clock), "
            "so they did not write it"
        ) from exc


def _champion_model_name(model_dir: Path) -> str | None:
    """The stored champion's model (``model_name`` in its metadata), or ``None``."""
    registry = ModelRegistry(model_dir)
    try:
        version = registry.champion_version()
        return None if version is None else registry.metadata(version).get("model_name")
    except (ClvError, OSError, ValueError):  # none, or broken: replaced by this run anyway
        return None


def _champion_evaluator(events: pd.DataFrame, selection: Any) -> Evaluate:
    """Scores a stored champion on the challenger's validation window, with the same metric."""
    from training.datasets import purchasers_at
    from training.metrics import all_metrics
    from training.selection import REFERENCE, composite_score, qualifies, recorded_warnings

    def ranked(name: str, m: dict[str, float], how: str, ties: bool = False) -> ChampionScore:
        """The champion's composite, ranked as the selection ranks: one that misses the targets
        against BG/NBD+GG on the window ranks below it (and so below any challenger)."""
        ref = selection.scores[REFERENCE].metrics
        if name != REFERENCE and not qualifies(m, ref):
            how += "; it misses the targets against BG/NBD+GG there, so it ranks below it"
            return ChampionScore(float("-inf"), how, ties)
        return ChampionScore(composite_score(m, ref), how, ties)

    def evaluate(champion: LoadedModel, val: Validation) -> float | ChampionScore:
        if selection.val_actual is None or val.train_end_day < 0:
            return float("nan")
        name = str(champion.metadata.get("model_name", ""))
        recipe = selection.scores.get(name)
        champ_cutoff = int(champion.metadata["data_window"]["cutoff_day"])
        if champ_cutoff > val.train_end_day and recipe is not None and not recipe.error:
            # The stored fit saw part of this window's outcomes, which would tilt the comparison
            # its way; its recipe, refitted before the window in this very selection, does not.
            how = f"its recipe {name} refitted before this window, which its own fit overlaps"
            if val.metric == COMPOSITE:
                return ranked(name, recipe.metrics, how, ties=True)
            return ChampionScore(_score_on(recipe, val.metric), how, ties_promote=True)
        feats = purchasers_at(events, val.train_end_day)
        with recorded_warnings():  # the champion's notes were kept when it was trained
            pred = champion.model.predict(feats, val.label_days)["predicted_value"].to_numpy()
        m = all_metrics(selection.val_actual, pred)
        if val.metric == COMPOSITE:
            how = "re-scored on this window"
            if champ_cutoff > val.train_end_day:
                how += ", which its training data overlaps"
            return ranked(name, m, how)
        return float(m[val.metric])

    return evaluate


def _candidate_table(selection: Any) -> dict[str, dict[str, Any]]:
    """Each candidate's validation row for the metadata; the reference, the yardstick of the
    targets, neither qualifies nor misses (null)."""
    from training.selection import REFERENCE

    return {
        name: {
            **s.metrics,
            "composite": s.score,
            "qualifies": None if name == REFERENCE else s.qualifies,
            "missed_targets": None if name == REFERENCE else s.missed,
            "seconds": round(s.seconds, 3),
            "error": s.error,
            "warnings": s.warnings,
        }
        for name, s in selection.scores.items()
    }


def train(
    settings: Settings,
    *,
    progress: bool | Say = True,
    force: bool = False,
    again: bool = False,
    max_users: int = DEFAULT_MAX_USERS,
    candidates: list[str] | None = None,
    on_phase: Callable[[str], None] | None = None,
    until_day: int | None = None,
) -> TrainResult:
    """Train from ``settings.event_log_dir``, register in ``settings.model_dir``, promote if better.

    ``until_day``: train on the log's events dated on or before that day only (a model as it
    would have been trained then; ``clv train --until``), the rest of the log left out.

    When a champion exists and a registered version was trained on the same events with the
    same :func:`training_inputs`, nothing is trained: the result describes that version, with
    ``skipped`` set (training is deterministic, so a rerun would register a copy). ``again``
    or ``force`` trains anyway. Runs on one event log take turns (:func:`runs_take_turns`):
    one started while another trains waits for it, then reads the log as it then is.

    ``progress``: a callable for the progress lines, or whether to print them on stderr. Raises
    :class:`TrainingError` when the log holds no purchase to learn from. The numeric
    pools of the calling thread get one thread each unless the environment sets them
    (:mod:`training.threads`).
    """
    threads.one_thread_unless_set()  # in the thread that fits: OpenMP's limit is per thread
    from feature_store.event_log import log_dir_problem
    from training.progress import resolve

    t0 = time.perf_counter()
    root = settings.event_log_dir
    if problem := log_dir_problem(root):
        raise TrainingError(problem)
    _check_model_dir(settings.model_dir)  # before any work, not after it
    say: Say = resolve(progress, "train")
    clock = _Clock(say, on_phase)
    with runs_take_turns(root, say):
        return _train(
            settings,
            say,
            clock,
            t0,
            force=force,
            again=again,
            max_users=max_users,
            candidates=candidates,
            until_day=until_day,
        )


@contextlib.contextmanager
def runs_take_turns(root: Path, say: Say) -> Iterator[None]:
    """Training runs on one event log take turns: each holds an exclusive ``flock`` on the
    log's folder (opened read-only, so a trainer that may only read the log can take it and no
    file is made) from reading the log to its decision. A run that starts while another holds
    it says so and waits; it then reads the log as the other left it and, when nothing was
    added, trains nothing (the other run's version stands for those events), so two trainers
    on one registry (``clv up`` beside ``clv train``, say) do not register twin versions. The
    kernel drops the lock of a run that dies, however it dies."""
    with _log_folder(root) as fd:
        try:
            if not _take_turn_now(fd):
                say(f"waiting for another training run on the event log {root} to finish")
                fcntl.flock(fd, fcntl.LOCK_EX)  # a SIGTERM meanwhile ends the wait (143)
        except OSError as exc:  # a file system without locks (some network mounts): train
            log.warning("training runs on %s cannot take turns (%s)", root, exc.strerror)
        yield


@contextlib.contextmanager
def _log_folder(root: Path) -> Iterator[int]:
    """The event log's folder, open read-only: what a turn locks (closing it releases one)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _take_turn_now(fd: int) -> bool:
    """Take the turn on the folder ``fd`` if no other run holds it; ``False`` when one does.
    An ``OSError`` other than that (a file system without locks) is raised."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def turn_taken(root: Path) -> bool:
    """Whether another training run holds its turn on the event log at ``root`` now (a glance:
    it may end a moment later; ``False`` when the log cannot be locked or opened)."""
    try:
        with _log_folder(root) as fd:
            return not _take_turn_now(fd)  # taken here, it is released as the folder closes
    except OSError:
        return False


def _train(
    settings: Settings,
    say: Say,
    clock: _Clock,
    t0: float,
    *,
    force: bool,
    again: bool,
    max_users: int,
    candidates: list[str] | None,
    until_day: int | None = None,
) -> TrainResult:
    """:func:`train`'s run, its turn on the event log taken."""
    from feature_store.event_log import read_events
    from feature_store.features import day_date
    from training.datasets import history_days
    from training.models.candidates import CANDIDATES, UNSUPERVISED, make_candidates
    from training.progress import heartbeat
    from training.selection import final_training_set, recorded_warnings, select_champion

    root = settings.event_log_dir
    say(f"reading the event log at {root}")
    with clock.phase("read event log"):
        raw = read_events(root, currency=settings.currency)
        if not raw.empty:  # (the whole log, --until or not: it is refused, not a part of it)
            _check_times(raw, root, settings.future_tolerance_seconds)
        if until_day is not None:
            later = int((raw["day"] > until_day).sum())
            raw = raw[raw["day"] <= until_day].reset_index(drop=True)
            say(f"--until {day_date(until_day)}: {later:,} later events left out")
        if until_day is not None and not (raw["type"] == "purchase").any():
            raise TrainingError(
                f"no purchase events dated on or before {day_date(until_day)} in the event log "
                f"at {root} ({later:,} after it)"
            )
        if raw.empty or not (raw["type"] == "purchase").any():
            raise TrainingError(
                f"no purchase events in the event log at {root}: nothing to train on "
                "(run the archiver, or write one with `clv synth --out DIR`)"
            )
        say(f"read {len(raw):,} events")
    with clock.phase("prepare"):
        events, user_ids = compact_events(raw)
        del raw
        fingerprint = compact_fingerprint(events, user_ids)
        n_users = len(user_ids)
        first_day, cutoff = int(events["day"].min()), int(events["day"].max())
        history = history_days(events, cutoff)
        horizon = choose_horizon(history, settings.horizon_days)
        if horizon < settings.horizon_days:
            say(
                f"history is {history} days: horizon shortened to {horizon} days "
                f"(CLV_HORIZON_DAYS={settings.horizon_days})"
            )
        inputs = training_inputs(settings, candidates=candidates, max_users=max_users)
        if not (again or force) and (
            done := _trained_already(settings, fingerprint, inputs, clock.timings, t0)
        ):
            return done
        seed = int(fingerprint[:8], 16)
        work, n_sampled = sample_users(events, n_users, max_users, seed)
        say(
            f"{n_users:,} users, cutoff {day_date(cutoff)}, horizon {horizon} days"
            + (f"; selecting on a sample of {n_sampled:,} users" if n_sampled < n_users else "")
        )
    with clock.phase("select"):
        names = candidates
        if names is None and n_sampled > SLOW_CANDIDATES_MAX_USERS:
            # The champion's own model stays: a stored champion whose fit saw the validation
            # window is judged by its recipe refitted before it (_champion_evaluator), never
            # by its own fit's score on outcomes it was trained on.
            kept = _champion_model_name(settings.model_dir)
            left_out = [n for n in SLOW_CANDIDATES if n != kept]
            names = [n for n in CANDIDATES if n not in left_out]
            say(f"{n_sampled:,} users: leaving out {', '.join(left_out)} at this scale")
            if kept in SLOW_CANDIDATES:
                say(f"keeping {kept}: the champion's model, to judge it on this window")
        selection = select_champion(work, cutoff, horizon, names=names, progress=say)
        say(f"challenger: {selection.champion} ({selection.reason})")
        if note := selection.plan.label_note():
            say(note)
    with clock.phase("final fit"):
        model = make_candidates([selection.champion])[selection.champion]
        ds = final_training_set(
            events,
            cutoff,
            horizon,
            selection.plan,
            supervised=selection.champion not in UNSUPERVISED,
            progress=say,
        )
        fit_users = len(ds.current)
        rows = f" ({len(ds):,} labelled rows)" if len(ds) else ""
        say(f"final fit of {selection.champion} on all {fit_users:,} buyers{rows}")
        doing = f"fitting {selection.champion} for the final fit"
        try:
            with recorded_warnings() as final_warnings, heartbeat(say, doing):
                model.fit(ds)
                _check_forecasts(model, ds)
        except (ClvError, ValueError, ArithmeticError) as exc:
            model, final_warnings = _label_free_fallback(
                selection, events, cutoff, horizon, exc, say
            )
        for line in final_warnings:
            say(f"final fit warned: {line}")
        del ds
    # The version's rename and the decision on it are one step: a run stopped between them
    # would leave a version registered that no decision names (and no later run recognises).
    with clock.phase("register"), interruptions_deferred():
        registry = ModelRegistry(settings.model_dir)
        validation = _validation(selection, fingerprint)
        candidate_table = _candidate_table(selection)
        window = DataWindow(first_day, cutoff, cutoff, horizon)
        version = registry.register(
            model,
            data_window=window,
            validation=validation,
            candidates=candidate_table,
            data_fingerprint=fingerprint,
            currency=settings.currency,
            extra={
                "selection_reason": selection.reason,
                "requested_horizon_days": settings.horizon_days,
                "history_days": history,
                "plan": {
                    "label_days": selection.plan.label_days,
                    "val_days": selection.plan.val_days,
                    "inner_cutoff_day": selection.inner_cutoff_day,
                },
                "events": len(events),
                "users": n_users,
                "sampled_users": n_sampled,
                "fit_users": fit_users,
                "candidates_considered": list(selection.scores),
                "inputs": inputs,
                "final_fit_warnings": final_warnings,
            },
        )
        decision = registry.offer(
            version, evaluate=_champion_evaluator(work, selection), force=force
        )
        try:
            registry.prune(settings.model_keep)
        except OSError as exc:  # the run's outcome stands; the next run prunes again
            log.warning("could not remove old model versions: %s", exc)
    result = TrainResult(
        version=version,
        promoted=decision.promoted,
        decision=decision,
        champion_version=registry.champion_version(),
        model_name=selection.champion,
        selection_reason=selection.reason,
        cutoff_day=cutoff,
        horizon_days=horizon,
        requested_horizon_days=settings.horizon_days,
        events=len(events),
        users=n_users,
        sampled_users=n_sampled,
        validation=validation,
        candidates=candidate_table,
        timings={**clock.timings, "total": time.perf_counter() - t0},
    )
    return result  # its summary() is the caller's to print (the decision's reason is in it)


def _trained_already(
    settings: Settings,
    fingerprint: str,
    inputs: dict[str, Any],
    timings: dict[str, float],
    t0: float,
) -> TrainResult | None:
    """The result of the registered version trained on this log with ``inputs``, when there is
    one and a champion (else ``None``: train)."""
    registry = ModelRegistry(settings.model_dir)
    meta = registry.trained_on(fingerprint, inputs)  # metadata first: no unpickling for a miss
    if meta is None:
        return None
    try:
        champion = registry.load_champion().version  # verified: a broken one is replaced
    except ClvError:  # no champion, or one that cannot be loaded: a run replaces it
        return None
    version, extra, window = meta["version"], meta["extra"], meta["data_window"]
    reason = "trained on this same event log with the same code, libraries and settings"
    return TrainResult(
        version=version,
        promoted=False,
        decision=Decision(version, False, reason, champion_version=champion),
        champion_version=champion,
        model_name=meta["model_name"],
        selection_reason=extra["selection_reason"],
        cutoff_day=window["cutoff_day"],
        horizon_days=window["horizon_days"],
        requested_horizon_days=extra["requested_horizon_days"],
        events=extra["events"],
        users=extra["users"],
        sampled_users=extra["sampled_users"],
        validation=Validation.from_json(meta["validation"]),
        candidates=meta["candidates"],
        timings={**timings, "total": time.perf_counter() - t0},
        skipped=True,
    )


# --- periodic retraining (run by the stack) ----------------------------------------------------


def _child_env(settings: Settings) -> dict[str, str]:
    """The environment of a training child: this process's, plus ``settings`` as CLV_ vars
    (settings built in code win over the environment they came from), with one-thread pools
    (:data:`training.threads.THREAD_VARS`; set before the child loads any library, so every
    thread of it gets them) unless the environment chose otherwise. The child shares the
    machine with the consumers and the API, and OpenMP's spinning workers lose badly under such
    load: hgb_poisson on 2,962 stacked rows took 81.7 s with the default pools and 2.6 s with
    one thread while `make model-quality` kept both cores busy."""
    env = {**{k: "1" for k in threads.THREAD_VARS}, **os.environ, **settings.as_env()}
    # The child must import this very code, installed or not.
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


#: How a training child is started: ``training/__main__.py`` imports this module with a SIGTERM
#: during the imports ending the child as one later does (exit 143, not the bare signal).
TRAINING_CHILD = ("-m", "training")


async def train_in_subprocess(
    settings: Settings, *, force: bool = False, candidates: list[str] | None = None
) -> int:
    """One quiet training run in a child process (:func:`run_training_child`), its outcome
    logged as the stack's retraining; returns its exit code."""
    code, said, warned = await run_training_child(settings, force=force, candidates=candidates)
    if code == 0:
        log.info("retraining: %s", said)
        if warned:  # a run that succeeded may still have warned (an old version left, say)
            log.warning("retraining warned: %s", warned[-2000:])
    else:
        text = said or warned
        log.warning("retraining failed (exit %s): %s", code, text[-2000:])
    return code


async def run_training_child(
    settings: Settings,
    *,
    force: bool = False,
    candidates: list[str] | None = None,
    relay: Callable[[str], None] | None = None,
    until: dt.date | None = None,
) -> tuple[int, str, str]:
    """One training run in a child process (its CPU and memory never touch the caller's event
    loop): its exit code (negative: the signal that killed it) and what it printed on stdout
    and stderr. Quiet unless ``relay`` is given: then it reports its progress too, and each
    line, of either stream, is handed to ``relay`` as it comes (``clv demo`` prints them).
    Cancelling terminates the child (or, while it is still being started, asyncio kills it): a
    run waiting for another's turn or in the middle of a fit ends at once, where a run in a
    thread could not be stopped; what it says as it ends is not relayed.

    The child runs in a process group of its own, as the local servers do: a terminal's Ctrl-C
    or hangup goes to the whole foreground group, and a child that took it would die of a
    ``KeyboardInterrupt`` and be logged as a failed run while ``clv up`` stops; the parent
    cancels, and so terminates, the run instead. Its output always comes through pipes: a
    background group writing to the terminal is stopped by SIGTTOU where the terminal has
    ``tostop`` set."""
    args = [sys.executable, *TRAINING_CHILD]
    if relay is None:
        args.append("--quiet")
    if force:
        args.append("--force")
    if candidates:
        args.append("--candidates=" + ",".join(candidates))
    if until is not None:
        args.append(f"--until={until.isoformat()}")
    proc = await asyncio.create_subprocess_exec(
        *args,
        env=_child_env(settings),
        stdin=asyncio.subprocess.DEVNULL,  # out of the terminal's reach, input too
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 20,  # the longest line relayed (a traceback's)
        process_group=0,
        preexec_fn=die_with_parent(),  # a clv killed outright takes its training run along
    )
    try:
        if relay is None:
            out, err = await proc.communicate()
        else:
            assert proc.stdout is not None and proc.stderr is not None
            out, err = await asyncio.gather(
                _relayed(proc.stdout, relay), _relayed(proc.stderr, relay)
            )
            await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        raise
    said, warned = (b.decode(errors="replace").strip() for b in (out, err))
    return int(proc.returncode or 0), said, warned


async def _relayed(stream: asyncio.StreamReader, relay: Callable[[str], None]) -> bytes:
    """Everything ``stream`` gives until its end, each line handed to ``relay`` as it comes."""
    lines = []
    while line := await stream.readline():
        lines.append(line)
        relay(line.decode(errors="replace").rstrip("\n"))
    return b"".join(lines)


def log_signature(root: Path) -> str:
    """A cheap signature of the event log's files (names and sizes): the log is append-only,
    so it changes exactly when events were added. No file is read."""
    from feature_store.event_log import log_files

    digest = hashlib.sha256()
    for part in log_files(root):
        # os.fsencode: a name that is not UTF-8 (its bytes kept as surrogates) is a name too
        digest.update(os.fsencode(f"{part.parent.name}/{part.name}:{part.stat().st_size}\n"))
    return digest.hexdigest()


async def _champion_fault(registry: ModelRegistry) -> str | None:
    """Why the champion cannot be served (missing, unreadable, or its files no longer match
    their hashes), or ``None`` when it checks out. Nothing is unpickled."""
    try:
        await asyncio.to_thread(registry.verify_champion)
    except (ClvError, OSError) as exc:
        return str(exc)
    return None


async def retrain_forever(
    settings: Settings, interval_s: float, *, candidates: list[str] | None = None
) -> None:
    """Train now and then every ``interval_s`` seconds (counted from each run's start), each
    run in a child process.

    A run is skipped when the event log's files have not changed since the last successful one
    (no stream of identical versions) and the champion still checks out (a champion deleted or
    corrupted since is replaced by a run on the same log); after a restart, the child itself
    trains nothing when the events and inputs are a registered version's (:func:`train`).
    Until a champion exists, a failed run (say, an event log still empty) is retried after at
    most a minute. Failures are logged, never raised.
    """
    registry = ModelRegistry(settings.model_dir)
    trained_on: str | None = None
    nothing = hashlib.sha256().hexdigest()  # the signature of a log with no file yet
    while True:
        started = time.monotonic()
        try:
            signature: str | None = await asyncio.to_thread(log_signature, settings.event_log_dir)
        except (OSError, ValueError) as exc:  # a log it may not read: it tries again later
            log.warning("retraining cannot read the event log: %s", exc)
            signature = None
        if signature is None:
            pass
        elif signature == nothing:  # a new stack: the archiver has written nothing yet
            log.info(
                "retraining waits: the event log %s %s",
                settings.event_log_dir,
                "holds no events yet"
                if settings.event_log_dir.is_dir()
                else "does not exist yet (CLV_EVENT_LOG_DIR; the archiver makes it)",
            )
        elif signature == trained_on and (fault := await _champion_fault(registry)) is None:
            log.info("retraining skipped: no new events since the last run")
        else:
            if signature == trained_on:  # the log is as trained on, but its champion is gone
                log.warning("retraining runs again on an unchanged event log: %s", fault)
            if turn_taken(settings.event_log_dir):  # its child (quiet) will wait: say so here
                log.info(
                    "retraining waits its turn: another training run is on the event log %s",
                    settings.event_log_dir,
                )
            try:
                if await train_in_subprocess(settings, candidates=candidates) == 0:
                    trained_on = signature
            except OSError as exc:  # could not start the child at all
                log.warning("retraining could not start: %s", exc)
        try:
            has_champion = registry.champion_version() is not None
        except (ClvError, OSError):
            has_champion = False
        # Runs start on a fixed grid (every interval from the first, not an interval after the
        # end of the last, which would drift by each run's length); a run that outlasts the
        # interval moves the next start to the grid's next point, not to at once.
        period = interval_s if has_champion else min(interval_s, 60.0)
        await asyncio.sleep(period - (time.monotonic() - started) % period)


async def retrain_until(settings: Settings, interval_s: float, stop: asyncio.Event) -> None:
    """``clv train --every``: :func:`retrain_forever` until ``stop`` is set. A run in progress
    is terminated: it registers nothing, or first finishes the decision it is making."""
    from clv.stopping import cancel_and_wait, stop_or_first_done

    log.info(
        "retraining every %gs from the event log %s into %s",
        interval_s,
        settings.event_log_dir,
        settings.model_dir,
    )
    task = asyncio.create_task(retrain_forever(settings, interval_s))
    await stop_or_first_done(stop, [task])
    # a failure of its own (it logs a run's) is the command's error; a cancellation of this
    # command's task is passed on, not taken for the trainer's
    await cancel_and_wait(task)
    log.info("retraining stopped")


def main(argv: list[str] | None = None) -> int:
    """``python -m training [--force] [--again] [--quiet] [--candidates=a,b]
    [--until=YYYY-MM-DD]``: one run, one
    line (``python -m training.train`` runs it too, without the guard of ``training/__main__``)."""
    args = sys.argv[1:] if argv is None else argv
    names = [a.split("=", 1)[1] for a in args if a.startswith("--candidates=")]
    candidates = names[0].split(",") if names else None
    untils = [a.split("=", 1)[1] for a in args if a.startswith("--until=")]
    until_day = (dt.date.fromisoformat(untils[0]) - dt.date(1970, 1, 1)).days if untils else None
    try:
        # The parent terminates a cancelled run: clean up on the way out (and a run terminated
        # while it imports the models exits 143, as any other, and as one terminated while
        # Python imports this module does under ``training/__main__``).
        with stops_unwind():
            from training.models.candidates import make_candidates

            try:
                make_candidates(candidates)  # unknown names: bad input, before the log is read
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            try:
                settings = Settings()
            except ValidationError as exc:
                raise ClvError(settings_error(exc)) from None
            result = train(
                settings,
                progress="--quiet" not in args,
                force="--force" in args,
                again="--again" in args,
                candidates=candidates,
                until_day=until_day,
            )
    except (ClvError, OSError) as exc:  # OSError: a full disk, a registry it may not write
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: not enough memory to train on this event log", file=sys.stderr)
        return 1
    except Terminated:
        print("error: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:  # (run by hand: as a child, it has a process group of its own)
        print("error: interrupted", file=sys.stderr)
        return 130
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
