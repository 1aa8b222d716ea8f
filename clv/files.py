"""Writing a file so that readers see the old version or the whole new one, never a part."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (a dangling symlink
    exists); ``missing[-1].parent`` is then the nearest existing ancestor."""
    missing = []
    for d in (path, *path.parents):
        if d.exists() or d.is_symlink():
            break
        missing.append(d)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (as :func:`missing_dirs` lists them: made by a run that
    failed) that are still empty, deepest first."""
    for d in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A fresh, uniquely named file beside ``path`` to write; renamed onto ``path`` when the
    block ends without an error, removed when it raises. The unique name (created exclusively)
    means no existing file (the input being read, another writer's staging file) can be
    clobbered on the way; it is created like any file, so the umask sets its mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield staged
        staged.replace(path)
    finally:
        staged.unlink(missing_ok=True)
