"""Hybrids of the probabilistic model and gradient boosting.

The BG/NBD + Gamma-Gamma model knows how purchase rates decay with dropout and how to
extrapolate to any horizon; boosting knows how to use every feature. Two ways to combine them:

* :class:`BTYDFeatureBoost`: the BG/NBD/GG outputs (expected purchases, P(alive), expected spend
  and their product) are extra inputs of a Poisson-loss boosted model.
* :class:`BTYDResidualBoost`: the BG/NBD/GG value is the base and boosting learns a
  multiplicative correction, a Poisson model with ``log(base)`` as offset. The horizon's shape
  stays the probabilistic model's, so it extrapolates from short label windows.

For each stacked cutoff the BG/NBD/GG model is refitted on that cutoff's rows (all purchasers
as of that day, the calibration period a forecast on that day would have had).
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor

from clv.errors import ModelError
from training.models.base import CLVModel, TrainingSet, prediction_frame
from training.models.btyd import BGNBDGammaGamma
from training.models.inputs import model_inputs
from training.models.regressors import fit_poisson_boosting, poisson_boosting

BTYD_COLUMNS: tuple[str, ...] = (
    "btyd_orders",
    "btyd_p_alive",
    "btyd_spend",
    "btyd_value",
    "btyd_orders_per_day",
)


def _btyd_block(model: BGNBDGammaGamma, features: pd.DataFrame, days: int) -> pd.DataFrame:
    c = model.components(features, days)
    return pd.DataFrame(
        {
            "btyd_orders": c["expected_orders"].to_numpy(),
            "btyd_p_alive": c["p_alive"].to_numpy(),
            "btyd_spend": c["expected_spend"].to_numpy(),
            "btyd_value": (c["expected_orders"] * c["expected_spend"]).to_numpy(),
            "btyd_orders_per_day": c["expected_orders"].to_numpy() / days,
        },
        index=features.index,
    )


def stacked_btyd(ds: TrainingSet) -> tuple[pd.DataFrame, BGNBDGammaGamma]:
    """BG/NBD/GG outputs for every row of ``ds`` (one fit per cutoff, over that row's label
    window) and the model fitted on ``ds.current`` for scoring; computed once per training set
    (both hybrids need them) and shared read-only."""
    if "stacked_btyd" not in ds.memo:
        ds.memo["stacked_btyd"] = _stacked_btyd(ds)
    return ds.memo["stacked_btyd"]


def _stacked_btyd(ds: TrainingSet) -> tuple[pd.DataFrame, BGNBDGammaGamma]:
    blocks = []
    for c in ds.cutoffs:
        rows = ds.cutoff_day == c
        feats = ds.features[rows]
        m = BGNBDGammaGamma().fit_features(feats)
        blocks.append(_btyd_block(m, feats, int(ds.label_days[rows][0])))
    block = pd.concat(blocks)
    # cutoffs are stacked in time order by build_training_set; keep row order aligned
    order = np.argsort(ds.cutoff_day, kind="stable")
    if not np.array_equal(order, np.arange(len(order))):
        raise ModelError("TrainingSet rows must be in cutoff order")
    return block, BGNBDGammaGamma().fit(ds)


def _level_factors(cutoff_day: np.ndarray, base: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per row, ``sum(base) / sum(y)`` over its cutoff: rescaling labels by it removes the
    level drift between cohorts so boosting learns only who spends more or less than BG/NBD
    says, and the total stays the probabilistic model's."""
    out = np.ones(len(y))
    for c in np.unique(cutoff_day):
        rows = cutoff_day == c
        total = y[rows].sum()
        if total > 0:
            out[rows] = base[rows].sum() / total
    return out


def _anchor(model: BTYDFeatureBoost | BTYDResidualBoost, ds: TrainingSet) -> float:
    """Factor giving ``model`` the same total as BG/NBD/GG on the latest snapshot, so the
    boosted part re-ranks customers and the probabilistic model sets the level."""
    if not len(ds.current):
        return 1.0
    cur = model.predict(ds.current, ds.horizon_days)["predicted_value"].sum()
    ref = model.btyd_.predict(ds.current, ds.horizon_days)["predicted_value"].sum()
    return float(ref / cur) if cur > 0 else 1.0


def _label_window(ds: TrainingSet) -> int:
    """The days the BG/NBD/GG inputs were computed over in training (the label window, shorter
    than the horizon when the history is): a forecast must compute them over the same days,
    or the boosted stage reads inputs on another scale than it learned."""
    return int(ds.label_days[-1]) if len(ds) else ds.horizon_days


def _hgb(params: dict[str, Any], seed: int) -> HistGradientBoostingRegressor:
    return poisson_boosting(seed, **{"max_leaf_nodes": 15, "min_samples_leaf": 50, **params})


