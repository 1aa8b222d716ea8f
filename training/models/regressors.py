"""Scikit-learn regressors on the features, tuned with a time-ordered grid search.

The grid search validates on a later cutoff than it trains on, and on other customers: stacked
label windows overlap (a row at cutoff ``c'`` is labelled with revenue up to ``c' + label``, past
the validated cutoff ``c``), so a customer in both would carry the validated label into
training. Splitting customers as well removes that; what the two sides still share is the
calendar of the overlapping windows. Never a random K-fold, which would mix times too.
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import (
    GradientBoostingRegressor,
    HistGradientBoostingRegressor,
    RandomForestRegressor,
)
from sklearn.linear_model import Ridge, TweedieRegressor
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from training.models.base import CLVModel, TrainingSet, numeric_features, prediction_frame
from training.models.btyd import current_bgnbd, p_alive_from
from training.models.inputs import model_inputs


def cutoff_splits(
    cutoff_day: np.ndarray, users: pd.Index | np.ndarray, max_splits: int = 3
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Time-ordered, customer-disjoint splits over stacked cutoffs: validate one of the last
    ``max_splits`` cutoffs on half of the customers, train on every earlier cutoff's rows of
    the other half (an expanding window, as ``TimeSeriesSplit``; the halves alternate)."""
    half = pd.util.hash_array(np.asarray(users, dtype=object)) % 2  # stable across runs
    cuts = np.unique(cutoff_day)
    splits: list[tuple[np.ndarray, np.ndarray]] = []
    for k, c in enumerate(cuts[1:][-max_splits:]):
        side = k % 2
        train = np.flatnonzero((cutoff_day < c) & (half != side))
        val = np.flatnonzero((cutoff_day == c) & (half == side))
        if len(train) and len(val):
            splits.append((train, val))
    return splits


def _signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def _mean_order_value(features: pd.DataFrame) -> np.ndarray:
    f = numeric_features(features)
    return f["revenue_total"].to_numpy() / np.maximum(f["purchase_days"].to_numpy(), 1.0)


def typical_order_value(features: pd.DataFrame) -> float:
    """The median of the customers' mean revenue per purchase day (those with any), learnt at
    fit time so that a customer's order count never depends on who else is scored with them."""
    mean = _mean_order_value(features)
    positive = mean[mean > 0]
    return float(max(np.median(positive), 1.0)) if len(positive) else 1.0


def per_order_value(features: pd.DataFrame, typical: float = 1.0) -> np.ndarray:
    """Mean revenue per purchase day (at least $1), used to turn a value into an order count.
    Where refunds ate a customer's revenue (nothing left, or less), ``typical`` stands in:
    dividing by the $1 floor made a forecast of $5 five orders."""
    mean = _mean_order_value(features)
    return np.where(mean > 0, np.maximum(mean, 1.0), typical)


