"""What the demo says about its event log."""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

import clv.demo as demo
from clv.demo import events_not_replayed
from clv.local_stack import LocalProcess
from clv.settings import Settings
from consumers.kafka import read_topic
from feature_store.event_log import write_events
from feature_store.features import day_number
from feature_store.offline import events_from_orders
from tests.processes import flocks_on


def _orders(users: list[str], ids: list[str]) -> pd.DataFrame:
    return events_from_orders(
        pd.DataFrame(
            {
                "user_id": users,
                "order_id": ids,
                "ts": ["1997-01-01T10:00:00Z"] * len(users),
                "amount": [10.0] * len(users),
                "event_id": ids,
            }
        )
    )


def test_events_the_demo_did_not_replay_are_counted(tmp_path: Path) -> None:
    replayed = _orders(["a", "b"], ["1", "2"])
    write_events(tmp_path, replayed)
    write_events(tmp_path, replayed)  # a second demo appends the same events: none foreign
    assert events_not_replayed(tmp_path, replayed) == 0
    # a hand replay: a new user, and a known id under another user
    write_events(tmp_path, _orders(["c", "b"], ["3", "1"]))
    assert events_not_replayed(tmp_path, replayed) == 2


async def test_a_stopped_demo_leaves_no_training_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if the demo trains in a thread: cancelled (a Ctrl-C) while its run waited for
    # another run's turn on the event log (or fitted), the thread went on, took the turn once
    # it was free and trained after the demo had stopped.
    from training.registry import ModelRegistry

    monkeypatch.setattr(demo, "console", Console(file=io.StringIO()))
    settings = Settings(event_log_dir=tmp_path / "events", model_dir=tmp_path / "models")
    write_events(settings.event_log_dir, _orders(["a", "b"], ["1", "2"]))
    holder = os.open(settings.event_log_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another training run's turn
        task = asyncio.create_task(demo.train_champion(settings))
        for _ in range(1200):  # a bound, not a timing: the run starts, then waits for the turn
            if task.done() or any(waits for _, waits in flocks_on(settings.event_log_dir)):
                break
            await asyncio.sleep(0.1)
        assert not task.done()
        [waiter] = [pid for pid, waits in flocks_on(settings.event_log_dir) if waits]
        # a child, in a process group of its own: a terminal's Ctrl-C reaches the demo alone
        assert waiter != os.getpid() and os.getpgid(waiter) == waiter
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=30)
        if not done:
            pytest.fail("the demo's training still ran 30 s after it was cancelled")
    finally:
        os.close(holder)  # the other run ends
    assert task.cancelled()
    for _ in range(20):  # for two seconds: nothing takes the turn the other run left
        assert flocks_on(settings.event_log_dir) == []
        await asyncio.sleep(0.1)
    assert ModelRegistry(settings.model_dir).versions() == []


@pytest.mark.parametrize(
    ("script", "says"),
    [
        ("echo 'error: the event log holds no purchase' >&2; exit 1", "failed (exit 1)"),
        ("kill -9 $$", "was killed by SIGKILL (out of memory?)"),
    ],
    ids=["fails", "killed"],
)
async def test_a_demo_training_run_that_fails_is_an_error_that_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, says: str
) -> None:
    # A stand-in interpreter for the training child. Fails if the demo takes a failed run for
    # a trained model (and goes on to a champion that is not there or is an old one), or
    # reports a run the kernel killed as "exit -9".
    from clv.errors import ClvError

    out = io.StringIO()
    monkeypatch.setattr(demo, "console", Console(file=out, width=132))
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\n{script}\n")
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    settings = Settings(event_log_dir=tmp_path / "events", model_dir=tmp_path / "models")
    with pytest.raises(ClvError) as info:
        await demo.train_champion(settings)
    assert str(info.value) == f"training from the event log {settings.event_log_dir} {says}"
    if "exit 1" in says:  # what the run said is shown
        assert "error: the event log holds no purchase" in out.getvalue()


