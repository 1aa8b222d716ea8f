"""Stored scores: one hash per user in the user's Redis Cluster slot, and the rankings.

``<prefix>:score:{<user>}`` holds the latest score (value, purchases expected, ``p_alive``,
churn risk, segment, model version, as-of day, when), what the API answers with it (the
features as JSON, the explanation, the digest of the state they were computed from) and the
alert state: the reference value a drop is measured from and the id of the alert already sent
for that drop.
``<prefix>:top`` ranks every scored user by value; ``<prefix>:top:<segment>`` each segment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from feature_store.redis_store import AnyRedis, user_key
from service.scoring import SEGMENTS

#: What ``/users/top`` and the scorer read back of a stored score.
PUBLIC_FIELDS = (
    "clv",
    "expected_orders",
    "p_alive",
    "churn_risk",
    "segment",
    "model_version",
    "as_of",
    "scored_at",
)


#: What the API answers from, after :data:`PUBLIC_FIELDS`.
ANSWER_FIELDS = (*PUBLIC_FIELDS, "state", "features", "explanation")


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """The scorer's score of one user, with the features and the explanation it stored."""

    clv: float
    expected_orders: float
    p_alive: float
    churn_risk: float
    segment: str
    scored_at: str
    features: dict[str, Any]
    explanation: list[dict[str, Any]]


def text_of(v: Any) -> str:
    """A Redis reply's bytes as text."""
    return v.decode() if isinstance(v, bytes) else str(v)


class ScoreStore:
    def __init__(self, redis: AnyRedis, *, prefix: str = "clv") -> None:
        self._redis = redis
        self._prefix = prefix

    def score_key(self, user_id: str) -> str:
        return user_key(f"{self._prefix}:score", user_id)

    def top_key(self, segment: str | None = None) -> str:
        return f"{self._prefix}:top" if segment is None else f"{self._prefix}:top:{segment}"

    # The scorers' shared records: which clock the scores follow, the last sweep ("day:model"),
    # the lock of the sweep in progress.
    @property
    def clock_key(self) -> str:
        return f"{self._prefix}:clock"

    @property
    def swept_key(self) -> str:
        return f"{self._prefix}:swept"

    @property
    def lock_key(self) -> str:
        return f"{self._prefix}:sweep-lock"

    async def recorded_clock(self) -> str | None:
        raw = await self._redis.get(self.clock_key)
        return None if raw is None else text_of(raw)

    async def record_clock(self, clock: str) -> str:
        """Record ``clock`` unless one is recorded; the clock recorded."""
        await self._redis.set(self.clock_key, clock, nx=True)
        return await self.recorded_clock() or clock

    async def last_sweep(self) -> str | None:
        raw = await self._redis.get(self.swept_key)
        return None if raw is None else text_of(raw)

    async def read(self, user_ids: Sequence[str]) -> list[dict[str, str] | None]:
        """Each user's stored score, ``None`` where there is none."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for u in user_ids:
                pipe.hgetall(self.score_key(u))
            raws = await pipe.execute()
        return [{text_of(k): text_of(v) for k, v in raw.items()} or None for raw in raws]

    async def write(self, rows: Sequence[tuple[str, Mapping[str, str], str | None]]) -> None:
        """``(user, fields, previous segment)`` each: the score, and the rankings."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for user, fields, before in rows:
                pipe.hset(self.score_key(user), mapping={k: v for k, v in fields.items()})
                value = float(fields["clv"])
                pipe.zadd(self.top_key(), {user: value})
                pipe.zadd(self.top_key(fields["segment"]), {user: value})
                if before is not None and before != fields["segment"]:
                    pipe.zrem(self.top_key(before), user)
            await pipe.execute()

    async def answer(
        self, user_id: str, *, model_version: str, as_of: str, state: str
    ) -> StoredAnswer | None:
        """The stored score of ``user_id`` if it is the score of the state with digest
        ``state`` (:func:`feature_store.redis_store.state_digest`) as of day ``as_of`` by
        model ``model_version``, exactly what scoring them now would give; else ``None``."""
        raw = await self._redis.hmget(self.score_key(user_id), ANSWER_FIELDS)
        got = dict(
            zip(ANSWER_FIELDS, (None if v is None else text_of(v) for v in raw), strict=True)
        )
        if (
            got["model_version"] != model_version
            or got["as_of"] != as_of
            or got["state"] != state
            or got["features"] is None
            or got["explanation"] is None
        ):
            return None
        return StoredAnswer(
            clv=float(got["clv"]),  # type: ignore[arg-type]
            expected_orders=float(got["expected_orders"]),  # type: ignore[arg-type]
            p_alive=float(got["p_alive"]),  # type: ignore[arg-type]
            churn_risk=float(got["churn_risk"]),  # type: ignore[arg-type]
            segment=str(got["segment"]),
            scored_at=str(got["scored_at"]),
            features=json.loads(got["features"]),
            explanation=json.loads(got["explanation"]),
        )

    async def value_at_share(self, share: float) -> tuple[int, float | None]:
        """How many users are ranked, and the value a user needs to be in the top ``share``
        of them (None: nobody ranked)."""
        n = await self._redis.zcard(self.top_key())
        if not n:
            return 0, None
        rank = max(0, min(n - 1, int(n * share) - 1))
        got = await self._redis.zrevrange(self.top_key(), rank, rank, withscores=True)
        return int(n), float(got[0][1]) if got else None

    async def top(self, limit: int, segment: str | None = None) -> tuple[int, list[dict[str, Any]]]:
        """How many users the ranking holds, and its first ``limit`` with their scores."""
        key = self.top_key(segment)
        count = await self._redis.zcard(key)
        ranked = await self._redis.zrevrange(key, 0, limit - 1)
        users = [text_of(u) for u in ranked]
        async with self._redis.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.hmget(self.score_key(u), PUBLIC_FIELDS)
            values = await pipe.execute()
        out = []
        for user, vals in zip(users, values, strict=True):
            if vals[0] is None:  # erased between the two reads
                continue
            row: dict[str, Any] = {"user_id": user}
            for name, v in zip(PUBLIC_FIELDS, vals, strict=True):
                text = text_of(v)
                row[name] = (
                    float(text)
                    if name in ("clv", "expected_orders", "p_alive", "churn_risk")
                    else text
                )
            out.append(row)
        return int(count), out

    async def forget(self, user_id: str) -> int:
        """Remove the user's score and ranking entries; how many keys and entries went."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.score_key(user_id))
            pipe.zrem(self.top_key(), user_id)
            for s in SEGMENTS:
                pipe.zrem(self.top_key(s), user_id)
            return sum(int(n) for n in await pipe.execute())
