"""``python -m training.quality --out docs/model-quality.md``: the model-quality report.

For CDNOW master at several cutoffs (one with less history than the horizon), every
candidate is fitted on the orders up to the cutoff and scored against what the customers
actually spent in the horizon; the champion is the one the internal validation chose (it never
sees the future). The targets are checked against the BG/NBD+GG reference.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from feature_store.features import day_number
from training.backtest import BacktestResult, StderrProgress, backtest_events, write_report
from training.datasets import load_orders
from training.metrics import METRIC_NAMES
from training.models.candidates import REFERENCE
from training.selection import BIAS_LIMIT, RMSE_TOLERANCE

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "clv" / "data" / "CDNOW_master.txt.gz"
#: (cutoff, horizon days): the headline case, an earlier one, and one with less history
#: (181 days) than its horizon (365 days).
DEFAULT_CASES: tuple[tuple[dt.date, int], ...] = (
    (dt.date(1997, 12, 31), 181),
    (dt.date(1997, 9, 30), 181),
    (dt.date(1997, 6, 30), 365),
    (dt.date(1998, 3, 31), 91),
)


@dataclass(frozen=True)
class TargetCheck:
    gini: bool
    decile_mape: bool
    rmse: bool
    mae: bool
    bias: bool

    @property
    def all(self) -> bool:
        return self.gini and self.decile_mape and self.rmse and self.mae and self.bias


def check_targets(champ: dict[str, float], ref: dict[str, float]) -> TargetCheck:
    """The project's targets for the champion against BG/NBD+GG, out of sample."""
    return TargetCheck(
        gini=champ["gini"] > ref["gini"],
        decile_mape=champ["decile_mape"] < ref["decile_mape"],
        rmse=champ["rmse"] <= ref["rmse"] * (1 + RMSE_TOLERANCE),
        mae=champ["mae"] <= ref["mae"] * (1 + RMSE_TOLERANCE),
        bias=abs(champ["bias"]) <= BIAS_LIMIT,
    )


