"""Child processes that end with the process that started them.

The local servers and the training child run in process groups of their own, so that a
terminal's Ctrl-C reaches ``clv`` alone and ``clv`` stops them in order. A ``clv`` killed outright
(SIGKILL, the OOM killer) runs no cleanup, and they would outlive it, holding their ports. On
Linux the kernel sends a child a chosen signal when its parent ends (``PR_SET_PDEATHSIG``);
elsewhere nothing is set and the old behaviour stays.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # looked up here, not between fork and exec


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child sent SIGTERM when its parent ends, or ``None`` where
    the platform cannot.

    Linux's "parent" is the *thread* that forked: start children from a thread that lives as
    long as they should (the main thread, or the event loop's executor, whose threads end only
    when the loop does). A parent that died before the child's ``prctl`` ran would never send
    it; the child then sees another parent and ends at once."""
    prctl = _PRCTL
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec
