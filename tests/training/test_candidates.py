"""Every candidate behind the one interface: fitted on a stacked point-in-time set, it predicts
the three columns for any horizon and survives the registry's round trip; the grid-searched
ones validate on later cutoffs and other customers; the naive baseline's formula."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import GridSearchCV

import training.models.regressors as regressors
from clv.errors import ModelError
from feature_store.features import FEATURE_NAMES, day_number
from feature_store.offline import events_from_orders, features_at
from training.datasets import build_training_set
from training.models.base import PREDICTION_COLUMNS, TrainingSet, prediction_frame
from training.models.candidates import CANDIDATES, make_candidates
from training.models.inputs import model_inputs
from training.models.naive import HistoricalRate
from training.registry import DataWindow, ModelRegistry, Validation

CUTOFF = day_number(dt.date(1997, 9, 30))


@pytest.fixture(scope="module")
def stacked(sample_events: pd.DataFrame) -> TrainingSet:
    """Four stacked cutoffs, 91-day labels: what a selection's validation fit sees."""
    return build_training_set(sample_events, CUTOFF, 91, label_days=91, n_cutoffs=4)


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_every_candidate_fits_predicts_and_round_trips_the_registry(
    name: str, stacked: TrainingSet, tmp_path: Path
) -> None:
    model = make_candidates([name])[name].fit(stacked)
    customers = stacked.current
    short, long = model.predict(customers, 30), model.predict(customers, 365)
    for pred in (short, long):
        assert list(pred.columns) == list(PREDICTION_COLUMNS)
        assert pred.index.equals(customers.index)
        values = pred.to_numpy()
        assert np.isfinite(values).all() and (values >= 0).all()
        assert (pred["p_alive"] <= 1).all()
    total = short["predicted_value"].sum()
    assert 0 < total < long["predicted_value"].sum()  # a longer horizon is worth more
    # buyers' values order like their spend so far (a model that ignored them would not)
    spend = customers["revenue_total"].rank()
    assert spend.corr(long["predicted_value"].rank()) > 0.3

    registry = ModelRegistry(tmp_path / "models")
    version = registry.register(
        model,
        data_window=DataWindow(0, CUTOFF, CUTOFF, 91),
        validation=Validation("mae", False, 1.0, CUTOFF - 91, 91, len(customers)),
        candidates={name: {"mae": 1.0}},
        data_fingerprint="0" * 64,
    )
    loaded = registry.load(version)
    assert loaded.metadata["model_name"] == name
    pd.testing.assert_frame_equal(loaded.model.predict(customers, 365), long)


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_a_user_with_no_purchase_on_record_is_forecast_nothing_by_every_candidate(
    name: str, stacked: TrainingSet
) -> None:
    """A refund of an order the stream never carried (made before it began) makes a user whose
    features have no purchase day. The models learnt from buyers only: left to them, BG/NBD+GG
    gave such a user what it gives a customer who bought that day, with p_alive 1, the Tweedie GLM
    thousands, which would top any ranking. Fails if any candidate forecasts them anything."""
    refund = pd.DataFrame(
        [{"user_id": "r", "order_id": "o", "ts": "1997-09-20T10:00:00Z", "amount": 30.0}]
    ).assign(type="refund", event_id="refund-o")
    no_buyer = features_at(events_from_orders(refund), CUTOFF)
    assert no_buyer.loc["r", "purchase_days"] == 0 and no_buyer.loc["r", "revenue_total"] < 0
    customers = stacked.current
    both = pd.concat([customers.head(50), no_buyer[customers.columns]])
    model = make_candidates([name])[name].fit(stacked)
    pred = model.predict(both, 91)
    assert pred.loc["r"].tolist() == [0.0, 0.0, 0.0]
    pd.testing.assert_frame_equal(pred.drop(index="r"), model.predict(customers.head(50), 91))


class _SpySearch(GridSearchCV):
    """The grid search as used, keeping the splits it was handed."""

    handed: ClassVar[list[Any]] = []

    def fit(self, X: Any, y: Any = None, **params: Any) -> Any:  # type: ignore[override]
        _SpySearch.handed.append(self.cv)
        return super().fit(X, y, **params)


