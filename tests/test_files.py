import os
import stat
from pathlib import Path

import pytest

from clv.files import replaced_atomically


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
