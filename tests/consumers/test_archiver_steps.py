"""The archiver's commits after a rebalance and after a refused commit. Fakes on purpose (as
test_feature_consumer_steps.py): a commit refused on demand is a fault the real broker does not
produce."""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError, KafkaConnectionError, RequestTimedOutError
from aiokafka.structs import ConsumerRecord

from clv.settings import Settings
from consumers.archiver import Archiver
from feature_store.event_log import read_events

from .test_feature_consumer_steps import event

P0, P1 = TopicPartition("orders", 0), TopicPartition("orders", 1)


def record(tp: TopicPartition, offset: int, event_id: str) -> ConsumerRecord[bytes, bytes]:
    value = event(event_id)
    return ConsumerRecord(
        tp.topic, tp.partition, offset, 0, 0, b"u1", value, None, 2, len(value), ()
    )


class FakeConsumer:
    """Hands out its batches (a ``None`` revokes P1, as a rebalance would), then stops the run.
    A commit of a partition it does not own is refused as aiokafka refuses it."""

    def __init__(self, stop: asyncio.Event, batches: list[Any]) -> None:
        self.stop, self.batches = stop, list(batches)
        self.assigned = {P0, P1}
        self.committed: dict[TopicPartition, int] = {}
        self.failures: list[Exception] = []  # raised by the next commits, in turn

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, Any]:
        await asyncio.sleep(0)
        while self.batches and self.batches[0] is None:
            self.batches.pop(0)
            self.assigned = {P0}
        if not self.batches:
            self.stop.set()
            return {}
        batch: list[ConsumerRecord[bytes, bytes]] = self.batches.pop(0)
        out: dict[TopicPartition, Any] = {}
        for r in batch:
            out.setdefault(TopicPartition(r.topic, r.partition), []).append(r)
        return out

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        for tp in offsets:
            if tp not in self.assigned:
                raise IllegalStateError(f"Partition {tp} is not assigned")
        self.committed.update(offsets)


def _archiver(tmp_path: Path, consumer: FakeConsumer) -> Archiver:
    s = Settings(event_log_dir=tmp_path, archive_flush_events=1)  # a flush per batch
    return Archiver(s, consumer, tmp_path)


async def test_after_a_rebalance_the_archiver_commits_only_what_it_still_owns(
    tmp_path: Path,
) -> None:
    # Fails if flush() no longer clears the offsets it committed: after a rebalance every
    # commit names the revoked partition too, is refused whole, and the archiver commits
    # nothing more until a restart (which re-writes everything since).
    stop = asyncio.Event()
    kafka = FakeConsumer(
        stop,
        [
            [record(P0, 0, "a"), record(P1, 0, "b")],
            None,  # P1 goes to another member
            [record(P0, 1, "c")],
            [record(P0, 2, "d")],
        ],
    )
    archiver = _archiver(tmp_path, kafka)
    await asyncio.wait_for(archiver.run(stop), timeout=30)
    assert kafka.committed == {P0: 3, P1: 1}
    assert sorted(read_events(tmp_path)["event_id"]) == ["a", "b", "c", "d"]


async def test_a_refused_archiver_commit_is_made_good_by_the_next_one(tmp_path: Path) -> None:
    # Fails if a commit refused with a KafkaError other than a rebalance is no longer logged
    # and passed over: it stops the archiver (and with it `clv up`) over offsets that the next
    # flush commits anyway; the events were written, readers drop the repeats.
    stop = asyncio.Event()
    kafka = FakeConsumer(stop, [[record(P0, 0, "a")], [record(P0, 1, "b")]])
    kafka.failures = [RequestTimedOutError()]
    archiver = _archiver(tmp_path, kafka)
    await asyncio.wait_for(archiver.run(stop), timeout=30)
    assert kafka.committed == {P0: 2}
    assert archiver.written == 2
    assert sorted(read_events(tmp_path)["event_id"]) == ["a", "b"]


async def test_the_archiver_removes_temporary_parts_left_by_a_killed_one(tmp_path: Path) -> None:
    # Fails if Archiver.run no longer clears them: every archiver killed mid-write leaves one.
    left = tmp_path / "date=1997-01-01" / ".part-dead.parquet.tmp"
    left.parent.mkdir()
    left.write_bytes(b"PAR1")
    os.utime(left, (0, 0))
    stop = asyncio.Event()
    await _archiver(tmp_path, FakeConsumer(stop, [[record(P0, 0, "a")]])).run(stop)
    assert not left.exists()
    assert len(read_events(tmp_path)) == 1


@pytest.mark.parametrize("how", ["stopped mid-flush", "stopped", "cancelled"])
async def test_a_stopping_archiver_does_not_wait_on_a_commit_the_coordinator_does_not_answer(
    how: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Fails if a stopping archiver waits on a commit for as long as the group coordinator does
    # not answer (the client retries without end): `clv archive` then never exits on SIGTERM.
    # "stopped mid-flush": one event per flush, the commit hangs in a flush of the running loop
    # and the stop comes during it; "stopped": the stop's own last flush commits; "cancelled":
    # the task is cancelled outright and flushes on its way out. Each time the part is written,
    # the offsets are left uncommitted (re-written after the restart, deduplicated) and not
    # recorded as committed for the lag, and the commit left running ends later without
    # asyncio logging its failure as never retrieved.
    import consumers.archiver
    import consumers.kafka

    monkeypatch.setattr(consumers.kafka, "COMMIT_ON_STOP_S", 0.05)
    recorded: list[object] = []
    monkeypatch.setattr(consumers.archiver, "record_commit", lambda *a: recorded.append(a))
    fetched, committing, answer = asyncio.Event(), asyncio.Event(), asyncio.Event()

    class Unanswered(FakeConsumer):
        async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, Any]:
            out = await super().getmany(timeout_ms, max_records)
            fetched.set()
            return out

        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            committing.set()
            await asyncio.shield(self._request())  # as aiokafka's commit: the request shielded

        async def _request(self) -> None:
            await answer.wait()
            raise KafkaConnectionError("the client was closed")

    stop = asyncio.Event()
    # cancelled: the fake's own event, so that running out of batches is no stop
    kafka = Unanswered(asyncio.Event() if how == "cancelled" else stop, [[record(P0, 0, "e1")]])
    flush_events = 1 if how == "stopped mid-flush" else 10
    s = Settings(event_log_dir=tmp_path, archive_flush_events=flush_events)
    run = asyncio.create_task(Archiver(s, kafka, tmp_path).run(stop))
    if how == "cancelled":
        await asyncio.wait_for(fetched.wait(), timeout=30)
        run.cancel()
    else:
        await asyncio.wait_for(committing.wait(), timeout=30)
        stop.set()
    done, _ = await asyncio.wait({run}, timeout=30)  # a bound for a hang, not a timing
    if not done:
        answer.set()
        pytest.fail(f"the archiver was still running 30 s after it was {how}")
    assert run.cancelled() if how == "cancelled" else run.result() is None
    assert list(read_events(tmp_path)["event_id"]) == ["e1"]
    assert kafka.committed == {} and recorded == []
    assert "archiver stopping without its last commit" in caplog.text
    answer.set()
    for _ in range(20):
        await asyncio.sleep(0)
    gc.collect()
    assert "never retrieved" not in caplog.text
