"""``clv synth``: write a realistic synthetic order log (CSV or date-partitioned event log)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from clv.commands import fail, output_path, parse_date
from clv.errors import ClvError
from clv.files import remove_abandoned

err = Console(stderr=True)
#: More users or orders than any machine this runs on has memory for.
MAX_ROWS = 10**11
#: Endings of an ``--out`` meant as a file in another format, not as the event-log directory.
FILE_LIKE = frozenset(
    {".parquet", ".pq", ".json", ".jsonl", ".ndjson", ".gz", ".zip", ".tsv", ".txt", ".xlsx"}
)


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int, int], None] | None]:
    """A ``progress(phase, done, total)`` callback drawing one bar per phase on stderr."""
    if not enabled:
        yield None
        return
    bars = Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bars.add_task(phase, total=total)
        bars.update(tasks[phase], completed=done, total=total)

    with bars:
        yield update


def synth(
    users: Annotated[int, typer.Option("--users", help="number of customers", min=1, max=MAX_ROWS)],
    orders: Annotated[
        int, typer.Option("--orders", help="number of purchases (>= users)", min=1, max=MAX_ROWS)
    ],
    out_arg: Annotated[
        str,
        typer.Option(
            "--out", help="FILE.csv (or FILE.csv.gz) for an orders CSV, else an event-log directory"
        ),
    ],
    seed: Annotated[int, typer.Option("--seed", help="random seed", min=0, max=2**63 - 1)] = 0,
    start: Annotated[
        str, typer.Option("--start", help="first day of the log, YYYY-MM-DD")
    ] = "2024-01-01",
    days: Annotated[int, typer.Option("--days", help="length of the log in days", min=1)] = 730,
    refund_rate: Annotated[
        float, typer.Option("--refund-rate", help="share of orders refunded later")
    ] = 0.03,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Generate a synthetic order log, as an orders CSV or a Parquet event log.

    Pareto/NBD customers, gamma-gamma spend, seasons and hours, price points, refunds.

    The event log is date-partitioned like the archiver's."""
    from training.synth import SYNTH_STAGING, SynthConfig, generate, write_csv, write_log

    first = parse_date(start, "--start")
    cfg = SynthConfig(
        users=users, orders=orders, seed=seed, start=first, days=days, refund_rate=refund_rate
    )
    try:
        cfg.check()
    except ClvError as exc:
        raise fail(str(exc)) from None  # bad parameters: exit 2
    last = first + dt.timedelta(days=days - 1)
    if last >= dt.datetime.now(dt.UTC).date():  # a day not over yet holds times still to come
        raise fail(
            f"--start {first} with --days {days} ends on {last}, not before today (UTC): the "
            "consumers and `clv train` refuse events from the future; give an earlier --start"
        )
    as_csv = out_arg.lower().endswith((".csv", ".csv.gz"))
    given = Path(out_arg)
    suffix = given.suffix.lower()
    meant_dir = out_arg.endswith(("/", "\\")) or given.is_dir()
    if not as_csv and suffix in FILE_LIKE and not meant_dir:  # not a dir where a file was meant
        raise fail(
            f"--out {out_arg}: synth writes FILE.csv, FILE.csv.gz or an event-log directory, "
            f"not a {suffix} file"
        )
    out = output_path(out_arg, "--out", file=as_csv)
    if as_csv and (out.exists() or out.is_symlink()):  # it may hold real orders: never replaced
        raise fail(f"--out {out} exists: synth does not replace a file; give a new name")
    if not as_csv and out.exists():
        if not out.is_dir():
            raise fail(
                f"--out {out} is not a directory: give FILE.csv for an orders CSV, else a directory"
            )
        if all(p.name.startswith(SYNTH_STAGING) for p in out.iterdir()):
            remove_abandoned(out, SYNTH_STAGING)  # an earlier run's, cut short by a hard kill
        if any(out.iterdir()):
            raise fail(f"--out {out} is not empty: synthetic users would mix into what is there")
    t0 = time.perf_counter()
    try:  # a failed or stopped write leaves nothing, not even the folders made for it
        with progress_bars(not quiet) as bar:
            log = generate(cfg, bar)
            if as_csv:
                write_csv(log, out, bar)
                what = f"orders CSV {out}"
            else:
                files = write_log(log, out, bar)
                what = f"event log {out} ({files} files)"
    except ClvError as exc:
        raise fail(str(exc), 1) from None
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc.strerror or exc}", 1) from None
    except MemoryError:
        raise fail(f"not enough memory for {orders:,} orders of {users:,} users", 1) from None
    refunds = len(log) - log.purchases
    err.print(
        f"wrote {log.purchases:,} orders and {refunds:,} refunds of {users:,} users to {what} "
        f"in {time.perf_counter() - t0:.1f}s",
        highlight=False,
        soft_wrap=True,
    )
