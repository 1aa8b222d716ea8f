"""``clv up`` on addresses where nothing runs: it starts Redis and the broker, runs, and on
Ctrl-C stops everything it started."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from redis.asyncio import Redis

from clv.errors import StackError
from clv.local_stack import (
    LocalProcess,
    LocalStack,
    free_port,
    kafka_host_port,
    port_open,
    redis_host_port,
    start_redis,
)
from clv.settings import Settings
from clv.stack import Running, ensure_servers, run_stack, wait_healthy
from consumers.kafka import ensure_topics
from feature_store.redis_client import connect
from tests.consumers.kafka_helpers import unique_settings
from tests.processes import children, lines_until

pytestmark = pytest.mark.integration


def _clv_on_free_ports(
    tmp_path: Path, *args: str, buffered: bool = False
) -> tuple[subprocess.Popen[str], int, int, int]:
    """``clv ARGS`` in a session of its own (like a terminal's foreground job), with Redis, the
    broker and the metrics on free local ports (so it starts its own servers), its folders
    under ``tmp_path``, its stdout and stderr one pipe; and the three ports. ``buffered``:
    without PYTHONUNBUFFERED, as a pipe usually is."""
    redis_port, kafka_port, metrics_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLV_")}
    if buffered:
        env.pop("PYTHONUNBUFFERED", None)
    env.update(
        CLV_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        CLV_KAFKA_BOOTSTRAP=f"127.0.0.1:{kafka_port}",
        CLV_EVENT_LOG_DIR=str(tmp_path / "events"),
        CLV_MODEL_DIR=str(tmp_path / "models"),
        CLV_METRICS_PORT=str(metrics_port),
        CLV_API_PORT=str(free_port()),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "clv", *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return proc, redis_port, kafka_port, metrics_port


def test_up_says_it_is_up_at_once_into_a_pipe(tmp_path: Path) -> None:
    # Fails if (stack.py) clv up's own lines are printed without a flush: into a pipe or a
    # file (`nohup`, `| tee`, a supervisor's log) they stayed in the buffer until it ended.
    proc, _, _, _ = _clv_on_free_ports(tmp_path, "up", "--retrain-every", "0", buffered=True)
    watchdog = threading.Timer(120, proc.kill)  # a bound, not a timing: a held line ends it
    watchdog.start()
    try:
        lines = lines_until(proc, "clv is up")
        assert proc.poll() is None, "".join(lines)  # said while running, not at its exit
        assert any("started redis-server" in line for line in lines)
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGHUP, signal.SIGKILL], ids=["ctrl-c", "hangup", "killed"]
)
def test_up_starts_local_servers_that_end_with_it(tmp_path: Path, sig: int) -> None:
    proc, redis_port, kafka_port, metrics_port = _clv_on_free_ports(
        tmp_path, "up", "--retrain-every", "0"
    )
    lines: list[str] = []
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("clv is up"):
                break
        assert any(line.startswith("clv is up") for line in lines), "".join(lines)
        assert any("started redis-server" in line for line in lines)
        assert any("started Kafka-protocol broker" in line for line in lines)
        assert port_open("127.0.0.1", redis_port) and port_open("127.0.0.1", kafka_port)
        # Fails if clv up drops its own INFO lines (where it serves metrics; each retraining's
        # outcome), as the root logger's WARNING level did.
        assert any(f"metrics at http://127.0.0.1:{metrics_port}/metrics" in x for x in lines)
        # Fails if clv up does not serve the stream processes' metrics at CLV_METRICS_PORT.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as answer:
            assert "clv_consumer_batches_total" in answer.read().decode()
        # A terminal's Ctrl-C (or its closing) goes to the whole foreground group: the servers
        # must not take it, or they die before the consumers finish and commit (or outlive a
        # clv that a hangup killed).
        pids = children(proc.pid)
        assert len(pids) == 2 and all(os.getpgid(p) != proc.pid for p in pids)
        os.killpg(proc.pid, sig)
        # Killed outright, clv stops nothing itself: the kernel ends its servers (fails if they
        # are started without clv.orphans.die_with_parent, and outlive it on their ports).
        expected = -signal.SIGKILL if sig == signal.SIGKILL else 0
        assert proc.wait(60) == expected, "".join(lines) + (proc.stdout.read() or "")
        rest = proc.stdout.read()
        assert "Traceback" not in rest and "Unable connect" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
        servers = {"redis-server": redis_port, "broker": kafka_port}
        for _ in range(50):
            left = [name for name, port in servers.items() if port_open("127.0.0.1", port)]
            if not left:
                break
            time.sleep(0.1)
        if left:  # killed here, so that a failure leaves no servers behind for the suite
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert not left, f"left running: {left}"


async def test_a_stack_that_never_gets_healthy_says_what_it_waited_for() -> None:

    port = free_port()  # nobody there; a password in the user part and in the query
    settings = Settings(redis_url=f"redis://u:secret@127.0.0.1:{port}/0?password=secret")
    redis = connect(settings.redis_url)
    try:
        said: list[str] = []
        with pytest.raises(StackError) as info:
            await wait_healthy(Running(settings, redis), timeout=1, say=said.append, say_after=0)
        quiet: list[str] = []
        with pytest.raises(StackError):
            await wait_healthy(Running(settings, redis), timeout=1, say=quiet.append, say_after=5)
    finally:
        await redis.aclose()
    # While it waits, it says what for.
    assert len(said) == 1 and said[0].startswith("waiting for the stack (0s): Redis at 127.0.0.1:")
    assert quiet == []  # not before say_after
    assert all("secret" not in line for line in said)
    message = str(info.value)
    assert message.startswith(f"the stack was not healthy within 1s: Redis at 127.0.0.1:{port}/0 ")
    assert "does not answer: " in message and "secret" not in message


class _Consumer:
    """A feature consumer as ``wait_healthy`` sees it: given partitions after ``polls`` asks."""

    def __init__(self, polls: int = 0) -> None:
        self.polls, self.asked = polls, 0

    def assignment(self) -> set[str]:
        self.asked += 1
        return {"orders-0"} if self.asked > self.polls else set()


async def test_the_stack_is_healthy_once_redis_answers_and_every_consumer_has_partitions(
    redis: Redis,
) -> None:

    ready, late = _Consumer(), _Consumer(polls=3)
    await wait_healthy(Running(Settings(), redis, consumers=[ready, late]), timeout=60)  # type: ignore[list-item]
    assert late.asked == 4  # it waited for the last one, and no longer


async def test_a_stack_whose_consumers_get_no_partitions_says_so(redis: Redis) -> None:

    never = _Consumer(polls=10**9)
    with pytest.raises(StackError) as info:
        await wait_healthy(Running(Settings(), redis, consumers=[never]), timeout=1)  # type: ignore[list-item]
    assert str(info.value) == (
        "the stack was not healthy within 1s: "
        "the feature consumers were given no partitions of the orders topic"
    )
    assert never.asked > 1  # asked again and again, not once
    # Some consumers at work and some idle: more consumers than the topic has partitions.
    with pytest.raises(StackError) as info:
        await wait_healthy(Running(Settings(), redis, consumers=[_Consumer(), never]), timeout=1)  # type: ignore[list-item]
    assert str(info.value) == (
        "the stack was not healthy within 1s: 1 of 2 feature consumers were given no partition "
        "of the orders topic (a group puts no more consumers to work than the topic has "
        "partitions: fewer --consumers, or more partitions)"
    )


async def test_a_component_that_fails_while_starting_ends_the_wait(redis: Redis) -> None:

    async def fails() -> None:
        raise RuntimeError("the orders topic has no partitions")

    async def runs() -> None:
        await asyncio.Event().wait()

    cancelled = asyncio.create_task(runs())  # cancelled is not failed: the wait goes on
    tasks = [asyncio.create_task(runs()), cancelled]
    cancelled.cancel()
    running = Running(Settings(), redis, tasks=tasks, consumers=[_Consumer(polls=10**9)])  # type: ignore[list-item,arg-type]
    waiting = asyncio.create_task(wait_healthy(running, timeout=60))
    try:
        for _ in range(5):
            await asyncio.sleep(0.2)
        assert not waiting.done()
        tasks.append(asyncio.create_task(fails()))
        with pytest.raises(StackError) as info:
            await waiting  # within a poll, not at the minute's timeout
        assert str(info.value) == (
            "a component failed while starting: the orders topic has no partitions"
        )
    finally:
        for task in tasks:
            task.cancel()


async def test_up_on_running_servers_starts_none_and_runs_then_stops_retraining(
    broker: LocalProcess,
    redis_server: LocalProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Servers already listen: nothing is started (and so nothing of theirs stopped); the
    # archiver writes the log; retraining runs at the interval asked for and is cancelled at stop.
    import training.train as train_module
    from clv.replay import publish
    from feature_store.event_log import log_files
    from tests.consumers.kafka_helpers import event_message
    from tests.feature_store.streams import messy_events

    retraining: list[object] = []

    async def retrain_forever(_settings: object, interval_s: float, **_: object) -> None:
        retraining.append(interval_s)
        try:
            await asyncio.Event().wait()  # runs until cancelled, as the real one
        except asyncio.CancelledError:
            retraining.append("cancelled")
            raise

    monkeypatch.setattr(train_module, "retrain_forever", retrain_forever)
    settings = unique_settings(
        broker.address,
        redis_server.address,
        event_log_dir=tmp_path / "events",
        model_dir=tmp_path / "models",
        archive_flush_seconds=0.2,
    )

    async def on_ready(_running: object) -> None:
        await publish(settings, [event_message(e) for e in messy_events(3, users=5, per_user=4)])
        for _ in range(600):  # a bound, not a timing
            if retraining and log_files(settings.event_log_dir):
                return
            await asyncio.sleep(0.1)

    said: list[str] = []
    stop = asyncio.Event()
    run = run_stack(
        settings,
        stop,
        workdir=tmp_path / ".clv",
        retrain_every_s=7.0,
        on_ready=on_ready,
        say=said.append,
    )
    await asyncio.wait_for(run, 120)  # a retraining left running would hang the stop
    assert retraining == [7.0, "cancelled"]
    assert log_files(settings.event_log_dir)  # the archiver ran
    assert any(line.startswith("clv is up") for line in said)
    assert not any(line.startswith("started") for line in said), said
    assert not (tmp_path / ".clv").exists()  # no server's folder either
    # the servers it did not start are left running
    assert port_open(*redis_host_port(redis_server.address))
    assert port_open(*kafka_host_port(broker.address))


async def test_a_local_redis_server_listens_on_loopback_only_and_keeps_nothing_on_disk(
    tmp_path: Path,
) -> None:
    server = start_redis(free_port(), tmp_path / "redis")
    try:
        client: Redis = connect(server.address)
        try:
            assert await client.config_get("bind") == {"bind": "127.0.0.1"}
            assert await client.config_get("save") == {"save": ""}
            assert await client.config_get("appendonly") == {"appendonly": "no"}
            await client.set("kept", "1")
        finally:
            await client.aclose()
    finally:
        server.stop()
    # Stopped with nothing saved: a restart in the same folder starts empty.
    assert not list((tmp_path / "redis").glob("*.rdb"))
    again = start_redis(free_port(), tmp_path / "redis")
    try:
        client = connect(again.address)
        try:
            assert await client.get("kept") is None
        finally:
            await client.aclose()
    finally:
        again.stop()


def test_stopping_a_server_asks_it_to_end_before_killing_it(tmp_path: Path) -> None:
    server = start_redis(free_port(), tmp_path / "redis")
    server.stop()
    assert server.proc.returncode == 0  # redis-server's clean exit on SIGTERM, not -SIGKILL


def test_a_server_that_ignores_sigterm_is_killed_not_left_running(tmp_path: Path) -> None:
    ignores_sigterm = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", ignores_sigterm], stdout=subprocess.PIPE)
    stack = LocalStack([LocalProcess("stubborn", proc, "-")])
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        stack.processes[0].stop(timeout=0.5)
        assert proc.poll() is not None  # ended: killed after the grace period
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_starting_redis_where_a_server_already_listens_is_an_error(
    redis_server: LocalProcess, tmp_path: Path
) -> None:
    # The new redis-server cannot bind and exits; the other server's open port must not be
    # taken for it (clv would then "stop" a dead process and run on somebody else's Redis).
    _, port = redis_host_port(redis_server.address)
    with pytest.raises(StackError):
        start_redis(port, tmp_path / "redis")
    assert port_open("127.0.0.1", port)  # the other server is untouched


def test_server_addresses_are_read_as_the_clients_read_them() -> None:
    assert redis_host_port("redis://localhost/0") == ("localhost", 6379)
    assert redis_host_port("redis://:pw@10.0.0.5:6380/2") == ("10.0.0.5", 6380)
    assert kafka_host_port("127.0.0.1:9093,other:9094") == ("127.0.0.1", 9093)  # the first
    assert kafka_host_port(" broker:19092 ") == ("broker", 19092)
    # A host without a port is valid (CLV_KAFKA_BOOTSTRAP accepts it): Kafka's default port.
    assert kafka_host_port("localhost") == ("localhost", 9092)
    assert kafka_host_port("localhost,other:9094") == ("localhost", 9092)


def test_servers_are_started_only_for_local_addresses(tmp_path: Path) -> None:

    # Nothing listens there, but they are not this machine: clv must not start a server of
    # its own on 127.0.0.1 in their place.
    settings = Settings(
        redis_url=f"redis://redis.invalid:{free_port()}/0",
        kafka_bootstrap=f"kafka.invalid:{free_port()}",
    )
    stack = LocalStack()
    try:
        assert ensure_servers(settings, stack, tmp_path) == []
        assert stack.processes == []
    finally:
        stack.stop()
    assert not (tmp_path / "redis").exists() and not (tmp_path / "kafka").exists()


@pytest.mark.parametrize("user", ["", "clv"], ids=["password", "user-and-password"])
def test_a_redis_started_for_a_url_with_a_password_requires_it(tmp_path: Path, user: str) -> None:
    # Fails if (stack.py) the local redis-server is started without the URL's credentials:
    # the stack came up "healthy" on a server anyone on the machine could read and write.
    import redis

    port, password = free_port(), 's3 "cr\\et\nsé\r#'
    url = f"redis://{user}:{quote(password, safe='')}@127.0.0.1:{port}/0"
    stack = LocalStack()
    try:
        settings = Settings(redis_url=url, kafka_bootstrap=f"kafka.invalid:{free_port()}")
        assert ensure_servers(settings, stack, tmp_path) == [f"redis-server on 127.0.0.1:{port}"]
        with redis.Redis(port=port) as anyone:
            with pytest.raises(redis.AuthenticationError):
                anyone.ping()
        with redis.Redis.from_url(url) as client:
            assert client.ping()
        config = tmp_path / "redis" / "redis.conf"
        assert config.stat().st_mode & 0o777 == 0o600  # the password in no command line
        assert password not in " ".join(stack.processes[0].proc.args)  # type: ignore[arg-type]
    finally:
        stack.stop()


def test_a_server_that_exits_while_starting_is_said_to_have_exited(tmp_path: Path) -> None:
    # redis-server refuses an unknown option and exits: said at once, as what happened, not
    # waited out as a server that "did not listen"
    with pytest.raises(StackError) as info:
        start_redis(free_port(), tmp_path / "redis", "--no-such-option", "1")
    assert str(info.value) == "redis-server exited with code 1 while starting"


@pytest.mark.parametrize(
    "redis_url",
    [
        "redis+cluster://127.0.0.1:{port}",
        "redis://127.0.0.1:{port}/0?cluster=true",
        "rediss://127.0.0.1:{port}/0",
    ],
    ids=["cluster", "cluster-query", "tls"],
)
def test_no_plain_local_redis_is_started_for_a_cluster_or_tls_address(
    redis_url: str, tmp_path: Path
) -> None:

    # a plain, unencrypted redis-server there would only make the clients fail later, and
    # misleadingly ("started redis-server", then a cluster or TLS error)
    settings = Settings(
        redis_url=redis_url.format(port=free_port()), kafka_bootstrap=f"kafka.invalid:{free_port()}"
    )
    stack = LocalStack()
    try:
        assert ensure_servers(settings, stack, tmp_path) == []
    finally:
        stack.stop()


async def _up_with(
    settings: Settings,
    tmp_path: Path,
    consumers: int,
    on_ready: Callable[[Running], Awaitable[None]],
    say: Callable[[str], None],
) -> None:
    """run_stack without retraining, stopped once ``on_ready`` returns."""
    await asyncio.wait_for(
        run_stack(
            settings,
            asyncio.Event(),
            workdir=tmp_path / ".clv",
            consumers=consumers,
            retrain_every_s=None,
            on_ready=on_ready,
            say=say,
        ),
        120,
    )


def test_ctrl_c_mid_demo_stops_it_with_exit_130(tmp_path: Path) -> None:
    # Fails if the demo waits on, after a Ctrl-C during its replay (it waited up to 15 minutes
    # for commits from the consumers the Ctrl-C had stopped, and a second Ctrl-C did nothing),
    # or ends with exit 0 as if it had run to its end.
    proc, redis_port, kafka_port, _ = _clv_on_free_ports(tmp_path, "demo")
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends with the process, if it never replays
            lines.append(line)
            if "replaying CDNOW" in line:
                break
        assert any("replaying CDNOW" in line for line in lines), "".join(lines)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            pytest.fail("clv demo still ran 90 s after a Ctrl-C during its replay")
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 130, "".join(lines) + rest
    assert "stopped before the demo finished" in rest and "clv: interrupted" in rest, rest
    assert "Traceback" not in rest, rest
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    for _ in range(50):  # its servers are stopped with it
        if not (port_open("127.0.0.1", redis_port) or port_open("127.0.0.1", kafka_port)):
            break
        time.sleep(0.1)
    assert not port_open("127.0.0.1", redis_port) and not port_open("127.0.0.1", kafka_port)


async def test_a_group_that_is_slow_to_give_partitions_is_said_while_the_stack_waits(
    broker: LocalProcess,
    redis_server: LocalProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A consumer's start returns only once its group gives it partitions; a group held for
    # members that left (tansu after two members left in turn) kept `clv up` silent for as
    # long as that lasted. Fails if nothing is said while the consumers join.
    import clv.stack
    import consumers.feature_consumer

    real = consumers.feature_consumer.open_clients

    async def slow(*args: Any) -> Any:
        await asyncio.sleep(1.0)  # the group holds the join
        return await real(*args)

    monkeypatch.setattr(consumers.feature_consumer, "open_clients", slow)
    monkeypatch.setattr(clv.stack, "SAY_AFTER_S", 0.2)
    settings = unique_settings(broker.address, redis_server.address, event_log_dir=tmp_path / "e")

    async def on_ready(running: Running) -> None:
        return None

    said: list[str] = []
    await _up_with(settings, tmp_path, 1, on_ready, said.append)
    waited = [line for line in said if "have not given their consumers partitions" in line]
    assert waited and settings.consumer_group in waited[0], said
    assert said.index(waited[0]) < next(i for i, x in enumerate(said) if x.startswith("clv is up"))


async def test_up_runs_as_many_feature_consumers_as_asked_each_with_partitions(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path
) -> None:

    host, port = redis_host_port(redis_server.address)
    settings = unique_settings(
        broker.address,
        # a password in the URL (the server has none: any is taken): never said
        f"redis://default:s3cret@{host}:{port}/0",
        event_log_dir=tmp_path / "events",
    )
    seen: list[Running] = []

    async def on_ready(running: Running) -> None:
        seen.append(running)

    said: list[str] = []
    await _up_with(settings, tmp_path, 3, on_ready, said.append)
    [running] = seen
    assert len(running.consumers) == 3
    assert all(c.assignment() for c in running.consumers)  # healthy means every one has some
    # the three consumers, the archiver, the scorer and the API, all ended by the stop
    assert len(running.tasks) == 6 and all(t.done() for t in running.tasks)
    [up] = [line for line in said if line.startswith("clv is up")]
    assert "consumers=3 " in up and f"redis={host}:{port}/0 " in up
    assert up.endswith(f"API=http://127.0.0.1:{settings.api_port}")
    assert all("s3cret" not in line for line in said)


async def test_up_refuses_more_consumers_than_the_orders_topic_has_partitions(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path
) -> None:
    # Fails if the count is not checked against the topic itself (an existing topic may have
    # fewer partitions than CLV_ORDERS_PARTITIONS): the stack then waited a minute for the idle
    # consumers to get partitions and failed with "not healthy".
    settings = unique_settings(
        broker.address, redis_server.address, event_log_dir=tmp_path / "events"
    )
    await ensure_topics(settings, partitions=2)  # an existing topic: its own count counts
    ready: list[Running] = []

    async def on_ready(running: Running) -> None:
        ready.append(running)

    with pytest.raises(StackError) as err:
        await _up_with(settings, tmp_path, 3, on_ready, lambda _: None)
    assert str(err.value) == (
        f"--consumers 3 is more than the 2 partitions of {settings.orders_topic}: a consumer "
        "group puts at most one consumer on a partition; run 2 or fewer, or give the topic "
        "more partitions"
    )
    assert ready == []


async def _ended(run: asyncio.Task[None], what: str, within_s: float = 60) -> None:
    """``run`` ended within ``within_s`` (a bound, so that the test fails instead of hanging)."""
    done, _ = await asyncio.wait({run}, timeout=within_s)
    if not done:
        pytest.fail(f"the stack still ran {within_s:g} s after {what}")


async def test_what_runs_on_the_stack_failing_ends_the_stack_with_its_error(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path
) -> None:
    # Fails if on_ready's own failure (the demo's training failed) is dropped: the command
    # then exits 0 as if the demo had run.
    settings = unique_settings(broker.address, redis_server.address, event_log_dir=tmp_path / "e")
    seen: list[Running] = []

    async def on_ready(running: Running) -> None:
        seen.append(running)
        raise RuntimeError("training from the event log failed")

    with pytest.raises(RuntimeError, match="training from the event log failed"):
        await _up_with(settings, tmp_path, 1, on_ready, lambda _: None)
    assert all(t.done() for t in seen[0].tasks)  # the consumers and the archiver stopped


@pytest.mark.parametrize("waiting", [False, True], ids=["up", "demo"])
async def test_a_component_that_fails_while_running_stops_the_stack_and_is_named(
    broker: LocalProcess,
    redis_server: LocalProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    waiting: bool,
) -> None:
    # `clv up` (no on_ready): it runs until stopped, or until a component ends, which only a
    # failure does; then it stops the rest and raises, so that the command exits 1. The same
    # while on_ready runs (`clv demo`): what it waits for may never come once a component has
    # failed. Fails (demo) if on_ready is awaited whatever the components do.
    import training.train as train_module

    up = asyncio.Event()

    async def retrain_forever(_settings: object, _interval_s: float, **_: object) -> None:
        await up.wait()  # fails once the stack is up and running, not while it starts
        raise RuntimeError("the model directory vanished")

    async def on_ready(_running: Running) -> None:
        await asyncio.Event().wait()  # the demo waiting on the components

    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        if line.startswith("clv is up"):
            up.set()

    monkeypatch.setattr(train_module, "retrain_forever", retrain_forever)
    settings = unique_settings(
        broker.address,
        redis_server.address,
        event_log_dir=tmp_path / "events",
        model_dir=tmp_path / "models",
    )
    stop = asyncio.Event()
    run = asyncio.create_task(
        run_stack(
            settings,
            stop,
            workdir=tmp_path / ".clv",
            retrain_every_s=60.0,
            on_ready=on_ready if waiting else None,
            say=say,
        )
    )
    try:
        await _ended(run, "the failure", within_s=120)  # ended by the failure alone
    finally:
        stop.set()  # (a hung stack is ended here, so that a failure leaves nothing running)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    # the failure comes before healthy or after: either way it ends the stack
    with pytest.raises(StackError) as info:
        run.result()
    assert str(info.value) == (
        "a component of the stack failed: RuntimeError('the model directory vanished')"
    )
    assert any(line.startswith("clv is up") for line in said)


async def test_a_stop_ends_what_runs_on_the_stack_once_it_is_up(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path
) -> None:
    # `clv demo` waits on the stack once it is up (the consumers' commits of its replay, its
    # training). Fails if on_ready is awaited whatever the stop: a Ctrl-C stopped the consumers
    # and left the demo waiting, for up to 15 minutes, for commits they would never make. And
    # if its clean-up (the demo's: terminating its training run) is not waited for.
    settings = unique_settings(broker.address, redis_server.address, event_log_dir=tmp_path / "e")
    stop = asyncio.Event()
    seen: list[Running] = []
    cancelled: list[bool] = []

    async def on_ready(running: Running) -> None:
        seen.append(running)
        try:
            await asyncio.Event().wait()  # what stopped consumers never bring
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # a clean-up that takes a while
            cancelled.append(True)
            raise

    run = asyncio.create_task(
        run_stack(
            settings,
            stop,
            workdir=tmp_path / ".clv",
            retrain_every_s=None,
            on_ready=on_ready,
            say=lambda _: None,
        )
    )
    try:
        for _ in range(1200):  # a bound, not a timing: until the stack is up
            if seen or run.done():
                break
            await asyncio.sleep(0.1)
        assert seen, "the stack never got up"
        stop.set()  # what Ctrl-C does
        await _ended(run, "the stop")
    finally:
        stop.set()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    run.result()  # a stop is no failure
    assert cancelled == [True]
    assert all(t.done() for t in seen[0].tasks)  # the consumers and the archiver stopped


@pytest.mark.parametrize("silent", ["kafka", "redis"])
async def test_ctrl_c_while_the_stack_starts_stops_it_at_once(
    broker: LocalProcess,
    redis_server: LocalProcess,
    tmp_path: Path,
    silent: str,
) -> None:
    # A server that accepts connections but never answers (a port taken by something else, a
    # hung broker) keeps the start waiting for up to a minute: Ctrl-C must end that wait, not
    # be ignored until the client's or the health check's timeout.
    import socket

    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(64)  # accepted by the kernel, never answered
        address = f"127.0.0.1:{mute.getsockname()[1]}"
        settings = unique_settings(
            address if silent == "kafka" else broker.address,
            # a timeout longer than the bound below: the stop, not the client, must end it
            f"redis://{address}/0?socket_timeout=300"
            if silent == "redis"
            else redis_server.address,
            event_log_dir=tmp_path / "events",
            model_dir=tmp_path / "models",
        )
        said: list[str] = []
        stop = asyncio.Event()
        run = asyncio.create_task(
            run_stack(
                settings, stop, workdir=tmp_path / ".clv", retrain_every_s=None, say=said.append
            )
        )
        # Redis: long enough for the consumers to have joined their group, were the stack to
        # come up without an answer from Redis (it did, and then a stop waited for one)
        for _ in range(150 if silent == "redis" else 20):
            if run.done() or any(line.startswith("clv is up") for line in said):
                break
            await asyncio.sleep(0.1)
        assert not run.done(), said
        stop.set()  # what Ctrl-C does
        # not the 40 s client timeout, the 60 s health wait or Redis's socket_timeout (the
        # consumers' check of their new partitions waited it out, ignoring the stop)
        await asyncio.wait_for(run, 20)
    assert not any(line.startswith("clv is up") for line in said), said
    assert said[-1] == "stopped before the stack was up", said


def test_up_starts_no_plaintext_broker_for_tls_or_sasl_clients(tmp_path: Path) -> None:
    # Fails if clv up starts tansu (plaintext only) where CLV_KAFKA_SECURITY_PROTOCOL asks for
    # TLS: every client would then fail its handshake with a broker clv itself started.
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        redis_url="rediss://127.0.0.1:6390/0",  # not a plain address: no redis-server either
        kafka_security_protocol="SSL",
    )
    stack = LocalStack()
    try:
        assert ensure_servers(settings, stack, tmp_path) == []
    finally:
        stack.stop()
