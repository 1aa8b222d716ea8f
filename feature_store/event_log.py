"""The offline event log: validated events as date-partitioned Parquet (what training reads).

Layout: ``<root>/date=YYYY-MM-DD/part-<uuid>.parquet`` partitioned by the event's UTC date, so a
training window reads only the partitions it needs. Files are written to a temporary name and
renamed into place: a reader never sees half a file. The archiver may write an event twice
(redelivery after a crash); readers deduplicate by ``event_id`` the same way the online state
does, so the log stays effectively-once for every caller.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from clv.errors import ClvError
from clv.files import fsync_dir, fsync_names, missing_dirs
from feature_store.events import MAX_AMOUNT, amounts_in_range, valid_user_id
from feature_store.features import day_date, day_number, ms_to_iso
from feature_store.offline import EVENT_COLUMNS, MS_PER_DAY, signed_cents

log = logging.getLogger(__name__)


class EventLogError(ClvError):
    """The event log cannot be read (a damaged or foreign file in it)."""


SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("type", pa.string()),
        ("user_id", pa.string()),
        ("order_id", pa.string()),
        ("amount", pa.float64()),
        ("currency", pa.string()),
        ("ts_ms", pa.int64()),
        ("day", pa.int64()),
        ("cents", pa.int64()),
        # Arrival order (Kafka partition and offset; -1 where the log was not fed from Kafka).
        ("partition", pa.int32()),
        ("offset", pa.int64()),
    ]
)
ARRIVAL_COLUMNS = ("partition", "offset")
#: Never null in a file the archiver (or ``clv synth``) wrote.
REQUIRED_COLUMNS = ("event_id", "type", "user_id", "ts_ms", "day", "cents")


def write_events(root: Path, events: pd.DataFrame, *, durable: bool = True) -> list[Path]:
    """Append ``events`` (columns :data:`EVENT_COLUMNS`) to the log; returns the files written.

    ``durable``: each part, its name and the folders leading to it are on disk when this
    returns (the archiver commits the events' offsets next; a crash of the machine must not
    take back a part the commit has moved past). Off for a log written to a scratch folder."""
    if events.empty:
        return []
    root = Path(root)
    written: list[Path] = []
    frame = events.loc[:, list(EVENT_COLUMNS)].copy()
    for col in ARRIVAL_COLUMNS:
        frame[col] = events[col].to_numpy() if col in events else -1
    days = frame["day"].to_numpy(np.int64)
    order = np.argsort(days, kind="stable")
    frame = frame.iloc[order]
    days = days[order]
    bounds = np.flatnonzero(np.diff(days)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(days)]))
    made = missing_dirs(root)  # created below, by the first date folder's mkdir
    for start, end in zip(starts, ends, strict=True):
        part = frame.iloc[start:end]
        folder = root / f"date={day_date(int(days[start])).isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = folder / f".{name}.tmp"
        table = pa.Table.from_pandas(part, schema=SCHEMA, preserve_index=False)
        with open(tmp, "wb") as out:
            pq.write_table(table, out, compression="zstd")
            if durable:
                out.flush()
                os.fsync(out.fileno())  # the bytes on disk before the name points at them
        os.replace(tmp, folder / name)
        written.append(folder / name)
    if durable:
        # The names: the parts in their date folders, then each folder in its parent, up to
        # the root's: every call, since a folder made by an earlier call that failed, or by
        # another archiver, may not be on disk yet; above the root, the folders this call made.
        for folder in sorted({w.parent for w in written}):
            fsync_dir(folder)
        fsync_dir(root)
        fsync_names(root, made)
    return written


#: A part still being written is younger than this; an older temporary part was left by a
#: writer killed mid-write.
STALE_PART_SECONDS = 3600.0


def remove_stale_parts(root: Path, older_than_s: float = STALE_PART_SECONDS) -> int:
    """Delete the temporary parts that writers killed mid-write left behind (readers skip them;
    they only take disk); returns how many."""
    cutoff = time.time() - older_than_s
    removed = 0
    for tmp in Path(root).glob("date=*/.part-*.parquet.tmp"):
        try:
            if tmp.is_file() and not tmp.is_symlink() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # another archiver removed it meanwhile
            continue
        except OSError as exc:  # housekeeping: never a reason to stop archiving
            log.warning("cannot remove the stale temporary part %s: %s", tmp, exc)
    return removed


def _partition_day(folder: Path) -> int | None:
    name = folder.name
    if not name.startswith("date="):
        return None
    try:
        return day_number(dt.date.fromisoformat(name[5:]))
    except ValueError:
        return None


def log_dir_problem(root: Path) -> str | None:
    """Why ``root`` cannot be read as the event log (missing, or not a folder), or None. Not
    the same as an empty log: that holds no events, this cannot tell."""
    if root.is_dir():
        return None
    what = "is not a directory" if root.exists() else "does not exist"
    return f"the event log {root} (CLV_EVENT_LOG_DIR) {what}"


def log_files(root: Path, start_day: int | None = None, end_day: int | None = None) -> list[Path]:
    """The log's Parquet parts for the days in ``[start_day, end_day]``, in date then name
    order (folders that are not a ``date=`` partition are ignored)."""
    root = Path(root)
    files: list[Path] = []
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            d = _partition_day(folder)
            if d is None or (start_day is not None and d < start_day):
                continue
            if end_day is not None and d > end_day:
                continue
            files.extend(sorted(folder.glob("part-*.parquet")))
    return files


def _foreign_file(dataset: pads.FileSystemDataset) -> str:
    """Which part lacks the event columns (the dataset reads missing columns as nulls)."""
    for fragment in dataset.get_fragments():
        missing = [c for c in REQUIRED_COLUMNS if c not in fragment.physical_schema.names]
        if missing:
            return f"{fragment.path} is not an event-log file (no {', '.join(missing)})"
    return "a file has events with empty ids, types, times or amounts"


def _refuse(root: Path, frame: pd.DataFrame, ok: np.ndarray, what: str) -> None:
    if ok.all():
        return
    i = int(np.flatnonzero(~ok)[0])
    raise EventLogError(
        f"event log {root}: event {frame['event_id'].iat[i]!r} of user "
        f"{str(frame['user_id'].iat[i])[:64]!r} has {what} ({int((~ok).sum()):,} such): the "
        "consumers refuse such events, so this is not a log the archiver wrote"
    )


def _check_values(root: Path, frame: pd.DataFrame, currency: str | None) -> None:
    amount = frame["amount"].to_numpy(np.float64, na_value=np.nan)
    _refuse(root, frame, amounts_in_range(amount), f"an amount outside 0 to {MAX_AMOUNT:g}")
    cents = signed_cents(amount, frame["type"].to_numpy())
    _refuse(
        root, frame, cents == frame["cents"].to_numpy(np.int64), "cents that are not its amount"
    )
    users = pd.unique(frame["user_id"])
    bad_users = {u for u in users if not valid_user_id(u)}
    if bad_users:
        _refuse(root, frame, ~frame["user_id"].isin(bad_users).to_numpy(), "a malformed user id")
    if currency is not None:
        cur = frame["currency"]
        _refuse(
            root, frame, (cur.isna() | (cur == currency)).to_numpy(), f"a currency not {currency}"
        )


def read_events(
    root: Path,
    start_day: int | None = None,
    end_day: int | None = None,
    *,
    user_id: str | None = None,
    dedupe: bool = True,
    arrival_order: bool = False,
    currency: str | None = None,
) -> pd.DataFrame:
    """Events dated in ``[start_day, end_day]`` (UTC day numbers, inclusive), optionally for one
    user, deduplicated by ``event_id`` within a user (redelivered copies are identical; one is
    kept), as the online state is: two users may use the same id.

    Values the consumers would have dead-lettered (an amount out of range, cents that are not
    the amount, a user id the schema refuses; with ``currency``, another currency) mean the log
    is not what the archiver wrote, and raise :class:`EventLogError` naming the first event.

    ``arrival_order`` sorts by Kafka partition and offset, the order the online state saw (a
    user's events share a partition), which :func:`feature_store.offline.too_late_mask` needs.
    """
    files = [str(p) for p in log_files(root, start_day, end_day)]
    if not files:
        return SCHEMA.empty_table().to_pandas()
    flt = pads.field("user_id") == user_id if user_id is not None else None
    try:
        dataset = pads.dataset(files, schema=SCHEMA, format="parquet")
        frame = dataset.to_table(filter=flt).to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise EventLogError(f"event log {root} has an unreadable file: {exc}") from exc
    if frame[list(REQUIRED_COLUMNS)].isna().to_numpy().any():
        raise EventLogError(f"event log {root}: {_foreign_file(dataset)}")
    ts_ms, days = frame["ts_ms"].to_numpy(np.int64), frame["day"].to_numpy(np.int64)
    misfiled = days != ts_ms // MS_PER_DAY
    if misfiled.any():
        i = int(np.flatnonzero(misfiled)[0])
        eid, filed = frame["event_id"].iat[i], day_date(int(days[i]))
        raise EventLogError(
            f"event log {root}: event {eid!r} has day {filed} "
            f"but time {ms_to_iso(int(ts_ms[i]))} ({int(misfiled.sum()):,} such): not a log "
            "the archiver wrote"
        )
    kinds = frame["type"].isin(["purchase", "refund"]).to_numpy()
    if not kinds.all():
        shown = frame["type"].to_numpy()[~kinds][0]
        raise EventLogError(f"event log {root} holds events of type {shown!r}, not order events")
    _check_values(root, frame, currency)
    if arrival_order:
        frame = frame.sort_values(list(ARRIVAL_COLUMNS), kind="stable", ignore_index=True)
    if dedupe:
        frame = frame.drop_duplicates(["user_id", "event_id"], keep="first").reset_index(drop=True)
    return frame
