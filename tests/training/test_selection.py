"""Window planning and the selection rule."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from training.selection import (
    WindowPlan,
    composite_score,
    missed_targets,
    plan_windows,
    qualifies,
)

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
    ("change", "said"),
    [
        ({"rmse": 10.3}, "RMSE 10.3 more than 2% above 10 (+3.00%)"),  # > 2 % worse
        ({"mae": 5.2}, "MAE 5.2 more than 2% above"),
        ({"gini": 0.6}, "Gini 0.6000 not above"),  # not better
        ({"decile_mape_level": 0.2}, "level-adjusted decile MAPE 0.2000 not below"),
        ({"bias": 0.16}, "total bias +16.00% outside ±15.00%"),  # beyond 10 % and the reference's
        ({"gini": float("nan")}, "gini not a finite number"),
    ],
)
def test_missing_any_target_disqualifies_and_says_which(
    change: dict[str, float], said: str
) -> None:
    good = {**REF, "gini": 0.65, "decile_mape_level": 0.15}
    assert qualifies(good, REF) and missed_targets(good, REF) == []
    assert not qualifies({**good, **change}, REF)
    missed = missed_targets({**good, **change}, REF)
    assert len(missed) == 1 and missed[0].startswith(said), missed


def test_a_bias_limit_widened_to_the_references_says_so() -> None:
    good = {**REF, "gini": 0.65, "decile_mape_level": 0.15}
    assert missed_targets({**good, "bias": 0.16}, REF) == [
        "total bias +16.00% outside ±15.00% (the reference's own; the target is ±10%)"
    ]
    narrow = {**REF, "bias": -0.05}  # the reference within ±10%: the plain target
    assert missed_targets({**good, "bias": 0.12}, narrow) == ["total bias +12.00% outside ±10.00%"]


def test_a_short_horizon_lists_the_candidates_it_cannot_fit(sample_events) -> None:  # type: ignore[no-untyped-def]
    """Every candidate is accounted for: those the windows rule out carry the reason."""
    from feature_store.features import day_number
    from training.selection import MIN_LABEL_DAYS, select_champion

    names = ["naive_rate", "bgnbd_gg", "ridge", "hybrid_btyd_residual"]
    sel = select_champion(sample_events, day_number(dt.date(1998, 1, 31)), 13, names=names)
    assert set(sel.scores) == set(names)
    for name in ("ridge", "hybrid_btyd_residual"):
        error = sel.scores[name].error or ""
        assert error.startswith("not fitted:") and f"{MIN_LABEL_DAYS}+ days" in error
    assert not sel.scores["bgnbd_gg"].error
    table = sel.table()
    assert table.loc["ridge", "error"].startswith("not fitted")


def test_a_refused_candidate_better_on_balance_is_named_with_what_it_missed(
    sample_events, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The reference stays champion; the reason, the table and each score say which target
    kept the candidate that scored best on the composite out."""
    import training.selection as selection
    from feature_store.features import day_number

    figures = {
        "bgnbd_gg": REF,
        "naive_rate": {**REF, "gini": 0.5, "rmse": 20.0},  # worse on balance
        "ridge": {**REF, "gini": 0.59, "decile_mape_level": 0.05},  # better, Gini not above
    }

    def scored(models, *args, **kwargs):  # type: ignore[no-untyped-def]
        return {n: selection.CandidateScore(n, figures[n], 0.0) for n in models}, {}

    monkeypatch.setattr(selection, "evaluate", scored)
    cutoff = day_number(dt.date(1997, 12, 31))
    sel = selection.select_champion(sample_events, cutoff, 91, names=list(figures))
    assert sel.champion == "bgnbd_gg"
    assert sel.scores["ridge"].score > 0 > sel.scores["naive_rate"].score
    assert sel.scores["ridge"].missed == ["Gini 0.5900 not above 0.6000"]
    assert sel.reason == (
        "no candidate met the targets against BG/NBD+GG on validation; best on the composite: "
        f"ridge ({sel.scores['ridge'].score:+.3f}), which missed Gini 0.5900 not above 0.6000"
    )
    assert sel.table().loc["ridge", "missed"] == "Gini 0.5900 not above 0.6000"
    assert sel.table().loc["bgnbd_gg", "missed"] == ""
    # one candidate meets the targets but is worse on balance: the better one is named all the same
    figures["naive_rate"] = {**REF, "gini": 0.6001, "decile_mape_level": 0.1999, "rmse": 10.19}
    sel = selection.select_champion(sample_events, cutoff, 91, names=list(figures))
    assert sel.champion == "bgnbd_gg" and sel.scores["naive_rate"].qualifies
    assert sel.scores["naive_rate"].score < 0
    assert sel.reason == (
        "candidates met the targets against BG/NBD+GG on validation but none beat it on the "
        f"composite score; best on the composite: ridge ({sel.scores['ridge'].score:+.3f}), "
        "which missed Gini 0.5900 not above 0.6000"
    )


