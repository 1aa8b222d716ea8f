import errno
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clv import files
from clv.errors import ClvError
from clv.files import (
    OWNER_FILE,
    remove_abandoned,
    replaceable,
    replaced_atomically,
    staged,
    staging_dir,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_the_new_file_has_the_mode_a_plain_write_gives(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.csv"
        plain.write_text("a\n")
        target = tmp_path / "out.csv"
        with replaced_atomically(target) as staged:
            staged.write_text("a\n")
    finally:
        os.umask(old)
    assert _mode(target) == _mode(plain) == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_staging_file(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), replaced_atomically(target) as staged:
        staged.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_the_whole_new_file_replaces_the_old(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.csv"
    with replaced_atomically(target) as staged:
        assert staged.parent == target.parent and staged != target
        staged.write_text("new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.csv"]


def test_a_symlink_is_written_through(tmp_path: Path) -> None:
    """The link stays a link; its target gets the new content."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "out.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    with replaced_atomically(link) as staged:
        staged.write_text("new\n")
    assert link.is_symlink() and link.resolve() == target
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "real"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.csv"]


@pytest.mark.parametrize("kind", ["fifo", "directory", "link to a fifo"])
def test_what_is_not_a_regular_file_is_refused_not_replaced(tmp_path: Path, kind: str) -> None:
    """A device or pipe (``--out /dev/null`` as root) must never be swapped for a file."""
    path = tmp_path / "thing"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    if kind == "link to a fifo":
        (tmp_path / "link").symlink_to(path)
        path = tmp_path / "link"
    with pytest.raises(ClvError, match="is not a regular file"), replaced_atomically(path) as s:
        s.write_text("x")
    assert not (tmp_path / "thing").is_file() and (tmp_path / "thing").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"thing", path.name})


def test_standard_output_is_refused_by_any_name_but_dev_shm_is_a_place_for_files(
    tmp_path: Path,
) -> None:
    """A link to /dev/stdout resolves, with stdout redirected to a file, to that file: every
    hop of the link counts, not only where it ends."""
    link = tmp_path / "out.csv"
    link.symlink_to("/dev/stdout")
    for path in (Path("/dev/stdout"), Path("/proc/self/fd/1"), link):
        with pytest.raises(ClvError, match="standard output"):
            replaceable(path)
    shm = Path("/dev/shm")
    if shm.is_dir():
        assert replaceable(shm / "clv-test.csv") == shm / "clv-test.csv"


def test_a_symlink_loop_is_refused(tmp_path: Path) -> None:
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    with pytest.raises(ClvError, match="link that loops"), replaced_atomically(loop) as s:
        s.write_text("x")
    assert loop.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["loop.csv"]


def test_sigterm_inside_a_deferred_step_waits_for_its_end_and_a_second_is_ignored() -> None:
    """In a child process (a mistake here must not take the test runner down with it)."""
    code = """
import os, signal
from clv.errors import Terminated
from clv.files import interruptions_deferred, stops_unwind
steps = []
try:
    with stops_unwind():
        try:
            with interruptions_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("step finished")
            steps.append("not reached")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # a second one, during the cleanup: ignored
            steps.append("cleanup finished")
except Terminated:
    steps.append("terminated")
try:
    with stops_unwind():
        with interruptions_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            raise ValueError("the step's own error")
except Terminated as exc:
    steps.append("terminated after " + str(exc.__context__))
try:
    with interruptions_deferred():
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C waits for the step too
        steps.append("step finished")
except KeyboardInterrupt:
    steps.append("interrupted")
print(",".join(steps))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "step finished,cleanup finished,terminated,terminated after the step's own error,"
        "step finished,interrupted"
    )


_DROPPED = """
import os, signal, sys, threading, time
import numpy as np
import clv.files
from clv.errors import Terminated
from clv.files import interruptions_deferred, stops_unwind

case, rounds = sys.argv[1], int(sys.argv[2])
sig = signal.SIGINT if case.startswith("Ctrl-C") else signal.SIGTERM
if case in (
    "block ends",
    "swallowed",
    "Ctrl-C handled inside",
    "Ctrl-C, then SIGTERM deferred",
    "Ctrl-C deferred, swallowed",
):
    clv.files._AGAIN_S = 3600.0  # not raised again in time: what comes next must raise it
if case == "Ctrl-C ignored":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
if case == "while setting up":  # a SIGTERM lands as soon as its handler is set
    setting = signal.signal
    def signal_as_set(signum, handler):
        previous = setting(signum, handler)
        if signum == signal.SIGTERM and getattr(handler, "__name__", "") == "_raise":
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(10))
        return previous

class SignalledInFinalizer:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)  # handled here, inside the finalizer: dropped
        sum(range(10))

class FailingFinalizer:
    def __del__(self):
        raise ValueError("a library's finalizer failing")

class DtypeOf:  # numpy asks it for its dtype, and clears whatever error that raises
    @property
    def dtype(self):
        os.kill(os.getpid(), sig)  # handled here, inside numpy's C code: dropped
        sum(range(10))
        return None

def chunks():  # its cleanup runs as the Terminated propagates, before anything handles it
    try:
        yield 1
        yield 2
    finally:  # longer than the repeats' interval: they come meanwhile, and are ignored
        for _ in range(10):
            time.sleep(clv.files._AGAIN_S)
        steps.append("generator cleaned up")

def in_chunks():
    for _ in chunks():
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10))

def signalled_while_reporting(unraisable):  # the signal lands while the error is reported
    os.kill(os.getpid(), signal.SIGTERM)
    sum(range(10))

def spin():  # other Python threads keep the interpreter's lock busy
    while True:
        pass

if case == "busy threads":
    for _ in range(2):
        threading.Thread(target=spin, daemon=True).start()
if case == "while reporting":
    sys.unraisablehook = signalled_while_reporting
late = []  # SIGTERMs that came after their block ended (simulated ones, too)
signal.signal(signal.SIGTERM, lambda signum, frame: late.append(signum))
before = signal.getsignal(signal.SIGTERM)
before_int = signal.getsignal(signal.SIGINT)
hook = sys.unraisablehook
if case == "while setting up":
    signal.signal = signal_as_set
kept = []
if case == "earlier stop kept":  # by a log record, a list of errors, pytest.raises
    try:
        with stops_unwind():
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(10))
    except Terminated as exc:
        kept.append(exc)
for _ in range(rounds):
    steps = []
    try:
        with stops_unwind():
            if case == "while reporting":
                FailingFinalizer()
            elif case == "Ctrl-C handled inside":  # as typer does (exit code 130)
                try:
                    os.kill(os.getpid(), sig)
                    sum(range(10))
                except KeyboardInterrupt:
                    steps.append("handled")
            elif case in ("cleared by C code", "Ctrl-C cleared by C code", "Ctrl-C ignored"):
                assert not np.dtype("int64") == DtypeOf()
                if case == "Ctrl-C ignored":
                    with interruptions_deferred():  # a step does not take it either
                        os.kill(os.getpid(), signal.SIGINT)
                        sum(range(10))
            elif case == "earlier stop kept":  # not taken for this block's, on its way out
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(10))
            elif case == "Ctrl-C deferred, swallowed":  # the block knows of it: raised at its end
                try:
                    with interruptions_deferred():
                        os.kill(os.getpid(), signal.SIGINT)
                        sum(range(10))
                        steps.append("step done")
                except BaseException:
                    steps.append("swallowed")
            elif case == "Ctrl-C, then SIGTERM deferred":  # the first one decides
                assert not np.dtype("int64") == DtypeOf()
                with interruptions_deferred():
                    os.kill(os.getpid(), signal.SIGTERM)
                    sum(range(10))
            elif case == "generator closed":
                in_chunks()
            elif case == "long cleanup":
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    sum(range(10))
                finally:  # raised again meanwhile, many times: ignored while this runs
                    for _ in range(20):
                        time.sleep(clv.files._AGAIN_S)
                    steps.append("cleaned up")
            else:
                SignalledInFinalizer()
            if not case.endswith("inside"):
                steps.append("dropped")
            if case == "swallowed":
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    sum(range(10))
                except BaseException:  # a library swallowing everything
                    steps.append("swallowed")
            deadline = time.monotonic() + 60  # a guard against hanging, not a measurement
            ends = (
                "block ends",
                "swallowed",
                "Ctrl-C handled inside",
                "Ctrl-C ignored",
                "Ctrl-C deferred, swallowed",
            )
            while case not in ends and time.monotonic() < deadline:
                pass
            steps.append("ran on to the end")
    except Terminated:
        steps.append("terminated")
    except KeyboardInterrupt:
        steps.append("interrupted")
    print(",".join(steps))
    assert sys.unraisablehook is hook, "the hook was not restored"
    signal.signal = setting if case == "while setting up" else signal.signal
    assert clv.files._raised is None, "kept after its block, with its traceback's frames"
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) is before_int
time.sleep(0.1)  # (ten times the repeats' interval)
print("exit", len(late))
"""


@pytest.mark.parametrize(
    ("case", "rounds", "expected"),
    [
        ("forever", 1, "dropped,terminated"),  # signalled again while the block runs
        ("busy threads", 10, "dropped,terminated"),  # the same, with others wanting the GIL
        ("while reporting", 1, "dropped,terminated"),  # arrived while another error is reported
        ("cleared by C code", 3, "dropped,terminated"),  # numpy's dtype == x: PyErr_Clear
        ("long cleanup", 1, "cleaned up,terminated"),  # its cleanup is not cut short
        ("generator closed", 1, "generator cleaned up,terminated"),  # nor one before handling
        ("Ctrl-C cleared by C code", 3, "dropped,interrupted"),  # a Ctrl-C is raised again too
        ("Ctrl-C handled inside", 1, "handled,ran on to the end,interrupted"),  # by typer: 130
        ("Ctrl-C ignored", 1, "dropped,ran on to the end"),  # (`clv up &` in a script) stays so
        ("Ctrl-C, then SIGTERM deferred", 1, "interrupted"),  # exit 130, not 143
        ("while setting up", 1, "terminated"),  # its handlers are still restored
        ("earlier stop kept", 1, "terminated"),  # another block's does not hide this one's
        (
            "Ctrl-C deferred, swallowed",
            1,
            "step done,swallowed,dropped,ran on to the end,interrupted",
        ),
        ("block ends", 1, "dropped,ran on to the end,terminated"),  # the end came first
        ("swallowed", 1, "dropped,swallowed,ran on to the end,terminated"),  # raised at the end
    ],
)
def test_a_stop_dropped_by_python_still_stops(case: str, rounds: int, expected: str) -> None:
    """Python drops an exception raised in a ``__del__``, a weakref callback or the hook that
    reports such errors ("Exception ignored in ..."), and C code may clear it (numpy's dtype
    comparison, which pandas makes all the time: a terminated ``clv synth`` wrote its whole
    log and only then said it was terminated); the handler had already set SIGTERM to be
    ignored, so the run went on to the end. It is raised in the block again, or where the
    block ends, and the handlers are restored after."""
    done = subprocess.run(
        [sys.executable, "-c", _DROPPED, case, str(rounds)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [expected] * rounds + ["exit 0"], done.stdout
    assert "Exception ignored" not in done.stderr, done.stderr


ROOT = Path(__file__).resolve().parents[1]

_HOLD = """
import sys
from pathlib import Path
from clv.files import staging_dir
with staging_dir(Path(sys.argv[1]), ".staging.") as d:
    (d / "part.csv").write_text("half")
    print(d, flush=True)
    sys.stdin.read()  # held until killed
"""


def _holder(parent: Path, script: str = _HOLD) -> tuple[subprocess.Popen[str], Path]:
    """A process running ``script`` on ``parent`` until killed, and the path it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,  # this checkout's clv, whatever the installed one
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_a_live_run_keeps_its_staging_and_a_killed_runs_is_removed(tmp_path: Path) -> None:
    proc, held = _holder(tmp_path)
    try:
        assert held.parent == tmp_path and (held / "part.csv").exists()
        assert remove_abandoned(tmp_path, ".staging.") == []  # the lock says it is in use
        with staging_dir(tmp_path, ".staging.") as mine:  # a second run beside it
            assert mine != held and held.exists()
        assert held.exists() and not mine.exists()
    finally:
        proc.kill()  # SIGKILL: no cleanup runs, the folder stays behind
        proc.wait()
    assert (held / "part.csv").exists()
    (tmp_path / ".staging.not-a-folder").write_text("x")  # a file of that name is not touched
    (tmp_path / ".other").mkdir()  # nor a folder of another prefix
    assert remove_abandoned(tmp_path, ".staging.") == [held]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other", ".staging.not-a-folder"]


def test_a_new_staging_folder_clears_abandoned_ones(tmp_path: Path) -> None:
    proc, held = _holder(tmp_path)
    proc.kill()
    proc.wait()
    with staging_dir(tmp_path, ".staging.") as mine:
        assert not held.exists()
        assert [p.name for p in tmp_path.iterdir()] == [mine.name]
    assert list(tmp_path.iterdir()) == []  # removed with what is left in it


def test_a_folder_made_in_staging_and_moved_away_is_kept(tmp_path: Path) -> None:
    with staging_dir(tmp_path, ".staging-") as stage:
        (stage / "v1").mkdir()
        (stage / "v1" / "model.pkl").write_bytes(b"x")
        assert staged(stage) == [stage / "v1"]  # what the run wrote, not its owner file
        os.rename(stage / "v1", tmp_path / "v1")
        assert remove_abandoned(tmp_path, ".staging-") == []  # still owned while it runs
    assert (tmp_path / "v1" / "model.pkl").read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]  # the staging folder is gone


def test_a_folder_without_an_owner_file_is_removed_only_once_old(tmp_path: Path) -> None:
    """A run makes the owner file just after the folder; one without it is being created, or
    was left by a run interrupted in between (or by older code), and is removed once old."""
    young, old = tmp_path / ".staging.young", tmp_path / ".staging.old"
    young.mkdir()
    old.mkdir()
    (old / "part.csv").write_text("half")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    assert remove_abandoned(tmp_path, ".staging.") == [old]
    assert young.is_dir()


def test_a_folder_that_cannot_be_locked_is_an_error_not_a_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only "held by another process" means busy; a file system without locks (ENOLCK) or no
    descriptors left is an error, and no folder is claimed or removed on its say-so."""
    left = tmp_path / ".staging.left"
    left.mkdir()
    (left / OWNER_FILE).touch()

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    with pytest.raises(OSError, match="No locks"), staging_dir(tmp_path, ".staging."):
        pass
    with pytest.raises(OSError, match="No locks"):
        remove_abandoned(tmp_path, ".staging.")
    assert [p.name for p in tmp_path.iterdir()] == [left.name]
    left.rename(tmp_path / "kept")  # nothing to sweep: the new folder's own lock fails
    with pytest.raises(OSError, match="No locks"), staging_dir(tmp_path, ".staging."):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]  # and the folder is not left


def test_a_folder_swept_between_its_making_and_its_lock_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run's sweep may lock, remove and release a new folder before its maker locks it:
    the maker's lock then holds a removed file, so it makes another folder instead."""
    real = files.fcntl.flock
    swept: list[Path] = []

    def swept_first(fd: int, op: int) -> None:
        if not swept:  # the first new folder is taken by a sweep just before the lock
            (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith(".staging.")]
            shutil.rmtree(folder)
            swept.append(folder)
        real(fd, op)

    monkeypatch.setattr(files.fcntl, "flock", swept_first)
    with staging_dir(tmp_path, ".staging.") as d:
        assert swept and d != swept[0] and d.is_dir()
        (d / "part.csv").write_text("whole")


def test_the_new_file_is_renamed_into_place_not_copied_over_the_old(tmp_path: Path) -> None:
    """A reader that opened the old file keeps reading the old file whole; the path then
    names the staged file itself (its inode), never a file rewritten in place."""
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with target.open() as reader:
        with replaced_atomically(target) as staged:
            staged.write_text("new\n")
            inode = staged.stat().st_ino
        assert reader.read() == "old\n"
    assert target.stat().st_ino == inode and target.read_text() == "new\n"


def test_a_failed_write_removes_the_folders_it_made(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper" / "out.csv"
    with pytest.raises(RuntimeError), replaced_atomically(target) as staged:
        staged.write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_standard_output_is_refused_through_a_chain_of_links_and_a_linked_folder(
    tmp_path: Path,
) -> None:
    """Every hop counts, however many there are, and a folder on the way that is a link to
    /proc (or /dev) counts as where it leads."""
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    second.symlink_to("/dev/stdout")
    first.symlink_to(second)
    (tmp_path / "proc").symlink_to("/proc")
    for path in (first, tmp_path / "proc" / "self" / "environ"):
        with pytest.raises(ClvError, match="standard output"):
            replaceable(path)


def test_a_folder_that_loops_is_refused_even_when_the_file_itself_is_not_followed(
    tmp_path: Path,
) -> None:
    """``follow_links=False`` (the registry's pointer) still refuses a path under a loop."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(ClvError, match="link that loops"):
        replaceable(loop / "pointer", follow_links=False)


def test_a_process_open_file_is_refused_by_a_path_with_dot_dot_or_a_linked_folder(
    tmp_path: Path,
) -> None:
    up = "../" * (len(tmp_path.parts) - 1)  # from tmp_path back to /
    with (tmp_path / "log.txt").open("w") as log:  # stands for `clv ... > log.txt`
        fd = log.fileno()
        (tmp_path / "relative.csv").symlink_to(f"{up}proc/self/fd/{fd}")
        (tmp_path / "fds").symlink_to("/dev/fd")
        for path in (
            Path(f"{tmp_path}/{up}proc/self/fd/{fd}"),  # `--out ../../proc/self/fd/N`
            tmp_path / "relative.csv",  # a relative link
            tmp_path / "fds" / str(fd),  # a link to /dev/fd, then the descriptor
        ):
            with pytest.raises(ClvError, match="standard output"):
                replaceable(path)


_WRITE = (
    "import sys; from pathlib import Path; from clv.files import replaced_atomically\n"
    "with replaced_atomically(Path(sys.argv[1])) as f:\n"
    "    f.write_text('half of it'); print(f, flush=True); sys.stdin.read()\n"
)


def _aged(path: Path, seconds: float = 2 * files.STAGED_GRACE_S) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_killed_writers_staging_file_is_removed_by_the_next_write_and_a_live_ones_kept(
    tmp_path: Path,
) -> None:
    # Fails if a staging file that `kill -9` left beside the output (clv synth --out FILE,
    # clv backtest --out) stays for good, or if a live writer's is taken for one.
    out = tmp_path / "pred.csv"
    proc, held = _holder(out, _WRITE)
    try:
        assert held.parent == tmp_path and held.read_text() == "half of it"
        _aged(held)  # a long write: old, but its writer is alive and holds the lock
        with replaced_atomically(out) as mine:
            mine.write_text("whole")
            assert held.exists()
        assert out.read_text() == "whole" and held.exists()
    finally:
        proc.kill()  # SIGKILL: no cleanup runs, the staging file stays behind
        proc.wait()
    _aged(held)
    others = [tmp_path / ".pred.csv.tmp", tmp_path / ".other.csv.0123456789abcdef.tmp"]
    for other in others:  # not a staging file of pred.csv: never touched
        other.write_text("x")
        _aged(other)
    with replaced_atomically(out) as mine:
        mine.write_text("again")
    assert not held.exists() and out.read_text() == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["pred.csv", *(o.name for o in others)]
    )


def test_an_unlocked_staging_file_is_left_alone_while_young(tmp_path: Path) -> None:
    # Fails if the sweep removes a staging file in the instant between its writer's create
    # and lock (young and unlocked): that writer would lose its file.
    out = tmp_path / "pred.csv"
    young = tmp_path / ".pred.csv.0123456789abcdef.tmp"
    young.write_text("just made")
    assert files.remove_abandoned_staged(out) == []
    _aged(young)
    assert files.remove_abandoned_staged(out) == [young] and not young.exists()


def test_only_old_staging_files_of_that_very_path_are_swept(tmp_path: Path) -> None:
    # Fails if the sweep takes what only looks like a staging file of pred.csv: a user's
    # .pred.csv.backup.tmp, another output's (.predXcsv.<hex>.tmp), a name that goes on past
    # .tmp, or a folder or link of that name (a folder made the write fail; a link would be
    # followed to its target).
    out = tmp_path / "pred.csv"
    token = "0123456789abcdef"
    kept = [
        tmp_path / ".pred.csv.backup.tmp",
        tmp_path / ".predXcsv.0123456789abcdef.tmp",
        tmp_path / f".pred.csv.{token}.tmp.keep",
        tmp_path / f".pred.csv.{token[:-1]}.tmp",
    ]
    for path in kept:
        path.write_text("x")
    folder = tmp_path / ".pred.csv.fedcba9876543210.tmp"
    folder.mkdir()
    target = tmp_path / "target.txt"
    target.write_text("linked")
    link = tmp_path / ".pred.csv.00000000ffffffff.tmp"
    link.symlink_to(target)
    for path in [*kept, folder, target]:
        _aged(path)
    os.utime(link, (time.time() - 600, time.time() - 600), follow_symlinks=False)
    with replaced_atomically(out) as staged_file:
        staged_file.write_text("whole")
    assert out.read_text() == "whole"
    assert all(p.exists() for p in kept) and folder.is_dir() and link.is_symlink()
    assert target.read_text() == "linked"


@pytest.mark.parametrize("fails", ["unlink", "lock"])
def test_a_staging_file_the_sweep_cannot_handle_does_not_fail_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    # Fails if the sweep raises: another user's leftover in a sticky folder (locked, then not
    # removable: EPERM) or a file system without locks failed every write of that output.
    import fcntl

    out = tmp_path / "pred.csv"
    left = tmp_path / ".pred.csv.0123456789abcdef.tmp"
    left.write_text("half")
    _aged(left)
    if fails == "unlink":
        real_unlink = Path.unlink

        def unlink(self: Path, missing_ok: bool = False) -> None:
            if self == left:
                raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
            real_unlink(self, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", unlink)
    else:

        def flock(fd: int, op: int) -> None:
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(fcntl, "flock", flock)
    with replaced_atomically(out) as staged_file:
        staged_file.write_text("whole")
    assert out.read_text() == "whole" and left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [left.name, "pred.csv"]
