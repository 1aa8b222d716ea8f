"""The Parquet event log: what reading it deduplicates."""

from __future__ import annotations

import datetime as dt
import errno
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store.event_log import (
    EventLogError,
    log_files,
    read_events,
    remove_stale_parts,
    write_events,
)
from feature_store.features import day_number
from feature_store.offline import events_from_orders, features_at
from tests.fsyncs import recorded_fsyncs, unreadable_folder


def test_an_event_id_is_deduplicated_within_a_user_not_across_users(tmp_path: Path) -> None:
    """The online dedup set lives in each user's hash, so two users' events may share an id
    (two shops' order numbers, say) and both count; a user's redelivered copy counts once."""
    orders = pd.DataFrame(
        {
            "user_id": ["a", "b", "a"],
            "order_id": ["1", "1", "1"],
            "ts": ["2024-01-01T10:00:00Z"] * 3,
            "amount": [10.0, 20.0, 10.0],
            "event_id": ["same-id"] * 3,
        }
    )
    write_events(tmp_path, events_from_orders(orders))
    log = read_events(tmp_path)
    assert sorted(zip(log["user_id"], log["event_id"], strict=True)) == [
        ("a", "same-id"),
        ("b", "same-id"),
    ]
    f = features_at(log, day_number(dt.date(2024, 1, 1)))
    assert f.loc["a", "revenue_total"] == 10.0 and f.loc["b", "revenue_total"] == 20.0
    assert len(read_events(tmp_path, dedupe=False)) == 3


def _log(root: Path, dates: list[str], kind: str = "purchase") -> None:
    write_events(
        root,
        events_from_orders(
            pd.DataFrame(
                {
                    "user_id": ["u"] * len(dates),
                    "order_id": [f"o{i}" for i in range(len(dates))],
                    "ts": [f"{d}T12:00:00Z" for d in dates],
                    "amount": [1.0] * len(dates),
                    "type": [kind] * len(dates),
                }
            )
        ),
    )


# Fails if the start day or the end day of a range is exclusive.
def test_a_day_range_reads_exactly_the_partitions_of_its_days_both_ends_included(
    tmp_path: Path,
) -> None:
    _log(tmp_path, ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"])
    start, end = day_number(dt.date(2024, 1, 2)), day_number(dt.date(2024, 1, 3))
    assert sorted(read_events(tmp_path, start, end)["day"]) == [start, end]
    assert [p.parent.name for p in log_files(tmp_path, start, end)] == [
        "date=2024-01-02",
        "date=2024-01-03",
    ]
    assert list(read_events(tmp_path, end, end)["day"]) == [end]


# Fails if the type check is removed: a log holding another kind of event is refused, it
# would otherwise count as revenue without an order.
def test_a_log_holding_events_of_another_type_is_refused(tmp_path: Path) -> None:
    _log(tmp_path, ["2024-01-01"], kind="exchange")
    with pytest.raises(EventLogError, match="holds events of type 'exchange', not order events"):
        read_events(tmp_path)


# Fails if the null check of the required columns is removed: a Parquet part that is not
# an event-log file is refused by name.
def test_a_part_file_without_the_event_columns_is_refused_by_name(tmp_path: Path) -> None:
    _log(tmp_path, ["2024-01-01"])
    foreign = tmp_path / "date=2024-01-01" / "part-foreign.parquet"
    pq.write_table(pa.table({"event_id": ["x"], "user_id": ["u"], "amount": [1.0]}), foreign)
    with pytest.raises(EventLogError, match=r"part-foreign\.parquet is not an event-log file"):
        read_events(tmp_path)


def test_a_part_and_its_name_are_on_disk_before_write_events_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The archiver commits the events' offsets right after write_events: a part whose bytes
    # or name were still only in the page cache would be lost for good by a machine crash (a
    # renamed file can even come back empty, and one empty part stops every read of the log).
    steps: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd: int) -> None:
        steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recorded_replace(src: object, dst: object) -> None:
        steps.append(("replace", str(dst)))
        replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    root = tmp_path / "events"
    root.mkdir()
    _log(root, ["1997-01-01", "1997-01-02", "1997-01-02"])
    files = log_files(root)
    assert len(files) == 2
    for f in files:
        renamed = steps.index(("replace", str(f)))
        tmp = str(f.parent / f".{f.name}.tmp")
        # Fails without the file's fsync before its rename, or the folder's after it.
        assert ("fsync", tmp) in steps[:renamed]
        assert ("fsync", str(f.parent)) in steps[renamed:]
    # Then the date folders' names in the root, and the root's in its parent: fails if the
    # root is taken as on disk because it existed (made by a write that failed, or by
    # another archiver, it may not be).
    assert steps[-2:] == [("fsync", str(root)), ("fsync", str(tmp_path))]


