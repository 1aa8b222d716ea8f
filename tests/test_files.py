import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from clv.files import remove_abandoned, replaced_atomically, staging_dir


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


_HOLD = """
import sys
from pathlib import Path
from clv.files import staging_dir
with staging_dir(Path(sys.argv[1]), ".staging.") as d:
    (d / "part.csv").write_text("half")
    print(d, flush=True)
    sys.stdin.read()  # held until killed
"""


def _holder(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
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


def test_a_staging_folder_moved_away_is_kept(tmp_path: Path) -> None:
    with staging_dir(tmp_path, ".staging-") as stage:
        (stage / "model.pkl").write_bytes(b"x")
        stage.rename(tmp_path / "v1")
    assert (tmp_path / "v1" / "model.pkl").read_bytes() == b"x"
    assert remove_abandoned(tmp_path, ".staging-") == []
