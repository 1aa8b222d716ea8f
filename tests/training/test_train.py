"""``train`` end to end on a synthetic event log: registered champion, promotion rules, errors."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

import training.threads as threads
from clv.commands.train import train as train_command
from clv.settings import Settings
from feature_store.event_log import write_events
from feature_store.features import FEATURE_NAMES, day_date
from feature_store.offline import features_at
from tests.processes import children
from training.registry import ModelRegistry
from training.synth import SynthConfig, events_frame, generate
from training.threads import THREAD_VARS
from training.train import (
    TRAINING_CHILD,
    TrainingError,
    _child_env,
    choose_horizon,
    compact_events,
    data_fingerprint,
    log_signature,
    retrain_forever,
    sample_users,
    train,
    train_in_subprocess,
    turn_taken,
)

FAST = ["naive_rate", "bgnbd_gg"]  # label-free candidates: seconds, not minutes


def synth_events(days: int = 500, seed: int = 11, start: dt.date = dt.date(2023, 1, 1)):  # type: ignore[no-untyped-def]
    log = generate(SynthConfig(users=600, orders=4_000, seed=seed, start=start, days=days))
    return events_frame(log)


def settings_for(tmp_path: Path, horizon_days: int = 180) -> Settings:
    return Settings(
        event_log_dir=tmp_path / "events",
        model_dir=tmp_path / "models",
        horizon_days=horizon_days,
    )


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return synth_events()


def test_train_registers_and_promotes_the_first_model(tmp_path: Path, events: pd.DataFrame) -> None:
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    result = train(settings, progress=False, candidates=FAST)
    assert result.promoted and result.champion_version == result.version
    assert result.cutoff_day == int(events["day"].max())
    assert result.horizon_days == 180 and result.users == 600
    assert result.events == len(events)
    assert set(result.candidates) == set(FAST)
    registry = ModelRegistry(settings.model_dir)
    champion = registry.load_champion()
    meta = champion.metadata
    assert meta["model_name"] == result.model_name in FAST
    assert meta["feature_names"] == list(FEATURE_NAMES)
    assert meta["data_window"]["first_event_day"] == int(events["day"].min())
    assert meta["data_window"]["cutoff_day"] == result.cutoff_day
    assert meta["validation"]["train_end_day"] < result.cutoff_day  # validated before the cutoff
    assert meta["data_fingerprint"] == data_fingerprint(events)
    # Readable without the code: dates beside day numbers, units said, params as JSON values.
    assert meta["validation"]["train_end_date"] == str(
        day_date(meta["validation"]["train_end_day"])
    )
    assert meta["units"]["money"].startswith(settings.currency)
    assert meta["model_params"] == champion.model.get_params()  # numbers, not their repr
    reference = meta["candidates"]["bgnbd_gg"]
    assert reference["qualifies"] is None and reference["missed_targets"] is None
    # The champion scores the contract's features (string user ids, as the API has them).
    feats = features_at(events, result.cutoff_day)
    pred = champion.model.predict(feats, champion.horizon_days)
    assert list(pred.columns) == ["predicted_value", "expected_orders", "p_alive"]
    assert len(pred) == 600 and np.isfinite(pred.to_numpy()).all()
    assert pred["predicted_value"].sum() > 0


def test_retraining_on_the_same_data_is_registered_not_promoted(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    lines: list[str] = []
    first = train(settings, progress=lines.append, candidates=FAST)
    assert first.summary() == (
        f"model {first.version} ({first.model_name}) promoted to champion: "
        "first model: no champion yet"
    )
    again = train(settings, progress=lines.append, again=True, candidates=FAST)
    assert not again.skipped and not again.promoted  # a tie on the same window keeps it
    assert "same window" in again.decision.reason
    assert again.champion_version == first.version
    assert again.summary().endswith(
        f"registered, not promoted: {again.decision.reason}; the champion stays {first.version}"
    )
    # The progress callable got the run's lines; the outcome is the summary's, said once.
    assert lines[0].startswith("reading the event log at ")
    assert any(line.startswith("select: ") for line in lines)
    assert not any(first.decision.reason in line or again.version in line for line in lines)
    assert len(ModelRegistry(settings.model_dir).versions()) == 2
    forced = train(settings, progress=False, force=True, candidates=FAST)
    assert forced.promoted and forced.champion_version == forced.version


def test_an_unchanged_log_is_not_trained_again(tmp_path: Path, events: pd.DataFrame) -> None:
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    first = train(settings, progress=False, candidates=FAST)
    write_events(settings.event_log_dir, events.iloc[:100])  # redelivered: the same events
    same = train(settings, progress=False, candidates=FAST)
    registry = ModelRegistry(settings.model_dir)
    assert registry.versions() == [first.version]  # no copy registered, no decision made
    assert same.skipped and not same.promoted and not first.skipped
    assert same.version == first.version == same.champion_version
    assert same.summary() == (
        f"nothing to train: model {first.version} ({first.model_name}) was trained on this "
        f"same event log with the same code, libraries and settings; the champion is "
        f"{first.version} (`clv train --again` trains anyway)"
    )
    # The result describes the version that stands for this log.
    assert (same.model_name, same.selection_reason) == (first.model_name, first.selection_reason)
    assert (same.cutoff_day, same.horizon_days) == (first.cutoff_day, first.horizon_days)
    assert (same.events, same.users, same.validation) == (
        first.events,
        first.users,
        first.validation,
    )
    assert set(same.candidates) == set(first.candidates)
    history = (settings.model_dir / "promotions.jsonl").read_text().splitlines()
    assert len(history) == 1


@pytest.mark.parametrize(
    "change",
    [
        "events",
        "horizon",
        "currency",
        "candidates",
        "sample size",
        "code",
        "libraries",
        "clv version",
        "no champion",
        "broken pointer",
        "champion's model file gone",
        "tampered",
    ],
)
def test_anything_that_decides_the_model_changed_trains_again(
    tmp_path: Path, events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    import training.train as train_module

    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events.iloc[: len(events) // 2])
    first = train(settings, progress=False, candidates=FAST)
    names, max_users = FAST, train_module.DEFAULT_MAX_USERS
    registry = ModelRegistry(settings.model_dir)
    if change == "events":
        write_events(settings.event_log_dir, events.iloc[len(events) // 2 :])
    elif change == "horizon":
        settings = settings_for(tmp_path, horizon_days=90)
    elif change == "currency":
        settings = settings.model_copy(update={"currency": "EUR"})
    elif change == "candidates":
        names = FAST[:1]
    elif change == "sample size":
        max_users = 10_000
    elif change == "code":
        monkeypatch.setattr(train_module, "code_fingerprint", lambda: "0" * 64)
    elif change == "libraries":
        newer = {**train_module.library_versions(), "scikit-learn": "99.0"}
        monkeypatch.setattr(train_module, "library_versions", lambda: newer)
    elif change == "clv version":
        import clv

        monkeypatch.setattr(clv, "__version__", f"{clv.__version__}.post1")
    elif change == "no champion":
        registry.pointer_path.unlink()
    elif change == "broken pointer":
        registry.pointer_path.write_text("{garbage")
    elif change == "champion's model file gone":
        (settings.model_dir / first.version / "model.pkl").unlink()
    else:  # the registered version's metadata no longer verifies
        meta = settings.model_dir / first.version / "metadata.json"
        meta.write_text(meta.read_text().replace('"users"', '"Users"'))
    second = train(settings, progress=False, candidates=names, max_users=max_users)
    assert not second.skipped and second.version != first.version
    assert registry.versions() == sorted([first.version, second.version])


def test_a_version_never_offered_does_not_stand_for_its_log(
    tmp_path: Path, events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped between registering and offering: the next run trains and offers."""
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events.iloc[: len(events) // 2])
    first = train(settings, progress=False, candidates=FAST)
    write_events(settings.event_log_dir, events.iloc[len(events) // 2 :])

    def stopped(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ModelRegistry, "offer", stopped)
        with pytest.raises(KeyboardInterrupt):
            train(settings, progress=False, candidates=FAST)
    registry = ModelRegistry(settings.model_dir)
    assert len(registry.versions()) == 2  # registered, never offered
    again = train(settings, progress=False, candidates=FAST)
    assert not again.skipped and again.decision.champion_version == first.version
    assert len(registry.versions()) == 3
    assert train(settings, progress=False, candidates=FAST).skipped  # offered now: it stands


def test_a_matching_version_whose_model_file_is_broken_does_not_stand_for_its_log(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events.iloc[: len(events) // 2])
    first = train(settings, progress=False, candidates=FAST)
    write_events(settings.event_log_dir, events.iloc[len(events) // 2 :])
    second = train(settings, progress=False, candidates=FAST)
    registry = ModelRegistry(settings.model_dir)
    registry.offer(first.version, force=True)  # the champion is the other data's model
    assert train(settings, progress=False, candidates=FAST).version == second.version  # skipped
    (settings.model_dir / second.version / "model.pkl").write_bytes(b"not the model")
    third = train(settings, progress=False, candidates=FAST)
    assert not third.skipped and third.version not in (first.version, second.version)


def test_the_code_fingerprint_follows_the_source_and_ignores_editor_files(
    tmp_path: Path,
) -> None:
    import shutil
    import subprocess
    import sys

    import feature_store
    import training

    for package in (training, feature_store):
        source = Path(package.__file__ or "").parent
        shutil.copytree(
            source, tmp_path / source.name, ignore=shutil.ignore_patterns("__pycache__")
        )

    def fingerprint() -> str:
        code = "from training.train import code_fingerprint; print(code_fingerprint())"
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
            cwd=tmp_path,  # the copies, not the checkout's packages
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    base = fingerprint()
    (tmp_path / "check.py").write_text("import training; print(training.__file__)")
    where = subprocess.run(
        [sys.executable, "check.py"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert where.stdout.startswith(str(tmp_path))
    (tmp_path / "training" / ".#train.py").symlink_to("user@host.1234:1")  # an editor's lock
    hidden = tmp_path / "training" / ".ipynb_checkpoints"  # a notebook's checkpoint copies
    hidden.mkdir()
    (hidden / "train-checkpoint.py").write_text("# an old copy\n")
    assert fingerprint() == base
    features = tmp_path / "feature_store" / "features.py"
    features.write_text(features.read_text() + "\n# a changed feature definition\n")
    changed = fingerprint()
    assert changed != base
    features.rename(features.with_name("features_renamed.py"))
    renamed = fingerprint()
    assert renamed not in (base, changed)
    btyd = tmp_path / "training" / "models" / "btyd.py"  # a subpackage's module
    btyd.write_text(btyd.read_text() + "\n# a changed model definition\n")
    assert fingerprint() not in (base, changed, renamed)


def test_new_data_rescores_the_champion_on_the_new_window(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    full = synth_events(days=560, seed=4)
    early = full[full["day"] <= full["day"].min() + 400]
    write_events(settings.event_log_dir, early)
    first = train(settings, progress=False, candidates=FAST)
    write_events(settings.event_log_dir, full[full["day"] > full["day"].min() + 400])
    second = train(settings, progress=False, candidates=FAST)
    assert second.cutoff_day > first.cutoff_day
    assert second.decision.champion_version == first.version
    # The first champion's fit saw part of the new validation window's outcomes, so its
    # recipe, refitted before the window by this selection, stands in for it.
    assert second.validation.train_end_day < first.cutoff_day
    assert f"its recipe {first.model_name} refitted before this window" in second.decision.reason
    recipe = second.candidates[first.model_name]["composite"]
    assert second.decision.champion_score == pytest.approx(recipe)
    # the same recipe won again: on newer data it replaces the champion
    assert second.model_name == first.model_name
    assert second.promoted and "the newer fit wins" in second.decision.reason


def test_at_scale_a_champion_of_a_slow_model_is_judged_by_its_recipe_not_its_own_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if the slow candidates are left out at scale even when the champion is one: its
    # recipe is then missing and its own fit is scored on outcomes it was trained on, which
    # kept back a challenger that beat the recipe (review).
    import training.selection
    import training.train

    settings = settings_for(tmp_path)
    full = synth_events(days=560, seed=6)
    write_events(settings.event_log_dir, full[full["day"] <= full["day"].min() + 555])
    real = training.selection.select_champion

    def chosen(*args, **kwargs):  # type: ignore[no-untyped-def]
        picked = real(*args, **kwargs)
        picked.champion = "gradient_boosting"  # a run in which it won, at a smaller scale
        return picked

    monkeypatch.setattr(training.selection, "select_champion", chosen)
    slow = ["naive_rate", "bgnbd_gg", "gradient_boosting"]
    first = train(settings, progress=False, candidates=slow)
    assert first.promoted and first.model_name == "gradient_boosting"
    monkeypatch.setattr(training.selection, "select_champion", real)
    write_events(settings.event_log_dir, full[full["day"] > full["day"].min() + 555])
    monkeypatch.setattr(training.train, "SLOW_CANDIDATES_MAX_USERS", 10)  # 600 users: "scale"
    said: list[str] = []
    second = train(settings, progress=said.append)
    assert "gradient_boosting" in second.candidates and "random_forest" not in second.candidates
    assert "600 users: leaving out random_forest at this scale" in said
    assert "keeping gradient_boosting: the champion's model, to judge it on this window" in said
    assert second.validation.train_end_day < first.cutoff_day  # its fit saw the window
    assert "its recipe gradient_boosting refitted before this window" in second.decision.reason
    # no champion of a slow model: both left out
    monkeypatch.setattr(training.train, "_champion_model_name", lambda model_dir: None)
    said.clear()
    third = train(settings, progress=said.append, again=True)
    assert not {"random_forest", "gradient_boosting"} & set(third.candidates)
    assert "600 users: leaving out random_forest, gradient_boosting at this scale" in said


def test_a_final_fit_that_fails_with_no_label_free_stand_in_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if the model's own ValueError is raised as it is: `clv train` printed a traceback.
    import training.train
    from training.train import TrainingError

    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, synth_events(days=400, seed=3))

    def refuses(model, ds):  # type: ignore[no-untyped-def]
        raise ValueError("Input contains NaN")

    monkeypatch.setattr(training.train, "_check_forecasts", refuses)
    with pytest.raises(TrainingError, match=r"^the final fit of \w+ failed \(Input contains NaN\)"):
        train(settings, progress=False, candidates=FAST)
    assert ModelRegistry(settings.model_dir).champion_version() is None


def test_until_does_not_let_a_log_with_future_times_train(tmp_path: Path) -> None:
    # Fails if --until filters the log before its times are checked: the log the consumers
    # could not have written trained once its future part was cut off.
    from feature_store.features import day_number
    from training.train import TrainingError

    settings = settings_for(tmp_path)
    today = dt.datetime.now(dt.UTC).date()
    future = today + dt.timedelta(days=3)
    write_events(settings.event_log_dir, synth_events(days=200, start=future - dt.timedelta(199)))
    for until in (None, day_number(today - dt.timedelta(days=1))):
        with pytest.raises(TrainingError, match="ahead of the clock"):
            train(settings, progress=False, candidates=FAST, until_day=until)
    assert ModelRegistry(settings.model_dir).champion_version() is None


def test_short_history_shortens_the_horizon(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, horizon_days=365)
    write_events(settings.event_log_dir, synth_events(days=90, seed=5))
    said: list[str] = []
    result = train(settings, progress=said.append, candidates=FAST)
    assert result.requested_horizon_days == 365
    assert result.horizon_days < 90
    # Both cuts are said: the horizon's, and the label windows' (two thirds of the history).
    assert any(line.startswith("history is ") and "horizon shortened" in line for line in said)
    scaled = [line for line in said if "label windows (at most two thirds of the" in line]
    assert len(scaled) == 1 and f"{result.horizon_days}-day horizon" in scaled[0], said
    meta = ModelRegistry(settings.model_dir).load_champion().metadata
    assert meta["data_window"]["horizon_days"] == result.horizon_days


def test_choose_horizon() -> None:
    assert choose_horizon(1000, 365) == 365
    assert choose_horizon(100, 365) == 100
    assert choose_horizon(0, 365) == 7
    assert choose_horizon(0, 3) == 3  # a short request is kept, never lengthened
    assert choose_horizon(100, 3) == 3


def test_a_log_with_events_from_the_future_is_refused(tmp_path: Path) -> None:
    """The consumers refuse such events, so a log holding them was not written by them."""
    settings = settings_for(tmp_path)
    future = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=3)
    write_events(settings.event_log_dir, synth_events(days=200, start=future - dt.timedelta(199)))
    with pytest.raises(TrainingError, match="CLV_FUTURE_TOLERANCE_SECONDS=86400 ahead"):
        train(settings, progress=False, candidates=FAST)
    assert not settings.model_dir.exists()


def test_a_log_whose_days_disagree_with_its_times_is_refused(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    from feature_store.event_log import EventLogError, read_events

    root = tmp_path / "events"
    shifted = events.head(50).assign(day=events["day"].head(50) + 100_000)
    write_events(root, pd.concat([events.iloc[50:], shifted]))
    with pytest.raises(EventLogError, match=r"has day .* but time"):
        read_events(root)


def _spoiled(events: pd.DataFrame, how: str) -> pd.DataFrame:
    """The log with one event's values broken the way the consumers would have refused."""
    bad = events.copy()
    i = int(np.flatnonzero(bad["type"].to_numpy() == "purchase")[7])
    col = bad.columns.get_loc
    if how == "negative amount":
        bad.iloc[i, [col("amount"), col("cents")]] = [-5.0, -500]
    elif how == "not a number":
        bad.iloc[i, col("amount")] = float("nan")
    elif how == "cents":
        bad.iloc[i, col("cents")] = int(bad.iloc[i, col("cents")]) + 1
    elif how == "user id":
        bad.iloc[i, col("user_id")] = "u 1\n"
    elif how == "currency":
        bad.iloc[i, col("currency")] = "EUR"
    return bad


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("negative amount", r"an amount outside 0 to 1e\+09"),
        ("not a number", r"an amount outside 0 to 1e\+09"),
        ("cents", "cents that are not its amount"),
        ("user id", "a malformed user id"),
        ("currency", "a currency not USD"),
    ],
)
def test_a_log_holding_what_the_consumers_refuse_is_not_trained_on(
    tmp_path: Path, events: pd.DataFrame, how: str, message: str
) -> None:
    """Bad values in the log are refused, naming the event, before any model is made."""
    from feature_store.event_log import EventLogError

    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, _spoiled(events, how))
    with pytest.raises(EventLogError, match=rf"event .* has {message} \(1 such\)"):
        train(settings, progress=False, candidates=FAST)
    assert not settings.model_dir.exists()


def test_the_unspoiled_log_trains(tmp_path: Path, events: pd.DataFrame) -> None:
    """The control for the test above: the same log, nothing broken, trains."""
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, _spoiled(events, "none"))
    assert train(settings, progress=False, candidates=FAST).promoted


def test_empty_or_missing_log_is_a_training_error(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    with pytest.raises(TrainingError, match="does not exist"):
        train(settings, progress=False)
    assert not settings.model_dir.exists()  # refused before anything was made
    (tmp_path / "events").mkdir()
    with pytest.raises(TrainingError, match="nothing to train on"):
        train(settings, progress=False)
    assert not settings.model_dir.exists()  # made only when a model is registered


def test_a_model_dir_that_cannot_be_made_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "events").mkdir()
    (tmp_path / "file").write_text("")
    settings = Settings(event_log_dir=tmp_path / "events", model_dir=tmp_path / "file" / "m")
    with pytest.raises(
        TrainingError, match=r"file/m \(CLV_MODEL_DIR\) cannot be used: .*file is not a dir"
    ):
        train(settings, progress=False)


def test_cli_on_missing_log_one_line_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLV_EVENT_LOG_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("CLV_MODEL_DIR", str(tmp_path / "models"))
    limited: list[bool] = []
    monkeypatch.setattr(threads, "one_thread_unless_set", lambda: limited.append(True) or True)
    app = typer.Typer()
    app.command()(train_command)
    result = CliRunner().invoke(app, ["--quiet"])
    assert limited == [True]  # one thread per pool unless the environment says
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clv: error: the event log ")
    assert lines[0].endswith("does not exist")
    assert "Traceback" not in result.output


def test_cli_json_gives_the_outcome_with_dates_and_both_horizons(
    tmp_path: Path, events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:

    import training.train as train_module

    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CLV_HORIZON_DAYS", "3000")  # more than the log holds: shortened
    real = train_module.train
    monkeypatch.setattr(train_module, "train", lambda *a, **kw: real(*a, **kw, candidates=FAST))
    app = typer.Typer()
    app.command()(train_command)
    result = CliRunner().invoke(app, ["--json", "-q"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["cutoff_date"] == day_date(body["cutoff_day"]).isoformat()
    assert body["cutoff_day"] == int(events["day"].max())
    assert body["requested_horizon_days"] == 3000 > body["horizon_days"]
    assert body["promoted"] is True and body["model"] in FAST and body["skipped"] is False
    again = CliRunner().invoke(app, ["--json", "-q"])  # the same log: nothing to train
    assert again.exit_code == 0, again.output
    same = json.loads(again.stdout)
    assert same["skipped"] is True and same["promoted"] is False
    assert same["version"] == same["champion_version"] == body["version"]
    assert same["reason"].startswith("trained on this same event log")
    assert len(ModelRegistry(settings.model_dir).versions()) == 1
    text = CliRunner().invoke(app, ["-q"])
    assert text.exit_code == 0 and text.stdout.startswith("nothing to train: model ")
    retrained = CliRunner().invoke(app, ["--json", "-q", "--again"])
    assert retrained.exit_code == 0, retrained.output
    kept = json.loads(retrained.stdout)
    assert kept["skipped"] is False
    assert len(ModelRegistry(settings.model_dir).versions()) == 2
    # registered but not promoted: champion_version is the one still serving
    assert kept["promoted"] is False
    assert kept["version"] != body["version"] == kept["champion_version"]
    assert set(kept["timings"]) >= {"select", "final fit", "register", "total"}


def test_fingerprint_ignores_row_order_but_not_content(events: pd.DataFrame) -> None:
    fp = data_fingerprint(events)
    shuffled = events.sample(frac=1.0, random_state=0).reset_index(drop=True)
    assert data_fingerprint(shuffled) == fp
    changed = events.copy()
    changed.loc[5, "cents"] += 1
    assert data_fingerprint(changed) != fp
    assert data_fingerprint(events.iloc[1:]) != fp


def test_the_same_events_in_another_order_train_the_same_model(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    shuffled = events.sample(frac=1.0, random_state=3).reset_index(drop=True)
    a, ids_a = compact_events(events)
    b, ids_b = compact_events(shuffled)
    pd.testing.assert_frame_equal(a, b)
    assert ids_a.equals(ids_b)
    # end to end: a log written in another order gives a byte-identical model
    names = ["bgnbd_gg", "hgb_poisson", "hybrid_btyd_residual"]
    digests = []
    for i, frame in enumerate((events, shuffled)):
        settings = settings_for(tmp_path / str(i))
        write_events(settings.event_log_dir, frame)
        train(settings, progress=False, candidates=names)
        meta = ModelRegistry(settings.model_dir).load_champion().metadata
        digests.append((meta["model_name"], meta["artifact"]["sha256"]))
    assert digests[0] == digests[1]


def test_compact_and_sample_keep_whole_users(events: pd.DataFrame) -> None:
    compact, user_ids = compact_events(events)
    n_users = len(user_ids)
    assert n_users == 600 and len(compact) == len(events)
    assert set(user_ids[compact["user_id"].to_numpy()]) == set(events["user_id"])
    day = int(events["day"].max())
    a = features_at(events, day)
    b = features_at(compact, day)
    np.testing.assert_array_equal(  # same features whatever the id type
        np.sort(a["revenue_total"].to_numpy()), np.sort(b["revenue_total"].to_numpy())
    )
    sample, n = sample_users(compact, n_users, 100, seed=1)
    assert n == 100 and sample["user_id"].nunique() == 100
    per_user = compact.groupby("user_id").size()
    assert (sample.groupby("user_id").size() == per_user.loc[sample["user_id"].unique()]).all()
    same, n_all = sample_users(compact, n_users, 10_000, seed=1)
    assert same is compact and n_all == n_users


async def test_retrain_forever_trains_in_a_child_without_blocking_the_loop(
    tmp_path: Path, events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.train as train_module

    def not_here(*_: object, **__: object) -> None:
        raise AssertionError("trained in the service's own process")

    monkeypatch.setattr(train_module, "train", not_here)  # a child process never sees this
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    registry = ModelRegistry(settings.model_dir)
    ticks = 0
    task = asyncio.create_task(retrain_forever(settings, 3600, candidates=FAST))
    try:
        for _ in range(1200):  # up to ~2 minutes on a loaded machine
            await asyncio.sleep(0.1)
            ticks += 1
            if registry.champion_version() is not None:
                break
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert registry.champion_version() is not None
    assert ticks > 1  # the loop kept running while the child trained


async def _sound_champion(_registry: ModelRegistry) -> None:
    """retrain_forever's champion check, for a stub run whose success leaves no model."""
    return None


async def test_retraining_waits_for_events_then_runs_once_per_change(
    tmp_path: Path, events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new stack has no event log yet: no child is started (it could only fail) until the
    # archiver writes one; then one run, and none again until the log changes.
    import training.train as train_module

    runs: list[str] = []

    async def child(settings: Settings, **_: object) -> int:
        runs.append(log_signature(settings.event_log_dir))
        return 0

    monkeypatch.setattr(train_module, "train_in_subprocess", child)
    monkeypatch.setattr(train_module, "_champion_fault", _sound_champion)
    settings = settings_for(tmp_path)
    task = asyncio.create_task(retrain_forever(settings, 0.01))

    async def loops(n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(0.01)

    try:
        await loops(30)
        assert runs == []
        settings.event_log_dir.mkdir()
        await loops(30)
        assert runs == []  # a folder with no file is no event either
        write_events(settings.event_log_dir, events)
        for _ in range(3000):
            await asyncio.sleep(0.01)
            if runs:
                break
        await loops(30)
        assert runs == [log_signature(settings.event_log_dir)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_large_logs_select_on_a_sample_of_whole_users_and_fit_on_all(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    result = train(settings, progress=False, candidates=FAST, max_users=250)
    assert result.users == 600 and result.sampled_users == 250
    meta = ModelRegistry(settings.model_dir).load_champion().metadata
    assert meta["extra"]["sampled_users"] == 250 and meta["extra"]["users"] == 600
    buyers = events.loc[events["type"] == "purchase", "user_id"].nunique()
    assert meta["extra"]["fit_users"] == buyers > 250  # the champion is fitted on everyone
    assert meta["validation"]["users"] <= 250
    again = train(settings, progress=False, candidates=FAST, max_users=250)
    assert again.validation == result.validation  # the sample is drawn from the data: repeatable


def test_log_signature_changes_only_when_events_are_added(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    root = tmp_path / "events"
    empty = log_signature(root)
    write_events(root, events.iloc[:100])
    first = log_signature(root)
    assert first != empty and log_signature(root) == first
    write_events(root, events.iloc[100:200])
    assert log_signature(root) != first


def test_a_background_training_child_runs_single_threaded_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in THREAD_VARS:
        monkeypatch.delenv(k, raising=False)
    env = _child_env(settings_for(tmp_path))
    assert all(env[k] == "1" for k in THREAD_VARS)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert _child_env(settings_for(tmp_path))["OMP_NUM_THREADS"] == "2"


def test_train_with_every_kind_of_candidate(tmp_path: Path, events: pd.DataFrame) -> None:
    # FAST keeps the other tests quick; this one takes the supervised and hybrid paths too.
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    names = [*FAST, "hgb_poisson", "tweedie_glm", "hybrid_btyd_features", "hybrid_btyd_residual"]
    result = train(settings, progress=False, candidates=names)
    assert set(result.candidates) == set(names)
    for name, metrics in result.candidates.items():
        assert np.isfinite(metrics["rmse"]), f"{name} was not scored: {metrics}"
    champion = ModelRegistry(settings.model_dir).load_champion()
    assert champion.metadata["model_name"] == result.model_name
    pred = champion.model.predict(features_at(events, result.cutoff_day), champion.horizon_days)
    assert np.isfinite(pred.to_numpy()).all() and pred["predicted_value"].sum() > 0


def test_a_final_fit_that_cannot_forecast_is_not_registered(
    tmp_path: Path, events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.models.btyd as btyd

    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    fit_gg = btyd.fit_gamma_gamma
    calls = {"n": 0}

    def broken_spend(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        p = fit_gg(*args, **kwargs)
        # selection's fits are fine; the final fit's Gamma-Gamma gets a parameter that is no
        # number (a numerical failure: its forecast is refused, never zeroed)
        return btyd.GammaGammaParams(float("nan"), p.q, p.gamma) if calls["n"] > 1 else p

    monkeypatch.setattr(btyd, "fit_gamma_gamma", broken_spend)
    with pytest.raises(TrainingError, match="final fit cannot forecast"):
        train(settings, progress=False, candidates=["bgnbd_gg"])
    assert not (settings.model_dir / "CHAMPION").exists()
    assert ModelRegistry(settings.model_dir).versions() == []


def test_spend_too_heavy_tailed_for_gamma_gamma_still_trains_a_reference_that_forecasts(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    """Each user's spend scaled by a lognormal(0, 1.5) factor: Gamma-Gamma's q falls below 1
    (0.77 on the whole log). Fails if BG/NBD+GG refuses to forecast (it did: "non-finite
    values"), so that selection loses its yardstick, or if the registered model cannot."""
    rng = np.random.default_rng(0)
    users = events["user_id"].unique()
    factor = events["user_id"].map(
        dict(zip(users, np.exp(rng.normal(0, 1.5, len(users))), strict=True))
    )
    from feature_store.offline import signed_cents

    heavy = events.copy()
    heavy["amount"] = (heavy["amount"] * factor).round(2).clip(0.01, 1e9)
    heavy["cents"] = signed_cents(heavy["amount"].to_numpy(), heavy["type"].to_numpy())
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, heavy)
    result = train(settings, progress=False, candidates=FAST)
    reference = result.candidates["bgnbd_gg"]
    assert reference["error"] is None, reference["error"]
    assert any("Gamma-Gamma q = " in w and "<= 1" in w for w in reference["warnings"])
    champion = ModelRegistry(settings.model_dir).load_champion()
    assert champion.version == result.version
    pred = champion.model.predict(features_at(heavy, result.cutoff_day), champion.horizon_days)
    assert np.isfinite(pred.to_numpy()).all() and pred["predicted_value"].sum() > 0


def test_a_registry_that_cannot_promote_is_refused_before_registering(tmp_path: Path) -> None:
    from training.registry import POINTER_FILE, ModelRegistry
    from training.train import _check_model_dir

    root = tmp_path / "models"
    (root / POINTER_FILE).mkdir(parents=True)
    with pytest.raises(TrainingError, match="CHAMPION is not a regular file"):
        _check_model_dir(root)
    assert ModelRegistry(root).versions() == []


def test_a_champion_missing_the_targets_ranks_below_the_reference_as_in_selection() -> None:
    """Promotion ranks as the selection does: a champion (its recipe, refitted on the window)
    that misses the targets against BG/NBD+GG loses to any challenger, even the reference,
    whatever its composite score; one that meets them is compared on the composite."""
    from types import SimpleNamespace

    from training.registry import ChampionScore, LoadedModel, Validation
    from training.selection import REFERENCE, CandidateScore, composite_score, qualifies
    from training.train import COMPOSITE, _champion_evaluator

    ref_m = {"rmse": 10.0, "mae": 5.0, "gini": 0.6, "decile_mape": 0.3, "decile_mape_level": 0.2}
    ref_m["bias"] = -0.15
    good_m = {**ref_m, "rmse": 9.9, "mae": 4.9, "gini": 0.7, "decile_mape_level": 0.15}
    high_m = {**good_m, "rmse": 10.5, "gini": 0.8}  # far better ranking, but RMSE +5%
    assert qualifies(good_m, ref_m) and not qualifies(high_m, ref_m)
    assert composite_score(high_m, ref_m) > 0  # the composite alone would keep it
    val = Validation(COMPOSITE, True, 0.0, train_end_day=100, label_days=30)
    for metrics, kept in ((high_m, False), (good_m, True)):
        selection = SimpleNamespace(
            val_actual=np.ones(3),
            scores={
                REFERENCE: CandidateScore(REFERENCE, ref_m, 1.0, score=0.0),
                "hgb_poisson": CandidateScore(
                    "hgb_poisson", metrics, 1.0, score=composite_score(metrics, ref_m)
                ),
            },
        )
        champion = LoadedModel(
            "v1",
            None,
            {"model_name": "hgb_poisson", "data_window": {"cutoff_day": 120}},  # type: ignore[arg-type]
        )
        scored = _champion_evaluator(pd.DataFrame(), selection)(champion, val)
        assert isinstance(scored, ChampionScore)
        assert (scored.score > val.score) is kept, scored
        assert ("misses the targets" in scored.how) is not kept


def test_a_stored_champion_rescored_on_the_window_is_ranked_as_in_selection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other path: the stored champion (its fit ends before the window, or its recipe was
    not among this selection's candidates) is scored on the window; missing the targets
    ranks it below any challenger, even with a composite score above the reference's."""
    from types import SimpleNamespace

    import training.datasets as datasets
    from training.metrics import all_metrics
    from training.registry import ChampionScore, LoadedModel, Validation
    from training.selection import REFERENCE, CandidateScore, composite_score, qualifies
    from training.train import COMPOSITE, _champion_evaluator

    rng = np.random.default_rng(0)
    actual = rng.gamma(0.3, 100.0, 3_000)

    def noisy(sd: float) -> np.ndarray:  # a ranking of actual, noisier with sd, same total
        s = np.exp(np.log1p(actual) + rng.normal(0, sd, actual.size))
        return np.asarray(s * actual.sum() / s.sum())

    ref_m = all_metrics(actual, 0.9 * noisy(1.5))
    good = noisy(0.7)
    for pred, kept in ((1.2 * good, False), (good, True)):  # +20% total: misses the bias target
        m = all_metrics(actual, pred)
        assert qualifies(m, ref_m) is kept and composite_score(m, ref_m) > 0
        model = SimpleNamespace(
            predict=lambda feats, days, p=pred: pd.DataFrame({"predicted_value": p})
        )
        champion = LoadedModel(
            "v1",
            model,  # type: ignore[arg-type]
            {"model_name": "random_forest", "data_window": {"cutoff_day": 90}},
        )
        selection = SimpleNamespace(
            val_actual=actual,
            scores={REFERENCE: CandidateScore(REFERENCE, ref_m, 1.0, score=0.0)},
        )
        monkeypatch.setattr(datasets, "purchasers_at", lambda events, day: pd.DataFrame())
        val = Validation(COMPOSITE, True, 0.0, train_end_day=100, label_days=30)
        scored = _champion_evaluator(pd.DataFrame(), selection)(champion, val)
        assert isinstance(scored, ChampionScore) and "re-scored" in scored.how
        assert (scored.score > val.score) is kept, scored


def test_library_warnings_are_kept_with_the_model_not_printed(
    tmp_path: Path,
    events: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Small logs make scikit-learn warn (a solver stopping early, a bootstrap of a few rows).
    # Those notes belong in the candidate's record, not as multi-line noise past --quiet (and
    # pytest turns any warning that escapes into an error, so this also proves none does).
    import warnings

    from training.models.btyd import BGNBDGammaGamma
    from training.models.naive import HistoricalRate

    def noisy(fit):  # type: ignore[no-untyped-def]
        def fit_and_warn(self, ds):  # type: ignore[no-untyped-def]
            for _ in range(3):  # one note, however often it is raised
                note = f"{type(self).__name__} is unsure\nsee line two"
                warnings.warn(note, UserWarning, stacklevel=2)
            return fit(self, ds)

        return fit_and_warn

    for cls in (HistoricalRate, BGNBDGammaGamma):
        monkeypatch.setattr(cls, "fit", noisy(cls.fit))
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)

    result = train(settings, progress=False, candidates=FAST)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""
    meta = ModelRegistry(settings.model_dir).load_champion().metadata
    for name, cls in (("naive_rate", HistoricalRate), ("bgnbd_gg", BGNBDGammaGamma)):
        note = f"UserWarning: {cls.__name__} is unsure ... see line two"
        assert meta["candidates"][name]["warnings"] == [note]
    # and which targets each missed on validation, as the selection said
    assert meta["candidates"]["bgnbd_gg"]["missed_targets"] is None  # the yardstick
    refused = meta["candidates"]["naive_rate"]
    assert refused["qualifies"] == (refused["missed_targets"] == [])
    assert all(isinstance(m, str) and m for m in refused["missed_targets"])
    champion_class = {"naive_rate": "HistoricalRate", "bgnbd_gg": "BGNBDGammaGamma"}
    note = f"UserWarning: {champion_class[result.model_name]} is unsure ... see line two"
    assert meta["extra"]["final_fit_warnings"] == [note]

    loud = Settings(event_log_dir=settings.event_log_dir, model_dir=tmp_path / "loud")
    train(loud, progress=True, candidates=FAST)
    err = capsys.readouterr().err
    assert err.count("validation: naive_rate warned: UserWarning: HistoricalRate is unsure") == 1
    assert err.count("final fit warned: UserWarning: ") == 1
    assert "\nsee line two" not in err and "warnings.warn" not in err  # one line each


def test_the_training_child_exits_non_zero_when_it_cannot_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m training.train`` is what the stack's retraining runs: a run that could not
    train must not look like a success (retrain_forever would not try again until new events
    arrived)."""
    from training.train import main

    monkeypatch.setenv("CLV_EVENT_LOG_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("CLV_MODEL_DIR", str(tmp_path / "models"))
    assert main(["--quiet"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: the event log ")
    assert len(out.err.strip().splitlines()) == 1


def test_a_skipped_run_names_the_champion_not_the_version_it_matched(
    tmp_path: Path,
    events: pd.DataFrame,
) -> None:
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events.iloc[: len(events) // 2])
    first = train(settings, progress=False, candidates=FAST)
    write_events(settings.event_log_dir, events.iloc[len(events) // 2 :])
    second = train(settings, progress=False, candidates=FAST)
    ModelRegistry(settings.model_dir).offer(first.version, force=True)  # back to the first
    same = train(settings, progress=False, candidates=FAST)
    assert same.skipped and same.version == second.version
    assert same.champion_version == same.decision.champion_version == first.version
    assert same.summary().endswith(
        f"; the champion is {first.version} (`clv train --again` trains anyway)"
    )


def test_a_skipped_run_gives_the_horizon_its_model_was_trained_for(
    tmp_path: Path,
    events: pd.DataFrame,
) -> None:
    """A log shorter than the horizon asked for: the model's horizon was shortened, and the
    skipped run reports that one, beside the one asked for."""
    settings = settings_for(tmp_path, horizon_days=3000)
    write_events(settings.event_log_dir, events)
    first = train(settings, progress=False, candidates=FAST)
    same = train(settings, progress=False, candidates=FAST)
    assert same.skipped and first.horizon_days < 3000
    assert (same.horizon_days, same.requested_horizon_days) == (first.horizon_days, 3000)
    assert same.cutoff_day == first.cutoff_day


class _Sleeps:
    """Stands in for ``asyncio`` inside training.train: records what retrain_forever sleeps and
    yields at once, so that a schedule is checked without waiting for it."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    def __getattr__(self, name: str) -> object:
        return getattr(asyncio, name)

    async def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        await asyncio.sleep(0)


class _StoppedClock:
    """Stands in for ``time`` inside training.train: a monotonic clock that moves only when a
    test moves it (``now``), so a run's length is what the test says it was."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def monotonic(self) -> float:
        return self.now


def _scheduled(monkeypatch: pytest.MonkeyPatch, child: object) -> _Sleeps:
    """retrain_forever's clock stopped, its sleeps recorded, and ``child`` its training run."""
    import training.train as train_module

    sleeps = _Sleeps()
    monkeypatch.setattr(train_module, "asyncio", sleeps)
    monkeypatch.setattr(train_module, "time", _StoppedClock())
    monkeypatch.setattr(train_module, "train_in_subprocess", child)
    return sleeps


async def _loop_until(task: asyncio.Task[None], done: object) -> None:
    for _ in range(3000):  # a bound, not a timing: each turn is one yield to the loop
        if done() or task.done():  # type: ignore[operator]
            break
        await asyncio.sleep(0.001)


async def test_retraining_retries_a_failed_run_and_keeps_its_schedule(
    tmp_path: Path, events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failed run (non-zero exit, or a child that could not start) is tried again on the same
    # log, a minute at most apart while there is no champion; a success is not repeated; with a
    # champion, runs are `interval_s` apart.
    import training.train as train_module

    outcomes: list[int | Exception] = [1, OSError("no fork"), 0]
    runs: list[dict[str, object]] = []

    async def child(settings: Settings, **kwargs: object) -> int:
        runs.append(kwargs)
        outcome = outcomes.pop(0) if outcomes else 0
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    sleeps = _scheduled(monkeypatch, child)  # runs take no time here
    monkeypatch.setattr(train_module, "_champion_fault", _sound_champion)
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    task = asyncio.create_task(retrain_forever(settings, 3600, candidates=FAST))
    try:
        await _loop_until(task, lambda: len(sleeps.asked) >= 6)
        assert not task.done()  # failures are logged, never end the loop
        assert len(runs) == 3  # failed, could not start, then the success; none after it
        assert all(kw.get("candidates") == FAST for kw in runs)
        assert sleeps.asked[:6] == [60.0] * 6  # no champion yet: a minute at most
        monkeypatch.setattr(ModelRegistry, "champion_version", lambda self: "v1")
        sleeps.asked.clear()
        await _loop_until(task, lambda: len(sleeps.asked) >= 2)
        assert sleeps.asked[:2] == [3600, 3600]
        assert len(runs) == 3
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_retraining_runs_start_on_a_fixed_grid_whatever_a_run_lasts(
    tmp_path: Path, events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`clv train --every 3600` starts a run every hour, not an hour after the last run ended
    (which drifts by each run's length), and a run that outlasts the hour moves the next start
    to the grid's next point rather than starting one at once. Fails if the interval is
    counted from a run's end: the sleeps are then 3600 whatever the runs lasted."""
    import training.train as train_module

    clock = _StoppedClock()
    lasts = [100.0, 3700.0, 0.0]  # seconds each run takes, on the test's clock

    async def child(settings: Settings, **_: object) -> int:
        clock.now += lasts.pop(0) if lasts else 0.0
        write_events(settings.event_log_dir, events.iloc[:1])  # a change: the next one runs
        return 0

    sleeps = _Sleeps()
    monkeypatch.setattr(train_module, "asyncio", sleeps)
    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(train_module, "train_in_subprocess", child)
    monkeypatch.setattr(ModelRegistry, "champion_version", lambda self: "v1")
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    task = asyncio.create_task(retrain_forever(settings, 3600))
    try:
        await _loop_until(task, lambda: len(sleeps.asked) >= 3)
        # 100 s run: 3500 s to the next start; 3700 s run: past one start, 3500 s to the
        # next point of the grid; an instant run: the whole interval
        assert sleeps.asked[:3] == [3500.0, 3500.0, 3600.0]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_retraining_replaces_a_champion_broken_since_the_last_run_on_the_same_log(
    tmp_path: Path,
    events: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no new events a periodic run is skipped, but not when the champion has since been
    deleted or corrupted: the stack would otherwise serve no model until the next event.
    Fails if an unchanged log alone skips the run: the third run never starts."""
    from training.models.naive import HistoricalRate
    from training.registry import DataWindow, Validation

    settings = settings_for(tmp_path)
    registry = ModelRegistry(settings.model_dir)
    runs: list[str | None] = []

    async def child(_settings: Settings, **_: object) -> int:  # a run that leaves a champion
        runs.append(registry.champion_version())
        version = registry.register(
            HistoricalRate(min_age_days=len(runs)),
            data_window=DataWindow(9000, 9700, 9700, 180),
            validation=Validation("mae", False, float(len(runs)), 9500, 180, 100),
            candidates={"naive_rate": {"mae": float(len(runs))}},
            data_fingerprint="f" * 64,
        )
        registry.offer(version)
        return 0

    sleeps = _scheduled(monkeypatch, child)
    write_events(settings.event_log_dir, events)
    caplog.set_level(logging.INFO, logger="training.train")
    task = asyncio.create_task(retrain_forever(settings, 3600))
    try:
        await _loop_until(task, lambda: len(sleeps.asked) >= 3)
        assert runs == [None]  # trained once; then the same log and a sound champion: skipped
        assert "no new events since the last run" in caplog.text
        champion = registry.champion_version()
        assert champion is not None
        path = settings.model_dir / champion / "model.pkl"
        path.write_bytes(path.read_bytes()[:-1] + b"!")  # corrupted on disk
        await _loop_until(task, lambda: len(runs) >= 2)
        assert runs == [None, champion]
        assert "runs again on an unchanged event log" in caplog.text
        assert "does not match the sha256" in caplog.text
        healthy = registry.load_champion().version
        assert healthy != champion  # the broken one was replaced
        sleeps.asked.clear()
        await _loop_until(task, lambda: len(sleeps.asked) >= 2)
        assert len(runs) == 2  # and the loop is back to skipping
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


_WAITS_ITS_TURN = """
import sys
from training.train import main
sys.exit(main(["--candidates=naive_rate,bgnbd_gg"]))
"""


def test_training_runs_on_one_event_log_take_turns(
    tmp_path: Path, events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started while another trains on the same event log (`clv train` beside `clv up`'s
    retraining) waits for it, says so, and then trains nothing on the events the other trained
    on: one version, not twins. Fails without the turn: the second run trains at once beside
    the lock's holder and registers a second version of the same events."""
    import fcntl

    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    assert train(settings, progress=False, candidates=FAST).promoted  # a champion
    [first] = ModelRegistry(settings.model_dir).versions()
    write_events(settings.event_log_dir, synth_events(seed=12, start=dt.date(2024, 6, 1)))
    holder = os.open(settings.event_log_dir, os.O_RDONLY | os.O_DIRECTORY)
    # another run's turn, as the kernel sees it (not blocking: a turn the run above left held
    # fails here instead of hanging)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    waiter = subprocess.Popen(
        [sys.executable, "-c", _WAITS_ITS_TURN],
        env={**os.environ, **settings.as_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines: queue.Queue[str] = queue.Queue()
    assert waiter.stderr is not None
    threading.Thread(target=lambda: [lines.put(x) for x in waiter.stderr], daemon=True).start()
    try:
        said = ""
        while "waiting for another training run" not in said:
            try:  # a bound for a hang (a run that never says it waits), not a timing
                said += lines.get(timeout=120)
            except queue.Empty:
                pytest.fail(f"the second run never said it waits: {said}")
        assert "waiting for another training run on the event log" in said, said
        assert waiter.poll() is None  # still waiting: it read nothing
        # Meanwhile the holder trains on the new events and registers their version (in this
        # process, whose turn the held lock already is).
        import training.train as train_module

        monkeypatch.setattr(train_module, "runs_take_turns", lambda *_: contextlib.nullcontext())
        mine = train(settings, progress=False, candidates=FAST)
        assert ModelRegistry(settings.model_dir).versions() == sorted([first, mine.version])
    finally:
        os.close(holder)
        if waiter.poll() is None and sys.exc_info()[0] is not None:
            waiter.kill()
    assert waiter.stdout is not None
    out = waiter.stdout.read()
    assert waiter.wait(timeout=300) == 0, said
    assert "nothing to train" in out, out  # the holder's version stands for these events
    assert ModelRegistry(settings.model_dir).versions() == sorted([first, mine.version])


def test_a_run_holds_its_turn_from_reading_the_log_to_its_decision(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    """Fails if a run lets its turn go before it has decided on its version (taken and
    released at once, or dropped before registering): a second trainer could then read the
    same log meanwhile and register a twin. Probed from another handle in every phase."""

    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    held: dict[str, bool] = {}

    def probe(phase: str) -> None:
        if phase:
            held[phase] = turn_taken(settings.event_log_dir)

    train(settings, progress=False, candidates=FAST, on_phase=probe)
    assert set(held) >= {"read event log", "select", "final fit", "register"}, held
    assert all(held.values()), held


async def test_periodic_retraining_says_when_its_run_waits_for_another(
    tmp_path: Path,
    events: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`clv up`'s training child runs quiet: while it waits for another trainer's run, the
    stack's log must say why nothing happens. Fails if it stays silent until the outcome."""
    import fcntl

    runs: list[object] = []

    async def child(settings: Settings, **kwargs: object) -> int:
        runs.append(kwargs)
        return 0

    _scheduled(monkeypatch, child)
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    holder = os.open(settings.event_log_dir, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another trainer's turn
    task = asyncio.create_task(retrain_forever(settings, 3600))
    try:
        with caplog.at_level(logging.INFO, logger="training.train"):
            await _loop_until(task, lambda: len(runs) >= 1)
        assert runs and "retraining waits its turn: another training run is on" in caplog.text
    finally:
        os.close(holder)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not turn_taken(settings.event_log_dir)  # released: nobody holds it


def test_an_event_log_on_a_file_system_without_locks_still_trains(
    tmp_path: Path,
    events: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Some network mounts refuse flock (ENOLCK): runs then train without taking turns, with a
    warning. Fails if the refusal ends the run: no model could ever be trained there."""
    import errno

    import training.train as train_module

    def refused(fd: int, how: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    import fcntl

    # only the turn's flock (the registry's own lock is on the model directory's disk)
    monkeypatch.setattr(
        train_module,
        "fcntl",
        types.SimpleNamespace(flock=refused, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB),
    )
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert train(settings, progress=False, candidates=FAST).promoted
    assert "cannot take turns" in caplog.text


async def test_retraining_outlives_an_event_log_it_cannot_read(
    tmp_path: Path, events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An OSError reading the log (a permission, a vanished mount) or the registry is logged and
    # tried again: it must not end the task, which would stop the whole stack.
    import training.train as train_module

    real_signature = train_module.log_signature
    failures = [PermissionError(13, "Permission denied"), OSError(5, "Input/output error")]
    runs: list[object] = []

    def signature(root: Path) -> str:
        if failures:
            raise failures.pop(0)
        return real_signature(root)

    def unreadable_registry(self: ModelRegistry) -> str | None:
        raise PermissionError(13, "Permission denied")

    async def child(settings: Settings, **kwargs: object) -> int:
        runs.append(kwargs)
        return 0

    sleeps = _scheduled(monkeypatch, child)  # runs take no time here
    monkeypatch.setattr(train_module, "log_signature", signature)
    monkeypatch.setattr(ModelRegistry, "champion_version", unreadable_registry)
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    task = asyncio.create_task(retrain_forever(settings, 3600))
    try:
        await _loop_until(task, lambda: len(sleeps.asked) >= 3)
        assert not task.done()
        assert len(runs) == 1  # once the log could be read
        assert sleeps.asked[:3] == [60.0] * 3  # no champion known: a minute at most
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_the_log_signature_takes_a_file_name_that_is_not_utf8(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    # Fails if a part file named in bytes that are not UTF-8 raises out of log_signature (a
    # UnicodeEncodeError ended clv train --every with a traceback, at every restart).
    root = tmp_path / "events"
    write_events(root, events)
    before = log_signature(root)
    folder = next(p for p in root.iterdir() if p.is_dir())
    name = os.fsencode(folder) + b"/part-\xff.parquet"
    os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))
    after = log_signature(root)
    assert len(after) == 64 and after != before


async def test_a_training_run_that_succeeds_but_warns_is_not_silent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A stand-in interpreter for the child: its outcome on stdout, a warning on stderr, exit 0.
    # Fails if a run that succeeded drops what it warned (an old version it could not prune:
    # clv train -q says so, clv up's and train --every's retraining said nothing).
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\necho 'model v1 (naive_rate) kept: the champion is v0'\n"
        "echo 'could not remove old model version v-old' >&2\n"
    )
    python.chmod(0o755)
    caplog.set_level(logging.INFO, logger="training.train")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "executable", str(python))
        assert await train_in_subprocess(settings_for(tmp_path)) == 0
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "training.train"]
    assert (logging.INFO, "retraining: model v1 (naive_rate) kept: the champion is v0") in said
    assert (logging.WARNING, "retraining warned: could not remove old model version v-old") in said


async def test_retraining_says_when_the_event_log_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Fails if a CLV_EVENT_LOG_DIR that does not exist (a typo, or an archiver yet to write)
    # reads as a log that holds no events, every interval, whatever the setting says.
    import training.train as train_module

    settings = settings_for(tmp_path)

    class MakesTheLog(_Sleeps):  # the archiver's first flush, during the first wait
        async def sleep(self, seconds: float) -> None:
            settings.event_log_dir.mkdir(exist_ok=True)
            await super().sleep(seconds)

    sleeps = MakesTheLog()
    monkeypatch.setattr(train_module, "asyncio", sleeps)
    caplog.set_level(logging.INFO, logger="training.train")
    task = asyncio.create_task(retrain_forever(settings, 3600))
    try:
        await _loop_until(task, lambda: len(sleeps.asked) >= 2)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    waits = [r.getMessage() for r in caplog.records if "retraining waits" in r.getMessage()]
    assert waits[0].endswith("does not exist yet (CLV_EVENT_LOG_DIR; the archiver makes it)")
    assert waits[1].endswith("holds no events yet")


async def test_a_training_child_that_fails_returns_its_exit_code(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)  # no event log: the child cannot train
    assert await train_in_subprocess(settings, candidates=FAST) == 1


async def test_a_cancelled_training_child_is_terminated_not_killed(
    tmp_path: Path, events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.train as train_module

    started: list[asyncio.subprocess.Process] = []
    real_exec = asyncio.create_subprocess_exec

    async def exec_and_keep(*args: object, **kwargs: object) -> asyncio.subprocess.Process:
        proc = await real_exec(*args, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    patched = types.SimpleNamespace(**{**vars(asyncio), "create_subprocess_exec": exec_and_keep})
    monkeypatch.setattr(train_module, "asyncio", patched)
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    task = asyncio.create_task(train_in_subprocess(settings, force=True))  # every candidate
    for _ in range(3000):
        await asyncio.sleep(0.01)
        if started:
            break
    await asyncio.sleep(0.5)  # into its imports or its training, either is fine
    (proc,) = started
    # A group of its own: a terminal's Ctrl-C to clv's group does not reach it (the
    # cancellation below stops it instead).
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # SIGTERM: a clean exit (143) once training runs, or the signal itself before; a child left
    # running would have been killed (-9) ten seconds later, or have finished (0).
    assert proc.returncode in (143, -signal.SIGTERM)


async def test_a_training_child_cancelled_while_it_starts_is_not_left_running(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    before = set(children(os.getpid()))
    task = asyncio.create_task(train_in_subprocess(settings, force=True))
    await asyncio.sleep(0)  # the child is forked; its pipes are not yet connected
    spawned = set(children(os.getpid())) - before
    assert spawned and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Killed and reaped (by asyncio, before create_subprocess_exec gave us the process).
    assert not any(Path(f"/proc/{pid}").exists() for pid in spawned)


def test_a_training_child_gets_the_settings_built_in_code_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLV_MODEL_DIR", str(tmp_path / "elsewhere"))
    settings = settings_for(tmp_path)
    env = _child_env(settings)
    assert env["CLV_MODEL_DIR"] == str(settings.model_dir)


@pytest.mark.parametrize("given", ["nope", "bgnbd_gg,nope", ""])
def test_the_training_child_refuses_unknown_candidates_in_one_line(
    tmp_path: Path,
    events: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    given: str,
) -> None:
    """``python -m training.train --candidates=...`` with a name no candidate has is bad input:
    one line and exit 2, before the event log is read, not a KeyError's traceback."""
    from training.train import main

    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    monkeypatch.setenv("CLV_EVENT_LOG_DIR", str(settings.event_log_dir))
    monkeypatch.setenv("CLV_MODEL_DIR", str(settings.model_dir))
    assert main(["--quiet", f"--candidates={given}"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: unknown candidate(s) ")
    assert "bgnbd_gg" in out.err  # the known ones are named
    assert len(out.err.strip().splitlines()) == 1
    assert not settings.model_dir.exists()


def test_a_link_in_place_of_the_promotion_history_is_refused_before_training(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    """The registry never writes its history through a link, so a run with one there cannot
    record its decision. Fails if that is found only after training: the run then registers
    its version, moves the champion pointer to it, and ends in an error all the same."""
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    settings.model_dir.mkdir()
    (tmp_path / "audit.jsonl").write_text("")
    (settings.model_dir / "promotions.jsonl").symlink_to(tmp_path / "audit.jsonl")
    with pytest.raises(TrainingError, match=r"promotions\.jsonl is a symbolic link"):
        train(settings, progress=False, candidates=FAST)
    registry = ModelRegistry(settings.model_dir)
    assert registry.versions() == [] and registry.champion_version() is None


def _run_child(script: str, settings: Settings) -> subprocess.CompletedProcess[str]:
    """``script`` in a Python of its own with ``settings`` (a training child, as `clv up` runs
    one), on this checkout's packages."""
    return subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **settings.as_env()},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )


_TERMINATED_WHILE_DECIDING = """
import os, signal, sys
from training.registry import ModelRegistry
from training.train import main

decide = ModelRegistry._decide

def terminated_while_deciding(self, *args, **kw):  # as `clv up` cancelling the run there
    os.kill(os.getpid(), signal.SIGTERM)
    return decide(self, *args, **kw)

ModelRegistry._decide = terminated_while_deciding
sys.exit(main(["--quiet", "--candidates=naive_rate,bgnbd_gg"]))
"""


def test_a_run_terminated_after_registering_still_decides_on_its_version(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    """The version's rename and its promotion decision are one step: a SIGTERM arriving
    between them (the champion is loaded and re-scored there, seconds at scale) lets the
    decision finish, then ends the run (143). Fails if the run stops in between: its version
    stays registered but never offered, an orphan that no decision names and that the next
    run will not recognise, where the README promises "registers nothing" or "complete"."""
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    done = _run_child(_TERMINATED_WHILE_DECIDING, settings)
    assert done.returncode == 143, done.stderr
    registry = ModelRegistry(settings.model_dir)
    [version] = registry.versions()
    assert registry.champion_version() == version  # the first model, decided and promoted
    history = (settings.model_dir / "promotions.jsonl").read_text().splitlines()
    assert [json.loads(line)["version"] for line in history] == [version]


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (OSError(28, "No space left on device"), "No space left on device"),
        (MemoryError(), "not enough memory"),
    ],
)
def test_the_training_child_says_a_failure_of_the_machine_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: BaseException,
    said: str,
) -> None:
    """As `clv train` does: a full disk or an unwritable registry met mid-run, or too little
    memory, is one line and exit 1 in the stack's log. Fails if the child lets it escape as a
    traceback (which `clv up` then logs, cut to its last 2,000 characters, every retraining)."""
    import training.train as train_module

    def fails(*_a: object, **_kw: object) -> None:
        raise error

    monkeypatch.setattr(train_module, "train", fails)
    monkeypatch.setenv("CLV_EVENT_LOG_DIR", str(tmp_path / "events"))
    monkeypatch.setenv("CLV_MODEL_DIR", str(tmp_path / "models"))
    assert train_module.main(["--quiet"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and said in out.err
    assert len(out.err.strip().splitlines()) == 1


def test_a_run_removes_old_versions_beyond_clv_model_keep(
    tmp_path: Path, events: pd.DataFrame, minutes: list[dt.datetime]
) -> None:
    """Fails if `clv train` (and so `clv up`'s hourly retraining) leaves every version it ever
    made: CLV_MODEL_KEEP=1 keeps the champion and the newest version only."""
    settings = settings_for(tmp_path).model_copy(update={"model_keep": 1})
    write_events(settings.event_log_dir, events)
    first = train(settings, progress=False, candidates=FAST)
    again = train(settings, progress=False, again=True, candidates=FAST)
    assert not again.promoted
    registry = ModelRegistry(settings.model_dir)
    assert registry.versions() == [first.version, again.version]  # the champion, the newest
    forced = train(settings, progress=False, force=True, candidates=FAST)
    assert registry.versions() == [forced.version] == [registry.champion_version()]


_TERMINATED_WHILE_IMPORTING_MODELS = """
import os, signal, sys
import training.models.candidates as candidates
from training.train import main

make = candidates.make_candidates

def terminated_meanwhile(*args, **kw):  # as `clv up` cancelling a run that just started
    os.kill(os.getpid(), signal.SIGTERM)
    return make(*args, **kw)

candidates.make_candidates = terminated_meanwhile
sys.exit(main(["--quiet"]))
"""


def test_a_training_child_terminated_while_it_starts_exits_143(tmp_path: Path) -> None:
    """Fails if a SIGTERM while the child makes its candidates (the models' import, at its
    start) kills it outright (-15), where a run terminated later exits 143 after cleaning up.
    (One during `training.train`'s own imports: the test below.)"""
    settings = settings_for(tmp_path)
    done = _run_child(_TERMINATED_WHILE_IMPORTING_MODELS, settings)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "error: terminated"
    assert not settings.model_dir.exists()


def test_a_training_child_terminated_while_python_imports_it_exits_143(tmp_path: Path) -> None:
    # Fails if the child, started as the stack starts it, dies of the bare signal (-15) when
    # the SIGTERM (clv up cancelling a run that has just started) comes while Python imports
    # training.train: pandas, scikit-learn and the rest take most of a second to import.
    settings = settings_for(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, *TRAINING_CHILD, "--quiet"],
        env={**os.environ, **settings.as_env()},
        cwd=Path(__file__).resolve().parents[2],
        stderr=subprocess.PIPE,
        text=True,
    )
    maps = Path(f"/proc/{proc.pid}/maps")
    for _ in range(5000):  # until it is importing: numpy comes before pandas and the rest
        if proc.poll() is not None or "_multiarray_umath" in maps.read_text():
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.strip()) == (143, "error: terminated")
    assert not settings.model_dir.exists()


def test_the_training_child_never_prints_a_secret_of_a_bad_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Fails if pydantic's own text is printed (a traceback): it quotes the settings' input,
    # CLV_KAFKA_SASL_PASSWORD included, into the stack's log.
    import training.train as train_module

    monkeypatch.setenv("CLV_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CLV_KAFKA_SASL_USERNAME", "clv")
    monkeypatch.setenv("CLV_KAFKA_SASL_PASSWORD", "s3cret")
    assert train_module.main(["--quiet"]) == 1
    err = capsys.readouterr().err
    assert "s3cret" not in err and "SASL_SSL" in err and len(err.strip().splitlines()) == 1


def test_clv_train_every_trains_at_once_skips_an_unchanged_log_and_stops_cleanly(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    # `clv train --every SECONDS`: docker-compose.yml's trainer. Fails if it trains only once
    # (the trainer ran once and exited: no periodic retraining in production), hides each
    # run's outcome (a service's INFO lines were dropped: clv up said nothing of its
    # retraining), or a SIGTERM does not end it cleanly.
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    proc = subprocess.Popen(
        [sys.executable, "-m", "clv", "train", "--every", "1"],
        env={**os.environ, **settings.as_env()},
        cwd=Path(__file__).resolve().parents[2],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "retraining skipped: no new events" in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
    said = "".join(lines) + rest
    assert proc.returncode == 0, said
    assert "retraining: model" in said and "promoted to champion" in said
    assert "Traceback" not in said
    # Fails if an operator's log does not say when the trainer started, on what, and stopped.
    assert f"retraining every 1s from the event log {settings.event_log_dir} into" in said
    assert said.rstrip().endswith("retraining stopped")
    registry = ModelRegistry(settings.model_dir)
    assert registry.versions() == [registry.champion_version()]  # one run, then skipped


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (["--every", "0"], 2, "--every must be 1 second or more, not 0.0"),
        (["--every", "nan"], 2, "--every must be 1 second or more, not nan"),
        (["--every", "inf"], 2, "--every must be 1 second or more, not inf"),
        (["--every", "60", "--json", "--force"], 2, "--every takes no --force, --json"),
        (["--every", "60"], 1, "(CLV_MODEL_DIR) cannot be used"),
    ],
)
def test_clv_train_every_refuses_what_it_cannot_do_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], code: int, said: str
) -> None:
    # Fails if a bad --every, options that mean nothing with it, or a model directory it
    # cannot write (a file here) start the loop instead of ending at once in one line.
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("CLV_EVENT_LOG_DIR", str(tmp_path / "events"))
    monkeypatch.setenv("CLV_MODEL_DIR", str(tmp_path / "a_file"))
    app = typer.Typer()
    app.command()(train_command)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], result.stderr


def test_a_relayed_training_run_is_not_stopped_by_a_terminal_with_tostop(tmp_path: Path) -> None:
    # Fails if the child of a relayed run (clv demo's) writes to the terminal itself: in a
    # process group of its own it is a background writer, which a terminal with `stty tostop`
    # stops (SIGTTOU), and the demo hung at its training for good.
    import fcntl
    import pty
    import select
    import termios

    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] |= termios.TOSTOP
    termios.tcsetattr(slave, termios.TCSANOW, attrs)

    def on_the_terminal() -> None:  # the session's controlling terminal, as a login's
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    program = (
        "import asyncio, sys\n"
        "from clv.settings import Settings\n"
        "from training.train import run_training_child\n"
        "settings = Settings(event_log_dir=sys.argv[1], model_dir=sys.argv[2])\n"
        "code, _, _ = asyncio.run(run_training_child(settings, relay=print))\n"
        "print('exit', code)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", program, str(tmp_path / "no-log"), str(tmp_path / "models")],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=on_the_terminal,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    os.close(slave)
    said = b""
    try:
        for _ in range(1200):  # a bound (120 s), not a timing
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    said += os.read(master, 4096)
                except OSError:  # EIO: every writer has closed the terminal
                    break
            elif proc.poll() is not None:
                break
        else:
            pytest.fail(f"the run still ran after 120 s: {said.decode(errors='replace')}")
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = said.decode(errors="replace")
    assert "does not exist" in text and "exit 1" in text, text


def _stopped_retraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cleaning: asyncio.Event, ended: list[bool]
) -> asyncio.Task[None]:
    """``retrain_until`` with a stand-in trainer (the fake is the point) whose clean-up, once
    cancelled, takes a while (terminating its training child and waiting for its end): sets
    ``cleaning`` when it begins and appends to ``ended`` when it is done. Stopped at once."""
    import training.train as train_module
    from training.train import retrain_until

    async def trainer(settings: Settings, interval_s: float) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await asyncio.sleep(0.5)
            ended.append(True)
            raise

    monkeypatch.setattr(train_module, "retrain_forever", trainer)
    stop = asyncio.Event()
    stop.set()
    return asyncio.create_task(retrain_until(settings_for(tmp_path), 3600, stop))


async def test_retrain_until_passes_on_a_cancellation_of_its_own_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if retrain_until takes a cancellation of the command's own task, come while the
    # trainer it stops cleans up, for the trainer's and returns as if stopped normally.
    cleaning = asyncio.Event()
    task = _stopped_retraining(tmp_path, monkeypatch, cleaning, [])
    await asyncio.wait_for(cleaning.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)


async def test_retrain_until_waits_for_the_trainer_to_end_its_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if retrain_until cuts the trainer's clean-up short (cancelling it again, as
    # unless_stopped does a starting step): the training child it terminates and waits for
    # would be left running, and could register a model after `clv train --every` ended.
    ended: list[bool] = []
    await asyncio.wait_for(_stopped_retraining(tmp_path, monkeypatch, asyncio.Event(), ended), 30)
    assert ended == [True]


def test_until_trains_on_the_events_up_to_that_day_as_a_log_that_ended_then(
    tmp_path: Path, events: pd.DataFrame
) -> None:
    # Fails if --until is ignored (the cutoff is the log's last day) or trains on events after
    # it (the same model as a log that ended then would not be found: not skipped).
    from feature_store.features import day_number

    settings = settings_for(tmp_path)
    until = day_number(dt.date(2023, 12, 31))
    write_events(settings.event_log_dir, events[events["day"] <= until])
    then = train(settings, progress=False, candidates=FAST)
    write_events(settings.event_log_dir, events[events["day"] > until])  # the log goes on
    said: list[str] = []
    again = train(settings, progress=said.append, candidates=FAST, until_day=until)
    assert then.cutoff_day == until == again.cutoff_day
    assert again.skipped and again.version == then.version
    later = int((events["day"] > until).sum())
    assert f"--until 2023-12-31: {later:,} later events left out" in said
    whole = train(settings, progress=False, candidates=FAST)
    assert not whole.skipped and whole.cutoff_day == int(events["day"].max())


def test_cli_until_must_be_a_date_and_not_with_every(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clv.cli import main

    assert main(["train", "--until", "2023-13-01"]) == 2
    assert "--until '2023-13-01' is not a date (YYYY-MM-DD)" in capsys.readouterr().err
    assert main(["train", "--every", "60", "--until", "2023-12-01"]) == 2
    assert "--every takes no --until" in capsys.readouterr().err


def test_until_before_the_first_purchase_says_so(tmp_path: Path, events: pd.DataFrame) -> None:
    from feature_store.features import day_number

    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, events)
    with pytest.raises(TrainingError) as info:
        train(settings, progress=False, candidates=FAST, until_day=day_number(dt.date(2020, 1, 1)))
    assert str(info.value) == (
        f"no purchase events dated on or before 2020-01-01 in the event log at "
        f"{settings.event_log_dir} ({len(events):,} after it)"
    )
