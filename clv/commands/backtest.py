"""``clv backtest``: forecast the revenue after a cutoff from the orders up to it.

Bad input (missing file, bad date, bad columns, no order before the cutoff) ends in one line
on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from clv.commands import fail, parse_date
from clv.errors import ClvError


class OrdersFileFormat(StrEnum):
    csv = "csv"
    cdnow = "cdnow"


def backtest(
    orders: Annotated[
        Path, typer.Option("--orders", help="orders file (CSV or CDNOW text; .gz ok)")
    ],
    cutoff: Annotated[
        str, typer.Option("--cutoff", help="last day the models may see, YYYY-MM-DD")
    ],
    horizon_days: Annotated[
        int, typer.Option("--horizon-days", help="days forecast after the cutoff")
    ],
    out: Annotated[Path, typer.Option("--out", help="predictions CSV to write")],
    report: Annotated[
        Path | None, typer.Option("--report", help="directory for metrics, plots and index.html")
    ] = None,
    fmt: Annotated[
        OrdersFileFormat, typer.Option("--format", help="orders file format")
    ] = OrdersFileFormat.csv,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress lines on stderr")] = False,
) -> None:
    """Select and fit a model on the orders up to CUTOFF, forecast the horizon.

    Writes one row per customer with an order on or before the cutoff:
    user_id,predicted_value,expected_orders,p_alive."""
    day = parse_date(cutoff, "--cutoff")
    if horizon_days <= 0:
        raise fail("--horizon-days must be a positive number of days")
    if not orders.is_file():
        raise fail(f"orders file not found: {orders}")
    if out.is_dir():
        raise fail(f"--out {out} is a directory; give a CSV file path")
    for flag, folder in (("--out", out.parent), ("--report", report)):
        try:  # before the work: an output that cannot be written fails now, not after it
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise fail(f"{flag}: cannot make directory {folder}: {exc.strerror or exc}") from None
    # imported here: the modelling stack is heavy and other commands do not need it
    from training.backtest import run_backtest

    try:
        run_backtest(orders, fmt.value, day, horizon_days, out, report, progress=not quiet)
    except (ClvError, OSError, ValueError, KeyError) as exc:
        raise fail(str(exc) or type(exc).__name__) from None
