"""Writing a file so that readers see the old version or the whole new one, never a part."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    """The process's umask, from ``/proc`` where it is there (reading it with ``os.umask``
    means setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A fresh, uniquely named file beside ``path`` to write; renamed onto ``path`` when the
    block ends without an error, removed when it raises. The unique name means no existing file
    (the input being read, another writer's staging file) can be clobbered on the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    staged = Path(name)
    try:
        try:
            # mkstemp makes the file private (0600); give it the mode a plain open() gives
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        yield staged
        staged.replace(path)
    finally:
        staged.unlink(missing_ok=True)
