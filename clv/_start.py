"""The ``clv`` command's entry point, kept light.

Python spends about 0.6 s importing clv (typer, aiokafka, redis, pydantic, pandas: 0.61 s
cumulative for ``clv.cli`` by ``python -X importtime``) before :func:`clv.cli.main` handles
signals. A Ctrl-C or SIGTERM in that window ends the command as it would a moment later, with
one line and exit 130 or 143, not a traceback or a bare signal exit; nothing has started by
then. A signal the command was started with ignored (``nohup``) stays ignored.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

_SAID = {signal.SIGINT: (b"clv: interrupted\n", 130), signal.SIGTERM: (b"clv: terminated\n", 143)}


def _while_importing(signum: int, frame: FrameType | None) -> None:
    line, code = _SAID[signal.Signals(signum)]
    os.write(2, line)
    os._exit(code)  # mid-import: no unwinding through half-initialised modules


def main() -> int:
    replaced = {}
    for sig in _SAID:
        handler = signal.getsignal(sig)
        if handler in (signal.SIG_DFL, signal.default_int_handler):
            replaced[sig] = handler
            signal.signal(sig, _while_importing)
    from clv.cli import main as cli_main

    for sig, handler in replaced.items():
        signal.signal(sig, handler)
    return cli_main()