def _on_the_sample(monkeypatch: pytest.MonkeyPatch, data_dir: Path, tmp_path: Path) -> io.StringIO:
    """The demo replays the CDNOW sample (a tenth of the data: seconds, not minutes) and prints
    into the returned buffer."""
    package = tmp_path / "package"
    (package / "data").mkdir(parents=True)
    shutil.copy(data_dir / "CDNOW_sample.txt.gz", package / "data" / "CDNOW_master.txt.gz")
    monkeypatch.setattr(demo, "files", lambda _name: package)
    out = io.StringIO()
    monkeypatch.setattr(demo, "console", Console(file=out, width=132))
    return out


@pytest.fixture
def sample_demo(
    broker: LocalProcess,
    redis_server: LocalProcess,
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[io.StringIO, Settings, str]:
    """The demo on the sample (:func:`_on_the_sample`): what it prints, its settings, and the
    sample's biggest spender."""
    from clv.replay import load_events

    events = load_events(data_dir / "CDNOW_sample.txt.gz", "cdnow")
    top = str(events.groupby("user_id")["amount"].sum().idxmax())
    out = _on_the_sample(monkeypatch, data_dir, tmp_path)
    return out, _settings(broker, redis_server, tmp_path), top


def _settings(broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path) -> Settings:
    from tests.consumers.kafka_helpers import unique_settings

    return unique_settings(
        broker.address,
        redis_server.address,
        event_log_dir=tmp_path / "events",
        model_dir=tmp_path / "models",
        archive_flush_seconds=0.5,
    )


@pytest.mark.integration
async def test_the_demo_replays_the_data_finds_online_equal_to_offline_and_trains_once(
    broker: LocalProcess,
    redis_server: LocalProcess,
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from training.registry import ModelRegistry

    caplog.set_level(logging.INFO, logger="training.train")

    out = _on_the_sample(monkeypatch, data_dir, tmp_path)
    settings = _settings(broker, redis_server, tmp_path)
    assert await asyncio.wait_for(demo.run_demo(settings, asyncio.Event()), 600) is True
    said = out.getvalue()
    # the orders up to 1997-12-31 first (5,728 of the 6,919) + 3 broken ones, then the rest
    assert "published and applied 5,731 messages" in said
    assert "replaying the rest: 1,191 orders after 1997-12-31" in said
    assert "online features == offline features (same code over the file): True" in said
    assert f"dead-letter topic {settings.dlq_topic}: 3 message(s)" in said
    for reason in ("not_json", "invalid_value", "future_timestamp"):
        assert reason in said
    assert "did not replay" not in said  # the log holds the replay and nothing else
    assert "`clv demo --keep-running` keeps the stack up" in said  # and it did not
    # trained once, by the demo itself: no retraining runs alongside
    assert len(ModelRegistry(settings.model_dir).versions()) == 1
    assert not [r for r in caplog.records if r.getMessage().startswith("retraining")]
    assert "champion " in said
    # the training child's progress and its one line, printed by the demo as they came
    assert "[train " in said and "promoted to champion: first model" in said
    assert "--until 1997-12-31: 0 later events left out" in said  # trained on the first part
    # the scorer scored everyone as of each part's end; the API answered from its scores
    [version] = ModelRegistry(settings.model_dir).versions()
    for day in ("1997-12-31", "1998-06-30"):
        assert f"the scorer scored 2,357 customers as of {day} with {version}" in said
    assert "GET /users/top?limit=5 (2,357 ranked)" in said and '"segment"' in said
    assert '"score_source": "stored"' in said  # the top customer's answer, as the scorer stored it
    # time passing: valuable customers who stopped buying were alerted on, each once
    alerts = [json.loads(r.value) for r in await read_topic(settings, settings.alerts_topic)]
    assert f"churn-risk alerts on {settings.alerts_topic}: {len(alerts):,}" in said
    assert alerts and len({a["alert_id"] for a in alerts}) == len(alerts)
    assert all(a["drop_pct"] >= settings.alert_drop_pct for a in alerts)


@pytest.mark.integration
async def test_the_demo_says_when_redis_holds_orders_the_file_has_not_and_keeps_running(
    sample_demo: tuple[io.StringIO, Settings, str],
) -> None:
    from clv.replay import publish
    from consumers.kafka import ensure_topics
    from feature_store.events import encode_event

    # An earlier `clv replay` left one more order of the biggest spender on the topic: the
    # online features then differ from the file's, and the demo must not say they are equal.
    out, settings, top = sample_demo
    extra = encode_event(
        event_id="extra-1", user_id=top, order_id="extra-1", amount=99.0, ts="1997-06-01T00:00:00Z"
    )
    await ensure_topics(settings)
    await publish(settings, [(top.encode(), extra)])

    stop = asyncio.Event()
    run = asyncio.create_task(demo.run_demo(settings, stop, keep_running=True))
    try:
        for _ in range(6000):  # a bound, not a timing
            if "Ctrl-C stops the stack" in out.getvalue() or run.done():
                break
            await asyncio.sleep(0.1)
        for _ in range(5):
            await asyncio.sleep(0.1)
            assert not run.done(), out.getvalue()  # it waits for the stop
    finally:
        stop.set()
    assert await asyncio.wait_for(run, 120) is True  # ran to its end, then waited
    said = out.getvalue()
    assert "online features == offline features (same code over the file): False" in said
    assert "also holds 1 event the demo did not replay" in said


@pytest.mark.integration
async def test_a_demo_on_a_redis_holding_an_earlier_runs_state_keeps_its_own_under_a_new_prefix(
    sample_demo: tuple[io.StringIO, Settings, str],
) -> None:
    # Fails if (demo.py) the demo replays over the state a Redis that outlived an earlier
    # demo holds (a system service): its look back at 1997-12-31 then failed with "as_of day
    # ... is before the user's latest event day" (exit 1) on every run after the first.
    from feature_store.redis_client import connect
    from feature_store.redis_store import FeatureStore
    from tests.feature_store.streams import MS_PER_DAY, _ev

    out, settings, top = sample_demo
    redis = connect(settings.redis_url)
    try:
        earlier = FeatureStore(redis, prefix=settings.key_prefix)  # the earlier run's, 1998
        late = _ev("e1", "purchase", top, "o1", 1000, day_number(dt.date(1998, 6, 1)) * MS_PER_DAY)
        await earlier.apply([late], group="g", progress={"orders:0": 0}, now_ms=0)
        before = await earlier.read_state(top)
        assert await asyncio.wait_for(demo.run_demo(settings, asyncio.Event()), 600) is True
        said = out.getvalue()
        new = f"{settings.key_prefix}-demo2"
        assert f"already holds clv state under '{settings.key_prefix}'" in said
        assert f"keeps its state under '{new}'" in said
        assert "online features == offline features (same code over the file): True" in said
        assert await earlier.read_state(top) == before  # the earlier state is left as it was
        assert await FeatureStore(redis, prefix=new).read_state(top) is not None
    finally:
        await redis.aclose()


@pytest.mark.integration
async def test_the_demo_judges_a_prefix_by_its_own_keys_only(redis_server: LocalProcess) -> None:
    # Fails if (demo.py) the prefix is matched as a glob: "clv*" took another's keys for its own
    from feature_store.redis_client import connect

    settings = Settings(redis_url=redis_server.address, key_prefix="t[1]*")
    redis = connect(settings.redis_url)
    try:
        await redis.hset("t1x:{u1}", "h", "1")  # matched by the glob t[1]*, not the prefix
        assert await demo._unused_prefix(settings) == "t[1]*"
        await redis.hset("t[1]*:{u1}", "h", "1")
        assert await demo._unused_prefix(settings) == "t[1]*-demo2"
    finally:
        await redis.delete("t1x:{u1}", "t[1]*:{u1}")
        await redis.aclose()


def test_a_ctrl_c_while_the_demo_looks_at_a_redis_that_does_not_answer_ends_it(
    tmp_path: Path,
) -> None:
    # Fails if (demo.py) the look for state under the key prefix is not raced with the stop:
    # a Redis that accepts and never answers held a Ctrl-C for the URL's socket timeout.
    import signal

    from tests.test_cli import signalled_while_redis_is_mute

    code, err = signalled_while_redis_is_mute(
        tmp_path,
        signal.SIGINT,
        "demo",
        CLV_KAFKA_BOOTSTRAP="127.0.0.1:1",
        CLV_MODEL_DIR=str(tmp_path / "models"),
    )
    assert code == 130, err
    assert err.strip().splitlines()[-1] == "clv: interrupted", err
