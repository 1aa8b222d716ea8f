"""``clv up`` on addresses where nothing runs: it starts Redis and the broker, runs, and on
Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clv.local_stack import free_port, port_open

pytestmark = pytest.mark.integration


def test_up_starts_local_servers_and_stops_them_on_ctrl_c(tmp_path: Path) -> None:
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
        # A terminal's Ctrl-C goes to the whole foreground group: the servers must not take
        # it too, or they die before the consumers finish and commit.
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0, "".join(lines) + (proc.stdout.read() or "")
        rest = proc.stdout.read()
        assert "Traceback" not in rest and "Unable connect" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    for _ in range(50):
        if not port_open("127.0.0.1", redis_port) and not port_open("127.0.0.1", kafka_port):
            break
        time.sleep(0.1)
    assert not port_open("127.0.0.1", redis_port), "redis-server left running"
    assert not port_open("127.0.0.1", kafka_port), "broker left running"


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
    finally:
        await redis.aclose()
    # While it waits, it says what for.
    assert said and said[0].startswith("waiting for the stack (0s): Redis at 127.0.0.1:"), said
    assert all("secret" not in line for line in said)
    message = str(info.value)
    assert message.startswith(f"the stack was not healthy within 1s: Redis at 127.0.0.1:{port}/0 ")
    assert "does not answer: " in message and "secret" not in message
