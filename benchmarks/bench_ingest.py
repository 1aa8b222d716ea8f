"""``make bench-ingest``: the feature consumer's throughput against a bare consume-and-decode loop.

One run, one broker, one Redis, the same topic:

1. produce a realistic stream (default 500,000 events over 50,000 users across a year, 1%
   duplicates, 5% out of order, 3% refunds);
2. the ceiling: a bare aiokafka group consumer that only fetches and decodes every value with
   the consumer's own decoder (``msgspec`` into ``OrderEvent``; ``--ceiling-decode json`` for
   ``json.loads``, as runs before 2026-11-30 did: it costs ~9x the consumer's decode and lowers
   the ceiling);
3. the feature consumer (validation, dead letters, the Lua batch apply, commits) in a fresh
   group, until all its offsets are committed (its window ends at its last commit);
4. the ceiling again (the machine is shared and noisy: the ratio uses the mean of both).

Both sides are timed from the return of their first non-empty fetch ("first record") and from
before ``start()`` ("from start", which adds the same group join to both and flatters the ratio).

Prints both rates, their ratio and Redis memory per user.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from clv.local_stack import free_port, start_broker, start_redis
from clv.replay import publish
from clv.settings import Settings
from consumers.dead_letters import DeadLetters
from consumers.feature_consumer import FeatureConsumer
from consumers.kafka import ensure_topics, make_consumer, make_producer
from feature_store.events import OrderEvent
from feature_store.redis_client import connect
from feature_store.redis_store import FeatureStore

DAY_MS = 86_400_000


def make_stream(events: int, users: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """(key, value) messages: a year of orders, 3% refunds, 5% out of order, 1% duplicates."""
    rng = np.random.default_rng(seed)
    start_ms = 1_700_000_000_000 - 400 * DAY_MS
    # Heterogeneous users: purchase propensity ~ gamma, so some buy often and most rarely.
    weights = rng.gamma(0.8, 1.0, users)
    user = np.concatenate(
        [np.arange(users), rng.choice(users, size=events - users, p=weights / weights.sum())]
    )
    rng.shuffle(user)
    ts = np.sort(rng.integers(start_ms, start_ms + 365 * DAY_MS, events))
    amount = np.round(rng.gamma(2.0, 25.0, events), 2)
    refund = rng.random(events) < 0.03
    order = np.arange(events)
    # 5% out of order: delivered up to ~2,000 positions (hours) after their time order.
    pos = order.astype(np.float64)
    late = rng.random(events) < 0.05
    pos[late] += rng.integers(1, 2000, late.sum())
    seq = np.argsort(pos, kind="stable")
    # 1% duplicates: the same message again, a little later (as a retrying producer sends it).
    dup_src = rng.choice(events, size=events // 100, replace=False)
    messages: list[tuple[bytes, bytes]] = []
    for i in seq:
        uid = f"user-{user[i]:06d}"
        kind = "refund" if refund[i] else "purchase"
        body = {
            "event_id": f"evt-{i:08d}",
            "type": kind,
            "user_id": uid,
            "order_id": f"ord-{i if not refund[i] else max(i - 1, 0):08d}",
            "amount": float(amount[i] if not refund[i] else round(amount[i] / 4, 2)),
            "currency": "USD",
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts[i]) / 1000)),
        }
        messages.append((uid.encode(), json.dumps(body).encode()))
    rank = np.empty(events, dtype=np.int64)
    rank[seq] = np.arange(events)
    keys = np.concatenate(
        [
            np.arange(events, dtype=np.float64),
            rank[dup_src] + rng.integers(1, 3000, len(dup_src)) + 0.5,
        ]
    )
    everything = messages + [messages[int(rank[i])] for i in dup_src]
    return [everything[j] for j in np.argsort(keys, kind="stable")]


async def produce(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    sent = 0

    def show(n: int) -> None:
        nonlocal sent
        sent += n
        print(f"\r  produced {sent:,}/{len(messages):,}", end="", file=sys.stderr, flush=True)

    await publish(settings, messages, progress=show)
    print(file=sys.stderr)


def decoder(kind: str) -> Callable[[bytes], object]:
    """The ceiling's decode: the consumer's own (typed msgspec, no checks) or json.loads."""
    return json.loads if kind == "json" else msgspec.json.Decoder(OrderEvent).decode


async def ceiling(settings: Settings, total: int, decode: str = "msgspec") -> tuple[float, float]:
    """Bare loop: group consumer, fetch, decode. Returns (seconds from start, from first
    record) to read ``total`` messages."""
    c = make_consumer(settings, f"ceiling-{uuid.uuid4().hex[:6]}", settings.orders_topic)
    t0 = time.perf_counter()
    await c.start()
    seen = 0
    first = None
    loads = decoder(decode)
    try:
        while seen < total:
            batch = await c.getmany(timeout_ms=200, max_records=settings.consume_batch)
            for records in batch.values():
                if first is None:
                    first = time.perf_counter()
                for r in records:
                    loads(r.value)
                seen += len(records) if records else 0
        t1 = time.perf_counter()
    finally:
        await c.stop()
    return t1 - t0, t1 - (first or t0)


async def seconds_in_scripts(redis: Any) -> float:
    """Redis's time inside scripts (EVAL, EVALSHA) since its stats were last reset."""
    stats = await redis.info("commandstats")
    return sum(v["usec"] for k, v in stats.items() if k.startswith("cmdstat_eval")) / 1e6


class Busy(msgspec.Struct):
    """Where the consumer's window went: this process's CPU time (the consumer's Python:
    fetching, validation, encoding, the clients) and Redis's time in the apply script."""

    window_s: float
    python_cpu_s: float
    redis_script_s: float


