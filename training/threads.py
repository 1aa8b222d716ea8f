"""How many threads the numeric libraries' pools get when training or backtesting.

One each, unless the environment chooses (``OMP_NUM_THREADS`` and friends). HistGradientBoosting's
OpenMP workers spin while they wait for each other, and when the cores are busy with anything
else (consumers, the API, another job) that costs far more than the second thread gains.
One run of ``python -m benchmarks.bench_threads`` on a 2-core machine: with the cores idle, the
default two threads took 1.96 s against 2.06 s with one; with both cores busy, 38.6 s against
3.2 s. A user walking through ``clv backtest`` on a busy machine saw one fit go from 10 s to
more than ten minutes.
"""

from __future__ import annotations

import os

from threadpoolctl import threadpool_limits

#: The variables by which the environment sets the pools' sizes itself.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def one_thread_unless_set() -> bool:
    """Limit the BLAS and OpenMP pools of numpy, scipy and scikit-learn to one thread each,
    unless one of :data:`THREAD_VARS` is set; whether it did. Call it in the thread that will
    fit: OpenMP's limit holds for the thread that sets it (a worker thread still gets every
    core)."""
    if any(os.environ.get(v) for v in THREAD_VARS):
        return False
    # threadpoolctl limits the pools that are loaded: load the libraries that own them first
    import scipy.linalg  # noqa: F401  (scipy's OpenBLAS)
    import sklearn.ensemble  # noqa: F401  (scikit-learn's OpenMP runtime)

    threadpool_limits(1)
    return True
