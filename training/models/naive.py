"""The naive baseline: each customer keeps spending at their historical daily rate."""

from __future__ import annotations

from typing import Self

import numpy as np
import pandas as pd

from training.models.base import CLVModel, TrainingSet, numeric_features, prediction_frame


class HistoricalRate(CLVModel):
    """``revenue_total / max(age_days + 1, min_age_days) * H``; no learning at all.

    ``min_age_days`` keeps a customer first seen yesterday from being extrapolated from one day.
    ``p_alive`` is 1: the naive view assumes nobody leaves.
    """

    name = "naive_rate"

    def __init__(self, min_age_days: int = 30) -> None:
        self.min_age_days = min_age_days

    def fit(self, ds: TrainingSet) -> Self:
        self.fitted_on_day_ = ds.as_of_day
        return self

    def predict(self, features: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        f = numeric_features(features)
        span = np.maximum(f["age_days"].to_numpy() + 1.0, float(self.min_age_days))
        value = f["revenue_total"].to_numpy() / span * horizon_days
        orders = f["purchase_days"].to_numpy() / span * horizon_days
        return prediction_frame(features, value, orders, np.ones(len(f)))
