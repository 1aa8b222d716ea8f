"""The fsyncs a test's code makes, by path (through /proc, so folders too)."""

from __future__ import annotations

import os

import pytest


def recorded_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``os.fsync`` from now on, as the path of its file or folder, in order."""
    synced: list[str] = []
    fsync = os.fsync

    def recorded(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    return synced
