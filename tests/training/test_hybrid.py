"""The hybrids of BG/NBD+GG and boosting: a shared probabilistic stage, the reference's level."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from feature_store.features import day_number
from training.datasets import build_training_set
from training.models.base import TrainingSet
from training.models.btyd import BGNBDGammaGamma
from training.models.hybrid import BTYDFeatureBoost, BTYDResidualBoost, _btyd_block

CUTOFF = day_number(dt.date(1997, 12, 31))
HORIZON = 91


def _training_set(events: pd.DataFrame) -> TrainingSet:
    past = events[events["day"].to_numpy() <= CUTOFF]
    return build_training_set(past, CUTOFF, HORIZON, n_cutoffs=2, min_history_days=30)


@pytest.fixture(scope="module")
def ds(sample_events: pd.DataFrame) -> TrainingSet:
    return _training_set(sample_events)


def test_the_hybrids_share_one_probabilistic_stage_without_changing_a_prediction(
    sample_events: pd.DataFrame, ds: TrainingSet
) -> None:
    features_first = BTYDFeatureBoost().fit(ds)
    shared = BTYDResidualBoost().fit(ds)
    assert shared.btyd_ is features_first.btyd_  # fitted once for the set

    alone = BTYDResidualBoost().fit(_training_set(sample_events))  # a fresh set: its own fits
    assert alone.btyd_ is not shared.btyd_
    a = shared.predict(ds.current, HORIZON)
    b = alone.predict(ds.current, HORIZON)
    pd.testing.assert_frame_equal(a, b)


def test_a_subset_does_not_reuse_the_whole_sets_fits(ds: TrainingSet) -> None:
    BTYDResidualBoost().fit(ds)
    latest = ds.subset(ds.cutoff_day == ds.cutoffs[-1])
    assert "stacked_btyd" not in latest.memo
    assert BTYDResidualBoost().fit(latest).btyd_ is not ds.memo["stacked_btyd"][1]


@pytest.mark.parametrize("model", [BTYDFeatureBoost, BTYDResidualBoost])
def test_anchored_hybrids_keep_the_references_total_and_change_the_ranking(
    ds: TrainingSet, model: type[BTYDFeatureBoost | BTYDResidualBoost]
) -> None:
    hybrid = model().fit(ds).predict(ds.current, HORIZON)["predicted_value"].to_numpy()
    ref = BGNBDGammaGamma().fit(ds).predict(ds.current, HORIZON)["predicted_value"].to_numpy()
    assert hybrid.sum() == pytest.approx(ref.sum(), rel=1e-6)
    assert not np.allclose(hybrid, ref, rtol=0.01)


@pytest.mark.parametrize("model", [BTYDFeatureBoost, BTYDResidualBoost])
def test_hybrids_predict_from_inputs_over_the_window_they_learned_from(
    sample_events: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
    model: type[BTYDFeatureBoost | BTYDResidualBoost],
) -> None:
    """Labels shorter than the horizon (short history): the BG/NBD/GG inputs were computed
    over the label window in training, so a forecast must read them over that window too,
    not over the horizon, where the same customer's expected orders are larger."""
    past = sample_events[sample_events["day"].to_numpy() <= CUTOFF]
    short = build_training_set(past, CUTOFF, HORIZON, label_days=30, n_cutoffs=2)
    fitted = model().fit(short)
    seen: list[pd.DataFrame] = []
    real = fitted._inputs

    def spy(features: pd.DataFrame, block: pd.DataFrame) -> np.ndarray:
        seen.append(block)
        return real(features, block)

    monkeypatch.setattr(fitted, "_inputs", spy)
    value = fitted.predict(short.current, HORIZON)["predicted_value"].to_numpy()
    assert np.isfinite(value).all() and value.sum() > 0
    over_window = _btyd_block(fitted.btyd_, short.current, 30)
    over_horizon = _btyd_block(fitted.btyd_, short.current, HORIZON)
    assert not np.allclose(over_window["btyd_orders_per_day"], over_horizon["btyd_orders_per_day"])
    [block] = seen
    pd.testing.assert_frame_equal(block, over_window)


@pytest.mark.parametrize("model", [BTYDFeatureBoost, BTYDResidualBoost])
def test_the_boosted_stage_stops_early_on_held_out_customers(
    model: type[BTYDFeatureBoost] | type[BTYDResidualBoost],
    sample_events: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above 10,000 stacked rows the boosting stops early on whole held-out customers (not
    scikit-learn's random rows, whose labels are in the same customers' later features)."""
    import training.models.hybrid as hybrid

    past = sample_events[sample_events["day"].to_numpy() <= CUTOFF]
    big = build_training_set(past, CUTOFF, HORIZON, n_cutoffs=6, min_history_days=30)
    assert len(big) > 10_000
    users: list[pd.Index] = []
    real = hybrid.fit_poisson_boosting

    def spy(est, X, y, who, sample_weight=None):  # type: ignore[no-untyped-def]
        users.append(who)
        return real(est, X, y, who, sample_weight=sample_weight)

    monkeypatch.setattr(hybrid, "fit_poisson_boosting", spy)
    fitted = model().fit(big)
    assert len(users) == 1 and users[0].equals(big.features.index)
    assert fitted.hgb_.early_stopping is True and len(fitted.hgb_.validation_score_) > 1
