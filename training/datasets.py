"""Point-in-time datasets: features as of a cutoff (the online feature code), labels after it.

Features come only from :func:`feature_store.offline.features_at`, the same definition the
online path uses, so training never sees a number the API could not compute. A row's label is
the user's net revenue (refunds subtract) dated in ``(cutoff, cutoff + window]``.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from clv.errors import ClvError
from clv.files import orders_file_problem
from feature_store.events import (
    FUTURE_TOLERANCE_MS,
    MAX_AMOUNT,
    MAX_ID,
    RFC3339,
    amounts_in_range,
    id_digest,
    valid_event_id,
    valid_user_id,
)
from feature_store.features import FEATURE_NAMES, day_date, day_number
from feature_store.offline import events_from_orders, features_at
from training.models.base import TrainingSet

OrdersFormat = Literal["csv", "cdnow", "auto"]
REQUIRED_CSV_COLUMNS: tuple[str, ...] = ("user_id", "order_id", "ts", "amount")


class DatasetError(ClvError):
    """An orders file or dataset request that cannot be served (bad file, columns, window)."""


def _read_text(path: Path) -> str:
    if problem := orders_file_problem(path):
        raise DatasetError(problem)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path} is not valid gzip: {exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text (byte {exc.start})") from None


def _amounts(table: pd.DataFrame, what: str) -> pd.Series:
    """Order amounts as numbers within the event schema's range (finite, 0 to 1e9); else an
    error naming the first offending row (``what``: how rows are counted)."""
    amount = pd.to_numeric(table["amount"], errors="coerce")
    ok = amounts_in_range(amount.to_numpy(np.float64, na_value=np.nan))
    bad = np.flatnonzero(~ok)
    first_negative = bad.size > 0 and bool(amount.iloc[bad[0]] < 0)  # the row the error names
    refunds = "type" in table.columns or what.startswith("CSV")  # CDNOW holds no refunds
    hint = " (a refund is a positive amount of type refund)" if refunds and first_negative else ""
    _first_bad(ok, table, "amount", f"is not a number from 0 to {MAX_AMOUNT:g}{hint}", what)
    return amount


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _looks_like_cdnow(text: str) -> bool:
    """Blank-separated records of numbers (after a header without commas, as CDNOW master's)."""
    lines = [ln for ln in text.splitlines()[:3] if ln.strip()]
    if lines and "," not in lines[0] and not any(_is_number(t) for t in lines[0].split()):
        lines = lines[1:]
    return bool(lines) and "," not in lines[0] and all(_is_number(t) for t in lines[0].split())


def orders_format(text: str) -> Literal["csv", "cdnow"]:
    """``auto``'s choice, from the content, never the name: CDNOW when the first records are
    blank-separated numbers (after a header without commas), else CSV, whose reader says which
    header it wants."""
    return "cdnow" if _looks_like_cdnow(text) else "csv"


def _cdnow_orders(text: str) -> pd.DataFrame:
    """CDNOW master (header, 4 columns) or sample (no header, 5 columns) -> orders table.

    Several records of one customer on one day are separate orders, so each gets its own
    ``order_id`` (customer:date:n); the time is midnight UTC of the record's date.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and not any(_is_number(tok) for tok in lines[0].split()):
        lines = lines[1:]  # the header (master's): a record always has numbers
    if not lines:
        raise DatasetError("CDNOW file holds no records")
    try:  # split on ASCII blanks only: any other white space stays in a field and is refused
        table = pd.read_csv(  # no NA words: a field reading "NA" is a value, checked below
            io.StringIO("\n".join(lines)),
            sep=r"[ \t]+",
            header=None,
            dtype=str,
            engine="python",
            keep_default_na=False,
        )
    except pd.errors.ParserError as exc:
        raise DatasetError(f"CDNOW records of different lengths: {exc}".strip()) from None
    if table.shape[1] == 5:
        table = table.drop(columns=[1])  # the sample's original id
    if table.shape[1] != 4:
        hint = " (an orders CSV? leave out --format cdnow)" if "," in lines[0] else ""
        raise DatasetError(f"CDNOW records need 4 or 5 columns, found {table.shape[1]}{hint}")
    table.columns = ["user_id", "date", "cds", "amount"]
    what = "CDNOW record"  # counted from 1, blank lines and the header left out
    short = table.isna().any(axis=1).to_numpy()
    if short.any():
        n = int(short.sum())
        raise DatasetError(
            f"{what} {int(np.flatnonzero(short)[0]) + 1}: too few fields ({n:,} such)"
        )
    dates = pd.to_datetime(table["date"], format="%Y%m%d", errors="coerce", utc=True)
    eight = table["date"].str.fullmatch(r"[0-9]{8}")  # strptime reads 1997013 as 1997-01-03
    _first_bad(dates.notna() & eight, table, "date", "is not a date (YYYYMMDD)", what)
    cds = table["cds"].str.fullmatch(r"[0-9]+")
    _first_bad(cds, table, "cds", "is not a count of CDs", what)
    amount = _amounts(table, what)
    _check_user_ids(table, what)
    n = table.groupby(["user_id", "date"]).cumcount().astype(str)
    order_id = table["user_id"] + ":" + table["date"] + ":" + n
    long = order_id.str.len() > MAX_ID  # (a user id near the limit) a digest: the schema's
    order_id[long] = order_id[long].map(id_digest)
    return pd.DataFrame(
        {
            "user_id": table["user_id"],
            "order_id": order_id,
            "ts": dates,
            "amount": amount,
        }
    )


def _first_bad(
    ok: pd.Series | np.ndarray,
    table: pd.DataFrame,
    column: str,
    rule: str,
    what: str = "CSV data row",
) -> None:
    """Raise for the first row where ``ok`` is False, numbered from 1 after the header (blank
    lines are not counted)."""
    ok = np.asarray(ok, dtype=bool)
    if ok.all():
        return
    row = int(np.flatnonzero(~ok)[0])
    value = str(table[column].iloc[row])[:64]
    n = int((~ok).sum())
    raise DatasetError(f"{what} {row + 1}: {column} {value!r} {rule} ({n:,} such)")


def _check_user_ids(table: pd.DataFrame, what: str = "CSV data row") -> None:
    _first_bad(
        table["user_id"].map(valid_user_id),
        table,
        "user_id",
        f"must be 1 to {MAX_ID} printable characters with no white space",
        what,
    )


def _csv_timestamps(table: pd.DataFrame) -> pd.Series:
    """The event schema's rule: RFC 3339 with a zone offset, or a bare date (midnight UTC),
    on or after 1970-01-01."""
    ts = table["ts"]
    _first_bad(ts.str.fullmatch(RFC3339.pattern), table, "ts", "is not RFC 3339 with a zone")
    # e.g. 2023-02-30 or 24:00:00 match the pattern but are no time
    parsed = pd.to_datetime(ts.str.upper(), utc=True, format="ISO8601", errors="coerce")
    _first_bad(parsed.notna(), table, "ts", "is not a valid time")
    return parsed


def _longer_row(text: str) -> str | None:
    """The first data row with more fields than the header (numbered as :func:`_first_bad`)."""
    rows = (r for r in csv.reader(io.StringIO(text)) if r)  # pandas skips blank lines too
    width = len(next(rows, []))
    for n, row in enumerate(rows, 1):
        if len(row) > width:
            return f"CSV data row {n} has {len(row)} fields, more than the header's {width}"
    return None


def _csv_orders(text: str, currency: str) -> pd.DataFrame:
    """An orders CSV, every field checked by the event schema's rules (the online consumer
    dead-letters what this refuses), with the line number of the first offender."""
    try:
        with warnings.catch_warnings():
            # a row with more fields than the header: pandas would shift it or drop fields
            warnings.simplefilter("error", pd.errors.ParserWarning)
            table = pd.read_csv(
                io.StringIO(text), dtype=str, keep_default_na=False, index_col=False
            )
    except (pd.errors.ParserWarning, pd.errors.ParserError) as exc:
        # the first row longer than the header warns, a later one is a tokenizer error
        longer = _longer_row(text)
        raise DatasetError(longer or f"unreadable CSV: {str(exc).strip()}") from None
    except pd.errors.EmptyDataError as exc:
        raise DatasetError(f"unreadable CSV: {exc}") from exc
    names = next((r for r in csv.reader(io.StringIO(text)) if r), [])
    used = (*REQUIRED_CSV_COLUMNS, "type", "event_id", "currency")
    if twice := [c for c in used if names.count(c) > 1]:
        # pandas would read the first and rename the others (amount.1): refuse, not guess
        raise DatasetError(f"the CSV header names {', '.join(twice)} more than once")
    missing = [c for c in REQUIRED_CSV_COLUMNS if c not in table.columns]
    if missing:
        looks_cdnow = _looks_like_cdnow(text)
        header = text.lstrip().partition("\n")[0]
        raise DatasetError(
            f"CSV lacks column(s) {', '.join(missing)}; needs {','.join(REQUIRED_CSV_COLUMNS)}"
            + (" (CDNOW's text format? give --format cdnow)" if looks_cdnow else "")
            + (" (the header has ';': fields must be separated by commas)" if ";" in header else "")
        )
    for c in (*REQUIRED_CSV_COLUMNS, *(c for c in ("type", "event_id") if c in table)):
        _first_bad(table[c].str.strip() != "", table, c, "is empty")
    _check_user_ids(table)
    _first_bad(
        table["order_id"].str.len() <= MAX_ID, table, "order_id", f"is over {MAX_ID} characters"
    )
    if "event_id" in table:
        _first_bad(
            table["event_id"].map(valid_event_id),
            table,
            "event_id",
            f"must be 1 to {MAX_ID} printable characters",
        )
    if "type" in table:
        _first_bad(
            table["type"].isin(["purchase", "refund"]), table, "type", "must be purchase or refund"
        )
    if "currency" in table:
        cur = table["currency"]
        _first_bad(
            (cur == "") | (cur == currency),
            table,
            "currency",
            f"is not this deployment's {currency}",
        )
        table["currency"] = cur.where(cur != "", None)
    if table.empty:
        raise DatasetError("the CSV has a header but no orders")
    table["amount"] = _amounts(table, "CSV data row")
    table["ts"] = _csv_timestamps(table)
    return table


def load_orders(
    path: str | Path,
    fmt: OrdersFormat = "csv",
    *,
    currency: str = "USD",
    future_tolerance_ms: int = FUTURE_TOLERANCE_MS,
) -> pd.DataFrame:
    """Read an orders file (CSV or CDNOW text, optionally gzipped; ``auto``: told by
    :func:`orders_format`) into the event table. A CSV ``currency`` other than ``currency``
    (the deployment's) is refused, as online, and so is a time more than
    ``future_tolerance_ms`` ahead of the clock."""
    text = _read_text(Path(path))
    if fmt == "auto":
        fmt = orders_format(text)
    if fmt == "cdnow":
        orders = _cdnow_orders(text)
    elif fmt == "csv":
        orders = _csv_orders(text, currency)
    else:
        raise DatasetError(f"unknown orders format {fmt!r} (csv, cdnow or auto)")
    try:
        events = events_from_orders(orders)
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"unreadable timestamps: {exc}") from exc
    check_times(events, future_tolerance_ms)
    return _earliest_copies(events)


def _earliest_copies(events: pd.DataFrame) -> pd.DataFrame:
    """One row per ``(user_id, event_id)``: the earliest-dated copy (the first in the file
    among equally dated ones), rows kept in file order. A file's rows are not in arrival
    order, so keeping the first in the file would let a copy dated after a cutoff remove an
    order dated before it, and change the features at that cutoff."""
    order = np.argsort(events["ts_ms"].to_numpy(), kind="stable")
    repeat = np.empty(len(events), dtype=bool)
    repeat[order] = events.iloc[order].duplicated(["user_id", "event_id"]).to_numpy()
    return events[~repeat].reset_index(drop=True)


def check_times(events: pd.DataFrame, tolerance_ms: int = FUTURE_TOLERANCE_MS) -> None:
    """As online: no time before 1970, none more than the tolerance ahead of the wall clock
    (for an orders file, and for an event log, which the consumers wrote under that rule)."""
    ts = events["ts_ms"].to_numpy()
    now = time.time_ns() // 1_000_000
    for bad, rule in (
        (ts < 0, "is before 1970-01-01"),
        (ts > now + tolerance_ms, "is in the future"),
    ):
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            row = events.iloc[i]
            raise DatasetError(
                f"order {row['order_id']!r} of user {row['user_id']!r}: its time {rule} "
                f"({int(bad.sum()):,} such)"
            )


def as_day(d: dt.date | int) -> int:
    """A date or a day number -> UTC day number."""
    return d if isinstance(d, int) else day_number(d)


def purchasers_at(events: pd.DataFrame, cutoff_day: int) -> pd.DataFrame:
    """Features as of ``cutoff_day`` of every user with a purchase on or before it."""
    feats = features_at(events, cutoff_day)
    return feats[feats["orders_total"].to_numpy() > 0]


def window_labels(
    events: pd.DataFrame, users: pd.Index, start_day: int, days: int
) -> tuple[np.ndarray, np.ndarray]:
    """Net revenue and purchase count of each of ``users`` in ``(start_day, start_day+days]``."""
    ev = events.drop_duplicates(["user_id", "event_id"], keep="first")
    d = ev["day"].to_numpy()
    ev = ev[(d > start_day) & (d <= start_day + days)]
    revenue = ev.groupby("user_id")["cents"].sum().reindex(users, fill_value=0) / 100.0
    is_p = (ev["type"] == "purchase").astype(np.int64)
    count = is_p.groupby(ev["user_id"]).sum().reindex(users, fill_value=0)
    return revenue.to_numpy(np.float64), count.to_numpy(np.int64)


def build_training_set(
    events: pd.DataFrame,
    as_of_day: int,
    horizon_days: int,
    *,
    label_days: int | None = None,
    n_cutoffs: int = 4,
    step_days: int = 30,
    min_history_days: int = 0,
    progress: Callable[[str], None] | None = None,
) -> TrainingSet:
    """Stack point-in-time examples whose label windows end on or before ``as_of_day``.

    Cutoffs are ``as_of_day - label_days - k * step_days`` for ``k < n_cutoffs``; those less
    than ``min_history_days`` after the first purchase are skipped. ``label_days`` defaults to
    ``horizon_days``; pass a shorter window when the history is too short (models rescale).
    ``progress`` hears of each cutoff as its features are built (the slow part at scale).
    """
    window = horizon_days if label_days is None else label_days
    if window <= 0 or horizon_days <= 0:
        raise DatasetError("horizon and label window must be positive")
    p_days = events.loc[events["type"] == "purchase", "day"]
    first = int(p_days.min()) if len(p_days) else as_of_day
    frames: list[pd.DataFrame] = []
    cut, rev, cnt = [], [], []
    for k in range(n_cutoffs):
        c = as_of_day - window - k * step_days
        if c < first + min_history_days:
            break
        feats = purchasers_at(events, c)
        r, n = window_labels(events, feats.index, c, window)
        frames.append(feats[list(FEATURE_NAMES)])
        if progress:
            progress(
                f"training set: cutoff {day_date(c)}, {len(feats):,} buyers, {window}-day labels"
            )
        cut.append(np.full(len(feats), c, dtype=np.int64))
        rev.append(r)
        cnt.append(n)
    if not frames:
        raise DatasetError(
            f"no purchase at least {window} days before {day_date(as_of_day)}: "
            "nothing to learn from"
        )
    for parts in (frames, cut, rev, cnt):
        parts.reverse()  # time order
    cutoff_day = np.concatenate(cut)
    return TrainingSet(
        features=pd.concat(frames),
        cutoff_day=cutoff_day,
        label=np.concatenate(rev),
        label_orders=np.concatenate(cnt),
        label_days=np.full(len(cutoff_day), window, dtype=np.int64),
        horizon_days=horizon_days,
        as_of_day=as_of_day,
        current=purchasers_at(events, as_of_day),
    )


def history_days(events: pd.DataFrame, as_of_day: int) -> int:
    """Days from the first purchase to ``as_of_day`` (0 when there is none)."""
    p = events.loc[(events["type"] == "purchase") & (events["day"] <= as_of_day), "day"]
    return int(as_of_day - p.min()) if len(p) else 0
