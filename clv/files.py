"""Writing a file so that readers see the old version or the whole new one, never a part."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A fresh, uniquely named file beside ``path`` to write; renamed onto ``path`` when the
    block ends without an error, removed when it raises. The unique name means no existing file
    (the input being read, another writer's staging file) can be clobbered on the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    staged = Path(name)
    try:
        yield staged
        staged.replace(path)
    finally:
        staged.unlink(missing_ok=True)