def test_the_winners_reason_says_how_many_met_the_targets_and_who_scored_higher(
    sample_events, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """'Best' only among those that met the targets: a refused candidate with a higher
    composite is named, with what it missed, so the reason never reads as a contradiction."""
    import training.selection as selection
    from feature_store.features import day_number

    figures = {
        "bgnbd_gg": REF,
        "ridge": {**REF, "gini": 0.61, "decile_mape_level": 0.19},  # meets them, a little better
        "naive_rate": {**REF, "gini": 0.70, "decile_mape_level": 0.05, "rmse": 10.5},  # refused
    }

    def scored(models, *args, **kwargs):  # type: ignore[no-untyped-def]
        return {n: selection.CandidateScore(n, figures[n], 0.0) for n in models}, {}

    monkeypatch.setattr(selection, "evaluate", scored)
    cutoff = day_number(dt.date(1997, 12, 31))
    sel = selection.select_champion(sample_events, cutoff, 91, names=list(figures))
    ridge, naive = sel.scores["ridge"], sel.scores["naive_rate"]
    assert sel.champion == "ridge" and naive.score > ridge.score > 0
    assert sel.reason == (
        f"the only candidate to meet the targets against BG/NBD+GG (composite {ridge.score:+.3f}); "
        f"naive_rate scored higher ({naive.score:+.3f}) but missed {naive.missed[0]}"
    )
    assert sel.table().loc["bgnbd_gg", "qualifies"] == "reference"
    # two refused above it: the higher one is named
    figures["tweedie_glm"] = {**REF, "gini": 0.66, "decile_mape_level": 0.10, "rmse": 10.5}
    sel = selection.select_champion(sample_events, cutoff, 91, names=list(figures))
    tweedie = sel.scores["tweedie_glm"]
    top = sel.scores["naive_rate"].score
    assert sel.champion == "ridge" and top > tweedie.score > sel.scores["ridge"].score
    assert "; naive_rate scored higher" in sel.reason and "tweedie_glm" not in sel.reason
    del figures["tweedie_glm"]
    figures["naive_rate"] = {**REF, "gini": 0.605, "decile_mape_level": 0.199}  # meets, worse
    sel = selection.select_champion(sample_events, cutoff, 91, names=list(figures))
    assert sel.champion == "ridge"
    assert sel.reason == (
        "met the targets against BG/NBD+GG with the best composite score of the 2 that did "
        f"({sel.scores['ridge'].score:+.3f})"
    )


def test_no_revenue_in_the_labels_is_a_one_line_reason(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every customer bought once: supervised candidates have nothing to learn; the reason is
    one line, not a library traceback."""
    from feature_store.features import day_number
    from training.selection import select_champion
    from training.synth import SynthConfig, events_frame, generate

    start = dt.date(2023, 1, 1)
    events = events_frame(generate(SynthConfig(users=300, orders=300, seed=3, start=start)))
    events = events[events["type"] == "purchase"]
    names = ["naive_rate", "bgnbd_gg", "hgb_poisson", "hybrid_btyd_residual"]
    cutoff = day_number(start) + 400
    sel = select_champion(events, cutoff, 60, names=names)
    for name in ("hgb_poisson", "hybrid_btyd_residual"):
        error = sel.scores[name].error or ""
        assert "no revenue in the label windows" in error and "\n" not in error, error
    # The report's table: a candidate without figures has an empty score, not -inf.
    scores = sel.table()["score"].astype(float)
    assert scores[["hgb_poisson", "hybrid_btyd_residual"]].isna().all()
    assert not np.isinf(scores).any(), scores


def test_one_line_keeps_the_cause_of_a_multi_line_message() -> None:
    from clv.errors import one_line

    exc = ValueError(
        "\nAll the 4 fits failed.\nTraceback (most recent call last):\n  ...\nValueError: y < 0"
    )
    assert one_line(exc) == "All the 4 fits failed. ... ValueError: y < 0"
    assert one_line(ValueError("plain")) == "plain"
    assert one_line(ValueError()) == "ValueError"


def test_a_winner_must_also_beat_the_reference_on_the_composite(
    monkeypatch: pytest.MonkeyPatch,
    sample_events,  # type: ignore[no-untyped-def]
) -> None:
    """Meeting the targets allows RMSE and MAE up to 2% worse, so a candidate can meet them
    with a composite below the reference's 0; it does not win, and promotion, which ranks by
    the composite, agrees."""
    import training.selection as selection
    from feature_store.features import day_number

    names = ["naive_rate", "bgnbd_gg"]
    cutoff = day_number(dt.date(1997, 12, 31))
    monkeypatch.setattr(selection, "missed_targets", lambda m, ref: [])
    monkeypatch.setattr(selection, "composite_score", lambda m, ref: -0.01)
    sel = selection.select_champion(sample_events, cutoff, 91, names=names)
    assert sel.scores["naive_rate"].qualifies
    assert sel.champion == "bgnbd_gg" and "none beat it on the composite" in sel.reason
    monkeypatch.setattr(selection, "composite_score", lambda m, ref: 0.01)
    sel = selection.select_champion(sample_events, cutoff, 91, names=names)
    assert sel.champion == "naive_rate"


def test_recorded_warnings_take_this_threads_notes_only() -> None:
    import threading
    import warnings

    from training.selection import recorded_warnings

    shown: list[str] = []

    def elsewhere() -> None:
        warnings.warn("from the event loop's thread", UserWarning, stacklevel=1)

    def show(message, *_: object, **__: object) -> None:  # type: ignore[no-untyped-def]
        shown.append(str(message))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show  # what the process prints, seen from outside
        with recorded_warnings() as notes:
            warnings.warn("solver stopped early\nmore detail", UserWarning, stacklevel=1)
            warnings.warn("overflow in exp", RuntimeWarning, stacklevel=1)
            other = threading.Thread(target=elsewhere)
            other.start()
            other.join()
    assert notes == [
        "UserWarning: solver stopped early ... more detail",
        "RuntimeWarning: overflow in exp",
    ]
    assert shown == ["from the event loop's thread"]  # shown as before, not taken as the fit's


def test_recorded_warnings_leave_api_deprecations_to_the_process_filters() -> None:
    import warnings

    from training.selection import recorded_warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under -W error (and this suite's settings)
        with pytest.raises(FutureWarning), recorded_warnings() as notes:
            warnings.warn("this argument will change", FutureWarning, stacklevel=1)
    assert notes == []


def test_a_fit_with_no_validation_window_keeps_its_warnings_in_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import warnings

    from training.models.btyd import BGNBDGammaGamma
    from training.models.candidates import REFERENCE
    from training.selection import select_champion
    from training.synth import SynthConfig, events_frame, generate

    fit = BGNBDGammaGamma.fit

    def noisy(self, ds):  # type: ignore[no-untyped-def]
        warnings.warn("BG/NBD is unsure", UserWarning, stacklevel=2)
        return fit(self, ds)

    monkeypatch.setattr(BGNBDGammaGamma, "fit", noisy)
    log = events_frame(generate(SynthConfig(users=300, orders=6000, days=400, seed=3)))
    first = int(log["day"].min())
    sel = select_champion(log, first + 25, 30)  # days of history: nothing to validate on
    assert sel.plan.val_days < 1 and sel.champion == REFERENCE
    assert sel.reason == (
        "no history before the cutoff to validate on; "
        "bgnbd_gg warned: UserWarning: BG/NBD is unsure"
    )


def test_plan_boundaries() -> None:
    # exactly two horizons of usable history (past the first 30 days): a whole horizon validated
    assert plan_windows(history=30 + 2 * 91, horizon_days=91) == WindowPlan(212, 91, 91, 91)
    assert plan_windows(history=30 + 2 * 91 - 1, horizon_days=91).val_days == 45
    # 14-day label and validation windows are enough to learn from labels
    assert plan_windows(history=400, horizon_days=14) == WindowPlan(400, 14, 14, 14)
    assert plan_windows(history=400, horizon_days=14).supervised
    # long enough labels but a validation window under 14 days: label-free candidates only
    plan = plan_windows(history=60, horizon_days=20)
    assert (plan.label_days, plan.val_days) == (20, 10) and not plan.supervised


def test_a_negative_bias_beyond_the_allowance_disqualifies() -> None:
    good = {**REF, "gini": 0.65, "decile_mape_level": 0.15}
    assert missed_targets({**good, "bias": -0.16}, REF) == [
        "total bias -16.00% outside ±15.00% (the reference's own; the target is ±10%)"
    ]
    narrow = {**REF, "bias": 0.05}
    assert missed_targets({**good, "bias": -0.12}, narrow) == ["total bias -12.00% outside ±10.00%"]
    assert qualifies({**good, "bias": -0.10}, narrow)


def test_exactly_two_percent_worse_rmse_and_mae_still_qualify() -> None:
    ref = {**REF, "rmse": 50.0, "mae": 25.0}
    m = {**ref, "gini": 0.65, "decile_mape_level": 0.15, "rmse": 51.0, "mae": 25.5}  # +2.00 %
    assert qualifies(m, ref)


def test_the_composite_by_hand() -> None:
    # Gini +10 %, level-adjusted decile MAPE 10 % lower, RMSE 5 % lower, MAE 2 % higher
    m = {**REF, "gini": 0.66, "decile_mape_level": 0.18, "rmse": 9.5, "mae": 5.1}
    assert composite_score(m, REF) == pytest.approx(0.1 + 0.1 + 0.05 - 0.02)
    assert composite_score({**REF, "gini": 0.54}, REF) == pytest.approx(-0.1)


def test_the_composite_penalises_bias_only_beyond_the_allowance() -> None:
    assert composite_score({**REF, "bias": 0.0}, REF) == 0.0  # inside: no reward
    assert composite_score({**REF, "bias": -0.20}, REF) == pytest.approx(-5 * 0.05)
    narrow = {**REF, "bias": 0.02}  # the plain ±10 % limit
    assert composite_score({**narrow, "bias": -0.12}, narrow) == pytest.approx(-5 * 0.02)


def test_a_reference_without_a_level_adjusted_decile_mape_does_not_bar_a_candidate() -> None:
    """When BG/NBD+GG forecast no revenue its level-adjusted decile MAPE is not a number: the
    targets and the composite leave that term out, so a better candidate can still win."""
    ref = {**REF, "decile_mape_level": float("nan")}
    better = {**REF, "gini": 0.66, "decile_mape_level": 0.1}
    assert missed_targets(better, ref) == []
    assert composite_score(better, ref) == pytest.approx(0.1)  # the Gini term alone
    assert composite_score(ref, ref) == 0.0


def test_a_reference_with_no_error_at_all_gets_a_message_not_a_crash() -> None:
    ref = {**REF, "rmse": 0.0, "mae": 0.0}
    assert missed_targets({**REF, "gini": 0.66, "decile_mape_level": 0.1}, ref) == [
        "RMSE 10 more than 2% above 0 (the reference's is 0)",
        "MAE 5 more than 2% above 0 (the reference's is 0)",
    ]


def _fixed_scores(monkeypatch, figures, failed=()):  # type: ignore[no-untyped-def]
    import training.selection as selection

    def scored(models, *args, **kwargs):  # type: ignore[no-untyped-def]
        return {
            n: selection.CandidateScore(n, {}, 0.0, "boom")
            if n in failed
            else selection.CandidateScore(n, figures[n], 0.0)
            for n in models
        }, {}

    monkeypatch.setattr(selection, "evaluate", scored)


def test_the_best_composite_among_those_that_met_the_targets_wins_whatever_the_order(
    sample_events, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import training.selection as selection
    from feature_store.features import day_number

    figures = {
        "bgnbd_gg": REF,
        "naive_rate": {**REF, "gini": 0.605, "decile_mape_level": 0.199},  # meets, a little better
        "ridge": {**REF, "gini": 0.66, "decile_mape_level": 0.15},  # meets, much better
    }
    _fixed_scores(monkeypatch, figures)
    cutoff = day_number(dt.date(1997, 12, 31))
    for names in (["naive_rate", "ridge", "bgnbd_gg"], ["ridge", "naive_rate", "bgnbd_gg"]):
        sel = selection.select_champion(sample_events, cutoff, 91, names=names)
        assert sel.champion == "ridge", names


def test_a_failed_reference_leaves_the_lowest_validation_rmse(sample_events, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import training.selection as selection
    from feature_store.features import day_number

    figures = {"naive_rate": {**REF, "rmse": 12.0}, "ridge": {**REF, "rmse": 11.0}}
    _fixed_scores(monkeypatch, figures, failed={"bgnbd_gg"})
    cutoff = day_number(dt.date(1997, 12, 31))
    for names in (["naive_rate", "ridge"], ["ridge", "naive_rate"]):
        sel = selection.select_champion(sample_events, cutoff, 91, names=names)
        assert sel.champion == "ridge"
        assert sel.reason == "reference failed; lowest validation RMSE"


def test_validation_scores_the_days_after_the_inner_cutoff_through_the_cutoff(
    sample_events,
) -> None:  # type: ignore[no-untyped-def]
    """The inner cutoff is val_days before the cutoff and the orders on the cutoff day count."""
    from feature_store.features import day_number
    from training.datasets import purchasers_at
    from training.selection import select_champion

    cutoff = day_number(dt.date(1997, 12, 31))
    sel = select_champion(sample_events, cutoff, 91, names=["naive_rate", "bgnbd_gg"])
    inner = cutoff - sel.plan.val_days
    assert sel.inner_cutoff_day == inner
    users = purchasers_at(sample_events, inner).index
    days = sample_events["day"]
    window = sample_events[(days > inner) & (days <= cutoff)]
    window = window[window["user_id"].isin(users)]
    assert (window["day"] == cutoff).any()  # the probe: validated customers bought that day
    spent = window.groupby("user_id")["cents"].sum().reindex(users, fill_value=0) / 100
    assert sel.val_actual is not None
    np.testing.assert_allclose(sel.val_actual, spent.to_numpy())


def test_half_windows_validate_fits_on_labels_as_long_as_the_validation_window(
    sample_events, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """With under two horizons of history the validated fits' label windows are the validation
    window's (half the final fit's), so their cutoffs are as old as the final fit's."""
    import training.selection as selection
    from feature_store.features import day_number

    calls = []
    real = selection.training_set

    def spy(events, cutoff_day, horizon_days, label_days, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((cutoff_day, horizon_days, label_days))
        return real(events, cutoff_day, horizon_days, label_days, **kwargs)

    monkeypatch.setattr(selection, "training_set", spy)
    cutoff = day_number(dt.date(1997, 12, 31))
    sel = selection.select_champion(sample_events, cutoff, 365, names=["bgnbd_gg", "ridge"])
    plan = sel.plan
    assert plan.supervised and plan.val_days < plan.label_days  # the half-window case
    assert calls == [(cutoff - plan.val_days, plan.val_days, plan.val_days)]
    assert not sel.scores["ridge"].error