def test_a_log_folder_made_by_write_events_is_on_disk_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The archiver's first flush makes CLV_EVENT_LOG_DIR (nothing makes it before), and commits
    # right after: fails if the new folders' own names are left to the page cache.
    synced = recorded_fsyncs(monkeypatch)
    root = tmp_path / "data" / "events"
    _log(root, ["1997-01-01"])
    assert {str(root), str(root.parent), str(tmp_path)} <= set(synced)


def test_a_parent_the_archiver_may_pass_but_not_read_does_not_fail_its_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"  # say /home/alice, mode 0711, and the log the service's own
    root = home / "events"
    root.mkdir(parents=True)
    unreadable_folder(monkeypatch, home)
    # Fails if every write must open the log's parent to fsync it: the archiver then fails
    # every flush and commits nothing, for good.
    _log(root, ["1997-01-01"])
    assert len(log_files(root)) == 1


def test_a_date_folder_left_by_a_failed_write_is_put_on_disk_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failed flush (EIO) commits nothing and the events come again; fails if the folder the
    # failed call made is then taken as already on disk.
    root = tmp_path / "events"
    root.mkdir()
    fsync = os.fsync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        _log(root, ["1997-01-01"])
    assert (root / "date=1997-01-01").is_dir()
    monkeypatch.setattr(os, "fsync", fsync)
    synced = recorded_fsyncs(monkeypatch)
    _log(root, ["1997-01-01"])
    assert str(root) in synced


def test_a_log_folder_left_by_a_failed_first_write_is_put_on_disk_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data" / "events"
    fsync = os.fsync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        _log(root, ["1997-01-01"])  # made the folders, put none on disk
    monkeypatch.setattr(os, "fsync", fsync)
    synced = recorded_fsyncs(monkeypatch)
    _log(root, ["1997-01-01"])
    assert str(root.parent) in synced


def test_a_scratch_log_is_written_without_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # clv synth writes to a staging folder it moves into place: fsync would buy it nothing.
    synced = recorded_fsyncs(monkeypatch)
    write_events(
        tmp_path,
        events_from_orders(
            pd.DataFrame(
                {
                    "user_id": ["u"],
                    "order_id": ["o"],
                    "ts": ["1997-01-01T12:00:00Z"],
                    "amount": [1.0],
                }
            )
        ),
        durable=False,
    )
    assert synced == [] and len(log_files(tmp_path)) == 1


def test_temporary_parts_left_by_a_killed_writer_are_removed_once_stale(tmp_path: Path) -> None:
    # An archiver killed mid-write leaves its temporary part; readers skip it, but each kill
    # adds one. Fails if a stale one stays, or if one still being written (young) is removed.
    _log(tmp_path, ["1997-01-01"])
    folder = tmp_path / "date=1997-01-01"
    stale, young = folder / ".part-a.parquet.tmp", folder / ".part-b.parquet.tmp"
    for tmp in (stale, young):
        tmp.write_bytes(b"PAR1")
    hour_ago = time.time() - 3601
    os.utime(stale, (hour_ago, hour_ago))
    assert remove_stale_parts(tmp_path) == 1
    assert not stale.exists() and young.exists()
    assert len(log_files(tmp_path)) == 1  # the log itself untouched
    assert remove_stale_parts(tmp_path / "missing") == 0


def test_what_the_stale_part_cleanup_cannot_remove_is_left_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Housekeeping must never stop the archiver, which runs it at every start: fails if a
    # folder named like a part, or a part it may not remove, raises.
    folder = tmp_path / "date=1997-01-01"
    named_like_one, locked = folder / ".part-d.parquet.tmp", folder / ".part-l.parquet.tmp"
    named_like_one.mkdir(parents=True)
    locked.write_bytes(b"PAR1")
    for path in (named_like_one, locked):
        os.utime(path, (0, 0))
    unlink = Path.unlink

    def refused(self: Path, missing_ok: bool = False) -> None:
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    assert remove_stale_parts(tmp_path) == 0
    assert named_like_one.is_dir() and locked.exists()
    assert "cannot remove the stale temporary part" in caplog.text and str(locked) in caplog.text
