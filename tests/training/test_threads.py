"""Training and backtests fit with one thread per numeric pool unless the environment says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from training.threads import THREAD_VARS

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, threading
from threadpoolctl import threadpool_info
from training.threads import one_thread_unless_set
import training.train  # what clv train imports first: it loads no OpenMP runtime yet

seen = {"limited": one_thread_unless_set()}
from sklearn.utils._openmp_helpers import _openmp_effective_n_threads
seen["after"] = _openmp_effective_n_threads()
seen["pools"] = sorted({p["num_threads"] for p in threadpool_info()})

def worker():  # the demo trains in a worker thread and calls it there
    seen["worker before"] = _openmp_effective_n_threads()
    one_thread_unless_set()
    seen["worker after"] = _openmp_effective_n_threads()

t = threading.Thread(target=worker)
t.start()
t.join()
print(json.dumps(seen))
"""


def _probe(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )
    return json.loads(done.stdout)


def test_one_thread_unless_the_environment_chooses() -> None:
    seen = _probe()
    assert seen["limited"] is True
    assert seen["after"] == seen["worker after"] == 1 and seen["pools"] == [1]
    assert seen["worker before"] == (os.cpu_count() or 1)  # another thread: not limited yet
    chosen = _probe(OMP_NUM_THREADS="2")
    assert chosen["limited"] is False
    assert chosen["after"] == chosen["worker before"] == chosen["worker after"] == 2
    assert _probe(OMP_NUM_THREADS="")["limited"] is True  # set but empty chooses nothing
