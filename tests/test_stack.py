"""``clv up`` on addresses where nothing runs: it starts Redis and the broker, runs, and on
Ctrl-C stops everything it started."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from clv.local_stack import LocalProcess, free_port, kafka_host_port, port_open, redis_host_port
from tests.processes import children

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
def test_up_starts_local_servers_and_stops_them_on_ctrl_c(tmp_path: Path, sig: int) -> None:
    redis_port, kafka_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLV_")}
    env.update(
        CLV_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        CLV_KAFKA_BOOTSTRAP=f"127.0.0.1:{kafka_port}",
        CLV_EVENT_LOG_DIR=str(tmp_path / "events"),
        CLV_MODEL_DIR=str(tmp_path / "models"),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "clv", "up", "--retrain-every", "0"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a group of its own, like a terminal's foreground job
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
        # A terminal's Ctrl-C (or its closing) goes to the whole foreground group: the servers
        # must not take it, or they die before the consumers finish and commit (or outlive a
        # clv that a hangup killed).
        pids = children(proc.pid)
        assert len(pids) == 2 and all(os.getpgid(p) != proc.pid for p in pids)
        os.killpg(proc.pid, sig)
        assert proc.wait(60) == 0, "".join(lines) + (proc.stdout.read() or "")
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
    from clv.errors import StackError
    from clv.settings import Settings
    from clv.stack import Running, wait_healthy
    from feature_store.redis_client import connect

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
    from clv.settings import Settings
    from clv.stack import Running, wait_healthy

    ready, late = _Consumer(), _Consumer(polls=3)
    await wait_healthy(Running(Settings(), redis, consumers=[ready, late]), timeout=60)  # type: ignore[list-item]
    assert late.asked == 4  # it waited for the last one, and no longer


async def test_a_stack_whose_consumers_get_no_partitions_says_so(redis: Redis) -> None:
    from clv.errors import StackError
    from clv.settings import Settings
    from clv.stack import Running, wait_healthy

    never = _Consumer(polls=10**9)
    with pytest.raises(StackError) as info:
        await wait_healthy(Running(Settings(), redis, consumers=[_Consumer(), never]), timeout=1)  # type: ignore[list-item]
    assert str(info.value) == (
        "the stack was not healthy within 1s: "
        "the feature consumers were given no partitions of the orders topic"
    )
    assert never.asked > 1  # asked again and again, not once


async def test_a_component_that_fails_while_starting_ends_the_wait(redis: Redis) -> None:
    from clv.errors import StackError
    from clv.settings import Settings
    from clv.stack import Running, wait_healthy

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
    from clv.stack import run_stack
    from feature_store.event_log import log_files
    from tests.consumers.kafka_helpers import event_message, unique_settings
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
