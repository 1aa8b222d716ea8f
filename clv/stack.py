"""``clv up``: the whole stack in one process, local servers started only where none run."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.connection import parse_url

from clv.errors import StackError
from clv.files import check_usable_dir
from clv.local_stack import (
    LocalStack,
    kafka_host_port,
    port_open,
    redis_host_port,
    start_broker,
    start_redis,
)
from clv.settings import Settings
from clv.stopping import (
    StoppedWhileStarting,
    cancel_and_wait,
    stop_or_first_done,
    unless_stopped,
)
from feature_store.redis_client import cluster_mode

log = logging.getLogger(__name__)

T = TypeVar("T")

#: When a slow start step is first said, and how often after (a group join on the local
#: broker outlasted 5 s in each `clv demo` run: said only when it takes longer than that).
SAY_AFTER_S, SAY_EVERY_S = 15.0, 15.0


def ensure_servers(settings: Settings, stack: LocalStack, workdir: Path) -> list[str]:
    """Start a local redis-server / broker on the configured address where nothing listens."""
    started = []
    host, port = redis_host_port(settings.redis_url)
    if (
        _plain_redis(settings.redis_url)
        and not port_open(host, port)
        and host in ("localhost", "127.0.0.1")
    ):
        # with the URL's credentials: a server started for a URL with a password requires it
        auth = parse_url(settings.redis_url)
        stack.processes.append(
            start_redis(
                port,
                workdir / "redis",
                username=auth.get("username"),
                password=auth.get("password"),
            )
        )
        started.append(f"redis-server on {host}:{port}")
    host, port = kafka_host_port(settings.kafka_bootstrap)
    # tansu speaks plaintext only: a TLS or SASL client could not use one started here
    plain_kafka = settings.kafka_security_protocol == "PLAINTEXT"
    if plain_kafka and not port_open(host, port) and host in ("localhost", "127.0.0.1"):
        stack.processes.append(start_broker(port, workdir / "kafka"))
        started.append(f"Kafka-protocol broker (tansu, in-memory) on {host}:{port}")
    return started


def _plain_redis(url: str) -> bool:
    """A URL a local redis-server would answer: TCP, no TLS, not a cluster (a unix socket has no
    port to start one on; a plain server on a cluster's address would only fail later)."""
    return urlparse(url).scheme == "redis" and not cluster_mode(url)[0]


@dataclass
class Running:
    """Handles the running stack exposes (for ``clv demo`` and health checks)."""

    settings: Settings
    redis: Redis | RedisCluster
    tasks: list[asyncio.Task[object]] = field(default_factory=list)
    consumers: list[AIOKafkaConsumer] = field(default_factory=list)


async def wait_healthy(
    running: Running,
    timeout: float = 60,
    *,
    say: Callable[[str], None] | None = None,
    say_after: float = 5,
) -> None:
    """Redis answers and every feature consumer holds partitions. ``say`` hears what is awaited
    once the wait passes ``say_after`` seconds, and every :data:`SAY_EVERY_S` after (slow is
    not hung)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline, next_say = start + timeout, start + say_after
    waiting = "nothing checked yet"
    while loop.time() < deadline:
        for t in running.tasks:
            # (exception() of a cancelled task raises CancelledError, which would read as the
            # wait itself being cancelled)
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise StackError(f"a component failed while starting: {t.exception()}")
        try:
            await running.redis.ping()
        except Exception as exc:  # not up yet; said if it never comes up
            waiting = f"Redis at {server_where(running.settings.redis_url)} does not answer: {exc}"
        else:
            idle = sum(1 for c in running.consumers if not c.assignment())
            if not idle:
                return
            waiting = (
                "the feature consumers were given no partitions of the orders topic"
                if idle == len(running.consumers)
                else f"{idle} of {len(running.consumers)} feature consumers were given no "
                "partition of the orders topic (a group puts no more consumers to work than "
                "the topic has partitions: fewer --consumers, or more partitions)"
            )
        if say is not None and loop.time() >= next_say:
            say(f"waiting for the stack ({loop.time() - start:.0f}s): {waiting}")
            next_say = loop.time() + SAY_EVERY_S
        await asyncio.sleep(0.2)
    raise StackError(f"the stack was not healthy within {timeout:.0f}s: {waiting}")


def server_where(url: str) -> str:
    """Where a server URL points, for messages: no scheme, credentials or query (a password
    may sit in the user part or in ``?password=``)."""
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        return parsed.path
    host, port = redis_host_port(url)
    return f"{host}:{port}{parsed.path.rstrip('/')}"


async def run_stack(
    settings: Settings,
    stop: asyncio.Event,
    *,
    workdir: Path = Path(".clv"),
    consumers: int = 1,
    retrain_every_s: float | None = 3600.0,
    on_ready: Callable[[Running], Awaitable[None]] | None = None,
    say: Callable[[str], None] | None = None,
) -> None:
    """Run consumers, archiver, scorer, API and retraining until ``stop``; servers started
    here are stopped. ``say`` hears the stack's own lines (by default they are printed, each
    at once: stdout piped to a file or a supervisor is not left holding them)."""
    if say is None:
        say = functools.partial(print, flush=True)
    from consumers.archiver import Archiver
    from consumers.dead_letters import DeadLetters
    from consumers.feature_consumer import FeatureConsumer, open_clients
    from consumers.kafka import ensure_topics, topic_partitions
    from consumers.metrics import metrics_served
    from feature_store.redis_store import FeatureStore
    from service.scorer import run_scorer
    from service.server import api_url, bind, serve_api
    from training.registry import ModelRegistry
    from training.train import retrain_forever

    # Before any server starts: a log or model directory that cannot be written ends it now.
    check_usable_dir(settings.event_log_dir, "the event log", "CLV_EVENT_LOG_DIR")
    if retrain_every_s:
        ModelRegistry(settings.model_dir).check_writable()
    stack = LocalStack()
    metrics = contextlib.ExitStack()
    try:
        metrics.enter_context(metrics_served(settings))  # a port in use: at once, as a setting
        api_socket = bind(settings)  # the API's address in use: at once too
        metrics.callback(api_socket.close)
        # Starting servers polls their ports with sleeps: keep that off the event loop.
        for line in await asyncio.to_thread(ensure_servers, settings, stack, workdir):
            say(f"started {line}")
        await unless_stopped(stop, ensure_topics(settings))
        topic = settings.orders_topic
        parts = len(await unless_stopped(stop, topic_partitions(settings, topic)))
        if consumers > parts:
            # A group gives each partition to one consumer: the rest would idle, and the wait
            # for every consumer to get work would run out only after a minute.
            raise StackError(
                f"--consumers {consumers} is more than the {parts} partitions of {topic}: a "
                f"consumer group puts at most one consumer on a partition; run {parts} or "
                "fewer, or give the topic more partitions"
            )
        async with contextlib.AsyncExitStack() as clients:
            groups = [settings.consumer_group] * consumers + [settings.archiver_group]
            # A consumer's start returns only once its group has given it partitions: a group
            # held for members that left can keep that up for minutes, so it is said.
            joining = (
                f"the consumer groups {settings.consumer_group} and {settings.archiver_group} "
                "have not given their consumers partitions yet (a join takes seconds; a group "
                "held for members that left can take minutes: a new group name or a broker "
                "restart ends that)"
            )
            opened = await unless_stopped(
                stop, said_while(open_clients(clients, settings, groups), say, joining)
            )
            redis, producer, kafka_consumers = opened.redis, opened.producer, opened.consumers
            *feature_consumers, archive_consumer = kafka_consumers
            running = Running(settings, redis, consumers=list(feature_consumers))
            store = FeatureStore(redis, prefix=settings.key_prefix)
            dlq = DeadLetters(producer, settings.dlq_topic)
            running.tasks = [
                asyncio.create_task(FeatureConsumer(settings, c, store, dlq).run(stop))
                for c in feature_consumers
            ]
            archiver = Archiver(settings, archive_consumer, settings.event_log_dir)
            running.tasks.append(asyncio.create_task(archiver.run(stop)))
            running.tasks.append(asyncio.create_task(run_scorer(settings, stop, redis, producer)))
            running.tasks.append(asyncio.create_task(serve_api(settings, stop, api_socket)))
            if retrain_every_s:
                # Runs until cancelled; each training is a child process.
                running.tasks.append(
                    asyncio.create_task(retrain_forever(settings, retrain_every_s))
                )
            try:
                await unless_stopped(stop, wait_healthy(running, say=say))
                host, port = api_socket.getsockname()[:2]
                say(
                    f"clv is up: consumers={consumers} kafka={settings.kafka_bootstrap} "
                    f"redis={server_where(settings.redis_url)} "
                    f"event log={settings.event_log_dir} API={api_url(host, port)}"
                )
                if on_ready is not None:
                    await _ready_unless_stopped(stop, on_ready(running), running.tasks)
                else:
                    await _until_stopped_or_failed(stop, running.tasks)
            finally:
                stop.set()  # the consumers finish the batches in hand and return
                if retrain_every_s:
                    running.tasks[-1].cancel()
                results = await asyncio.gather(*running.tasks, return_exceptions=True)
        failed = [
            r
            for r in results
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
        ]
        if failed:
            raise StackError(f"a component of the stack failed: {failed[0]!r}") from failed[0]
    except StoppedWhileStarting:
        say("stopped before the stack was up")
    finally:
        metrics.close()
        await asyncio.to_thread(stack.stop)


async def said_while(step: Awaitable[T], say: Callable[[str], None], what: str) -> T:
    """``step``'s result; while it takes longer than :data:`SAY_AFTER_S`, ``what`` is said
    every :data:`SAY_EVERY_S` with the time waited (slow is not hung)."""
    task = asyncio.ensure_future(step)
    loop = asyncio.get_running_loop()
    start, wait = loop.time(), SAY_AFTER_S
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=wait)
            if done:
                return task.result()
            say(f"waiting for the stack ({loop.time() - start:.0f}s): {what}")
            wait = SAY_EVERY_S
    finally:
        if not task.done():  # cancelled: the step with it
            await cancel_and_wait(task)


async def _ready_unless_stopped(
    stop: asyncio.Event, ready: Awaitable[None], tasks: list[asyncio.Task[object]]
) -> None:
    """Run ``ready`` (what runs on the stack once it is up: the demo's replay, its wait for the
    consumers' commits, its training) until it ends, ``stop`` is set or a component fails;
    in the last two cases it is cancelled. It may be waiting on the components (for commits a
    stopped or failed consumer will never make), so it cannot be left to finish."""
    task = asyncio.ensure_future(ready)
    try:
        await stop_or_first_done(stop, [task, *tasks])
    finally:
        if not task.done():
            await cancel_and_wait(task)
    if not task.cancelled():
        task.result()  # its own failure is the command's


async def _until_stopped_or_failed(stop: asyncio.Event, tasks: list[asyncio.Task[object]]) -> None:
    """Return when ``stop`` is set or any component ends (a component ends only by failing)."""
    await stop_or_first_done(stop, tasks)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.error("stopping the stack: a component failed: %r", t.exception())
