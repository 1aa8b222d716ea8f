"""``make bench-apply``: the feature store's Lua batch apply alone, one script against another.

No Kafka: the ingest benchmark's stream (default 500,000 events over 50,000 users, 1%
duplicates, 5% out of order, 3% refunds) is validated once, then applied through
``FeatureStore.apply`` in batches to one ``redis-server``, emptied before each apply. Each
round applies it with every script given (``--script FILE``, repeatable; the default is the
store's own script and, with ``--against REV``, the script as it was at a git revision),
alternating their order over the rounds, and checks that all of them leave the same state in
Redis (unless ``--formats-differ``: a script that stores the state in another layout).

Prints each script's median microseconds per event, for the whole apply and for Redis's time
inside the script (``INFO commandstats``: what bounds a consumer that keeps Redis busy), their
ranges, and each median as a ratio of the first script's from the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_ingest import make_stream, seconds_in_scripts
from clv.local_stack import free_port, start_redis
from feature_store.events import ValidEvent, validate
from feature_store.redis_client import connect
from feature_store.redis_store import _SCRIPT, FeatureStore

NOW_MS = 1_700_000_000_000


async def apply_all(
    address: str, script: str, events: list[ValidEvent], batch: int
) -> tuple[float, float]:
    """Seconds to apply ``events`` in batches, and Redis's seconds inside the script (``INFO
    commandstats``); the store is left for :func:`snapshot`."""
    redis = connect(address)
    try:
        await redis.flushall()
        await redis.config_resetstat()
        store = FeatureStore(redis, prefix="bench", script=script)
        t0 = time.perf_counter()
        for i in range(0, len(events), batch):
            await store.apply(
                events[i : i + batch],
                group="bench",
                progress={"orders:0": i + batch},
                now_ms=NOW_MS,
            )
        seconds = time.perf_counter() - t0
        return seconds, await seconds_in_scripts(redis)
    finally:
        await redis.aclose()


async def snapshot(address: str) -> dict[bytes, dict[bytes, bytes]]:
    redis = connect(address)
    try:
        keys = [k async for k in redis.scan_iter(match="bench:*", count=1000)]
        return {k: await redis.hgetall(k) for k in keys}  # type: ignore[misc]
    finally:
        await redis.aclose()


def script_at(rev: str) -> str:
    return subprocess.run(
        ["git", "show", f"{rev}:feature_store/lua/apply_batch.lua"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


async def main(args: argparse.Namespace, scripts: list[tuple[str, str]]) -> None:
    print(f"stream: {args.events:,} events over {args.users:,} users", file=sys.stderr)
    events = [
        validate(value, now_ms=2_000_000_000_000)
        for _, value in make_stream(args.events, args.users)
    ]
    work = Path(tempfile.mkdtemp(prefix="clv-bench-apply-"))
    redis_p = start_redis(free_port(), work / "redis")
    times: dict[str, list[float]] = {name: [] for name, _ in scripts}
    in_redis: dict[str, list[float]] = {name: [] for name, _ in scripts}
    try:
        for r in range(args.rounds):
            order = scripts if r % 2 == 0 else scripts[::-1]
            states = []
            for name, text in order:
                seconds, script_s = await apply_all(redis_p.address, text, events, args.batch)
                times[name].append(seconds / len(events) * 1e6)
                in_redis[name].append(script_s / len(events) * 1e6)
                states.append(await snapshot(redis_p.address))
                print(
                    f"  round {r + 1}/{args.rounds} {name}: {times[name][-1]:.2f} us/event, "
                    f"{in_redis[name][-1]:.2f} in the script",
                    file=sys.stderr,
                )
            # The header holds the wall clock of the apply, equal here (NOW_MS), so the whole
            # state must match byte for byte.
            if not args.formats_differ and any(s != states[0] for s in states[1:]):
                raise SystemExit("the scripts left different states in Redis")
    finally:
        redis_p.stop()
    print("us/event, median over the rounds [range]; 'in Redis' is the time inside the script")
    print(f"{'script':<32} {'apply':>22} {'vs first':>9} {'in Redis':>22} {'vs first':>9}")
    for name, _ in scripts:
        cells = []
        for figures in (times, in_redis):
            t, base = figures[name], statistics.median(figures[scripts[0][0]])
            med = statistics.median(t)
            cells.append(f"{med:>7.2f} [{min(t):.2f}-{max(t):.2f}] {med / base:>9.3f}")
        print(f"{name[-32:]:<32} {cells[0]:>32} {cells[1]:>32}")


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=500_000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=5_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--against", metavar="REV", help="also the script at this git revision")
    p.add_argument("--script", action="append", default=[], metavar="FILE")
    p.add_argument(
        "--formats-differ", action="store_true", help="do not compare the states they leave"
    )
    args = p.parse_args()
    scripts: list[tuple[str, str]] = [("current", _SCRIPT)]
    if args.against:
        scripts.append((args.against, script_at(args.against)))
    scripts += [(f, Path(f).read_text()) for f in args.script]
    asyncio.run(main(args, scripts))


if __name__ == "__main__":
    cli()
