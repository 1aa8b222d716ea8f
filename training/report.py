"""Backtest reports: PNG plots (matplotlib, Agg backend) and a one-page HTML summary."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter

from training.metrics import decile_table

#: Matplotlib dash patterns, one per drawn model, so that curves lying on one another (a
#: hybrid and the BG/NBD+GG whose total it keeps) both stay visible.
DASHES = ("--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))


def _thousands(ax: plt.Axes) -> None:
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))


def decile_plot(
    actual: np.ndarray,
    preds: Mapping[str, np.ndarray],
    path: Path,
    title: str = "Decile calibration",
    currency: str = "USD",
) -> Path:
    """Mean predicted vs mean actual value per predicted-value decile, one panel per model, on
    one symmetric-log scale (linear within one currency unit of 0, so zero and negative means
    show): decile MAPE weighs the low deciles' relative errors as much as the top's."""
    fig, axes = plt.subplots(
        1, len(preds), figsize=(4.2 * len(preds), 3.6), squeeze=False, sharey=True
    )
    top, bottom = 1.0, 0.0
    for ax, (name, p) in zip(axes[0], preds.items(), strict=True):
        t = decile_table(actual, p)
        means = t[["predicted", "actual"]].to_numpy()
        top, bottom = max(top, float(np.nanmax(means))), min(bottom, float(np.nanmin(means)))
        x = np.arange(len(t)) + 1
        ax.bar(x - 0.2, t["predicted"], width=0.4, label="predicted")
        ax.bar(x + 0.2, t["actual"], width=0.4, label="actual")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("predicted-value decile")
        ax.set_xticks(x)
    axes[0][0].set_yscale("symlog", linthresh=1.0)
    axes[0][0].set_ylim(bottom * 2, top * 2)  # headroom on the log part of the scale
    axes[0][0].set_ylabel(f"mean per customer ({currency})")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def gain_plot(
    actual: np.ndarray, preds: Mapping[str, np.ndarray], path: Path, title: str = "Gain curve"
) -> Path:
    """Cumulative share of actual revenue captured by customers ranked by each model."""
    a = np.asarray(actual, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    share = np.arange(1, len(a) + 1) / len(a)
    total = a.sum() or 1.0
    for name, p in preds.items():
        order = np.argsort(-np.asarray(p), kind="stable")
        ax.plot(share, np.cumsum(a[order]) / total, label=name, lw=1.2)
    ax.plot(share, np.cumsum(np.sort(a)[::-1]) / total, "k:", label="perfect", lw=1)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, label="random")
    ax.set_xlabel("share of customers (by predicted value)")
    ax.set_ylabel("share of actual revenue")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def tracking_plot(
    days: Sequence[int],
    actual_cum: np.ndarray,
    pred_cum: Mapping[str, np.ndarray],
    path: Path,
    title: str = "Cumulative revenue after the cutoff",
    currency: str = "USD",
) -> Path:
    """Actual cumulative revenue of the scored customers vs each model's forecast for the same
    number of days, over the horizon, from day 0; each legend entry gives the model's total
    against the actual at the horizon's end."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(days, actual_cum, "k-", lw=2, label=f"actual ({actual_cum[-1]:,.0f})")
    for (name, p), dashes in zip(pred_cum.items(), DASHES * len(pred_cum), strict=False):
        end = (
            f"bias {p[-1] / actual_cum[-1] - 1:+.1%}"
            if actual_cum[-1] > 0
            else f"total {p[-1]:,.0f} {currency}"
        )
        ax.plot(days, p, linestyle=dashes, lw=1.6, label=f"{name} ({end})")
    ax.set_xlabel("days after the cutoff")
    ax.set_ylabel(f"cumulative revenue ({currency})")
    ax.set_xlim(0, days[-1])
    ax.set_ylim(bottom=0)
    _thousands(ax)
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


#: What each column of the report's tables means, its unit and which way is better.
COLUMN_MEANINGS: dict[str, str] = {
    "rmse": "root mean squared error per customer, in the orders' currency; lower is better",
    "mae": "mean absolute error per customer, in the orders' currency; lower is better",
    "gini": "normalized Gini of the ranking by predicted value: 1 orders customers as their "
    "actual spend does, 0 is no better than chance; higher is better",
    "spearman": "rank correlation of predicted and actual value; higher is better",
    "top10_capture": "share of the actual revenue earned by the 10% of customers predicted "
    "highest; higher is better",
    "decile_mape": "mean absolute percentage error of the mean predicted against the mean "
    "actual value in each decile of predicted value (as in the ZILN paper); lower is better",
    "decile_mape_level": "the same with each model's predictions first scaled to the actual "
    "total: how well it splits the revenue among customers, its level aside; lower is better",
    "bias": "sum of predictions / sum of actual values - 1 (-0.05: the forecast total is 5% "
    "under the actual one); nearer 0 is better",
    "qualifies": "validation only: met every target against BG/NBD+GG (better Gini and "
    "level-adjusted decile MAPE, RMSE and MAE at most 2% worse, bias within ±10% or the "
    "reference's own); 'reference' for BG/NBD+GG itself, the yardstick",
    "missed": "validation only: the targets it missed, with both figures",
    "score": "validation only: the composite, the sum of the relative gains over BG/NBD+GG "
    "(Gini, level-adjusted decile MAPE, RMSE, MAE) less a penalty for bias beyond the limit; "
    "BG/NBD+GG scores 0, the best qualifying candidate above 0 wins; empty for a candidate "
    "without figures",
    "seconds": "validation only: time to fit and predict",
    "error": "validation only: why the candidate has no figures",
}


def write_html(
    path: Path,
    title: str,
    notes: Sequence[str],
    tables: Mapping[str, pd.DataFrame],
    images: Sequence[Path],
) -> Path:
    """One page: notes, metric tables, what their columns mean, and the plots (referenced
    relative to the page)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:1em auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    for caption, table in tables.items():
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(table.to_html(float_format=lambda v: f"{v:.4g}", na_rep=""))
    shown = dict.fromkeys(c for t in tables.values() for c in t.columns)
    meanings = [(c, COLUMN_MEANINGS[c]) for c in shown if c in COLUMN_MEANINGS]
    if meanings:
        parts.append("<h2>Columns</h2><dl>")
        for column, meaning in meanings:
            parts.append(f"<dt><b>{html.escape(column)}</b></dt><dd>{html.escape(meaning)}</dd>")
        parts.append("</dl>")
    for img in images:
        rel = img.relative_to(path.parent) if img.is_relative_to(path.parent) else img
        parts.append(f"<p><img src='{html.escape(str(rel))}' alt='{html.escape(img.stem)}'></p>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
