"""Model inputs derived from the contract's features only (so online scoring can compute them)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.models.base import numeric_features


def model_inputs(features: pd.DataFrame) -> pd.DataFrame:
    """:data:`~feature_store.features.FEATURE_NAMES` plus a few ratios trees and linear models
    cannot form themselves: days since the last purchase, lifetime order and spend rates, mean
    order value and the first purchase day's share of revenue."""
    f = numeric_features(features)
    age = f["age_days"].to_numpy()
    span = age + 1.0
    orders = f["orders_total"].to_numpy()
    revenue = f["revenue_total"].to_numpy()
    out = f.copy()
    out["days_since_last"] = age - f["recency_days"].to_numpy()
    out["orders_per_day"] = orders / span
    out["revenue_per_day"] = revenue / span
    out["repeat_days_per_day"] = f["frequency"].to_numpy() / span
    out["mean_order_value"] = np.where(orders > 0, revenue / np.maximum(orders, 1), 0.0)
    return out
