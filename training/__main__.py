"""``python -m training [--force] [--again] [--quiet] [--candidates=a,b]``: one training run,
as the stack's retraining starts it (:func:`training.train.main`).

A SIGTERM while Python still imports pandas, scikit-learn and the rest (the parent cancelling a
run that has just started) ends it as one later would: ``error: terminated``, exit 143, not the
bare signal. Nothing has been read or written by then.
"""

from __future__ import annotations

import signal
import sys

from clv._start import guarded

sys.exit(guarded("training.train", {signal.SIGTERM: (b"error: terminated\n", 143)})())
