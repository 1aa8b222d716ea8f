"""clv: streaming customer-lifetime-value service (entry points, settings, local stack)."""

from __future__ import annotations

import time

#: When this process started running clv code (before the heavy imports), for the commands'
#: progress clocks: ``[train 3.1s]`` counts the seconds a user has waited, imports included.
STARTED = time.perf_counter()

__version__ = "0.1.0"
