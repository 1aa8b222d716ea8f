"""How far off the BG/NBD + Gamma-Gamma reference's *total* is, across the calendar.

A forecast's total bias splits exactly into the purchase-count part and the spend part::

    1 + bias = (1 + orders_bias) * (1 + spend_bias)

where ``orders_bias`` compares the expected purchase days with the purchase days that happened
and ``spend_bias`` the implied revenue per purchase day with the actual one. The sweep refits
the reference at every cutoff (it needs no labels, so this is cheap) and scores every horizon
that ends within the data, which shows whether a level miss is the model's or the calendar's.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from feature_store.features import day_date
from training.datasets import history_days, purchasers_at, window_labels
from training.models.btyd import BGNBDGammaGamma, bgnbd_expected, fit_bgnbd
from training.progress import Progress
from training.report import plt, save_figure
from training.selection import BIAS_LIMIT, plan_windows


@dataclass(frozen=True)
class ReferenceLevel:
    cutoff: dt.date
    horizon_days: int
    customers: int
    predicted_days: float
    actual_days: int
    predicted_revenue: float
    actual_revenue: float

    @property
    def orders_bias(self) -> float:
        return _ratio(self.predicted_days, self.actual_days) - 1

    @property
    def bias(self) -> float:
        return _ratio(self.predicted_revenue, self.actual_revenue) - 1

    @property
    def spend_bias(self) -> float:
        """Predicted revenue per predicted purchase day against the actual one."""
        return _ratio(1 + self.bias, 1 + self.orders_bias) - 1


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def purchase_days_in(
    events: pd.DataFrame, users: pd.Index, start_day: int, days: int
) -> np.ndarray:
    """Distinct purchase days of each of ``users`` in ``(start_day, start_day + days]`` (the
    unit BG/NBD counts)."""
    d = events["day"].to_numpy()
    win = events[(d > start_day) & (d <= start_day + days) & (events["type"] == "purchase")]
    counts = win.drop_duplicates(["user_id", "day"]).groupby("user_id").size()
    return counts.reindex(users, fill_value=0).to_numpy(np.int64)


def _scorable(
    cutoff_days: Iterable[int], horizons: Iterable[int], last_day: int
) -> Iterator[tuple[int, list[int]]]:
    """Each cutoff with the horizons that end on or before ``last_day`` (cutoffs with none
    are skipped)."""
    hs = sorted(set(horizons))
    for c in cutoff_days:
        fits = [h for h in hs if c + h <= last_day]
        if fits:
            yield c, fits


def reference_levels(
    events: pd.DataFrame,
    cutoff_days: Iterable[int],
    horizons: Iterable[int],
    progress: Progress | None = None,
) -> list[ReferenceLevel]:
    """The reference fitted on the orders up to each cutoff, scored on every horizon that ends
    on or before the last day in ``events``."""
    out: list[ReferenceLevel] = []
    for c, hs in _scorable(cutoff_days, horizons, int(events["day"].max())):
        feats = purchasers_at(events, c)
        model = BGNBDGammaGamma().fit_features(feats)
        for h in hs:
            comp = model.components(feats, h)
            revenue, _ = window_labels(events, feats.index, c, h)
            out.append(
                ReferenceLevel(
                    cutoff=day_date(c),
                    horizon_days=h,
                    customers=len(feats),
                    predicted_days=float(comp["expected_orders"].sum()),
                    actual_days=int(purchase_days_in(events, feats.index, c, h).sum()),
                    predicted_revenue=float(
                        (comp["expected_orders"] * comp["expected_spend"]).sum()
                    ),
                    actual_revenue=float(revenue.sum()),
                )
            )
        if progress:
            progress(f"reference level: cutoff {day_date(c)} ({len(hs)} horizons)")
    return out


def levels_frame(levels: list[ReferenceLevel]) -> pd.DataFrame:
    rows = [
        {**asdict(x), "bias": x.bias, "orders_bias": x.orders_bias, "spend_bias": x.spend_bias}
        for x in levels
    ]
    return pd.DataFrame(rows)


def levels_table(df: pd.DataFrame) -> str:
    """Markdown from :func:`levels_frame`: one row per cutoff, one column per horizon,
    ``total (orders, spend)``."""
    horizons = sorted(df["horizon_days"].unique())
    lines = [
        "| cutoff | " + " | ".join(f"{h} d" for h in horizons) + " |",
        "|---|" + "---:|" * len(horizons),
    ]
    for cutoff, g in df.groupby("cutoff", sort=True):
        cells = []
        by_h = g.set_index("horizon_days")
        for h in horizons:
            if h not in by_h.index:
                cells.append("")
                continue
            r = by_h.loc[h]
            total = f"{r['bias'] * 100:+.1f}%"
            if abs(r["bias"]) > BIAS_LIMIT:
                total = f"**{total}**"
            cells.append(f"{total} ({_whole(r['orders_bias'])}, {_whole(r['spend_bias'])})")
        lines.append(f"| {cutoff} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _whole(fraction: float) -> str:
    """A fraction as signed whole percent, without a signed zero."""
    if not np.isfinite(fraction):
        return "n/a"
    v = round(fraction * 100)
    return f"{v:+d}" if v else "0"


def levels_plot(df: pd.DataFrame, path: Path) -> Path:
    """Heat map of :func:`levels_frame`'s total bias, cutoff by horizon, the misses beyond
    the bias limit in bold."""
    grid = df.pivot(index="horizon_days", columns="cutoff", values="bias") * 100
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * grid.shape[1], 1.2 + 0.6 * grid.shape[0]))
    lim = max(30.0, float(np.nanmax(np.abs(grid.to_numpy()))))
    im = ax.imshow(grid.to_numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for (i, j), v in np.ndenumerate(grid.to_numpy()):
        if np.isfinite(v):
            weight = "bold" if abs(v) > BIAS_LIMIT * 100 else "normal"
            ax.text(j, i, _whole(v / 100), ha="center", va="center", fontsize=8, fontweight=weight)
    ax.set_xticks(range(grid.shape[1]), [f"{c:%Y-%m-%d}" for c in grid.columns], rotation=60)
    ax.set_yticks(range(grid.shape[0]), [f"{h} d" for h in grid.index])
    ax.set_xlabel("cutoff")
    ax.set_ylabel("horizon")
    ax.set_title(f"BG/NBD+GG total bias, % (bold: outside ±{BIAS_LIMIT:.0%})", fontsize=11)
    fig.colorbar(im, ax=ax, fraction=0.03)
    return save_figure(fig, path)


def month_ends(first: dt.date, last: dt.date) -> list[dt.date]:
    """Every month's last day from ``first``'s month to ``last``'s, inclusive."""
    return [p.end_time.date() for p in pd.period_range(first, last, freq="M")]


