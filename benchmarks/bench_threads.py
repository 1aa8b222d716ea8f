"""HistGradientBoosting's OpenMP threads on a busy machine: the same fits with one thread and
with the default (every core), timed in one run while one busy process per core holds the CPU.

``python -m benchmarks.bench_threads``: prints both times and their ratio (the README's advice to
run ``clv train`` by hand with ``OMP_NUM_THREADS=1`` on a shared machine rests on it)."""

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
X = rng.random((1500, 8)); y = rng.poisson(np.exp(X[:, 0]))
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
    hogs = [mp.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 1)]
    for h in hogs:
        h.start()
    time.sleep(1)
    try:
        one, default = _timed("1"), _timed(None)
    finally:
        for h in hogs:
            h.terminate()
    print(f"3 HistGradientBoosting fits with {len(hogs)} busy processes on {len(hogs)} cores:")
    print(f"one thread {one:.2f}s, default threads {default:.2f}s: ratio {default / one:.1f}")


if __name__ == "__main__":
    main()
