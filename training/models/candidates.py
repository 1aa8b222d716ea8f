"""The candidate models a selection compares, by name, freshly constructed each time."""

from __future__ import annotations

from collections.abc import Callable

from training.models.base import CLVModel
from training.models.btyd import BGNBDGammaGamma
from training.models.hybrid import BTYDFeatureBoost, BTYDResidualBoost
from training.models.naive import HistoricalRate
from training.models.regressors import (
    gradient_boosting_model,
    hgb_poisson_model,
    random_forest_model,
    ridge_model,
    tweedie_glm_model,
)

#: The probabilistic reference every candidate is compared with, and the fallback champion.
REFERENCE = "bgnbd_gg"

CANDIDATES: dict[str, Callable[[], CLVModel]] = {
    "naive_rate": HistoricalRate,
    "bgnbd_gg": BGNBDGammaGamma,
    "ridge": ridge_model,
    "tweedie_glm": tweedie_glm_model,
    "random_forest": random_forest_model,
    "gradient_boosting": gradient_boosting_model,
    "hgb_poisson": hgb_poisson_model,
    "hybrid_btyd_features": BTYDFeatureBoost,
    "hybrid_btyd_residual": BTYDResidualBoost,
}
#: Candidates that need no labels (usable when the history is too short to learn from).
UNSUPERVISED: frozenset[str] = frozenset({"naive_rate", "bgnbd_gg"})


def make_candidates(names: list[str] | None = None) -> dict[str, CLVModel]:
    """Fresh, unfitted candidates (all of them by default)."""
    chosen = list(CANDIDATES) if names is None else names
    unknown = [n for n in chosen if n not in CANDIDATES]
    if unknown:
        raise ValueError(
            f"unknown candidate(s) {', '.join(map(repr, unknown))}; known: {', '.join(CANDIDATES)}"
        )
    models = {n: CANDIDATES[n]() for n in chosen}
    for n, m in models.items():
        m.name = n
    return models
