"""HistGradientBoosting's OpenMP threads, idle and busy: the same fits with one thread and with
the default (every core), timed in one run with no busy process of ours, then while one busy
process per core holds the CPU. Each condition alternates the two settings ``--rounds`` times
(drift hits both alike) and reports the median and range; the load average is printed with each,
as "idle" is only as idle as the shared machine is.

``python -m benchmarks.bench_threads``: prints the times and their ratios (the reason
:mod:`training.threads` gives ``clv train`` and ``clv backtest`` one thread by default)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
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
    out = subprocess.run(
        [sys.executable, "-c", FITS], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def _alternated(rounds: int) -> tuple[list[float], list[float]]:
    one: list[float] = []
    default: list[float] = []
    for i in range(rounds):  # ABBA order: neither setting always runs first
        for threads in ("1", None) if i % 2 == 0 else (None, "1"):
            (one if threads else default).append(_timed(threads))
    return one, default


def _report(title: str, one: list[float], default: list[float]) -> None:
    m1, md = statistics.median(one), statistics.median(default)
    print(f"{title} ({', '.join(f'{x:.2f}' for x in os.getloadavg())} load average):")
    print(
        f"one thread {m1:.2f}s ({min(one):.2f}-{max(one):.2f}), default threads {md:.2f}s "
        f"({min(default):.2f}-{max(default):.2f}), {len(one)} rounds: ratio of medians "
        f"{md / m1:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    ap.add_argument("--rounds", type=int, default=3)
    rounds = ap.parse_args().rounds
    cores = len(os.sched_getaffinity(0))  # what OpenMP's default uses, not the host's count
    _report(f"3 HistGradientBoosting fits, {cores} cores, no busy process", *_alternated(rounds))
    hogs = [mp.Process(target=_spin, daemon=True) for _ in range(cores)]
    for h in hogs:
        h.start()
    time.sleep(1)
    try:
        busy = _alternated(rounds)
    finally:
        for h in hogs:
            h.terminate()
    _report(f"3 HistGradientBoosting fits with {len(hogs)} busy processes on {cores} cores", *busy)


if __name__ == "__main__":
    main()
