"""Metrics on tiny examples worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training import metrics

A = np.array([0.0, 0.0, 10.0, 5.0, 0.0, 1.0])
P = np.array([0.0, 1.0, 9.0, 4.0, 0.0, 2.0])


def test_rmse_and_mae() -> None:
    # errors 0, -1, 1, 1, 0, -1 -> squares sum 4 over 6
    assert metrics.rmse(A, P) == pytest.approx(np.sqrt(4 / 6))
    assert metrics.mae(A, P) == pytest.approx(4 / 6)


def test_total_bias() -> None:
    assert metrics.total_bias(A, P) == pytest.approx(16 / 16 - 1)
    assert metrics.total_bias(np.array([1.0, 3.0]), np.array([2.0, 3.0])) == pytest.approx(0.25)


def test_normalized_gini_perfect_reversed_and_partial() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert metrics.normalized_gini(a, a) == pytest.approx(1.0)
    assert metrics.normalized_gini(a, -a) == pytest.approx(-1.0)
    # order by p: 4, 3, 1, 2 -> cumulative 4, 7, 8, 10 (perfect: 4, 7, 9, 10)
    # gini = sum(cum)/total/n - (n+1)/2n: (29/40 - 5/8) / (30/40 - 5/8) = 0.1 / 0.125
    assert metrics.normalized_gini(a, np.array([2.0, 1.0, 3.0, 4.0])) == pytest.approx(0.8)


def test_top_capture() -> None:
    a = np.array([10.0] + [1.0] * 9)  # total 19
    p = np.arange(10, dtype=float)  # ranks the big spender last
    assert metrics.top_capture(a, p) == pytest.approx(1 / 19)
    assert metrics.top_capture(a, -p) == pytest.approx(10 / 19)


def test_decile_mape_by_hand() -> None:
    # 20 customers, 2 per decile; decile k has actual mean k+1 and predicted mean 1.1*(k+1)
    actual = np.repeat(np.arange(1, 11, dtype=float), 2)
    pred = actual * 1.1
    assert metrics.decile_mape(actual, pred) == pytest.approx(0.1)
    # a decile with zero actual revenue has no percentage error and is skipped
    actual0 = actual.copy()
    actual0[:2] = 0.0
    assert metrics.decile_mape(actual0, pred) == pytest.approx(0.1)


def test_decile_bins_follow_predictions_not_actuals() -> None:
    actual = np.arange(10, dtype=float)
    pred = actual[::-1].copy()  # highest prediction on the lowest actual
    table = metrics.decile_table(actual, pred)
    assert list(table["actual"]) == list(actual[::-1])
    assert metrics.decile_mape(actual, actual) == 0.0


def test_spearman_and_degenerate_inputs() -> None:
    assert metrics.spearman(A, A) == pytest.approx(1.0)
    assert np.isnan(metrics.spearman(np.ones(3), np.arange(3.0)))
    with pytest.raises(ValueError):
        metrics.rmse(np.ones(3), np.ones(4))


def test_ties_count_as_a_block_in_random_order_so_row_order_changes_nothing() -> None:
    """A ranking cannot order customers with equal predictions: the figures read along it are
    the average over every order of the ties, whatever order the rows came in."""
    import itertools

    a = np.array([10.0, 0.0, 0.0, 0.0, 5.0, 0.0, 3.0])
    p = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0])
    # Gini and top-10% capture by brute force over every order of the rows
    ginis, captures = [], []
    for perm in itertools.permutations(range(len(a))):
        idx = np.array(perm)
        order = np.argsort(-p[idx], kind="stable")
        cum = np.cumsum(a[idx][order])
        ginis.append(cum.sum() / cum[-1] / len(a) - (len(a) + 1) / (2 * len(a)))
        captures.append(a[idx][order][0] / a.sum())
    best = np.cumsum(np.sort(a)[::-1])
    perfect = best.sum() / best[-1] / len(a) - (len(a) + 1) / (2 * len(a))
    assert metrics.normalized_gini(a, p) == pytest.approx(np.mean(ginis) / perfect)
    assert metrics.top_capture(a, p) == pytest.approx(np.mean(captures))  # top 1 of 7: p=2
    rng = np.random.default_rng(3)
    actual = rng.gamma(0.3, 50.0, 500)
    pred = np.round(actual + rng.normal(0, 30, 500), -1).clip(0)  # heavily tied
    first = metrics.all_metrics(actual, pred)
    for _ in range(5):
        idx = rng.permutation(500)
        again = metrics.all_metrics(actual[idx], pred[idx])
        for name, value in first.items():
            assert again[name] == pytest.approx(value, nan_ok=True), name
    # a constant forecast ranks no one: Gini 0 and capture of its share, in any order
    flat = np.full(500, 7.0)
    assert metrics.normalized_gini(actual, flat) == pytest.approx(0.0, abs=1e-12)
    assert metrics.top_capture(actual, flat) == pytest.approx(0.1)


def test_level_adjustment_needs_positive_totals() -> None:
    # refunds taking the actual total below zero would reverse the ranking: no figure
    assert np.isnan(metrics.level_adjusted_decile_mape(np.array([-100.0, 1.0, 2.0]), A[:3] + 1))
    assert np.isnan(metrics.level_adjusted_decile_mape(A, np.zeros_like(A)))


def test_decile_means_and_capture_are_the_expectation_over_orders_of_a_split_tie() -> None:
    """A tie block split by a bin edge (and by the top-10% cut) contributes its mean actual to
    each side: the bins keep equal counts, unlike a qcut that moves whole blocks."""
    import itertools

    a = np.array([0.0, 4.0, 10.0, 0.0, 2.0, 30.0, 0.0, 6.0, 1.0, 50.0, 0.0, 3.0, 8.0, 0.0])
    p = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 4.0, 5.0, 6.0, 6.0, 6.0])
    n_bins, n = 5, len(a)
    sizes = np.bincount(pd.qcut(np.arange(1, n + 1), n_bins, labels=False))  # 3, 3, 2, 3, 3
    tables, captures = [], []
    blocks = [np.flatnonzero(p == v) for v in np.unique(p)]
    for orders in itertools.product(*(itertools.permutations(b) for b in blocks)):
        ranked = np.concatenate([a[list(o)] for o in orders])  # ascending prediction
        bins = np.split(ranked, np.cumsum(sizes)[:-1])  # the ties of 2 and 3 straddle edges
        tables.append([b.mean() for b in bins])
        captures.append(ranked[::-1][:2].sum() / a.sum())  # top 10% of 14 = 2 customers
    got = metrics.decile_table(a, p, n_bins=n_bins)
    assert list(got.index) == list(range(n_bins))
    assert got["actual"].to_numpy() == pytest.approx(np.mean(tables, axis=0))
    assert metrics.top_capture(a, p) == pytest.approx(np.mean(captures))  # the top 2: a 3-way tie


def test_a_decile_whose_refunds_cancel_its_purchases_has_no_percentage_error() -> None:
    # 0.1 + 0.2 + 0.3 - 0.6 is 1.1e-16 in floating point (a tie mean of 2.8e-17), not 0
    actual = np.array([0.1, 0.2, 0.3, -0.6, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    pred = np.array([1.0, 1.0, 1.0, 1.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert metrics.decile_mape(actual, pred) == pytest.approx(0.0)


def test_all_metrics_reports_each_figure_under_its_own_name() -> None:
    rng = np.random.default_rng(0)
    actual = rng.gamma(0.5, 40.0, 200)
    pred = actual * rng.lognormal(0.0, 0.5, 200)
    got = metrics.all_metrics(actual, pred)
    assert list(got) == list(metrics.METRIC_NAMES)
    assert got == {
        "rmse": metrics.rmse(actual, pred),
        "mae": metrics.mae(actual, pred),
        "gini": metrics.normalized_gini(actual, pred),
        "spearman": metrics.spearman(actual, pred),
        "top10_capture": metrics.top_capture(actual, pred),
        "decile_mape": metrics.decile_mape(actual, pred),
        "decile_mape_level": metrics.level_adjusted_decile_mape(actual, pred),
        "bias": metrics.total_bias(actual, pred),
    }


def test_decile_mape_is_the_mean_over_deciles() -> None:
    # one customer per decile; only the top decile is off, by 100 %: 1.0 / 10
    actual = np.arange(1, 11, dtype=float)
    pred = actual.copy()
    pred[-1] = 20.0
    assert metrics.decile_mape(actual, pred) == pytest.approx(0.1)


def test_level_adjusted_decile_mape_scales_predictions_to_the_actual_total() -> None:
    actual = np.arange(1, 11, dtype=float)  # total 55
    # right shape, twice the level: the plain figure sees 100 % error, the level-adjusted none
    assert metrics.decile_mape(actual, 2 * actual) == pytest.approx(1.0)
    assert metrics.level_adjusted_decile_mape(actual, 2 * actual) == pytest.approx(0.0)
    shape = np.array([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 20])  # total 65
    assert metrics.level_adjusted_decile_mape(actual, 3 * shape) == pytest.approx(
        metrics.decile_mape(actual, shape * 55 / 65)
    )
