"""Children started with :func:`clv.orphans.die_with_parent` end when a ``clv`` that was killed
outright cannot stop them: the local servers (``tests/test_stack.py``) and the training child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")


def _ended(pid: int) -> bool:
    """Gone, or a zombie that nobody reaped (a container's init may not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _kill_parent_and_wait_for(parent: subprocess.Popen[str], child: int) -> bool:
    parent.send_signal(signal.SIGKILL)
    parent.wait(30)
    for _ in range(300):
        if _ended(child):
            return True
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)  # leave nothing behind for the suite
    return False


def _middle(code: str, tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    """A Python process running ``code``, which starts a child and prints its pid."""
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), line
    return proc, int(line)


@pytest.mark.parametrize("thread", ["main", "executor"])
def test_a_child_ends_when_its_parent_is_killed(tmp_path: Path, thread: str) -> None:
    # The local servers are started from the event loop's executor (asyncio.to_thread): the
    # kernel's "parent" is that thread, which lives as long as the loop.
    start = "await asyncio.to_thread(start)" if thread == "executor" else "start()"
    proc, child = _middle(
        f"""
        import asyncio, subprocess
        from clv.orphans import die_with_parent

        def start():
            p = subprocess.Popen(["sleep", "600"], preexec_fn=die_with_parent(), process_group=0)
            print(p.pid, flush=True)

        async def main():
            {start}
            await asyncio.sleep(600)

        asyncio.run(main())
        """,
        tmp_path,
    )
    # Fails if the child is started without die_with_parent: it outlives the killed parent.
    assert _kill_parent_and_wait_for(proc, child), "the child outlived its killed parent"


def test_the_training_child_ends_when_clv_is_killed(tmp_path: Path) -> None:
    # A stand-in interpreter that starts nothing but a long sleep, in place of training.train.
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'child.pid'}\nexec sleep 600\n")
    python.chmod(0o755)
    proc, _ = _middle(
        f"""
        import asyncio, sys
        from clv.settings import Settings
        from training.train import train_in_subprocess

        sys.executable = {str(python)!r}
        print(0, flush=True)
        asyncio.run(train_in_subprocess(Settings()))
        """,
        tmp_path,
    )
    pid_file = tmp_path / "child.pid"
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.1)
    child = int(pid_file.read_text())
    # Fails if train_in_subprocess starts its child without die_with_parent.
    assert _kill_parent_and_wait_for(proc, child), "the training child outlived a killed clv"
