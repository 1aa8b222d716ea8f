"""The hybrids of BG/NBD+GG and boosting: a shared probabilistic stage, the reference's level."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

import training.models.hybrid as hybrid
from feature_store.features import day_number
from training.datasets import build_training_set
from training.models.base import TrainingSet
from training.models.btyd import BGNBDGammaGamma
from training.models.hybrid import (
    BTYDFeatureBoost,
    BTYDResidualBoost,
    _btyd_block,
    stacked_btyd,
)

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


WINDOW = 30  # label window shorter than the horizon


def _short(events: pd.DataFrame) -> TrainingSet:
    past = events[events["day"].to_numpy() <= CUTOFF]
    return build_training_set(past, CUTOFF, HORIZON, label_days=WINDOW, n_cutoffs=2)


def test_stacked_inputs_are_each_cutoffs_fit_over_its_label_window(
    sample_events: pd.DataFrame,
) -> None:
    """Each cutoff's BG/NBD/GG outputs come from a fit on that cutoff's rows, over the label
    window (what the labels are compared with), not over the horizon."""
    ds = _short(sample_events)
    block, _ = stacked_btyd(ds)
    assert block.index.equals(ds.features.index)
    for c in ds.cutoffs:
        rows = ds.cutoff_day == c
        feats = ds.features[rows]
        own = _btyd_block(BGNBDGammaGamma().fit_features(feats), feats, WINDOW)
        pd.testing.assert_frame_equal(block[rows], own)


def _recorded_fit(monkeypatch: pytest.MonkeyPatch) -> list[tuple[np.ndarray, np.ndarray | None]]:
    seen: list[tuple[np.ndarray, np.ndarray | None]] = []
    real = hybrid.fit_poisson_boosting

    def spy(est, X, y, who, sample_weight=None):  # type: ignore[no-untyped-def]
        seen.append((np.asarray(y), sample_weight))
        return real(est, X, y, who, sample_weight=sample_weight)

    monkeypatch.setattr(hybrid, "fit_poisson_boosting", spy)
    return seen


@pytest.mark.parametrize("anchor", [True, False])
def test_feature_boost_learns_labels_at_the_references_level_over_the_horizon(
    sample_events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch, anchor: bool
) -> None:
    """Anchored, each cutoff's labels are rescaled to BG/NBD/GG's total over the label window;
    either way they are then rescaled from the label window to the horizon."""
    ds = _short(sample_events)
    seen = _recorded_fit(monkeypatch)
    BTYDFeatureBoost(anchor_level=anchor).fit(ds)
    [(y, _)] = seen
    block, _ = stacked_btyd(ds)
    label = np.maximum(ds.label, 0.0)
    for c in ds.cutoffs:
        rows = ds.cutoff_day == c
        if anchor:
            want = block["btyd_value"].to_numpy()[rows].sum() * HORIZON / WINDOW
            assert y[rows].sum() == pytest.approx(want, rel=1e-9)
        else:
            np.testing.assert_allclose(y[rows], label[rows] * HORIZON / WINDOW, rtol=1e-12)


@pytest.mark.parametrize("anchor", [True, False])
def test_residual_boost_is_a_poisson_model_with_the_reference_as_offset(
    sample_events: pd.DataFrame, monkeypatch: pytest.MonkeyPatch, anchor: bool
) -> None:
    """Target y / base with weight base (the Poisson model with offset log(base)); anchored,
    each cutoff's weighted target sums to BG/NBD/GG's total over the label window."""
    ds = _short(sample_events)
    seen = _recorded_fit(monkeypatch)
    BTYDResidualBoost(anchor_level=anchor).fit(ds)
    [(ratio, weight)] = seen
    block, _ = stacked_btyd(ds)
    base = np.maximum(block["btyd_value"].to_numpy(), 1e-6)
    assert weight is not None
    np.testing.assert_allclose(weight, base, rtol=1e-12)
    label = np.maximum(ds.label, 0.0)
    for c in ds.cutoffs:
        rows = ds.cutoff_day == c
        if anchor:
            assert (ratio * weight)[rows].sum() == pytest.approx(base[rows].sum(), rel=1e-9)
        else:
            np.testing.assert_allclose((ratio * weight)[rows], label[rows], rtol=1e-9)


@pytest.mark.parametrize("model", [BTYDFeatureBoost, BTYDResidualBoost])
def test_hybrid_orders_times_the_references_spend_are_the_value(
    sample_events: pd.DataFrame, model: type[BTYDFeatureBoost | BTYDResidualBoost]
) -> None:
    """The hybrids change the value, and their expected orders with it: orders times
    BG/NBD/GG's expected spend per purchase is the forecast value, at any horizon."""
    ds = _short(sample_events)
    fitted = model().fit(ds)
    for h in (WINDOW, HORIZON, 365):
        pred = fitted.predict(ds.current, h)
        spend = fitted.btyd_.components(ds.current, h)["expected_spend"].to_numpy()
        np.testing.assert_allclose(
            pred["expected_orders"].to_numpy() * spend, pred["predicted_value"], rtol=1e-9
        )
        ref = fitted.btyd_.predict(ds.current, h)["expected_orders"].to_numpy()
        assert not np.allclose(pred["expected_orders"], ref, rtol=0.01)


def test_residual_shrink_blends_geometrically_with_the_reference(
    sample_events: pd.DataFrame,
) -> None:
    """shrink=1 is BG/NBD/GG itself; shrink=0.5 is half the full correction in log space."""
    ds = _short(sample_events)
    ref = BGNBDGammaGamma().fit(ds).predict(ds.current, HORIZON)
    kept = BTYDResidualBoost(shrink=1.0, anchor_level=False).fit(ds)
    pd.testing.assert_frame_equal(kept.predict(ds.current, HORIZON), ref, rtol=1e-9)
    full = BTYDResidualBoost(shrink=0.0, anchor_level=False).fit(ds).predict(ds.current, HORIZON)
    half = BTYDResidualBoost(shrink=0.5, anchor_level=False).fit(ds).predict(ds.current, HORIZON)
    buyers = ref["predicted_value"].to_numpy() > 0
    log_full = np.log(full["predicted_value"].to_numpy()[buyers] / ref["predicted_value"][buyers])
    log_half = np.log(half["predicted_value"].to_numpy()[buyers] / ref["predicted_value"][buyers])
    assert np.abs(log_full).max() > 0.05  # a correction was learnt
    np.testing.assert_allclose(log_half, 0.5 * log_full, atol=1e-9)


@pytest.mark.parametrize("shrink", [-0.1, 1.5, float("nan")])
def test_a_shrink_outside_zero_to_one_is_refused(shrink: float) -> None:
    """Below 0 the correction is amplified, above 1 inverted: neither is a blend."""
    with pytest.raises(ValueError, match="shrink must be between 0 and 1"):
        BTYDResidualBoost(shrink=shrink)
