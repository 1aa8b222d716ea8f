"""Training at scale: ``clv synth`` 1M users / 10M orders into an event log, then ``train`` on it.

Prints the wall time and peak memory of each phase and the ceiling it is measured against
(10 minutes and 8 GiB on a 2-core machine). Training selects the champion on a sample of users
and fits it on all of them. A last phase fits BG/NBD + Gamma-Gamma alone on every user's
features as of the log's last day, against its own ceiling of one minute.

Memory: the synth phase runs as a child process (its peak RSS from
``getrusage(RUSAGE_CHILDREN)``); training runs in this process. Each phase's peak is the
kernel's high-water mark (``VmHWM`` in ``/proc/self/status``), read when the phase ends and then
reset (``echo 5 > /proc/self/clear_refs``), so no short peak is missed; the overall peak of
training is the largest of its phases'. (A sampling thread would need the GIL, which a long C
call holds while it allocates: it missed a 1.5 GiB transient entirely in a check.) Where the
reset is not allowed, the peaks fall back to 20 ms sampling of ``/proc/self/statm`` and are
lower bounds.

    python -m benchmarks.bench_train [--users N] [--orders M] [--days D] [--max-users K]
        [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CEILING_S = 600.0
BTYD_CEILING_S = 60.0
CEILING_BYTES = 8 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _hwm() -> int:
    """This process's peak RSS since the last reset (``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset ``VmHWM`` (and with it ``getrusage(RUSAGE_SELF).ru_maxrss``) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhaseMemory:
    """Peak RSS per phase: the kernel's high-water mark, reset at every phase boundary; a
    sampling daemon thread only where the reset is refused (then the peaks are lower bounds)."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.exact = _reset_hwm()
        self._stop = threading.Event()
        self._every = every_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def overall(self) -> int:
        """The peak over every phase (``ru_maxrss`` no longer holds it once reset)."""
        return max(self.peaks.values(), default=0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._every)

    def sample(self) -> None:
        rss = _hwm() if self.exact else _rss()
        if rss > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = rss

    def set_phase(self, name: str) -> None:
        """Close the running phase; ``""`` (a phase's end) attributes what follows to it still."""
        self.sample()
        if name:
            self.phase = name
            if self.exact:
                _reset_hwm()
            self.sample()

    def __enter__(self) -> PhaseMemory:
        if not self.exact:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.sample()
        if not self.exact:
            self._stop.set()
            self._thread.join()


def cores() -> str:
    """The CPUs this process may use (affinity, and a cgroup quota if one is set)."""
    n = len(os.sched_getaffinity(0))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            return f"{n} CPUs, cgroup quota {int(quota) / int(period):g}"
    except (OSError, ValueError):
        pass
    return f"{n} CPUs"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--orders", type=int, default=10_000_000)
    ap.add_argument("--days", type=int, default=730)
    ap.add_argument("--max-users", type=int, default=None, help="training's user sample cap")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the data here")
    args = ap.parse_args(argv)

    from clv.settings import Settings
    from training.train import DEFAULT_MAX_USERS, train

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    events_dir, models_dir = work / "events", work / "models"
    shutil.rmtree(events_dir, ignore_errors=True)
    shutil.rmtree(models_dir, ignore_errors=True)
    print(
        f"bench-train: {args.users:,} users, {args.orders:,} orders over {args.days} days, "
        f"{cores()}, {load()}; data in {work}",
        flush=True,
    )

    # Phase 1: the synthetic log, generated by the real command in a child process.
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "clv",
        "synth",
        "--users",
        str(args.users),
        "--orders",
        str(args.orders),
        "--days",
        str(args.days),
        "--seed",
        "1",
        "--out",
        str(events_dir),
    ]
    subprocess.run(cmd, check=True)
    synth_s = time.perf_counter() - t0
    synth_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    # Phase 2: training from the event log, in this process.
    settings = Settings(event_log_dir=events_dir, model_dir=models_dir)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t1 = time.perf_counter()
    with PhaseMemory() as mem:
        result = train(
            settings,
            progress=True,
            on_phase=mem.set_phase,
            max_users=args.max_users or DEFAULT_MAX_USERS,
        )
    train_s = time.perf_counter() - t1
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    train_cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    if mem.exact:
        train_rss = mem.overall
    else:
        train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # Phase 3: the probabilistic model alone on every user (the features, then the fit).
    from feature_store.event_log import read_events
    from training.datasets import purchasers_at
    from training.models.btyd import BGNBDGammaGamma

    with PhaseMemory() as mem3:
        mem3.set_phase("btyd: features")
        t2 = time.perf_counter()
        events = read_events(events_dir)
        feats = purchasers_at(events, int(events["day"].max()))
        del events
        features_s = time.perf_counter() - t2
        mem3.set_phase("btyd: fit")
        t3 = time.perf_counter()
        btyd = BGNBDGammaGamma().fit_features(feats)
        btyd_s = time.perf_counter() - t3

    rows = [("clv synth (child process)", synth_s, synth_rss)]
    rows += [
        (f"train: {name}", secs, mem.peaks.get(name, 0))
        for name, secs in result.timings.items()
        if name != "total"
    ]
    rows.append(("train total (this process)", train_s, train_rss))
    rows.append(("BG/NBD+GG: read + features", features_s, mem3.peaks.get("btyd: features", 0)))
    rows.append(("BG/NBD+GG: fit", btyd_s, mem3.peaks.get("btyd: fit", 0)))
    print()
    print(f"{'phase':<32} {'wall':>9} {'peak RSS':>11}")
    for name, secs, rss in rows:
        print(f"{name:<32} {secs:>8.1f}s {gib(rss):>11}")
    total_s = synth_s + train_s
    peak = max(synth_rss, train_rss)
    ok = train_s <= CEILING_S and peak <= CEILING_BYTES
    btyd_ok = btyd_s <= BTYD_CEILING_S
    print(
        f"\nmodel {result.version} ({result.model_name}); {result.events:,} events, "
        f"{result.users:,} users, selection on {result.sampled_users:,}, final fit on all"
    )
    print(result.summary())
    at_scale = (args.users, args.orders) == (1_000_000, 10_000_000)
    print(
        f"training {train_s:.0f}s (ceiling {CEILING_S:.0f}s, ratio {train_s / CEILING_S:.2f}; "
        f"CPU {train_cpu:.0f}s), synth+training {total_s:.0f}s; "
        f"peak RSS {gib(peak)} (ceiling {gib(CEILING_BYTES)}): "
        f"{('OK' if ok else 'OVER') if at_scale else 'no verdict: not the 1M/10M target size'}"
        f"\n{cores()}, {load()} (the ceilings are fixed, not measured in this run: the ratios are "
        "only as comparable between runs as the machines' load)"
    )
    print(
        f"BG/NBD+GG fit on {len(feats):,} users {btyd_s:.1f}s "
        f"(ceiling {BTYD_CEILING_S:.0f}s, ratio {btyd_s / BTYD_CEILING_S:.2f}): "
        f"{('OK' if btyd_ok else 'OVER') if len(feats) >= 1_000_000 else 'no verdict: < 1M users'}"
        f"; {btyd.bgnbd_}, {btyd.gg_}"
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok and btyd_ok else 1


if __name__ == "__main__":
    sys.exit(main())