def _fmt_table(table: pd.DataFrame, champion: str) -> str:
    cols = list(METRIC_NAMES)
    head = (
        "| model | RMSE | MAE | Gini | Spearman | top-10% capture | decile MAPE "
        "| decile MAPE, level-adjusted | bias |"
    )
    lines = [head, "|---|" + "---:|" * len(cols)]
    for name, row in table.iterrows():
        label = f"**{name}** (champion)" if name == champion else str(name)
        if name == REFERENCE:
            label += " (reference)"
        vals = [
            f"{row[c]:.2f}"
            if c in ("rmse", "mae")
            else f"{row[c] * 100:+.1f}%"
            if c == "bias"
            else f"{row[c]:.3f}"
            for c in cols
        ]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def case_section(
    result: BacktestResult, cutoff: dt.date, img_dir: Path, doc_dir: Path, seconds: float
) -> tuple[str, TargetCheck | None]:
    sel = result.selection
    oos = result.out_of_sample
    assert oos is not None
    champ, ref = oos.loc[sel.champion].to_dict(), oos.loc[REFERENCE].to_dict()
    check = check_targets(champ, ref) if sel.champion != REFERENCE else None
    prefix = f"{cutoff:%Y%m%d}_{result.horizon_days}d_"
    out = [
        f"## Cutoff {cutoff}, horizon {result.horizon_days} days",
        "",
        f"{len(result.predictions):,} customers with an order on or before the cutoff. History "
        f"before the cutoff: {sel.plan.history_days} days; internal validation fitted up to "
        f"{dt.date(1970, 1, 1) + dt.timedelta(days=sel.inner_cutoff_day or 0)} and scored the "
        f"next {sel.plan.val_days} days; the final fit's label windows are "
        f"{sel.plan.label_days} days"
        + (" (shorter than the horizon: rescaled)." if sel.plan.short_history else ".")
        + f" Run time {seconds:.0f} s.",
        "",
        f"Champion chosen by internal validation: **{sel.champion}** ({sel.reason}).",
        "",
        "Out of sample, against the revenue actually earned in the horizon:",
        "",
        _fmt_table(oos, sel.champion),
        "",
    ]
    if check is None:
        out.append("Targets: the champion *is* the reference, so it cannot beat it (**not met**).")
    else:
        out.append(
            f"Targets vs {REFERENCE}: Gini higher {_mark(check.gini)}, decile MAPE lower "
            f"{_mark(check.decile_mape)}, RMSE within +2% {_mark(check.rmse)} "
            f"({champ['rmse'] / ref['rmse'] - 1:+.1%}), MAE within +2% {_mark(check.mae)} "
            f"({champ['mae'] / ref['mae'] - 1:+.1%}), |bias| <= 10% {_mark(check.bias)} "
            f"-> **{'met' if check.all else 'not met'}**."
        )
    if abs(ref["bias"]) > BIAS_LIMIT:
        best = oos["bias"].abs().idxmin()
        out += [
            "",
            f"Level: {REFERENCE}'s own total is off by {ref['bias']:+.1%} here. The hybrids take "
            "their total from it (their boosting only re-ranks customers), so they share that "
            f"bias. The candidate closest in total here was {best} "
            f"({oos.loc[best, 'bias']:+.1%}), but which candidate's level is right changes from "
            "cutoff to cutoff (see the other cases), so the past does not tell which to trust. "
            "The miss follows the calendar: CDNOW's seasons differ from what a stationary "
            "purchase process fitted on the months before predicts, and with under a year of "
            "history the season cannot be learnt.",
        ]
    val = sel.table()
    vcols = ["rmse", "mae", "gini", "decile_mape", "decile_mape_level", "bias"]
    out += [
        "",
        "<details><summary>Internal validation (what the selection saw)</summary>",
        "",
        "| model | RMSE | MAE | Gini | decile MAPE | level-adj. decile MAPE | bias "
        "| meets targets | score |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, row in val.iterrows():
        if row.get("error"):
            out.append(f"| {name} | failed: {row['error']} |||||||")
            continue
        out.append(
            f"| {name} | "
            + " | ".join(f"{row[c] * 100:+.1f}%" if c == "bias" else f"{row[c]:.3f}" for c in vcols)
            + f" | {'yes' if row['qualifies'] else ''} | {row['score']:+.3f} |"
        )
    out += ["", "</details>", ""]
    for name in ("oos_deciles", "oos_gain", "tracking"):
        path = img_dir / f"{prefix}{name}.png"
        if path.exists():
            out.append(f"![{name}]({path.relative_to(doc_dir).as_posix()})")
    out.append("")
    return "\n".join(out), check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/model-quality.md"))
    parser.add_argument("--orders", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--img-dir", type=Path, default=None, help="where the plots go (default: img/ beside --out)"
    )
    parser.add_argument(
        "--candidates", default=None, help="comma-separated candidate names (default: all)"
    )
    parser.add_argument(
        "--cases", default=None, help="comma-separated CUTOFF:HORIZON, e.g. 1997-12-31:181"
    )
    args = parser.parse_args(argv)
    names = args.candidates.split(",") if args.candidates else None
    cases = DEFAULT_CASES
    if args.cases:
        cases = tuple(
            (dt.date.fromisoformat(c.split(":")[0]), int(c.split(":")[1]))
            for c in args.cases.split(",")
        )
    doc_dir = args.out.parent
    img_dir = args.img_dir or doc_dir / "img"
    say = StderrProgress("quality")
    events = load_orders(args.orders, "cdnow")
    sections, checks = [], []
    for cutoff, horizon in cases:
        say(f"=== cutoff {cutoff}, horizon {horizon} days")
        t0 = time.perf_counter()
        result = backtest_events(
            events, day_number(cutoff), horizon, candidates=names, score_all=True, progress=say
        )
        with tempfile.TemporaryDirectory() as tmp:
            write_report(events, result, Path(tmp))
            _copy_plots(Path(tmp), img_dir, f"{cutoff:%Y%m%d}_{horizon}d_")
        text, check = case_section(result, cutoff, img_dir, doc_dir, time.perf_counter() - t0)
        sections.append(text)
        checks.append((cutoff, horizon, result.selection.champion, check))
    summary = [
        "| cutoff | horizon | champion | targets met |",
        "|---|---:|---|---|",
        *(
            f"| {c} | {h} d | {ch} | {'yes' if k is not None and k.all else '**no**'} |"
            for c, h, ch, k in checks
        ),
    ]
    header = [
        "# Model quality",
        "",
        f"Generated by `python -m training.quality --out {args.out}` (`make model-quality`) on "
        f"CDNOW master (`{args.orders.name}`), Python {platform.python_version()}.",
        "",
        "Each case is a backtest: candidates see only orders dated on or before the cutoff; the "
        "champion is picked by an internal time-split validation inside that past (it never "
        "sees the horizon); the tables score every candidate's forecast against the revenue the "
        "customers actually spent in the horizon. Target at every cutoff: the champion beats "
        "BG/NBD+GG on normalized Gini and decile MAPE, is at most 2% worse on RMSE and MAE, and "
        "its total bias is within ±10%.",
        "",
        "Metrics: RMSE/MAE per customer in dollars; normalized Gini of the ranking; Spearman; "
        "share of actual revenue earned by the top 10% by prediction; decile MAPE as in the ZILN "
        "paper (mean absolute percentage error of per-decile mean prediction vs mean actual, "
        "deciles of predicted value); bias = sum(predicted) / sum(actual) - 1.",
        "",
        *summary,
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + sections), encoding="utf-8")
    say(f"wrote {args.out}")
    return 0


def _copy_plots(src: Path, dst: Path, prefix: str) -> None:
    """Keep the report's plots beside the markdown under stable, prefixed names."""
    dst.mkdir(parents=True, exist_ok=True)
    for png in src.glob("*.png"):
        (dst / f"{prefix}{png.name}").write_bytes(png.read_bytes())


if __name__ == "__main__":
    raise SystemExit(main())
