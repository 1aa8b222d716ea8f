"""Progress lines for the long training commands: a timestamped line on stderr per step, and a
heartbeat while one step (a model's fit) runs long, so a slow fit is not taken for a hang."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator

Progress = Callable[[str], None]

#: Seconds between heartbeat lines while one step runs.
HEARTBEAT_S = 30.0


def quiet(_: str) -> None:
    """The progress callable that says nothing."""


class StderrProgress:
    """Progress lines on stderr, each with the seconds since ``t0`` (a ``time.perf_counter()``
    reading; default: now). The commands pass :data:`clv.STARTED`, so the clock counts the
    seconds since the command started, its imports included."""

    def __init__(self, prefix: str = "backtest", t0: float | None = None) -> None:
        self.prefix = prefix
        self.t0 = time.perf_counter() if t0 is None else t0

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.t0
        print(f"[{self.prefix} {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def resolve(progress: bool | Progress, prefix: str) -> Progress:
    """A ``progress`` argument as the callable it stands for: itself, lines on stderr
    (``True``) or nothing (``False``)."""
    if callable(progress):
        return progress
    return StderrProgress(prefix) if progress else quiet


@contextlib.contextmanager
def heartbeat(say: Progress, doing: str, every_s: float | None = None) -> Iterator[None]:
    """Say ``still <doing> (<n>s)`` every ``every_s`` seconds (default :data:`HEARTBEAT_S`)
    until the block ends.

    The lines come from a daemon thread, which the block's end stops and joins (at once, even
    when the block raises). The fits it watches spend their time in compiled code that lets go
    of the GIL, so the lines keep coming while they run."""
    if say is quiet:
        yield
        return
    interval = HEARTBEAT_S if every_s is None else every_s
    done = threading.Event()
    t0 = time.perf_counter()

    def beat() -> None:
        while not done.wait(interval):
            say(f"still {doing} ({time.perf_counter() - t0:.0f}s)")

    thread = threading.Thread(target=beat, name=f"heartbeat: {doing}", daemon=True)
    try:  # started inside: a SIGTERM raised while it starts still stops it
        thread.start()
        yield
    finally:
        done.set()
        if thread.ident is not None:
            thread.join()
