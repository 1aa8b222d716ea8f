"""Progress lines: the heartbeat says a long step is still running, and stops with it."""

from __future__ import annotations

import threading

import pytest

from training.progress import heartbeat, quiet
from training.selection import evaluate


def _wait_for(lines: list[str], count: int) -> None:
    got = threading.Event()
    for _ in range(2000):  # at most ~20 s of polling; the beats come every 10 ms
        if len(lines) >= count:
            got.set()
            break
        got.wait(0.01)
    assert got.is_set(), lines


def test_a_long_step_says_it_is_still_running_until_it_ends() -> None:
    lines: list[str] = []
    with heartbeat(lines.append, "fitting slow_model", every_s=0.01):
        _wait_for(lines, 2)
    assert all(line.startswith("still fitting slow_model (") for line in lines)
    assert all(line.endswith("s)") for line in lines)
    assert not any(t.name.startswith("heartbeat") for t in threading.enumerate())  # joined


def test_the_heartbeat_stops_when_the_step_fails() -> None:
    lines: list[str] = []
    with pytest.raises(RuntimeError), heartbeat(lines.append, "fitting", every_s=0.01):
        _wait_for(lines, 1)
        raise RuntimeError("the fit failed")
    assert not any(t.name.startswith("heartbeat") for t in threading.enumerate())


def test_quiet_progress_starts_no_thread() -> None:
    with heartbeat(quiet, "fitting", every_s=0.001):
        assert not any(t.name.startswith("heartbeat") for t in threading.enumerate())


def test_the_selection_beats_while_a_candidate_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit longer than the interval gets a heartbeat line naming the candidate."""
    import numpy as np
    import pandas as pd

    import training.progress as progress_module

    monkeypatch.setattr(progress_module, "HEARTBEAT_S", 0.01)
    lines: list[str] = []

    class Slow:
        def fit(self, ds: object) -> None:
            _wait_for(lines, 3)  # the fit lasts until two heartbeats were said

        def predict(self, features: pd.DataFrame, horizon: int) -> pd.DataFrame:
            zeros = np.zeros(len(features))
            return pd.DataFrame(
                {"predicted_value": zeros, "expected_orders": zeros, "p_alive": zeros + 1},
                index=features.index,
            )

    feats = pd.DataFrame(index=pd.Index(["a", "b"], name="user_id"))
    scores, _ = evaluate(
        {"slow": Slow()},  # type: ignore[dict-item]
        [],  # type: ignore[arg-type]
        feats,
        np.array([1.0, 0.0]),
        30,
        lines.append,
        "validation: ",
    )
    assert scores["slow"].error is None
    assert lines[0] == "validation: fitting slow (1/1) on 0 rows"
    assert lines[1].startswith("validation: still fitting slow (")


def _recording(doings: list[str]):  # type: ignore[no-untyped-def]
    import contextlib

    @contextlib.contextmanager
    def record(say, doing, every_s=None):  # type: ignore[no-untyped-def]
        doings.append(doing)
        yield

    return record


def test_the_backtests_final_fits_are_watched(
    sample_events, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import datetime as dt

    import training.backtest as bt
    from feature_store.features import day_number

    doings: list[str] = []
    monkeypatch.setattr(bt, "heartbeat", _recording(doings))
    cutoff = day_number(dt.date(1997, 9, 30))
    names = ["naive_rate", "bgnbd_gg"]
    result = bt.backtest_events(
        sample_events, cutoff, 60, candidates=names, score_all=True, progress=lambda _m: None
    )
    assert sorted(doings) == [f"fitting {n} for the final fit" for n in sorted(names)]
    assert result.selection.champion in names


def test_trainings_final_fit_is_watched(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import training.progress as progress_module
    from feature_store.event_log import write_events
    from tests.training.test_train import FAST, settings_for, synth_events
    from training.train import train

    doings: list[str] = []
    monkeypatch.setattr(progress_module, "heartbeat", _recording(doings))
    settings = settings_for(tmp_path)
    write_events(settings.event_log_dir, synth_events())
    result = train(settings, progress=lambda _m: None, candidates=FAST)
    assert doings == [f"fitting {result.model_name} for the final fit"]