class SklearnCLV(CLVModel):
    """Any scikit-learn regressor predicting the horizon's revenue from :func:`model_inputs`.

    Trained on the labels rescaled to the horizon; a prediction for another horizon scales
    linearly. ``expected_orders`` is the value over the customer's mean purchase-day revenue.
    These models have no notion of dropout, so ``p_alive`` (a property of the customer as of
    the day of the features, whatever the horizon) is BG/NBD's, fitted on the training set's
    latest snapshot; where BG/NBD cannot be fitted, the Poisson chance of at least one purchase
    in the horizon stands in.
    """

    def __init__(
        self,
        estimator: BaseEstimator,
        param_grid: dict[str, list[Any]] | None = None,
        name: str = "sklearn",
        max_splits: int = 3,
    ) -> None:
        self.estimator = estimator
        self.param_grid = param_grid
        self.name = name
        self.max_splits = max_splits

    def fit(self, ds: TrainingSet) -> Self:
        ds.require_revenue()
        X = model_inputs(ds.features).to_numpy()
        y = np.maximum(ds.scaled_label(), 0.0)
        splits = cutoff_splits(ds.cutoff_day, ds.features.index, self.max_splits)
        if self.param_grid and splits:
            search = GridSearchCV(
                clone(self.estimator),
                self.param_grid,
                cv=splits,
                scoring="neg_root_mean_squared_error",
                refit=True,
                n_jobs=1,
            )
            search.fit(X, y)
            self.estimator_ = search.best_estimator_
            self.best_params_ = dict(search.best_params_)
        else:
            self.estimator_ = clone(self.estimator).fit(X, y)
            self.best_params_ = {}
        self.horizon_days_ = ds.horizon_days
        self.alive_params_ = current_bgnbd(ds)
        self.typical_order_value_ = typical_order_value(ds.current)
        return self

    def predict(self, features: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        X = model_inputs(features).to_numpy()
        value = self.estimator_.predict(X) * (horizon_days / self.horizon_days_)
        value = np.maximum(value, 0.0)
        orders = value / per_order_value(features, getattr(self, "typical_order_value_", 1.0))
        alive = p_alive_from(getattr(self, "alive_params_", None), features)
        if alive is None:  # no BG/NBD fit (or an artifact from before it)
            alive = 1.0 - np.exp(-orders)
        return prediction_frame(features, value, orders, alive)

    def get_params(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator,
            "param_grid": self.param_grid,
            "max_splits": self.max_splits,
            "name": self.name,
        }


def ridge_model() -> SklearnCLV:
    pipe = make_pipeline(FunctionTransformer(_signed_log1p), StandardScaler(), Ridge())
    return SklearnCLV(pipe, {"ridge__alpha": [0.1, 10.0, 1000.0]}, name="ridge")


def random_forest_model(seed: int = 0) -> SklearnCLV:
    est = RandomForestRegressor(
        n_estimators=50,
        min_samples_leaf=20,
        max_features=0.5,
        max_samples=0.3,
        n_jobs=2,
        random_state=seed,
    )
    return SklearnCLV(est, {"min_samples_leaf": [20, 100]}, name="random_forest", max_splits=2)


def gradient_boosting_model(seed: int = 0) -> SklearnCLV:
    est = GradientBoostingRegressor(
        n_estimators=80, learning_rate=0.08, subsample=0.5, max_depth=3, random_state=seed
    )
    return SklearnCLV(est, {"max_depth": [2, 4]}, name="gradient_boosting", max_splits=2)


def hgb_poisson_model(seed: int = 0) -> SklearnCLV:
    """Histogram gradient boosting with the Poisson loss (log link: a multiplicative model
    of a non-negative, zero-heavy target). The number of rounds is tuned with the tree size by
    the time-ordered grid search, not by scikit-learn's early stopping (see
    :func:`fit_poisson_boosting`)."""
    est = poisson_boosting(seed, min_samples_leaf=40)
    grid = {"max_leaf_nodes": [7, 31], "max_iter": [60, 200]}
    return SklearnCLV(est, grid, name="hgb_poisson")


def poisson_boosting(seed: int = 0, **params: Any) -> HistGradientBoostingRegressor:
    """Histogram gradient boosting with the Poisson loss and this project's base settings
    (``params`` override them); the plain candidate and the hybrids share it. Early stopping
    is off here: scikit-learn's holds out random rows, and in a stacked training set a held-out
    row's label is in the features of the same customer's later rows that it trains on."""
    base: dict[str, Any] = {
        "loss": "poisson",
        "max_iter": 200,
        "learning_rate": 0.05,
        "l2_regularization": 1.0,
        "early_stopping": False,
        "random_state": seed,
    }
    return HistGradientBoostingRegressor(**{**base, **params})


EARLY_STOPPING_ROWS = 10_000  # scikit-learn's threshold for early_stopping="auto"
HOLDOUT_SHARE = 10  # one customer in this many is held out for early stopping


def fit_poisson_boosting(
    est: HistGradientBoostingRegressor,
    X: np.ndarray,
    y: np.ndarray,
    users: pd.Index | np.ndarray,
    sample_weight: np.ndarray | None = None,
) -> HistGradientBoostingRegressor:
    """Fit ``est`` with early stopping on a held-out tenth of the *customers*, every cutoff of
    theirs, where scikit-learn's own holds out a tenth of the rows: a customer's row at a later
    cutoff has features that include an earlier row's label window, so a random row split
    scores the rounds on labels the training part has seen. Below scikit-learn's threshold
    for early stopping (10,000 rows) ``est`` is fitted on every row for its ``max_iter``."""
    held = pd.util.hash_array(np.asarray(users, dtype=object)) % HOLDOUT_SHARE == 0
    if len(X) <= EARLY_STOPPING_ROWS or held.all() or not held.any():
        return est.set_params(early_stopping=False).fit(X, y, sample_weight=sample_weight)
    w = w_val = None
    if sample_weight is not None:
        w, w_val = sample_weight[~held], sample_weight[held]
    return est.set_params(early_stopping=True).fit(
        X[~held], y[~held], sample_weight=w, X_val=X[held], y_val=y[held], sample_weight_val=w_val
    )


def tweedie_glm_model() -> SklearnCLV:
    """Tweedie (compound Poisson-gamma, power 1.5) GLM with a log link on log features.

    Scikit-learn's histogram boosting has no Tweedie loss, so Tweedie comes as a GLM."""
    pipe = make_pipeline(
        FunctionTransformer(_signed_log1p),
        StandardScaler(),
        TweedieRegressor(power=1.5, link="log", solver="newton-cholesky", max_iter=300),
    )
    return SklearnCLV(pipe, {"tweedieregressor__alpha": [0.01, 1.0]}, name="tweedie_glm")
