"""``clv backtest``: forecast the revenue after a cutoff from the orders up to it.

Bad input (missing file, bad date, bad columns, no order before the cutoff) ends in one line
on stderr and exit code 2, never a traceback; a failure while running (no candidate can be
fitted, a disk that fills up) in one line and exit code 1.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from clv.commands import fail, output_path, parse_date
from clv.errors import ClvError, ModelError
from clv.files import missing_dirs, orders_file_problem, remove_empty, replaceable
from clv.settings import MAX_HORIZON_DAYS
from feature_store.events import valid_currency


class OrdersFileFormat(StrEnum):
    csv = "csv"
    cdnow = "cdnow"


def _check_outputs(orders: Path, out: Path, report: Path | None) -> None:
    """Refuse, before any work, outputs that would overwrite the input or each other."""
    from training.backtest import REPORT_FILES, check_report_targets

    src, dst = orders.resolve(), out.resolve()
    if dst == src:
        raise fail(f"--out {out} is the orders file itself; give another path")
    if report is None:
        return
    rep = report.resolve()
    if dst == rep:
        raise fail(f"--out {out} is the --report directory; give a CSV file path")
    for what, path in (("--out", dst), ("the orders file", src)):
        if path.parent == rep and path.name in REPORT_FILES:
            raise fail(f"{what} {path} is a file the report writes; give another name")
    try:
        check_report_targets(report)
    except ClvError as exc:
        raise fail(str(exc)) from None


def backtest(
    orders: Annotated[
        Path,
        typer.Option(
            "--orders",
            help="orders file, .gz ok: a CSV with the header user_id,order_id,ts,amount "
            "(optional type,event_id,currency; a refund is a positive amount of type refund), "
            "or CDNOW text with --format cdnow",
        ),
    ],
    cutoff: Annotated[
        str, typer.Option("--cutoff", help="last day the models may see, YYYY-MM-DD")
    ],
    horizon_days: Annotated[
        int, typer.Option("--horizon-days", help="days forecast after the cutoff")
    ],
    out_arg: Annotated[str, typer.Option("--out", help="predictions CSV to write")],
    report_arg: Annotated[
        str | None,
        typer.Option(
            "--report",
            help="directory for metrics, plots and index.html; when the file covers the "
            "horizon, every candidate is also fitted and scored after the cutoff (about twice "
            "the run time)",
        ),
    ] = None,
    fmt: Annotated[
        OrdersFileFormat, typer.Option("--format", help="orders file format")
    ] = OrdersFileFormat.csv,
    currency: Annotated[
        str,
        typer.Option(
            "--currency",
            envvar="CLV_CURRENCY",
            help="the deployment's currency: CSV rows in another are refused",
        ),
    ] = "USD",
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="no progress lines on stderr")
    ] = False,
) -> None:
    """Select and fit a model on the orders up to CUTOFF, forecast the horizon.

    Writes one row per customer with an order on or before the cutoff:
    user_id,predicted_value,expected_orders,p_alive.

    Prints one line: the forecast total, and the actual when the file covers the horizon."""
    day = parse_date(cutoff, "--cutoff")
    out = output_path(out_arg, "--out")
    report = None if report_arg is None else output_path(report_arg, "--report", file=False)
    if not valid_currency(currency):
        raise fail(
            f"--currency (default: CLV_CURRENCY) {currency[:16]!r} is not an ISO 4217 code "
            "(three capital letters)"
        )
    if not 0 < horizon_days <= MAX_HORIZON_DAYS:
        raise fail(f"--horizon-days must be from 1 to {MAX_HORIZON_DAYS} days")
    if day > dt.datetime.now(dt.UTC).date():
        raise fail(f"--cutoff {day} is in the future: the orders up to it are not known yet")
    if problem := orders_file_problem(orders):  # before any work or directory is made
        raise fail(problem)
    _check_outputs(orders, out, report)
    made: list[Path] = []  # directories this run creates, removed again if it fails
    try:
        for flag, folder in (("--out", out.parent), ("--report", report)):
            if folder is None:
                continue
            try:  # before the work: an output that cannot be written fails now, not after it
                made += missing_dirs(folder)
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                why = exc.strerror or exc
                raise fail(f"{flag}: cannot make directory {folder}: {why}") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                raise fail(f"{flag}: cannot write in directory {folder}")
        # a link is written through: its target's folder takes the staging file and the rename
        target = replaceable(out).parent
        if target != out.parent and not os.access(target, os.W_OK | os.X_OK):
            raise fail(f"--out: cannot write in directory {target} (where {out} leads)")
        # imported here: the modelling stack is heavy and other commands do not need it
        from clv import STARTED
        from training.backtest import run_backtest
        from training.progress import StderrProgress

        with warnings.catch_warnings():
            if quiet:  # the libraries' convergence chatter too
                warnings.simplefilter("ignore")
            result = run_backtest(
                orders,
                fmt.value,
                day,
                horizon_days,
                out,
                report,
                progress=False if quiet else StderrProgress(t0=STARTED),
                currency=currency,
            )
    except (ClvError, OSError, ValueError, KeyError) as exc:
        remove_empty(made)
        # no model that fits or a full disk fails the run (1); anything else is bad input (2)
        code = 1 if isinstance(exc, ModelError | OSError) else 2
        raise fail(str(exc) or type(exc).__name__, code) from None
    except MemoryError:
        remove_empty(made)
        raise fail(f"not enough memory for a backtest of {orders}", 1) from None
    except BaseException:  # a refusal above, Ctrl-C, SIGTERM: the folders this run made go too
        remove_empty(made)
        raise
    typer.echo(result.summary(currency))
