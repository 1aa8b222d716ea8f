"""``clv demo``: the stack, CDNOW replayed as live events, and what the service makes of it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import time
from importlib.resources import files
from pathlib import Path

import httpx
import pandas as pd
from aiokafka.structs import ConsumerRecord
from redis.exceptions import RedisClusterException, RedisError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from clv.errors import ClvError
from clv.replay import encode_rows, load_events, publish
from clv.settings import Settings
from clv.stack import Running, run_stack, server_where
from clv.stopping import StoppedWhileStarting, unless_stopped
from consumers.dead_letters import describe
from consumers.kafka import read_topic, wait_committed
from feature_store.features import FEATURE_NAMES, RETENTION_DAYS, day_date, day_number
from feature_store.offline import features_at
from feature_store.redis_client import connect
from feature_store.redis_store import FeatureStore
from service.scores import ScoreStore

console = Console(width=132)  # the features table's names in full (132: a wide terminal)

DEMO_CANDIDATES = (
    "naive_rate",
    "bgnbd_gg",
    "tweedie_glm",
    "hgb_poisson",
    "hybrid_btyd_features",
    "hybrid_btyd_residual",
)

# A few broken messages, to show the dead-letter topic at work.
BAD_MESSAGES: list[tuple[bytes, bytes]] = [
    (b"bad-1", b"this is not JSON"),
    (
        b"bad-2",
        b'{"event_id":"x1","type":"purchase","user_id":"u1","order_id":"o","amount":-5,'
        b'"ts":"1997-03-01T00:00:00Z"}',
    ),
    (
        b"bad-3",
        b'{"event_id":"x2","type":"purchase","user_id":"u1","order_id":"o","amount":5,'
        b'"ts":"2999-01-01T00:00:00Z"}',
    ),
]


async def run_demo(settings: Settings, stop: asyncio.Event, *, keep_running: bool = False) -> bool:
    """Whether the demo ran to its end (a stop before it, a Ctrl-C, ends it at any step)."""
    from training.registry import ModelRegistry

    # CDNOW is history: "now" is the latest event time, not today's date.
    settings = settings.model_copy(update={"clock": "event"})
    ModelRegistry(settings.model_dir).check_writable()  # it trains at the end: know it now
    try:  # (a Redis that accepts and never answers would hold a Ctrl-C for its timeout)
        prefix = await unless_stopped(stop, _unused_prefix(settings))
    except StoppedWhileStarting:
        return False
    if prefix != settings.key_prefix:
        console.print(
            f"[yellow]the Redis at {server_where(settings.redis_url)} already holds clv state "
            f"under '{settings.key_prefix}' (an earlier demo's, if clv did not start that Redis): "
            f"the demo replays CDNOW from its start, so it keeps its state under '{prefix}' "
            f"(CLV_KEY_PREFIX={prefix} for commands against this stack); "
            f"`redis-cli --scan --pattern '{settings.key_prefix}*'` lists the older "
            "keys[/yellow]",
            soft_wrap=True,
        )
        settings = settings.model_copy(update={"key_prefix": prefix})
    finished: list[bool] = []  # one element once the show has run to its end

    async def show(running: Running) -> None:
        try:
            await _show(settings, running)
        except asyncio.CancelledError:  # a Ctrl-C (or a failed component) ends the stack
            console.print("[yellow]stopped before the demo finished[/yellow]")
            raise
        finished.append(True)
        # CDNOW ended in 1998: by the wall clock every window is empty, so the event clock
        hint = (
            f"[bold]export CLV_CLOCK=event[/bold] first (the data ends in 1998: every command "
            "against this stack must read 'now' from the events, as the demo does; a scorer "
            "with the wall clock is refused), then [bold].venv/bin/clv features 00001[/bold] "
            "or [bold]curl "
            f"{_api_url(settings)}/users/00001/clv[/bold]"
        )
        if keep_running:
            console.print(f"still running; in another terminal try {hint}", soft_wrap=True)
            console.print("[bold]Ctrl-C stops the stack[/bold]")
            await stop.wait()
        else:
            console.print(
                f"`clv demo --keep-running` keeps the stack up afterwards, to try {hint}",
                soft_wrap=True,
            )

    await run_stack(settings, stop, on_ready=show, retrain_every_s=None, say=console.print)
    return bool(finished)


async def _unused_prefix(settings: Settings) -> str:
    """``CLV_KEY_PREFIX``, or when a running Redis already holds users under it (a Redis
    that outlives the stack: a system service, compose's), the first of ``<prefix>-demo2``,
    ``-demo3``, ... under which it holds none. Replayed over an earlier run's state, every
    user's features would be as of its latest event, and the demo's look back at 1997-12-31
    could not be answered online. A Redis that does not answer yet (the stack starts one)
    holds nothing."""
    redis = connect(settings.redis_url)
    try:
        for n in range(1, 1000):
            prefix = settings.key_prefix if n == 1 else f"{settings.key_prefix}-demo{n}"
            async with contextlib.aclosing(FeatureStore(redis, prefix=prefix).scan_users()) as held:
                if await anext(held, None) is None:
                    return prefix
        where = server_where(settings.redis_url)
        raise ClvError(f"the Redis at {where} holds 999 demos' state: delete some")
    except (RedisError, RedisClusterException, OSError):
        return settings.key_prefix
    finally:
        await redis.aclose()


#: The demo replays CDNOW in two parts: the orders up to this day, then the rest. The champion
#: is trained on the first part; the second part is time passing, which the scorer follows.
SPLIT = dt.date(1997, 12, 31)


async def _show(settings: Settings, running: Running) -> None:
    path = Path(str(files("clv").joinpath("data/CDNOW_master.txt.gz")))
    events = load_events(path, "cdnow", settings)
    split = day_number(SPLIT)
    first, rest = events[events["day"] <= split], events[events["day"] > split]
    console.rule(
        f"replaying CDNOW: {len(events):,} orders of {events['user_id'].nunique():,} customers; "
        f"first the {len(first):,} up to {SPLIT}"
    )
    messages = encode_rows(first, settings.max_event_bytes) + BAD_MESSAGES
    t0 = time.monotonic()
    await _publish(settings, messages)
    took = time.monotonic() - t0
    store = FeatureStore(running.redis, prefix=settings.key_prefix)
    console.print(f"published and applied {len(messages):,} messages in {took:.1f}s")

    # Online (Redis) against offline (the same feature code over the file), for the top spenders.
    offline = features_at(first, split, late_after_days=RETENTION_DAYS)
    top = offline.sort_values("revenue_total", ascending=False).head(5).index
    title = f"features in Redis as of the event clock, {SPLIT} (top spenders)"
    table = Table(title=title)
    cols = [
        "orders_total",
        "revenue_total",
        "orders_90d",
        "revenue_365d",
        "frequency",
        "recency_days",
        "age_days",
        "avg_repeat_value",
    ]
    table.add_column("user")
    for c in cols:
        table.add_column(c, justify="right", min_width=len(c))  # feature names, not "revenue_t…"
    online_rows = []
    for uid in top:
        frame = await store.features(uid, split)
        assert frame is not None
        online_rows.append(frame)
        row = frame.loc[uid]
        table.add_row(uid, *[f"{row[c]:g}" for c in cols])
    console.print(table)
    online = pd.concat(online_rows)
    same = online[list(FEATURE_NAMES)].equals(offline.loc[top, list(FEATURE_NAMES)])
    console.print(f"online features == offline features (same code over the file): {same}")
    letters = [describe(r) for r in await read_topic(settings, settings.dlq_topic)]
    table = Table(title=f"dead-letter topic {settings.dlq_topic}: {len(letters)} message(s)")
    for c in ("reason", "source", "original value"):
        table.add_column(c)
    for d in letters:
        value = d["value"] if isinstance(d["value"], bytes) else b""
        table.add_row(
            str(d["reason"]),
            f"{d['topic']}/{d['partition']}@{d['offset']}",
            value[:60].decode("utf-8", "replace"),
        )
    console.print(table)
    version = await _train_and_score(settings, online, events)
    await _scored(settings, running, int(first["day"].max()), version)
    async with httpx.AsyncClient(base_url=_api_url(settings), timeout=30) as api:
        await _show_api(api, "GET /users/top?limit=5", "/users/top", {"limit": 5})
        best = (await api.get("/users/top", params={"limit": 1})).json()["users"][0]["user_id"]
        await _show_api(api, f"GET /users/{best}/clv", f"/users/{best}/clv", {})

        # Time passes: the rest of the orders. Customers who stop buying lose value, and the
        # valuable ones among them are alerted on.
        console.rule(f"replaying the rest: {len(rest):,} orders after {SPLIT} (time passing)")
        t0 = time.monotonic()
        await _publish(settings, encode_rows(rest, settings.max_event_bytes))
        last = int(events["day"].max())
        await _scored(settings, running, last, version)
        console.print(f"published, applied and scored in {time.monotonic() - t0:.1f}s")
        _show_alerts(settings, await read_topic(settings, settings.alerts_topic))
        await _show_api(
            api,
            "GET /users/top?limit=5&segment=at_risk",
            "/users/top",
            {"limit": 5, "segment": "at_risk"},
        )


async def _publish(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    """Publish ``messages`` and wait until the feature consumers have applied them."""
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("publishing", total=len(messages))
        await publish(settings, messages, progress=lambda n: bar.advance(task, n))
    await wait_committed(settings, settings.consumer_group, timeout=900)


def _api_url(settings: Settings) -> str:
    from service.server import api_url

    return api_url(settings.api_host, settings.api_port)


async def _scored(settings: Settings, running: Running, day: int, version: str) -> None:
    """Wait until the scorer has scored everyone as of ``day`` with the model ``version``."""
    scores = ScoreStore(running.redis, prefix=settings.key_prefix)
    want = scores.sweep_mark(day, version, settings.horizon_days)
    with console.status(f"the scorer is scoring every customer as of {day_date(day)}"):
        for _ in range(1800):
            if await scores.last_sweep() == want:
                break
            await asyncio.sleep(0.5)
        else:
            raise ClvError(f"the scorer did not score the customers as of {day_date(day)}")
    count = await running.redis.zcard(scores.top_key())
    console.print(f"the scorer scored {count:,} customers as of {day_date(day)} with {version}")


async def _show_api(
    api: httpx.AsyncClient, title: str, path: str, params: dict[str, str | int]
) -> None:
    answer = await api.get(path, params=params)
    if answer.status_code != 200:
        raise ClvError(f"{title} answered {answer.status_code}: {answer.text}")
    body = answer.json()
    if "users" in body:
        table = Table(title=f"{title} ({body['ranked_users']:,} ranked)")
        for c in ("user_id", "clv", "expected_orders", "p_alive", "churn_risk", "segment"):
            table.add_column(c, justify="right")
        for u in body["users"]:
            table.add_row(
                *(
                    f"{u[c]:g}" if isinstance(u[c], float) else str(u[c])
                    for c in (
                        "user_id",
                        "clv",
                        "expected_orders",
                        "p_alive",
                        "churn_risk",
                        "segment",
                    )
                )
            )
        console.print(table)
        return
    shown = {
        k: body[k]
        for k in (
            "user_id",
            "as_of",
            "horizon_days",
            "clv",
            "expected_orders",
            "p_alive",
            "churn_risk",
            "segment",
            "model_version",
            "score_source",
            "explanation",
        )
    }
    console.print(f"[bold]{title}[/bold] (abridged: the features and times left out)")
    console.print_json(data=shown)


def _show_alerts(settings: Settings, records: list[ConsumerRecord[bytes, bytes]]) -> None:
    alerts = [json.loads(r.value) for r in records if r.value is not None]
    alerts.sort(key=lambda a: -a["previous_clv"])
    table = Table(
        title=f"churn-risk alerts on {settings.alerts_topic}: {len(alerts):,} (most valuable first)"
    )
    for c in ("user_id", "previous_clv", "current_clv", "drop_pct", "p_alive", "segment", "as_of"):
        table.add_column(c, justify="right")
    for a in alerts[:8]:
        table.add_row(
            *(
                str(a[c])
                for c in (
                    "user_id",
                    "previous_clv",
                    "current_clv",
                    "drop_pct",
                    "p_alive",
                    "segment",
                    "as_of",
                )
            )
        )
    console.print(table)


async def train_champion(settings: Settings, until: dt.date | None = None) -> None:
    """Train from the event log (as ``clv train`` does, on :data:`DEMO_CANDIDATES`), in a
    child process as ``clv up`` retrains: cancelled (a Ctrl-C), it ends at once, in a fit or
    while it waits for another run's turn on the log; a run in a thread went on after the demo
    had stopped, and could register a model then. Its progress and its one line, as
    ``clv train`` prints them, are printed here as they come."""
    from training.train import run_training_child

    console.rule("training from the event log (time-split selection of the champion)")

    def relay(line: str) -> None:
        console.print(line, soft_wrap=True, markup=False, highlight=False)

    # The demo leaves out the two slowest candidates (random forest, exact gradient boosting)
    # and ridge, the weakest; `clv train` compares all of them.
    code, _, _ = await run_training_child(
        settings, candidates=list(DEMO_CANDIDATES), relay=relay, until=until
    )
    if code < 0:  # nothing said: the OOM killer, a kill -9
        try:
            name = signal.Signals(-code).name
        except ValueError:  # a signal Python has no name for
            name = f"signal {-code}"
        raise ClvError(
            f"training from the event log {settings.event_log_dir} was killed by {name}"
            + (" (out of memory?)" if -code == signal.SIGKILL else "")
        )
    if code != 0:  # it said why, above
        raise ClvError(f"training from the event log {settings.event_log_dir} failed (exit {code})")


def events_not_replayed(event_log_dir: Path, replayed: pd.DataFrame) -> int:
    """How many events of the log are not among ``replayed`` (by user and event id): what an
    earlier ``clv replay`` into a kept demo stack left there, which training reads too."""
    from feature_store.event_log import read_events

    log = read_events(event_log_dir)
    ours = pd.MultiIndex.from_frame(replayed[["user_id", "event_id"]])
    return int((~pd.MultiIndex.from_frame(log[["user_id", "event_id"]]).isin(ours)).sum())


async def _train_and_score(settings: Settings, online: pd.DataFrame, replayed: pd.DataFrame) -> str:
    """Train from the event log the archiver wrote, then score the users whose online
    features (read from Redis above) are ``online``; ``replayed``: the events the demo sent."""
    from training.registry import load_champion

    await wait_committed(settings, settings.archiver_group, timeout=900)
    others = await asyncio.to_thread(events_not_replayed, settings.event_log_dir, replayed)
    if others:
        console.print(
            f"[yellow]the event log {settings.event_log_dir} also holds {others:,} "
            f"event{'s' if others != 1 else ''} the demo did not replay (a `clv replay` into "
            "an earlier demo's stack?): training reads them too; `rm -rf data/events models` "
            "starts the demo afresh[/yellow]",
            soft_wrap=True,
        )
    await train_champion(settings, until=SPLIT)
    champion = await asyncio.to_thread(load_champion, settings.model_dir)
    horizon = settings.horizon_days  # as the API and the scorer forecast (CLV_HORIZON_DAYS)
    pred = champion.model.predict(online[list(FEATURE_NAMES)], horizon)
    title = (
        f"champion {champion.version} ({champion.metadata['model_name']}): "
        f"value over the next {horizon} days"
    )
    table = Table(title=title, min_width=len(title))  # a title on one line
    for c in ("user", "predicted_value", "expected_orders", "p_alive"):
        table.add_column(c, justify="right", min_width=len(c))
    for uid, row in pred.iterrows():
        table.add_row(
            str(uid),
            f"{row['predicted_value']:.2f}",
            f"{row['expected_orders']:.2f}",
            f"{row['p_alive']:.2f}",
        )
    console.print(table)
    return champion.version
