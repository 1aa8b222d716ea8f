"""The interface every CLV model candidate shares, and the training set it is fitted on.

A model is fitted on a :class:`TrainingSet` (stacked point-in-time examples built by
:mod:`training.datasets`) and scores a frame of the contract's features, exactly as
:func:`feature_store.features.compute_features` returns it. Only the numeric
:data:`~feature_store.features.FEATURE_NAMES` columns may be read, because the online API calls
``predict`` with a frame built from Redis state.

Models follow scikit-learn's estimator rules (``__init__`` stores parameters only, ``fit``
returns ``self``, learned attributes end in ``_``) and must pickle, so the registry can store
them as verified artifacts.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
import pandas as pd

from clv.errors import ModelError
from feature_store.features import FEATURE_NAMES

#: Columns of every model's ``predict`` output, in this order.
PREDICTION_COLUMNS: tuple[str, ...] = ("predicted_value", "expected_orders", "p_alive")


@dataclass(frozen=True)
class TrainingSet:
    """Point-in-time examples stacked over several cutoffs, plus the latest feature snapshot.

    Row ``i`` holds the features of one user as of ``cutoff_day[i]`` (only events dated on or
    before it) and, as labels, that user's net revenue and purchase count in
    ``(cutoff_day[i], cutoff_day[i] + label_days[i]]``. ``label_days`` equals ``horizon_days``
    except when the history was too short and a shorter window was used; models that learn a
    rate scale by ``horizon_days / label_days``.

    ``current`` is the features of every user as of ``as_of_day`` (the last day whose events the
    fit may use). It has no label; probabilistic models fit on it, since that is the most recent
    calibration period.

    ``memo`` holds what several candidates derive from the same set (the per-cutoff BG/NBD fits
    of the hybrids), so a selection computes it once; :meth:`subset` starts a new one.
    """

    features: pd.DataFrame  # FEATURE_NAMES columns, index user_id (repeats across cutoffs)
    cutoff_day: np.ndarray  # int64 per row
    label: np.ndarray  # float64 net revenue per row
    label_orders: np.ndarray  # int64 purchases per row
    label_days: np.ndarray  # int64 per row: the label window's length
    horizon_days: int
    as_of_day: int
    current: pd.DataFrame = field(repr=False)
    memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.features)
        for name in ("cutoff_day", "label", "label_orders", "label_days"):
            if len(getattr(self, name)) != n:
                raise ModelError(f"TrainingSet.{name} has {len(getattr(self, name))} rows, not {n}")

    def __len__(self) -> int:
        return len(self.features)

    @property
    def cutoffs(self) -> np.ndarray:
        """The distinct cutoff days, ascending."""
        return np.unique(self.cutoff_day)

    def require_revenue(self) -> None:
        """A supervised model learns from the labels: refuse a set whose labels hold no revenue
        (every customer bought once, say) with a reason, not the library's failure."""
        if not (self.label > 0).any():
            raise ModelError(
                "no revenue in the label windows (no customer bought again after a training "
                "cutoff): nothing to learn from"
            )

    def scaled_label(self) -> np.ndarray:
        """Labels rescaled to ``horizon_days`` (identity where the full window was observed)."""
        return self.label * (self.horizon_days / self.label_days)

    def subset(self, mask: np.ndarray) -> TrainingSet:
        """The rows selected by a boolean mask (``current`` unchanged)."""
        return TrainingSet(
            features=self.features[mask],
            cutoff_day=self.cutoff_day[mask],
            label=self.label[mask],
            label_orders=self.label_orders[mask],
            label_days=self.label_days[mask],
            horizon_days=self.horizon_days,
            as_of_day=self.as_of_day,
            current=self.current,
        )


class CLVModel(abc.ABC):
    """A customer-lifetime-value model: features as of a day -> value in the next N days."""

    name: str = "model"

    @abc.abstractmethod
    def fit(self, ds: TrainingSet) -> Self:
        """Learn from ``ds``; returns ``self``."""

    @abc.abstractmethod
    def predict(self, features: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        """Per-user ``predicted_value`` (revenue expected in the next ``horizon_days``),
        ``expected_orders`` and ``p_alive``, indexed like ``features``."""

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (scikit-learn convention), for reports and the registry."""
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and k != "name"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def numeric_features(features: pd.DataFrame) -> pd.DataFrame:
    """The :data:`FEATURE_NAMES` columns as float64 (raises :class:`ModelError` if absent)."""
    missing = [c for c in FEATURE_NAMES if c not in features.columns]
    if missing:
        raise ModelError(f"features lack columns: {', '.join(missing)}")
    return features[list(FEATURE_NAMES)].astype(np.float64)


def prediction_frame(
    features: pd.DataFrame, value: np.ndarray, orders: np.ndarray, p_alive: np.ndarray
) -> pd.DataFrame:
    """The standard ``predict`` output, indexed like ``features``: non-negative, ``p_alive``
    within [0, 1]. A non-finite number is a numerical failure of the model and raises
    :class:`ModelError`: passed on as a forecast of zero it would look like a customer with no
    value.

    A user with no purchase on record (``purchase_days`` 0: so far only a refund, of an order
    made before the stream began or not delivered yet) is no customer to the models, which are
    fitted on buyers only: what they made of such a row was an extrapolation (a positive value
    with ``p_alive`` 1 from BG/NBD+GG, one of thousands from the Tweedie GLM: README). Every
    model forecasts nothing for them: value 0, no orders, ``p_alive`` 0. Their first purchase
    makes them customers."""
    cols = {"predicted_value": value, "expected_orders": orders, "p_alive": p_alive}
    arrays = {k: np.array(v, dtype=np.float64) for k, v in cols.items()}  # copies: set below
    no_purchase = features["purchase_days"].to_numpy(dtype=np.float64) <= 0
    for a in arrays.values():
        a[no_purchase] = 0.0
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise ModelError(f"{name} is not finite for {bad:,} of {len(a):,} customers")
    return pd.DataFrame(
        {
            "predicted_value": np.maximum(arrays["predicted_value"], 0.0),
            "expected_orders": np.maximum(arrays["expected_orders"], 0.0),
            "p_alive": np.clip(arrays["p_alive"], 0.0, 1.0),
        },
        index=features.index,
    )
