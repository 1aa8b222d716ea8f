"""Window planning and the selection rule."""

from __future__ import annotations

import pytest

from training.selection import WindowPlan, composite_score, plan_windows, qualifies

REF = {
    "rmse": 10.0,
    "mae": 5.0,
    "gini": 0.6,
    "decile_mape": 0.3,
    "decile_mape_level": 0.2,
    "bias": -0.15,
}


def test_long_history_validates_a_whole_horizon() -> None:
    plan = plan_windows(history=500, horizon_days=91)
    assert plan == WindowPlan(500, 91, 91, 91)
    assert plan.supervised and not plan.short_history


def test_history_shorter_than_two_horizons_uses_half_windows() -> None:
    plan = plan_windows(history=364, horizon_days=181)
    assert (plan.label_days, plan.val_days) == (181, 90)
    # the validated fits' latest cutoff is as old as the final fit's
    assert plan.val_days + plan.val_days <= plan.label_days


def test_history_shorter_than_the_horizon() -> None:
    plan = plan_windows(history=180, horizon_days=365)
    assert plan.short_history and plan.supervised
    assert plan.label_days == 120 and plan.val_days == 60


def test_too_little_history_means_label_free_models_only() -> None:
    assert not plan_windows(history=20, horizon_days=365).supervised


def test_a_candidate_sharing_the_reference_level_can_qualify() -> None:
    m = {
        **REF,
        "gini": 0.65,
        "decile_mape_level": 0.15,
        "rmse": 10.1,
        "bias": REF["bias"] * (1 + 1e-12),
    }  # anchored: same total up to rounding
    assert qualifies(m, REF)
    assert composite_score(m, REF) > 0 == composite_score(REF, REF)


@pytest.mark.parametrize(
    "change",
    [
        {"rmse": 10.3},  # > 2 % worse
        {"mae": 5.2},
        {"gini": 0.6},  # not better
        {"decile_mape_level": 0.2},
        {"bias": 0.16},  # beyond both 10 % and the reference's 15 %
    ],
)
def test_missing_any_target_disqualifies(change: dict[str, float]) -> None:
    good = {**REF, "gini": 0.65, "decile_mape_level": 0.15}
    assert qualifies(good, REF)
    assert not qualifies({**good, **change}, REF)
