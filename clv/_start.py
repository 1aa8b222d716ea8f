"""The ``clv`` command's entry point, kept light.

Python spends about 0.6 s importing clv (typer, aiokafka, redis, pydantic, pandas: 0.61 s
cumulative for ``clv.cli`` by ``python -X importtime``) before :func:`clv.cli.main` handles
signals. A Ctrl-C or SIGTERM in that window ends the command with one line and exit 130 or
143, as it ends a command interrupted in its work, not a traceback or a bare signal exit;
nothing has started by then. (A service stopped once it runs, ``clv up`` or ``consume``, exits
0 instead: a clean stop.) A signal the command was started with ignored (``nohup``) stays
ignored. The stack's training child starts the same way (``training/__main__.py``).
"""

from __future__ import annotations

import importlib
import os
import signal
from collections.abc import Callable, Mapping
from types import FrameType

#: What a signal during the imports prints, and the exit code it ends with.
Said = Mapping[signal.Signals, tuple[bytes, int]]

_CLV: Said = {
    signal.SIGINT: (b"clv: interrupted\n", 130),
    signal.SIGTERM: (b"clv: terminated\n", 143),
}


def guarded(module: str, said: Said) -> Callable[[], int]:
    """Import ``module`` with the signals in ``said`` ending the process as it says; return
    the module's ``main``, with the signals' handlers as they were before."""

    def while_importing(signum: int, frame: FrameType | None) -> None:
        line, code = said[signal.Signals(signum)]
        os.write(2, line)
        os._exit(code)  # mid-import: no unwinding through half-initialised modules

    replaced = {}
    for sig in said:
        handler = signal.getsignal(sig)
        if handler in (signal.SIG_DFL, signal.default_int_handler):
            replaced[sig] = handler
            signal.signal(sig, while_importing)
    try:
        entry: Callable[[], int] = importlib.import_module(module).main
    finally:  # also when the import fails: a caller that goes on must not keep os._exit
        for sig, handler in replaced.items():
            signal.signal(sig, handler)
    return entry


def main() -> int:
    return guarded("clv.cli", _CLV)()
