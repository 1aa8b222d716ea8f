"""The report's plots draw what their legends say, and each column's meaning is its own metric's.
The figures are taken before they are saved."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

import training.report as report
from training.metrics import decile_table


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    drawn: list[plt.Figure] = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: drawn.append(fig) or path)
    yield drawn
    for fig in drawn:
        plt.close(fig)


def test_the_gain_curve_ranks_customers_by_predicted_value_highest_first(
    figures: list[plt.Figure], tmp_path: Path
) -> None:
    actual = np.random.default_rng(0).gamma(0.4, 50.0, 500)
    report.gain_plot(actual, {"oracle": actual, "backwards": -actual}, tmp_path / "g.png")
    lines = {line.get_label(): line.get_ydata() for line in figures[0].axes[0].get_lines()}
    best = np.cumsum(np.sort(actual)[::-1]) / actual.sum()
    worst = np.cumsum(np.sort(actual)) / actual.sum()
    np.testing.assert_allclose(lines["oracle"], best)
    np.testing.assert_allclose(lines["perfect"], best)
    np.testing.assert_allclose(lines["backwards"], worst)


def test_the_decile_bars_are_labelled_predicted_and_actual_as_they_are(
    figures: list[plt.Figure], tmp_path: Path
) -> None:
    actual = np.random.default_rng(1).gamma(0.4, 50.0, 500)
    pred = 2 * actual + 1  # twice too high: the bars differ
    report.decile_plot(actual, {"m": pred}, tmp_path / "d.png")
    t = decile_table(actual, pred)
    bars = {c.get_label(): [b.get_height() for b in c] for c in figures[0].axes[0].containers}
    np.testing.assert_allclose(bars["predicted"], t["predicted"])
    np.testing.assert_allclose(bars["actual"], t["actual"])


def test_the_tracking_legend_gives_each_models_bias_at_the_horizon(
    figures: list[plt.Figure], tmp_path: Path
) -> None:
    report.tracking_plot(
        [0, 30, 60], np.array([0.0, 50.0, 100.0]), {"m": np.array([0.0, 70.0, 120.0])},
        tmp_path / "t.png",
    )  # fmt: skip
    labels = [line.get_label() for line in figures[0].axes[0].get_lines()]
    assert labels == ["actual (100)", "m (bias +20.0%)"]


def test_each_column_meaning_describes_its_own_metric() -> None:
    """The page's explanations are read beside the figures: each names the metric it explains."""
    starts = {
        "rmse": "root mean squared error",
        "mae": "mean absolute error",
        "gini": "normalized Gini",
        "spearman": "rank correlation",
        "top10_capture": "share of the actual revenue earned by the 10%",
        "decile_mape": "mean absolute percentage error",
        "decile_mape_level": "the same with each model's predictions first scaled",
        "bias": "sum of predictions / sum of actual values - 1",
    }
    for column, start in starts.items():
        assert report.COLUMN_MEANINGS[column].startswith(start), column