def settled_inputs(
    events: pd.DataFrame, cutoff_day: int, settle_days: int
) -> tuple[pd.Index, np.ndarray, np.ndarray, np.ndarray]:
    """BG/NBD's ``(x, t_x, T)`` with each customer's clock started ``settle_days`` after the
    first purchase: ``x`` counts the purchase days strictly after that start and on or before
    the cutoff, ``t_x`` is the last of them less the start (0 without any), ``T`` the cutoff
    less the start. Customers whose start is after the cutoff are left out."""
    p = events.loc[events["type"] == "purchase", ["user_id", "day"]].drop_duplicates()
    past = p[p["day"].to_numpy() <= cutoff_day]
    start = past.groupby("user_id")["day"].min() + settle_days
    start = start[start <= cutoff_day]
    mine = past[past["user_id"].isin(start.index)]
    after = mine[mine["day"].to_numpy() > mine["user_id"].map(start).to_numpy()]
    g = after.groupby("user_id")["day"]
    x = g.size().reindex(start.index, fill_value=0).to_numpy(np.float64)
    t_x = (g.max().reindex(start.index) - start).fillna(0).to_numpy(np.float64)
    T = (cutoff_day - start).to_numpy(np.float64)
    return start.index, x, t_x, T


def _settled_bias(
    events: pd.DataFrame, cutoff_day: int, settle_days: int, horizons: Iterable[int]
) -> dict[int, float]:
    """Purchase-day bias of the settled-clock BG/NBD fitted at ``cutoff_day`` for each horizon
    (empty when nobody's clock has started by then)."""
    users, x, t_x, T = settled_inputs(events, cutoff_day, settle_days)
    if not len(users):
        return {}
    params, _ = fit_bgnbd(x, t_x, T)
    out = {}
    for h in horizons:
        expected = float(bgnbd_expected(params, h, x, t_x, T).sum())
        actual = int(purchase_days_in(events, users, cutoff_day, h).sum())
        out[h] = _ratio(expected, actual) - 1
    return out


def settled_orders_bias(
    events: pd.DataFrame, cutoff_days: Iterable[int], horizons: Iterable[int], settle_days: int
) -> pd.DataFrame:
    """Purchase-day bias of a BG/NBD whose customer clocks start ``settle_days`` after the
    first purchase (:func:`settled_inputs`).

    An analysis, not a candidate: the contract's features do not carry the purchase days of a
    customer's first weeks, so a model served from them cannot use it. It also bends BG/NBD's
    assumptions: the model takes every customer as alive at the start of the clock, and a
    customer who dropped out during the settling stretch re-enters as alive with no purchase.
    """
    rows = []
    for c, hs in _scorable(cutoff_days, horizons, int(events["day"].max())):
        for h, bias in _settled_bias(events, c, settle_days, hs).items():
            rows.append(
                {
                    "cutoff": day_date(c),
                    "horizon_days": h,
                    "settle_days": settle_days,
                    "orders_bias": bias,
                }
            )
    return pd.DataFrame(rows)


def settle_days_chosen_on_the_past(
    events: pd.DataFrame, cases: Iterable[tuple[int, int]], settle_days: Iterable[int]
) -> pd.DataFrame:
    """The delay a forecaster could have picked at each ``(cutoff_day, horizon)``: the one with
    the smallest purchase-day bias on the selection's internal validation window (fitted at
    ``cutoff - val_days`` on the orders up to then, scored on the ``val_days`` up to the
    cutoff), and the out-of-sample purchase-day bias with it and with no delay."""
    delays = sorted(set(settle_days))
    rows = []
    for c, h in cases:
        plan = plan_windows(history_days(events, c), h)
        inner = c - plan.val_days
        val = {
            d: _settled_bias(events, inner, d, [plan.val_days]).get(plan.val_days) for d in delays
        }
        known = {d: b for d, b in val.items() if b is not None and np.isfinite(b)}
        if not known:
            continue
        chosen = min(known, key=lambda d: abs(known[d]))
        oos = {d: _settled_bias(events, c, d, [h]).get(h, float("nan")) for d in {0, chosen}}
        rows.append(
            {
                "cutoff": day_date(c),
                "horizon_days": h,
                "val_days": plan.val_days,
                **{f"val_{d}": val[d] for d in delays},
                "chosen": chosen,
                "oos_chosen": oos[chosen],
                "oos_none": oos[0],
            }
        )
    return pd.DataFrame(rows)