async def feature_consumer(
    settings: Settings, total: int
) -> tuple[float, float, FeatureConsumer, Busy]:
    redis = connect(settings.redis_url)
    await redis.config_resetstat()
    producer = make_producer(settings)
    await producer.start()
    kc = make_consumer(settings, settings.consumer_group, settings.orders_topic)
    stop = asyncio.Event()
    first: float | None = None  # the return of the first non-empty fetch, as in ceiling()
    cpu_first = 0.0
    last_commit = 0.0  # the end of the consumer's work: its last commit's return
    cpu_last = 0.0
    fetch, commit = kc.getmany, kc.commit

    async def timed_fetch(*a: Any, **kw: Any) -> Any:
        nonlocal first, cpu_first
        batch = await fetch(*a, **kw)
        if first is None and batch:
            first = time.perf_counter()
            cpu_first = time.process_time()
        return batch

    async def timed_commit(*a: Any, **kw: Any) -> None:
        nonlocal last_commit, cpu_last
        await commit(*a, **kw)
        last_commit = time.perf_counter()
        cpu_last = time.process_time()

    kc.getmany, kc.commit = timed_fetch, timed_commit
    t0 = time.perf_counter()
    await kc.start()
    worker = FeatureConsumer(
        settings,
        kc,
        FeatureStore(redis, prefix=settings.key_prefix),
        DeadLetters(producer, settings.dlq_topic),
    )
    task = asyncio.create_task(worker.run(stop))
    try:
        parts = None
        while True:
            await asyncio.sleep(0.02)
            st = worker.stats
            done = st.applied + st.duplicates + st.rejected + st.too_late
            if done >= total:
                # everything applied; done once every partition's commit is in
                parts = parts or list(kc.assignment())
                positions = {tp: await kc.position(tp) for tp in parts}
                commits = {tp: await kc.committed(tp) for tp in parts}
                if all(commits[tp] == positions[tp] for tp in parts):
                    break
        t1 = last_commit  # not this poll's wake-up nor the checks' round trips
        script_s = await seconds_in_scripts(redis)
    finally:
        stop.set()
        await task
        await kc.stop()
        await producer.stop()
        await redis.aclose()
    busy = Busy(t1 - (first or t0), cpu_last - cpu_first, script_s)
    return t1 - t0, t1 - (first or t0), worker, busy


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="clv-bench-"))
    redis_p = start_redis(free_port(), work / "redis")
    broker_p = start_broker(free_port(), work / "kafka")
    try:
        settings = Settings(
            kafka_bootstrap=broker_p.address,
            redis_url=redis_p.address,
            orders_partitions=args.partitions,
            consume_batch=args.batch,
        )
        await ensure_topics(settings)
        print(f"generating {args.events:,} events over {args.users:,} users ...", file=sys.stderr)
        messages = make_stream(args.events, args.users)
        await produce(settings, messages)
        total = len(messages)
        redis = connect(settings.redis_url)
        await redis.flushall()
        base_mem = (await redis.info("memory"))["used_memory"]

        c1 = await ceiling(settings, total, args.ceiling_decode)
        print(f"  ceiling run 1: {total / c1[1]:,.0f} events/s", file=sys.stderr)
        f = await feature_consumer(settings, total)
        print(f"  feature consumer: {total / f[1]:,.0f} events/s", file=sys.stderr)
        c2 = await ceiling(settings, total, args.ceiling_decode)
        print(f"  ceiling run 2: {total / c2[1]:,.0f} events/s", file=sys.stderr)

        mem = (await redis.info("memory"))["used_memory"] - base_mem
        users = sum([1 async for _ in redis.scan_iter(f"{settings.key_prefix}:{{*", count=10_000)])
        await redis.aclose()
        st = f[2].stats
        ceil_steady = total / ((c1[1] + c2[1]) / 2)
        ceil_start = total / ((c1[0] + c2[0]) / 2)
        feat_steady = total / f[1]
        feat_start = total / f[0]
        print()
        print(
            f"stream: {total:,} messages ({args.events:,} events + duplicates), {args.users:,} "
            f"users, {args.partitions} partitions, batch {args.batch}, ceiling decode "
            f"{args.ceiling_decode}"
        )
        print(
            f"feature consumer: applied {st.applied:,}, duplicates {st.duplicates:,}, "
            f"too late {st.too_late:,}, rejected {st.rejected:,}, batches {st.batches:,}"
        )
        print(f"{'':24}{'ceiling':>14}{'consumer':>14}{'ratio':>8}")
        print(
            f"{'events/s (first record)':24}{ceil_steady:>14,.0f}{feat_steady:>14,.0f}"
            f"{feat_steady / ceil_steady:>8.3f}"
        )
        print(
            f"{'events/s (from start)':24}{ceil_start:>14,.0f}{feat_start:>14,.0f}"
            f"{feat_start / ceil_start:>8.3f}"
        )
        busy = f[3]
        print(
            f"consumer's window {busy.window_s:.2f} s: its Python busy "
            f"{busy.python_cpu_s / busy.window_s:.0%} (CPU {busy.python_cpu_s:.2f} s), Redis in "
            f"the apply script {busy.redis_script_s / busy.window_s:.0%} "
            f"({busy.redis_script_s / st.batches * 1e3 if st.batches else 0:.1f} ms a batch)"
        )
        print(
            f"redis memory: {mem / max(users, 1):,.0f} bytes per user ({users:,} users, "
            f"{mem / 2**20:,.1f} MiB)"
        )
    finally:
        broker_p.stop()
        redis_p.stop()


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=500_000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument(
        "--ceiling-decode",
        choices=["msgspec", "json"],
        default="msgspec",
        help="the ceiling's decode: the consumer's own decoder (default) or json.loads (as before)",
    )
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()