@pytest.mark.parametrize(
    "name", ["ridge", "tweedie_glm", "random_forest", "gradient_boosting", "hgb_poisson"]
)
def test_the_grid_search_validates_later_cutoffs_on_other_customers(
    name: str, stacked: TrainingSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never a K-fold: each split trains on earlier cutoffs only and validates one later
    cutoff on customers it did not train on, so no label of the validated rows is learnt."""
    monkeypatch.setattr(regressors, "GridSearchCV", _SpySearch)
    _SpySearch.handed = []
    model = make_candidates([name])[name].fit(stacked)
    assert len(_SpySearch.handed) == 1, "the candidate was not tuned by the grid search"
    (splits,) = _SpySearch.handed
    assert not isinstance(splits, int) and len(splits) >= 2, splits
    users = stacked.features.index.to_numpy()
    for train, val in splits:
        (validated,) = np.unique(stacked.cutoff_day[val])
        assert (stacked.cutoff_day[train] < validated).all()
        assert not set(users[train]) & set(users[val])
    assert set(model.best_params_) == set(model.param_grid or {})  # the search's pick is used


def test_the_naive_rate_is_spend_per_day_of_age_over_the_horizon() -> None:
    f = pd.DataFrame(0.0, index=["old", "young", "new"], columns=list(FEATURE_NAMES))
    f = f.assign(revenue_total=[365.0, 60.0, 30.0], purchase_days=[10, 2, 1], age_days=[364, 59, 0])
    pred = HistoricalRate(min_age_days=30).predict(f, 91)
    # 365 days of age: $1/day; 60 days: $1/day; one day old: as if 30 days old
    np.testing.assert_allclose(pred["predicted_value"], [91.0, 91.0, 91.0])
    np.testing.assert_allclose(pred["expected_orders"], [10 / 365 * 91, 2 / 60 * 91, 91 / 30])
    np.testing.assert_allclose(pred["p_alive"], 1.0)


def _buyers(ids: list[str]) -> pd.DataFrame:
    """Features of customers with one purchase day each (what prediction_frame reads)."""
    return pd.DataFrame({"purchase_days": [1] * len(ids)}, index=ids)


@pytest.mark.parametrize("column", [0, 1, 2])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_prediction_frame_refuses_a_non_finite_number_in_any_column(
    column: int, bad: float
) -> None:
    cols = [np.array([1.0, 2.0]), np.array([0.5, 1.0]), np.array([0.2, 0.9])]
    cols[column] = cols[column].copy()
    cols[column][1] = bad
    with pytest.raises(ModelError, match="not finite for 1 of 2"):
        prediction_frame(_buyers(["a", "b"]), *cols)


def test_prediction_frame_clips_to_the_forecasts_range() -> None:
    out = prediction_frame(
        _buyers(["a", "b"]), np.array([-3.0, 5.0]), np.array([-0.1, 2.0]), np.array([-0.2, 1.3])
    )
    assert list(out.columns) == ["predicted_value", "expected_orders", "p_alive"]
    np.testing.assert_allclose(out.to_numpy(), [[0.0, 0.0, 0.0], [5.0, 2.0, 1.0]])


def test_model_inputs_ratios() -> None:
    f = pd.DataFrame(0.0, index=["u", "v"], columns=list(FEATURE_NAMES))
    f = f.assign(
        age_days=[99.0, 0.0],
        recency_days=[60.0, 0.0],
        orders_total=[4.0, 0.0],
        revenue_total=[200.0, -10.0],
        frequency=[3.0, 0.0],
    )
    got = model_inputs(f)
    assert list(got.columns[: len(FEATURE_NAMES)]) == list(FEATURE_NAMES)
    np.testing.assert_allclose(got["days_since_last"], [39.0, 0.0])
    np.testing.assert_allclose(got["orders_per_day"], [4 / 100, 0.0])
    np.testing.assert_allclose(got["revenue_per_day"], [2.0, -10.0])
    np.testing.assert_allclose(got["repeat_days_per_day"], [3 / 100, 0.0])
    np.testing.assert_allclose(got["mean_order_value"], [50.0, 0.0])
