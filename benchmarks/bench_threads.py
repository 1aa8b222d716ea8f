"""HistGradientBoosting's OpenMP threads, idle and busy: the same fits with one thread and with
the default (every core), timed in one run with the cores otherwise idle, then while one busy
process per core holds the CPU.

``python -m benchmarks.bench_threads``: prints the times and their ratios (the reason
:mod:`training.threads` gives ``clv train`` and ``clv backtest`` one thread by default)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time

FITS = """
import time, numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
rng = np.random.default_rng(0)
X = rng.random((50000, 12)); y = rng.poisson(np.exp(X[:, 0]))
t = time.perf_counter()
for _ in range(3):
    HistGradientBoostingRegressor(loss="poisson", max_iter=100, early_stopping=False).fit(X, y)
print(time.perf_counter() - t)
"""


def _spin() -> None:
    while True:
        pass


def _timed(threads: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    out = subprocess.run([sys.executable, "-c", FITS], env=env, capture_output=True, text=True)
    return float(out.stdout.strip())


def main() -> None:
    cores = os.cpu_count() or 1
    idle_one, idle_default = _timed("1"), _timed(None)
    print(f"3 HistGradientBoosting fits, {cores} cores otherwise idle:")
    print(
        f"one thread {idle_one:.2f}s, default threads {idle_default:.2f}s: "
        f"ratio {idle_default / idle_one:.2f}"
    )
    hogs = [mp.Process(target=_spin, daemon=True) for _ in range(cores)]
    for h in hogs:
        h.start()
    time.sleep(1)
    try:
        one, default = _timed("1"), _timed(None)
    finally:
        for h in hogs:
            h.terminate()
    print(f"3 HistGradientBoosting fits with {len(hogs)} busy processes on {cores} cores:")
    print(f"one thread {one:.2f}s, default threads {default:.2f}s: ratio {default / one:.2f}")


if __name__ == "__main__":
    main()
