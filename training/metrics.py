"""Accuracy figures of CLV predictions against realised revenue.

Besides RMSE/MAE these cover what a CLV figure is used for: ranking customers (normalized Gini,
Spearman, top-decile capture), calibration by segment (decile MAPE, as in Wang, Liu & Miao 2019,
"A deep probabilistic model for customer lifetime value prediction", the ZILN paper) and the
total (bias).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

#: Metric names in report order; ``higher_is_better`` says which way each one improves.
METRIC_NAMES: tuple[str, ...] = (
    "rmse",
    "mae",
    "gini",
    "spearman",
    "top10_capture",
    "decile_mape",
    "decile_mape_level",
    "bias",
)
HIGHER_IS_BETTER: dict[str, bool] = {
    "rmse": False,
    "mae": False,
    "gini": True,
    "spearman": True,
    "top10_capture": True,
    "decile_mape": False,
    "decile_mape_level": False,
    "bias": False,  # bias: closer to 0 is better
}


def _arrays(actual: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(actual, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    if a.shape != p.shape or a.ndim != 1:
        raise ValueError(f"actual and predicted must be 1-d of equal length: {a.shape}, {p.shape}")
    return a, p


def rmse(actual: np.ndarray, pred: np.ndarray) -> float:
    a, p = _arrays(actual, pred)
    return float(np.sqrt(np.mean((a - p) ** 2)))


def mae(actual: np.ndarray, pred: np.ndarray) -> float:
    a, p = _arrays(actual, pred)
    return float(np.mean(np.abs(a - p)))


def _tie_means(actual: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``actual`` with each value replaced by the mean over the customers sharing its
    prediction. A ranking cannot order tied customers (BG/NBD gives every one-time buyer of
    one day the same value), so the metrics read along it (Gini, top-10% capture, decile
    means) use these: for those linear read-outs that is their expectation over every order
    of the ties, and no figure depends on the order of the rows."""
    _, group = np.unique(pred, return_inverse=True)
    return (np.bincount(group, weights=actual) / np.bincount(group))[group]


def _gini(actual: np.ndarray, order_by: np.ndarray) -> float:
    """Area between the cumulative-actual curve (sorted by ``order_by`` descending) and the
    diagonal (Kaggle's normalized-Gini formula; callers spread ties with :func:`_tie_means`)."""
    n = len(actual)
    order = np.argsort(-order_by, kind="stable")
    cum = np.cumsum(actual[order])
    total = cum[-1]
    if total == 0:
        return 0.0
    return float(cum.sum() / total / n - (n + 1) / (2 * n))


def normalized_gini(actual: np.ndarray, pred: np.ndarray) -> float:
    """Gini of the ranking by ``pred`` over the Gini of the perfect ranking (1 = perfect);
    customers with equal predictions count as one block in random order."""
    a, p = _arrays(actual, pred)
    if len(a) == 0:
        return float("nan")
    best = _gini(a, a)
    return _gini(_tie_means(a, p), p) / best if best != 0 else float("nan")


def spearman(actual: np.ndarray, pred: np.ndarray) -> float:
    a, p = _arrays(actual, pred)
    if len(a) < 2 or np.all(a == a[0]) or np.all(p == p[0]):
        return float("nan")
    return float(spearmanr(a, p).statistic)


def top_capture(actual: np.ndarray, pred: np.ndarray, share: float = 0.10) -> float:
    """Share of the total actual revenue earned by the top ``share`` of customers by ``pred``
    (rounded up to whole customers; a tie across the cut contributes its mean)."""
    a, p = _arrays(actual, pred)
    k = max(int(np.ceil(share * len(a))), 1)
    total = a.sum()
    if total == 0:
        return float("nan")
    top = np.argsort(-p, kind="stable")[:k]
    return float(_tie_means(a, p)[top].sum() / total)


def decile_table(actual: np.ndarray, pred: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Customers binned by predicted value into equal-count bins (``pd.qcut`` of the ranks):
    per bin the mean predicted and mean actual value. Bin 0 holds the lowest predictions.
    With distinct predictions these are ZILN's bins (``pd.qcut`` of the predictions). With
    ties, ZILN's keep a tie block in one bin (and fail when it covers a bin edge); here the
    bins keep equal counts and a block split across bins gives each its mean actual, the
    expected bin means over the orders of the tie."""
    a, p = _arrays(actual, pred)
    ranks = pd.Series(p).rank(method="first").to_numpy()
    bins = pd.qcut(ranks, min(n_bins, len(a)), labels=False)
    frame = pd.DataFrame({"bin": bins, "predicted": p, "actual": _tie_means(a, p)})
    return frame.groupby("bin").agg(predicted=("predicted", "mean"), actual=("actual", "mean"))


def decile_mape(actual: np.ndarray, pred: np.ndarray) -> float:
    """Mean over predicted-value deciles of |mean predicted - mean actual| / mean actual.

    Deciles whose mean actual is not positive (zero, or negative from refunds) have no
    defined percentage error and are skipped.
    """
    a, p = _arrays(actual, pred)
    table = decile_table(a, p)
    ok = table["actual"] > 1e-9 * np.abs(a).mean()  # zero but for rounding counts as zero
    if not ok.any():
        return float("nan")
    err = (table["predicted"][ok] - table["actual"][ok]).abs() / table["actual"][ok]
    return float(err.mean())


def level_adjusted_decile_mape(actual: np.ndarray, pred: np.ndarray) -> float:
    """Decile MAPE after scaling the predictions to the actual total: the calibration of the
    shape (who gets how much), with the overall level left to :func:`total_bias`."""
    a, p = _arrays(actual, pred)
    total, target = p.sum(), a.sum()
    if not (total > 0 and target > 0):  # a scale <= 0 would zero or reverse the ranking
        return float("nan")
    return decile_mape(a, p * (target / total))


def total_bias(actual: np.ndarray, pred: np.ndarray) -> float:
    """``sum(pred) / sum(actual) - 1``: +0.1 means 10 % too much revenue predicted in total."""
    a, p = _arrays(actual, pred)
    total = a.sum()
    return float(p.sum() / total - 1.0) if total != 0 else float("nan")


def all_metrics(actual: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`METRIC_NAMES`."""
    return {
        "rmse": rmse(actual, pred),
        "mae": mae(actual, pred),
        "gini": normalized_gini(actual, pred),
        "spearman": spearman(actual, pred),
        "top10_capture": top_capture(actual, pred),
        "decile_mape": decile_mape(actual, pred),
        "decile_mape_level": level_adjusted_decile_mape(actual, pred),
        "bias": total_bias(actual, pred),
    }