class BTYDFeatureBoost(CLVModel):
    """Poisson-loss boosting on the features plus the BG/NBD/GG outputs for the horizon."""

    name = "hybrid_btyd_features"

    def __init__(
        self, hgb_params: dict[str, Any] | None = None, anchor_level: bool = True, seed: int = 0
    ) -> None:
        self.hgb_params = hgb_params
        self.anchor_level = anchor_level
        self.seed = seed

    def _inputs(self, features: pd.DataFrame, block: pd.DataFrame) -> np.ndarray:
        return pd.concat([model_inputs(features), block], axis=1).to_numpy()

    def fit(self, ds: TrainingSet) -> Self:
        ds.require_revenue()
        block, self.btyd_ = stacked_btyd(ds)
        X = self._inputs(ds.features, block)
        y = np.maximum(ds.label, 0.0)
        if self.anchor_level:
            y = y * _level_factors(ds.cutoff_day, block["btyd_value"].to_numpy(), y)
        self.hgb_ = fit_poisson_boosting(
            _hgb(self.hgb_params or {}, self.seed),
            X,
            y * (ds.horizon_days / ds.label_days),
            ds.features.index,
        )
        self.horizon_days_ = ds.horizon_days
        self.input_days_ = _label_window(ds)
        self.level_ = 1.0
        if self.anchor_level:
            self.level_ = _anchor(self, ds)
        return self

    def predict(self, features: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        days = getattr(self, "input_days_", self.horizon_days_)  # artifacts from before it
        block = _btyd_block(self.btyd_, features, days)
        value = self.hgb_.predict(self._inputs(features, block))
        value = self.level_ * value * horizon_days / self.horizon_days_
        c = self.btyd_.components(features, horizon_days)
        orders = value / np.maximum(c["expected_spend"].to_numpy(), 1e-9)
        return prediction_frame(features, value, orders, c["p_alive"])


class BTYDResidualBoost(CLVModel):
    """``BG/NBD/GG value * exp(f(features))`` with ``f`` boosted under the Poisson loss.

    Fitting Poisson on ``y / base`` with weights ``base`` is the Poisson model with offset
    ``log(base)``. ``shrink`` (0..1) pulls the learned correction towards 1 in log space (a
    geometric blend with BG/NBD/GG), a guard against corrections learned on earlier, younger
    cohorts: on CDNOW half the correction keeps nearly all of the ranking gain and stays within
    1 % of BG/NBD's RMSE, where the full correction costs 2 %.
    """

    name = "hybrid_btyd_residual"

    def __init__(
        self,
        hgb_params: dict[str, Any] | None = None,
        shrink: float = 0.5,
        anchor_level: bool = True,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= shrink <= 1.0:  # outside, the correction is inverted or amplified
            raise ValueError(f"shrink must be between 0 and 1, not {shrink}")
        self.hgb_params = hgb_params
        self.shrink = shrink
        self.anchor_level = anchor_level
        self.seed = seed

    def _inputs(self, features: pd.DataFrame, block: pd.DataFrame) -> np.ndarray:
        b = block.drop(columns=["btyd_orders", "btyd_value"])  # the window's totals: not inputs
        return pd.concat([model_inputs(features), b], axis=1).to_numpy()

    def fit(self, ds: TrainingSet) -> Self:
        ds.require_revenue()
        block, self.btyd_ = stacked_btyd(ds)
        base = np.maximum(block["btyd_value"].to_numpy(), 1e-6)
        y = np.maximum(ds.label, 0.0)
        if self.anchor_level:
            y = y * _level_factors(ds.cutoff_day, base, y)
        params = {"max_leaf_nodes": 7, "min_samples_leaf": 200, **(self.hgb_params or {})}
        self.hgb_ = fit_poisson_boosting(
            _hgb(params, self.seed),
            self._inputs(ds.features, block),
            y / base,
            ds.features.index,
            sample_weight=base,
        )
        self.input_days_ = _label_window(ds)
        self.level_ = 1.0
        if self.anchor_level:
            self.level_ = _anchor(self, ds)
        return self

    def predict(self, features: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        block = _btyd_block(self.btyd_, features, horizon_days)  # the base: over the horizon
        days = getattr(self, "input_days_", horizon_days)  # artifacts from before it
        learned = block if days == horizon_days else _btyd_block(self.btyd_, features, days)
        ratio = self.hgb_.predict(self._inputs(features, learned))
        ratio = self.level_ * np.exp((1.0 - self.shrink) * np.log(np.maximum(ratio, 1e-9)))
        value = block["btyd_value"].to_numpy() * ratio
        orders = block["btyd_orders"].to_numpy() * ratio
        return prediction_frame(features, value, orders, block["btyd_p_alive"])
