"""Processes seen from /proc (no procps needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:  # after the name: state, ppid, ...
            found.append(int(stat.parent.name))
    return found


def flocks_on(path: Path) -> list[tuple[int, bool]]:
    """The ``flock`` locks on ``path`` in /proc/locks: (pid, waiting) for each holder, and for
    each process blocked waiting for it (``waiting`` True)."""
    st = path.stat()
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        waiting = fields[1] == "->"  # "1: -> FLOCK ADVISORY WRITE pid maj:min:ino 0 EOF"
        kind, _advisory, _mode, pid, file = fields[2 if waiting else 1 :][:5]
        if kind == "FLOCK" and file == where:
            found.append((int(pid), waiting))
    return found


def lines_until(proc: subprocess.Popen[str], start: str) -> list[str]:
    """``proc``'s output lines up to the first that starts with ``start`` (all of them, when
    none does and it ends)."""
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(start):
            break
    return lines
