"""``make bench-serving``: the scorer's sweep and the API's answers, each against a ceiling
measured in the same run on the same servers.

Data: the CDNOW orders up to 1997-12-31 (23,570 customers) applied to a redis-server of its own;
the champion trained on them as ``clv train --until 1997-12-31`` would (``hybrid_btyd_residual``
and BG/NBD + Gamma-Gamma as the only candidates, so it takes seconds).

* **Sweep**: :meth:`Scorer.sweep` scores and stores every customer (reads their state, computes
  the features, predicts, decides alerts, writes scores and rankings). Ceiling: reading the
  same users' states in the same chunks and nothing else (``scan_users`` + ``read_states``),
  the part no scorer can skip. Ratio: users/s of the sweep over users/s of the ceiling. The
  check that ends each sweep (users with no features taken off the rankings) is also run
  again alone, and its time given as a share of the sweep's.
* **API**: ``clv serve`` in a child process; ``wrk`` (Debian's package; a Python client was
  the bottleneck, at a tenth of wrk's rate on a bare FastAPI app) sends ``GET /users/{id}/clv``
  for random customers for ``--seconds`` over ``--concurrency`` connections, twice: as of the
  last sweep's day (the scorer's stored answers) and as of the day after (nothing stored: each
  scored at the request, with its explanation's counterfactuals); then ``GET /healthz`` the
  same way (the same server: what the HTTP stack alone allows). Ratios: requests/s of each
  over the last. wrk shares the machine's two cores with the server; the ratio is what
  counts.
* **Memory**: what Redis holds per customer after the sweep (``MEMORY USAGE`` of the feature
  state, the score hash and the stored answer).

    python -m benchmarks.bench_serving [--seconds S] [--concurrency C] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd

from clv.local_stack import free_port, start_broker, start_redis
from clv.replay import encode_rows, load_events
from clv.settings import Settings
from feature_store.event_log import write_events
from feature_store.events import ValidEvent, validate
from feature_store.features import day_number
from feature_store.redis_client import connect
from feature_store.redis_store import FeatureStore

DATA = Path(__file__).resolve().parents[1] / "clv" / "data" / "CDNOW_master.txt.gz"
UNTIL = dt.date(1997, 12, 31)
NOW_MS = 2_000_000_000_000  # a clock after every order (validation refuses future ones)


def _valid_events(frame: pd.DataFrame) -> list[ValidEvent]:
    """The orders as the feature consumers see them: encoded as messages, then validated."""
    return [validate(value, now_ms=NOW_MS) for _, value in encode_rows(frame)]


async def _load(settings: Settings, events: list[ValidEvent]) -> None:
    redis = connect(settings.redis_url)
    try:
        store = FeatureStore(redis, prefix=settings.key_prefix)
        for i in range(0, len(events), 5000):
            await store.apply(
                events[i : i + 5000], group="bench", progress={"orders:0": i}, now_ms=0
            )
    finally:
        await redis.aclose()


async def _sweep_vs_reads(settings: Settings, rounds: int) -> list[tuple[float, float, float, int]]:
    from consumers.kafka import ensure_topics, make_producer
    from service.champion import Champion
    from service.scorer import Scorer, prune_rankings

    await ensure_topics(settings)
    redis = connect(settings.redis_url)
    producer = make_producer(settings)
    await producer.start()
    out = []
    try:
        champion = Champion(settings.model_dir)
        await champion.refresh()
        assert champion.loaded is not None
        scorer = Scorer(settings, redis, champion, producer)
        store = scorer.features
        day = day_number(UNTIL)
        stop = asyncio.Event()
        for r in range(rounds):
            await redis.delete(scorer.scores.swept_key)
            t0 = time.perf_counter()
            n = 0
            async for users in store.scan_users(settings.score_batch):
                n += len((await store.read_states(users)).state)
            reads = time.perf_counter() - t0
            t0 = time.perf_counter()
            # (the last round as of UNTIL: the API's stored answers are of that day)
            swept = await scorer.sweep(champion.loaded, day - rounds + 1 + r, asyncio.Event())
            sweep = time.perf_counter() - t0
            assert swept == n, (swept, n)
            t0 = time.perf_counter()
            assert await prune_rankings(store, scorer.scores, settings.score_batch, stop) == 0
            prune = time.perf_counter() - t0
            out.append((reads, sweep, prune, n))
            print(
                f"  round {r + 1}: read {n:,} states in {reads:.2f}s, swept in {sweep:.2f}s "
                f"(its rankings check, run again alone: {prune:.2f}s)"
            )
    finally:
        await producer.stop()
        await redis.aclose()
    return out


async def _memory(settings: Settings, users: list[str]) -> dict[str, float]:
    """Mean ``MEMORY USAGE`` per customer (bytes, over the first 2,000) of what Redis holds for
    each: the feature state, the score hash and the stored answer."""
    from service.scores import ScoreStore

    redis = connect(settings.redis_url)
    try:
        store = FeatureStore(redis, prefix=settings.key_prefix)
        scores = ScoreStore(redis, prefix=settings.key_prefix)
        keys = {"state": store.user_key, "score": scores.score_key, "answer": scores.answer_key}
        sample = users[:2000]
        return {
            name: statistics.mean([await redis.memory_usage(key(u)) or 0 for u in sample])
            for name, key in keys.items()
        }
    finally:
        await redis.aclose()


def _wrk(url: str, seconds: float, concurrency: int, script: Path | None = None) -> float:
    """Requests per second ``wrk`` made (one thread, ``concurrency`` connections); every answer
    must be a 200."""
    args = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency"]
    if script is not None:
        args += ["-s", str(script)]
    done = subprocess.run([*args, url], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    if "Non-2xx" in done.stdout:
        raise RuntimeError(f"answers other than 200:\n{done.stdout}")
    for line in done.stdout.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(f"wrk printed no rate:\n{done.stdout}{done.stderr}")


def _api(
    url: str, users: list[str], args: argparse.Namespace, work: Path
) -> list[tuple[float, float, float]]:
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    else:
        raise RuntimeError("clv serve did not get ready")
    # random customers, the same sequence each round: as of UNTIL (the day of the last sweep:
    # the scorer's stored answers) and as of the day after (nothing stored: scored at the
    # request)
    after = UNTIL + dt.timedelta(days=1)
    scripts = {}
    ids = ",".join(f'"{u}"' for u in users)
    for name, day in (("stored", UNTIL), ("request", after)):
        check = httpx.get(f"{url}/users/{users[0]}/clv", params={"as_of": str(day)}).json()
        if check["score_source"] != name:
            raise RuntimeError(f"as of {day}: answered from {check['score_source']}, not {name}")
        scripts[name] = work / f"{name}.lua"
        scripts[name].write_text(
            f"local users = {{{ids}}}\nmath.randomseed(0)\n"
            "request = function()\n"
            "  local user = users[math.random(#users)]\n"
            f'  return wrk.format(nil, "/users/" .. user .. "/clv?as_of={day}")\n'
            "end\n"
        )
    out = []
    for r in range(args.rounds):
        stored = _wrk(url, args.seconds, args.concurrency, scripts["stored"])
        request = _wrk(url, args.seconds, args.concurrency, scripts["request"])
        health = _wrk(f"{url}/healthz", args.seconds, args.concurrency)
        out.append((stored, request, health))
        print(
            f"  round {r + 1}: /users/{{id}}/clv stored {stored:,.0f} req/s, "
            f"scored at the request {request:,.0f} req/s, /healthz {health:,.0f} req/s"
        )
    return out


def _serve(settings: Settings) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLV_")}
    env.update(settings.as_env())
    return subprocess.Popen([sys.executable, "-m", "clv", "serve"], env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from training.train import train

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        redis = start_redis(free_port(), work / "redis")
        broker = start_broker(free_port(), work / "broker")
        try:
            settings = Settings(
                redis_url=redis.address,
                kafka_bootstrap=broker.address,
                model_dir=work / "models",
                event_log_dir=work / "events",
                api_port=free_port(),
                clock="event",
            )
            events = load_events(DATA, "cdnow")
            events = events[events["day"] <= day_number(UNTIL)]
            write_events(settings.event_log_dir, events)
            print(f"training on {len(events):,} CDNOW orders up to {UNTIL}")
            result = train(
                settings, progress=False, candidates=["bgnbd_gg", "hybrid_btyd_residual"]
            )
            print(f"champion {result.version} ({result.model_name})")
            asyncio.run(_load(settings, _valid_events(events)))
            users = sorted(events["user_id"].unique())
            print(f"sweep of {len(users):,} customers against reading their states:")
            sweeps = asyncio.run(_sweep_vs_reads(settings, args.rounds))
            ratios = [reads / sweep for reads, sweep, _, _ in sweeps]
            print(
                f"sweep: {statistics.median(n / s for _, s, _, n in sweeps):,.0f} users/s, "
                f"reads alone {statistics.median(n / r for r, _, _, n in sweeps):,.0f} users/s, "
                f"ratio {statistics.median(ratios):.3f} (rounds: "
                + ", ".join(f"{x:.3f}" for x in ratios)
                + "); the rankings check at its end is "
                + f"{statistics.median(p / s for _, s, p, _ in sweeps):.1%} of the sweep's time"
            )
            memory = asyncio.run(_memory(settings, users))
            print(
                "Redis per customer (MEMORY USAGE, mean of 2,000): "
                + ", ".join(f"{name} {size:,.0f} bytes" for name, size in memory.items())
            )
            print(
                f"API: wrk, {args.seconds:g} s a round, {args.concurrency} connections "
                "(clv serve in a child process):"
            )
            server = _serve(settings)
            try:
                rates = _api(f"http://127.0.0.1:{settings.api_port}", users, args, work)
            finally:
                server.terminate()
                server.wait(60)
            for k, what in ((0, "the scorer's stored answer"), (1, "scored at the request")):
                ratios = [r[k] / r[2] for r in rates]
                print(
                    f"API, {what}: /users/{{id}}/clv "
                    f"{statistics.median(r[k] for r in rates):,.0f} req/s, /healthz "
                    f"{statistics.median(r[2] for r in rates):,.0f} req/s, ratio "
                    f"{statistics.median(ratios):.3f} (rounds: "
                    + ", ".join(f"{x:.3f}" for x in ratios)
                    + ")"
                )
        finally:
            broker.stop()
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
