"""Two scorers ranking one user at once, with two segments (a sweep's score and a change's,
or the states before and after an event): whatever order Redis applies their commands in,
the user ends on exactly one segment's ranking. The commands each ranking sends are recorded
(the fake client is the point: it only records) and every interleaving of them is replayed
on a real Redis."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Mapping
from typing import Any

import pytest

from clv.local_stack import LocalProcess
from feature_store.redis_client import connect
from service.scores import ScoreStore
from service.scoring import SEGMENTS

Command = tuple[str, tuple[Any, ...], dict[str, Any]]


class _Recorder:
    """Stands for the Redis client: records what a ranking sends and sends nothing. Each unit
    is what Redis applies without another client's command in between: one command, or all of
    a MULTI/EXEC pipeline's."""

    def __init__(self) -> None:
        self.units: list[list[Command]] = []
        self._transaction = False
        self._stack: list[Command] = []

    def pipeline(self, transaction: bool = False) -> _Recorder:
        self._transaction = bool(transaction)
        return self

    async def __aenter__(self) -> _Recorder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            self._stack.append((name, args, kwargs))

        return record

    async def execute(self) -> list[Any]:
        if self._transaction:
            self.units.append(self._stack)
        else:
            self.units.extend([c] for c in self._stack)
        self._stack = []
        return []


async def _units_of(prefix: str, rows: list[tuple[str, Mapping[str, str]]]) -> list[list[Command]]:
    """What ``ScoreStore.rank(rows)`` sends, in order, as units applied without interleaving."""
    rec = _Recorder()
    await ScoreStore(rec, prefix=prefix).rank(rows)  # type: ignore[arg-type]
    return rec.units


@pytest.mark.integration
async def test_two_rankings_of_one_user_at_once_leave_it_on_one_segment(
    redis_server: LocalProcess,
) -> None:
    redis = connect(redis_server.address)
    try:
        prefix = f"race-{uuid.uuid4().hex[:8]}"
        store = ScoreStore(redis, prefix=prefix)
        early, late = SEGMENTS[0], SEGMENTS[-1]
        # replica A ranks u on the last segment, replica B on the first (two scores of u
        # decided at once: e.g. a sweep's and a change's, or the states before and after an
        # event), and Redis interleaves the two pipelines' commands in any order
        a = await _units_of(prefix, [("u", {"clv": "1.0", "segment": late})])
        b = await _units_of(prefix, [("u", {"clv": "2.0", "segment": early})])
        bad = []
        for where in itertools.combinations(range(len(a) + len(b)), len(a)):
            await redis.delete(*(store.top_key(s) for s in (None, *SEGMENTS)))
            ia, ib = iter(a), iter(b)
            for i in range(len(a) + len(b)):
                unit = next(ia) if i in where else next(ib)
                async with redis.pipeline(transaction=len(unit) > 1) as pipe:
                    for name, args, kwargs in unit:
                        getattr(pipe, name)(*args, **kwargs)
                    await pipe.execute()
            on = [s for s in SEGMENTS if await redis.zscore(store.top_key(s), "u") is not None]
            if len(on) != 1:
                bad.append((where, on))
        assert not bad, f"{len(bad)} interleavings leave u on {bad[0][1]}, e.g. {bad[0][0]}"
    finally:
        await redis.aclose()


@pytest.mark.integration
async def test_rankings_under_their_old_names_are_adopted_once_and_deleted(
    redis_server: LocalProcess,
) -> None:
    # The rankings' names up to 1f1e89c, left by an upgrade (or an older replica still
    # running): each user not ranked under the current names is ranked on its old segment;
    # one ranked since keeps its current ranking (never two segments); the old keys go.
    redis = connect(redis_server.address)
    try:
        store = ScoreStore(redis, prefix=f"adopt-{uuid.uuid4().hex[:8]}")
        a, b, c = SEGMENTS[0], SEGMENTS[1], SEGMENTS[-1]
        users = {f"u{i}": float(i) for i in range(7)}  # more than a ZSCAN chunk of 3
        await redis.zadd(store.legacy_top_key(), {**users, "since": 1.0})
        await redis.zadd(store.legacy_top_key(a), {u: v for u, v in users.items() if u != "u6"})
        await redis.zadd(store.legacy_top_key(b), {"u6": 6.0, "since": 1.0})
        await store.rank([("since", {"clv": "9.5", "segment": c})])
        assert await store.adopt_legacy_rankings(count=3) == 7
        assert await redis.zrange(store.top_key(a), 0, -1) == [f"u{i}".encode() for i in range(6)]
        assert await redis.zrange(store.top_key(b), 0, -1, withscores=True) == [(b"u6", 6.0)]
        assert await redis.zscore(store.top_key(c), "since") == 9.5
        assert await redis.zcard(store.top_key()) == 8
        assert await redis.zscore(store.top_key(), "since") == 9.5
        for segment in (None, *SEGMENTS):
            assert not await redis.exists(store.legacy_top_key(segment))
        assert await store.adopt_legacy_rankings() == 0  # nothing left: nothing done
    finally:
        await redis.aclose()
