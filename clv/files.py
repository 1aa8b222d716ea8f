"""Writing a file so that readers see the old version or the whole new one, never a part."""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import tempfile
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


def _try_lock(folder: Path) -> int | None:
    """An open descriptor of ``folder`` holding its exclusive lock, or None when another process
    holds the lock or the folder is gone. The lock lives as long as the process that took it:
    the kernel drops it when the process ends, however it ends (``kill -9`` included)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_abandoned(parent: Path, prefix: str) -> list[Path]:
    """Remove the staging folders named ``prefix*`` in ``parent`` that no live process holds:
    those a hard kill or a power cut left behind. Returns the ones removed."""
    removed: list[Path] = []
    try:
        found = [p for p in parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for folder in found:
        if folder.is_symlink() or not folder.is_dir():
            continue
        fd = _try_lock(folder)
        if fd is None:
            continue  # a live run's, or gone already
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
        if not folder.exists():
            removed.append(folder)
    return removed


@contextmanager
def staging_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder named ``prefix*`` inside ``parent`` (which must exist), locked for as long
    as the block runs, and removed with whatever is left in it when the block ends (moving it
    or its contents away is how a caller keeps them). The lock tells live staging from folders
    abandoned by a hard kill; those are removed first (:func:`remove_abandoned`), so they
    neither pile up nor make a directory look in use."""
    remove_abandoned(parent, prefix)
    while True:
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd = _try_lock(folder)
        if fd is not None:  # else another run's sweep took it between mkdtemp and the lock
            break
        shutil.rmtree(folder, ignore_errors=True)
    try:
        yield folder
    finally:
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
