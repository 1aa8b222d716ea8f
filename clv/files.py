"""Writing a file so that readers see the old version or the whole new one, never a part."""

from __future__ import annotations

import _thread
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from clv.errors import ClvError, Terminated


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (files renamed or created in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (a dangling symlink
    exists); ``missing[-1].parent`` is then the nearest existing ancestor."""
    missing = []
    for d in (path, *path.parents):
        if d.exists() or d.is_symlink():
            break
        missing.append(d)
    return missing


def fsync_names(root: Path, made: list[Path]) -> None:
    """Make ``root``'s own name durable in its parent, and the names of the folders ``made``
    (:func:`missing_dirs`, deepest first) in theirs: every write, since a folder made by an
    earlier write that failed, or by another process, may not be on disk yet. A parent this
    process may pass through but not read (a 0711 home folder) cannot be opened to fsync and
    is skipped: its folder was there before, made by someone who may."""
    for folder in made or [root]:
        with suppress(PermissionError):
            fsync_dir(folder.parent)


def check_usable_dir(path: Path, what: str, setting: str | None = None) -> None:
    """Before a run that will write in ``path``: it is a directory this process can write in,
    or, missing, one it can make (nothing is made here). The error names ``what`` (and the
    ``setting`` it came from), so a mistake ends the command at once, not minutes in."""
    named = f"{what} {path}" + (f" ({setting})" if setting else "")
    if loops(path):
        raise ClvError(f"{named} is (or lies under) a symbolic link that loops")
    missing = missing_dirs(path)
    base = missing[-1].parent if missing else path  # the nearest existing ancestor
    if not base.is_dir():
        raise ClvError(f"{named} cannot be used: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ClvError(f"{named} cannot be used: {base} is not writable")


def remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (as :func:`missing_dirs` lists them: made by a run that
    failed) that are still empty, deepest first."""
    for d in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass


_deferring = 0  # > 0 while a commit step must not be cut in two (main thread only)
_pending: int | None = None  # a stop signal came while deferring: raised when the step ends
_raised: BaseException | None = None  # the stop raised last (:func:`_in_flight`)


def loops(path: Path) -> bool:
    """Whether ``path`` (or a folder on the way to it) is a symbolic link that loops. By the
    error the system gives, since ``Path.resolve`` stopped raising on a loop in Python 3.13."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


#: How often a stop signal that has not yet unwound its block is raised in it again.
_AGAIN_S = 0.02


#: What a stop signal raises in :func:`stops_unwind`.
_RAISES: dict[int, type[BaseException]] = {
    signal.SIGTERM: Terminated,
    signal.SIGINT: KeyboardInterrupt,  # (itself, not a subclass: the standard library tests
}  # for `exc_type == KeyboardInterrupt`, subprocess.Popen's exit for one)


def _stop(signum: int) -> BaseException:
    """A new exception for stop signal ``signum`` to raise, remembered (:func:`_in_flight`)."""
    global _raised
    _raised = _RAISES[signum]()
    return _raised


def _in_flight() -> bool:
    """Whether the stop exception raised last is still referenced from elsewhere: it
    propagates, or is being handled, or something keeps it (a reference cycle, a log record:
    then the block's end raises it again). One that C code cleared, or that was handled and let
    go, is referenced by nothing else, and is let go here too (with its traceback's frames).
    (A weak reference would say the same, but ``KeyboardInterrupt`` takes none.)"""
    global _raised
    if _raised is None:
        return False
    if sys.getrefcount(_raised) > 2:  # (this module's reference, and the argument's)
        return True
    _raised = None
    return False


def _unwinding() -> bool:
    """Whether the main thread (where a signal handler runs) is on its way out: a stop
    exception raised here (:func:`_stop`) is in flight (it propagates, and Python may run
    cleanup meanwhile that does not see it: a generator closed, a ``__del__``), or a
    :class:`~clv.errors.Terminated` or ``KeyboardInterrupt`` is being handled, or an error
    raised while one was (the cleanup), which a stop signal must not cut short."""
    if _in_flight():
        return True
    exc = sys.exc_info()[1]
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (Terminated, KeyboardInterrupt)):
            return True
        seen.add(id(exc))
        exc = exc.__context__
    return False


@contextmanager
def stops_unwind() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`~clv.errors.Terminated` in the main thread
    instead of ending the process on the spot, so the cleanup of the staging files and folders
    below runs, and Ctrl-C raises ``KeyboardInterrupt`` as it would anyway (unless it was set
    to be ignored, or is handled otherwise); the previous handlers are restored after. A stop
    signal that arrives during the cleanup (one of those is on its way out) is ignored, so that
    it cannot cut the cleanup short, and one that arrives inside :func:`interruptions_deferred`
    is raised when that step ends. The handlers are set inside the block's ``try``: a signal
    that lands while they are set still has them restored. Outside the main thread, a no-op.

    Python runs the handler wherever the main thread is, and some places drop what it raises:
    a finalizer (``__del__``, a weakref callback: "Exception ignored in ..."), and C code that
    clears any error raised while it runs Python (numpy's ``dtype == x``, which pandas does all
    the time, inside pyarrow's ``Table.from_pandas`` too). The run would go on to the end. So
    from the first stop signal on, it is raised again every :data:`_AGAIN_S` from another
    thread until the block is left, each time ignored while the run is on its way out
    (:func:`_unwinding`). The repeats are simulated (``_thread.interrupt_main``), so a blocking
    call (a sleep, a wait) entered after a stop was cleared is not cut short; the repeat lands
    when it returns. And whenever a stop signal arrived but no stop reached the end of the
    block (dropped where this cannot see, such as a library's ``except BaseException`` that
    keeps it, or handled inside it: typer turns a ``KeyboardInterrupt`` into exit code 130),
    one is raised where the block ends: a run asked to stop never ends as if it had not been.
    The first signal decides which. So code inside the block that handles a stop and goes on
    (``except KeyboardInterrupt: return``, then a ``finally``) gets it again within
    :data:`_AGAIN_S`: nothing in clv does; typer's exit 130 is its last step."""
    global _pending, _raised
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _raised = None  # (an earlier block's, still referenced somewhere, is not this block's)
    live = True  # the block runs: a signal raised again is still this block's
    first: int | None = None  # the first stop signal that arrived
    arrived = False  # a stop reached the end of the block
    reporting = False  # inside the hook below

    def _raise(signum: int, _frame: object) -> None:
        global _pending
        nonlocal first
        if first is None:
            first = signum
            # (Thread.start would wait, handling signals)
            _thread.start_new_thread(_again, (signal.Signals(signum),))
        if not live or _unwinding():  # (not live: the block's end raises it)
            return
        if _deferring:  # (a step inside the block leaves Ctrl-C to this handler too)
            _pending = first
            return
        if reporting:  # raised here, it would be dropped like the error being reported
            return
        raise _stop(first)

    def _again(signum: signal.Signals) -> None:  # in a thread of its own, beside the main one
        while live:
            time.sleep(_AGAIN_S)
            with again:  # the block's end waits for it: never after the handler is restored
                if live:
                    _thread.interrupt_main(signum)

    def _dropped(unraisable: sys.UnraisableHookArgs) -> None:
        nonlocal reporting
        if isinstance(unraisable.exc_value, tuple(_RAISES.values())):
            return  # not reported: raised again in the block by the next round
        reporting = True
        try:
            previous_hook(unraisable)
        finally:
            reporting = False

    again = _thread.allocate_lock()
    previous: dict[int, signal._HANDLER] = {}
    previous_hook = sys.unraisablehook
    try:
        for sig in _RAISES:  # Ctrl-C only where Python's own handler has it (not ignored)
            if sig == signal.SIGTERM or signal.getsignal(sig) is signal.default_int_handler:
                previous[sig] = signal.getsignal(sig)  # (known before a signal can land)
                signal.signal(sig, _raise)
        sys.unraisablehook = _dropped
        yield
    except (Terminated, KeyboardInterrupt):
        arrived = True
        raise
    finally:
        live = False
        with again:  # a repeat in flight has landed (in _raise, which ignores it now)
            pass
        if sys.unraisablehook is _dropped:  # not when something in the block replaced it
            sys.unraisablehook = previous_hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _pending = None  # (noted by a repeat as a deferred step ended: this block's)
        _raised = None  # (nor kept after it, with its traceback's frames)
        if first is not None and not arrived:  # dropped, or handled, before the end
            raise _RAISES[first]()


@contextmanager
def interruptions_deferred() -> Iterator[None]:
    """A step that must finish once begun (the renames that put a run's outputs in place, so
    that no mix of an earlier run's files and this one's is left): a SIGTERM or Ctrl-C arriving
    inside it is raised (:class:`~clv.errors.Terminated`, ``KeyboardInterrupt``) when it ends,
    in place of the step's own error if it fails: the process was asked to stop. The SIGTERM
    part works with :func:`stops_unwind`; without it, SIGTERM ends the process as usual.
    Outside the main thread, a no-op."""
    global _deferring, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted = False

    def _note_interrupt(_signum: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    # Ctrl-C where Python's own handler has it: not where it is ignored (`clv up &` in a
    # script), nor inside stops_unwind, whose handler notes it in a step as it does a SIGTERM
    previous_int = signal.getsignal(signal.SIGINT)
    taken = previous_int is signal.default_int_handler
    _deferring += 1  # first: a SIGTERM from here on is only noted
    try:
        if taken:
            signal.signal(signal.SIGINT, _note_interrupt)
        yield
    finally:
        if taken:
            signal.signal(signal.SIGINT, previous_int)
        _deferring -= 1
        if not _deferring and _pending is not None:
            signum, _pending = _pending, None
            raise _stop(signum)
        if interrupted:  # (outside stops_unwind: nothing to follow)
            raise KeyboardInterrupt


def orders_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an orders file (``None``: it is a regular file). Light,
    so a command can check before importing the modelling stack; the loader says the same."""
    if path.is_dir():
        return f"the orders file {path} is a directory; give a file"
    if not path.exists():
        return f"orders file not found: {path}"
    if not path.is_file():
        return f"the orders file {path} is not a regular file (a pipe or a device)"
    return None


def _in_real_folder(path: Path) -> Path:
    """``path`` in its folder as the folder resolves (the name itself not followed)."""
    return Path(os.path.realpath(path.absolute().parent)) / path.name


def _link_chain(path: Path, hops: int = 40) -> list[Path]:
    """``path`` and every path its symbolic links lead through, absolute, to the last one
    (``/dev/stdout`` -> ``/proc/self/fd/1`` -> the file or pipe behind it)."""
    chain = [path.absolute()]
    for _ in range(hops):
        here = chain[-1]
        if here.name not in ("", ".", ".."):  # the folders on the way, as they resolve
            chain.append(here := Path(os.path.realpath(here.parent)) / here.name)
        if not here.is_symlink():
            break
        chain.append((here.parent / os.readlink(here)).absolute())
    chain.append(path.resolve(strict=False))
    return chain


def replaceable(path: Path, *, follow_links: bool = True) -> Path:
    """The file that writing ``path`` replaces: a symbolic link's target, or with
    ``follow_links=False`` the link itself (a file the caller owns, like the registry's
    pointer). A :class:`ClvError` where that is not a regular file (a device, a pipe, a
    directory), which is never replaced, or where a link on the way loops."""
    if loops(path.parent) or (follow_links and loops(path)):
        raise ClvError(f"{path} is (or lies under) a symbolic link that loops; give a file path")
    # (the link itself is not followed where it is what is replaced: one that loops or leads
    # to a device is replaced like any other)
    chain = _link_chain(path) if follow_links else [_in_real_folder(path)]
    for seen in chain:
        top = seen.parts[1:3]  # /dev/stdout, /proc/self/fd/1, ... (but /dev/shm holds files)
        if top[:1] == ("proc",) or (top[:1] == ("dev",) and top != ("dev", "shm")):
            raise ClvError(
                f"{path} is a device or a process's open file (standard output?), not a file "
                "path; give a file path"
            )
    if follow_links and path.is_symlink():
        path = path.resolve(strict=False)
    if path.is_dir() and not path.is_symlink():
        raise ClvError(f"{path} is not a regular file but a directory; give a file path")
    if path.exists() and not path.is_symlink() and not path.is_file():
        raise ClvError(f"{path} is not a regular file (a device or a pipe); give a file path")
    return path


@contextmanager
def replaced_atomically(path: Path, *, follow_links: bool = True) -> Iterator[Path]:
    """A fresh, uniquely named file beside ``path`` to write; renamed onto ``path`` when the
    block ends without an error, removed when it raises, with the folders made for it. The
    unique name (created exclusively) means no existing file (the input being read, another
    writer's staging file) can be clobbered on the way; it is created like any file, so the
    umask sets its mode. What is replaced is :func:`replaceable`'s answer for ``path``.

    The staging file is locked (``flock``) for as long as the block runs, so the ones that a
    hard kill left beside ``path`` are told from live writers' and removed first
    (:func:`remove_abandoned_staged`). On NFS, where ``flock`` is a POSIX lock that closing
    any descriptor of the file drops, a live write older than :data:`STAGED_GRACE_S` into
    the same path by another run could be taken for abandoned."""
    path = replaceable(path, follow_links=follow_links)
    made = missing_dirs(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staged(path)
    staged = path.with_name(f".{path.name}.{secrets.token_hex(STAGED_TOKEN_BYTES)}.tmp")
    fd: int | None = None
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # ours until it ends, however it ends (kill -9)
        except OSError:
            pass  # a file system without locks: written unlocked, and no sweep removes it
        yield staged
        staged.replace(path)
        made = []
    finally:
        if fd is not None:
            try:
                with suppress(OSError):  # left for the next run's sweep; the error in hand is
                    staged.unlink(missing_ok=True)  # what the caller needs to hear
            finally:
                os.close(fd)
        remove_empty(made)


STAGED_TOKEN_BYTES = 8
#: A staging file younger than this is left alone even when unlocked: it may be one a writer
#: has just created and not yet locked.
STAGED_GRACE_S = 60.0


def remove_abandoned_staged(path: Path) -> list[Path]:
    """Remove the staging files of :func:`replaced_atomically` for ``path`` that no live
    process holds (those a hard kill or a power cut left): older than
    :data:`STAGED_GRACE_S` and not locked. Returns the ones removed. One that cannot be
    locked or removed (another user's in a sticky folder, a file system without locks) is left
    where it is: the sweep never fails the write it comes before."""
    name = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{{2 * STAGED_TOKEN_BYTES}}}\.tmp")
    removed: list[Path] = []
    try:
        found = [p for p in path.parent.iterdir() if name.fullmatch(p.name)]
    except OSError:
        return removed
    for left in found:
        try:
            info = left.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime <= STAGED_GRACE_S:
            continue
        try:
            fd = _lock_file(left, create=False)
        except OSError:  # no locks here, a folder swapped in: not ours to judge
            continue
        if fd is None:
            continue  # a live writer's, or gone already
        try:
            left.unlink(missing_ok=True)
            removed.append(left)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


OWNER_FILE = ".owner"  # inside a staging folder: locked by the run writing it, as long as it runs
UNOWNED_GRACE_S = 600  # a staging folder with no owner file is abandoned once this old
_BUSY = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES}  # flock: another process holds it
_MAKE_ATTEMPTS = 100


def _lock_owner(folder: Path, *, create: bool) -> int | None:
    """:func:`_lock_file` for ``folder``'s :data:`OWNER_FILE`."""
    return _lock_file(folder / OWNER_FILE, create=create)


def _lock_file(path: Path, *, create: bool) -> int | None:
    """A descriptor of the file ``path`` holding its exclusive lock, or None when another
    process holds the lock or the file (or its folder) is gone. The lock lives as long as the
    process that took it: the kernel drops it when the process ends, however it ends (``kill
    -9`` included). A regular file, since NFS shares locks on files between hosts and not on
    directories. Any other error (no locks on this file system, no descriptors left) raises:
    a file that cannot be locked is neither claimed nor removed."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except (FileNotFoundError, PermissionError):  # gone, or another user's: not ours to judge
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_nlink == 0:  # removed by a sweep between our open and our lock
            raise FileNotFoundError(errno.ENOENT, "removed by a sweep", str(path))
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, FileNotFoundError) or exc.errno in _BUSY:
            return None
        raise
    return fd


def _abandoned_unowned(folder: Path) -> bool:
    """A folder with no owner file: one a run is creating right now (it makes the file just
    after the folder), or one an interrupted or older run left; the second once it is old."""
    try:
        age = time.time() - folder.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age > UNOWNED_GRACE_S and not (folder / OWNER_FILE).exists()


def remove_abandoned(parent: Path, prefix: str) -> list[Path]:
    """Remove the staging folders named ``prefix*`` in ``parent`` that no live process owns:
    those a hard kill or a power cut left behind. Returns the ones removed."""
    removed: list[Path] = []
    try:
        found = [p for p in parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for folder in found:
        if folder.is_symlink() or not folder.is_dir():
            continue
        fd = _lock_owner(folder, create=False)
        if fd is None and not _abandoned_unowned(folder):
            continue  # a live run's, or gone already
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
        if not folder.exists():
            removed.append(folder)
    return removed


@contextmanager
def staging_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder named ``prefix*`` inside ``parent`` (which must exist), owned by this run
    (the lock of its :data:`OWNER_FILE`) for as long as the block runs, and removed with
    whatever is left in it when the block ends: a caller keeps what it wants by moving its
    :func:`staged` entries away (a folder made inside it, not the staging folder itself, whose
    mode is mkdtemp's 0700). Ownership tells live staging from folders abandoned by a hard
    kill; those are removed first (:func:`remove_abandoned`), so they neither pile up nor make a
    directory look in use."""
    remove_abandoned(parent, prefix)
    for _ in range(_MAKE_ATTEMPTS):
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            fd = _lock_owner(folder, create=True)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if fd is not None:
            break
        shutil.rmtree(folder, ignore_errors=True)  # another run's sweep took it: make another
    else:
        raise ClvError(f"could not make a staging folder in {parent} ({_MAKE_ATTEMPTS} tries)")
    try:
        yield folder
    finally:
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)


def staged(folder: Path) -> list[Path]:
    """What a run wrote into its staging ``folder`` (not the owner file), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.name != OWNER_FILE)
