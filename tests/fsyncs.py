"""The fsyncs a test's code makes, by path (through /proc, so folders too), and folders it may
not open for one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import clv.files


def recorded_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``os.fsync`` from now on, as the path of its file or folder, in order."""
    synced: list[str] = []
    fsync = os.fsync

    def recorded(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    return synced


def unreadable_folder(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``folder`` as a user who may pass through it but not read it (mode 0711, not root: the
    tests may run as root, who may read any folder) finds it: it cannot be opened to fsync."""
    fsync_dir = clv.files.fsync_dir

    def refused(path: Path) -> None:
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(path))
        fsync_dir(path)

    monkeypatch.setattr(clv.files, "fsync_dir", refused)
