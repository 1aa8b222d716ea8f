"""The time-ordered, customer-disjoint splits the regressors' grid search validates on, and the
customer-disjoint hold-out of the boosted models' early stopping."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
from sklearn.dummy import DummyRegressor
from sklearn.ensemble import HistGradientBoostingRegressor

from feature_store.features import day_number
from training.datasets import build_training_set
from training.models.regressors import (
    SklearnCLV,
    cutoff_splits,
    fit_poisson_boosting,
    hgb_poisson_model,
    per_order_value,
    poisson_boosting,
)


def test_splits_train_on_earlier_cutoffs_and_other_customers() -> None:
    users = pd.Index([f"u{i}" for i in range(200)])
    cutoff_day = np.repeat([100, 130, 160, 190], len(users))
    stacked = np.tile(users.to_numpy(), 4)
    splits = cutoff_splits(cutoff_day, stacked, max_splits=3)
    assert len(splits) == 3
    validated = []
    for train, val in splits:
        (c,) = np.unique(cutoff_day[val])
        validated.append(c)
        assert (cutoff_day[train] < c).all()  # the past only
        assert not set(stacked[train]) & set(stacked[val])  # no validated customer's label
        assert 0.3 < len(set(stacked[val])) / len(users) < 0.7  # about half of them
    assert validated == [130, 160, 190]
    sides = [frozenset(stacked[val]) for _, val in splits]
    assert sides[0] != sides[1] and sides[0] == sides[2]  # the halves alternate
    again = cutoff_splits(cutoff_day, stacked, max_splits=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))


class _Recording(HistGradientBoostingRegressor):
    """Keeps what ``fit`` was given (rows trained on, rows early stopping scored)."""

    def fit(self, X, y, sample_weight=None, **kw):  # type: ignore[no-untyped-def,override]
        self.seen_ = (X, kw.get("X_val"), sample_weight, kw.get("sample_weight_val"))
        return super().fit(X, y, sample_weight=sample_weight, **kw)


def _stacked(n_users: int, n_cutoffs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    users = np.tile(np.array([f"u{i}" for i in range(n_users)], dtype=object), n_cutoffs)
    code = np.tile(np.arange(n_users, dtype=float), n_cutoffs)  # which customer, as column 0
    X = np.column_stack([code, rng.random(len(code))])
    y = rng.poisson(np.exp(X[:, 1])).astype(float)
    return X, y, users


def test_early_stopping_holds_out_whole_customers() -> None:
    """Scikit-learn's early stopping holds out random rows; a stacked set has a customer at
    several cutoffs, so the held-out part must be customers, all their rows, never trained on."""
    X, y, users = _stacked(4_000, 4)
    w = np.linspace(1.0, 2.0, len(y))
    est = fit_poisson_boosting(poisson_boosting(max_iter=30), X, y, users, sample_weight=w)
    assert isinstance(est, HistGradientBoostingRegressor) and est.early_stopping is True
    assert len(est.validation_score_) > 1  # scored on the held-out part, round by round
    rec = fit_poisson_boosting(
        _Recording(**poisson_boosting(max_iter=30).get_params()), X, y, users, w
    )
    trained, held, w_trained, w_held = rec.seen_
    assert held is not None and not set(trained[:, 0]) & set(held[:, 0])
    assert 0.07 < len(set(held[:, 0])) / 4_000 < 0.13  # about a tenth of the customers
    assert len(trained) + len(held) == len(X) and len(held) == 4 * len(set(held[:, 0]))
    is_held = np.isin(X[:, 0], held[:, 0])
    np.testing.assert_array_equal(trained, X[~is_held])  # rows and their weights stay paired
    np.testing.assert_array_equal(held, X[is_held])
    np.testing.assert_array_equal(w_trained, w[~is_held])
    np.testing.assert_array_equal(w_held, w[is_held])
    again = fit_poisson_boosting(_Recording(**rec.get_params()), X, y, users, w)
    np.testing.assert_array_equal(again.seen_[1], held)  # the same customers every run


@pytest.mark.parametrize(("rows", "stops_early"), [(10_000, False), (10_001, True)])
def test_early_stopping_starts_where_scikit_learns_does(rows: int, stops_early: bool) -> None:
    """Up to 10,000 rows (scikit-learn's threshold for ``early_stopping="auto"``) the model is
    fitted on every row for all its rounds; above it, on the customers not held out."""
    X, y, users = _stacked(rows, 1)
    est = poisson_boosting(max_iter=30)
    rec = fit_poisson_boosting(_Recording(**est.get_params()), X, y, users)
    assert rec.early_stopping is stops_early and (rec.seen_[1] is not None) is stops_early
    assert (len(rec.seen_[0]) < rows) is stops_early
    if not stops_early:
        assert rec.n_iter_ == 30


def test_the_plain_poisson_booster_tunes_its_rounds_in_the_time_ordered_search() -> None:
    """``hgb_poisson`` goes through the grid search (customer-disjoint, time-ordered splits),
    which cannot hand scikit-learn the held-out customers: early stopping is off there, and the
    number of rounds is one of the tuned parameters instead."""
    model = hgb_poisson_model()
    assert model.estimator.get_params()["early_stopping"] is False
    assert model.param_grid is not None and len(model.param_grid["max_iter"]) > 1


def test_regressors_report_bgnbd_p_alive_whatever_the_horizon(sample_events: pd.DataFrame) -> None:
    """P(alive) is the customer's as of the features' day: the BG/NBD one of the training set's
    latest snapshot, not the chance of a purchase within the horizon (which grew with it)."""
    import datetime as dt

    from feature_store.features import day_number
    from training.datasets import build_training_set
    from training.models.btyd import BGNBDGammaGamma
    from training.models.candidates import make_candidates

    ds = build_training_set(
        sample_events, day_number(dt.date(1997, 9, 30)), 91, label_days=91, n_cutoffs=2
    )
    reference = BGNBDGammaGamma().fit(ds).predict(ds.current, 91)["p_alive"]
    for name in ("tweedie_glm", "ridge"):
        model = make_candidates([name])[name].fit(ds)
        short, long = (model.predict(ds.current, h)["p_alive"] for h in (7, 365))
        np.testing.assert_allclose(short, reference, rtol=1e-9)
        np.testing.assert_allclose(long, reference, rtol=1e-9)
    model.alive_params_ = None  # no BG/NBD fit: the Poisson chance of a purchase in the horizon
    short, long = (model.predict(ds.current, h)["p_alive"] for h in (7, 365))
    assert (long.to_numpy() >= short.to_numpy()).all() and (long > short).any()


def test_order_counts_of_customers_whose_refunds_ate_their_revenue() -> None:
    """A customer whose net revenue is gone is counted in the typical customer's orders, learnt
    at fit time (a $1 floor made a $5 forecast five orders); scored alone or in a batch, the
    same count."""
    from feature_store.features import FEATURE_NAMES
    from training.models.regressors import per_order_value, typical_order_value

    def frame(days: list[int], revenue: list[float]) -> pd.DataFrame:
        f = pd.DataFrame(0.0, index=range(len(days)), columns=list(FEATURE_NAMES))
        return f.assign(purchase_days=days, revenue_total=revenue)

    fitted_on = frame([2, 4, 1, 3, 2], [60.0, 80.0, -25.0, 0.0, 1.0])
    typical = typical_order_value(fitted_on)
    assert typical == 20.0  # the median of 30, 20 and 0.5 (customers with revenue left)
    np.testing.assert_allclose(
        per_order_value(fitted_on, typical),
        [30.0, 20.0, 20.0, 20.0, 1.0],  # $0.50: the floor
    )
    alone = frame([1], [-3.0])
    np.testing.assert_allclose(per_order_value(alone, typical), [20.0])
    assert typical_order_value(alone) == 1.0  # nobody with revenue: the floor


def test_regressors_learn_labels_rescaled_from_the_label_window_to_the_horizon(
    sample_events: pd.DataFrame,
) -> None:
    """30-day labels, a 91-day horizon: a regressor predicting the mean label predicts the mean
    30-day revenue times 91 / 30 (and scales linearly to other horizons); its expected orders
    are that value over the customer's revenue per purchase day."""
    ds = build_training_set(
        sample_events, day_number(dt.date(1997, 9, 30)), 91, label_days=30, n_cutoffs=2
    )
    assert (ds.label_days == 30).all()
    model = SklearnCLV(DummyRegressor(strategy="mean"), name="mean").fit(ds)
    mean_91 = float(np.mean(np.maximum(ds.label, 0.0)) * 91 / 30)
    for h in (91, 365):
        pred = model.predict(ds.current, h)
        np.testing.assert_allclose(pred["predicted_value"], mean_91 * h / 91, rtol=1e-12)
        per_order = per_order_value(ds.current, model.typical_order_value_)
        np.testing.assert_allclose(
            pred["expected_orders"].to_numpy() * per_order, pred["predicted_value"], rtol=1e-12
        )
